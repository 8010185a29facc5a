"""The ingress's request router (cluster/serving/routing.py): balance by tokens in flight, prefix affinity,
its overload escape, and the bookkeeping around them. Pure Python."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from epserve.cluster.serving.routing import RequestRouter

BS = 16


def tokens(seed: int, n: int) -> list[int]:
    """``n`` token ids that share no block with another seed's."""
    return [seed * 100_000 + j for j in range(n)]


def split_within(counts: list[int], low: float = 0.4) -> bool:
    return all(c >= low * sum(counts) for c in counts)


# ---- balance ------------------------------------------------------------------------------------------
def test_burst_of_equal_requests_splits_evenly():
    router = RequestRouter(2, block_size=BS)
    for k in range(64):
        router.choose(tokens(k, 40), 300)
    assert router.stats.routed == [32, 32]
    assert router.load() == [32 * 300, 32 * 300]
    assert router.in_flight() == [32, 32]


def test_burst_of_one_prompt_spreads_once_the_holder_is_overloaded():
    router = RequestRouter(2, block_size=BS)
    routes = [router.choose(tokens(7, 40), 100) for _ in range(64)]
    assert routes[:4] == [0, 0, 0, 1]  # 300 tokens > 1.5 * 0 + 256: the fourth leaves the holder
    assert router.stats.routed == [32, 32]
    assert router.stats.diverted == 1


def test_equal_ties_rotate_when_each_request_ends_before_the_next():
    router = RequestRouter(3, block_size=BS)
    routes = []
    for k in range(9):
        routes.append(router.choose(tokens(k, 8), 100))
        router.release(routes[-1], 100)
    assert routes == [0, 1, 2] * 3
    assert router.load() == [0, 0, 0]


def test_ties_on_load_go_to_fewer_requests_in_flight():
    router = RequestRouter(2, block_size=BS)
    router.choose(tokens(1, 8), 50, exclude={0})  # front-end 1: two requests of 50
    router.choose(tokens(2, 8), 50, exclude={0})
    router.choose(tokens(3, 8), 100, exclude={1})  # front-end 0: one of 100, chosen last (rotation favours 1)
    assert router.load() == [100, 100]
    assert router.choose(tokens(4, 8), 10) == 0


def test_burst_of_mixed_sizes_balances_requests_and_tokens():
    rng = random.Random(0)
    router = RequestRouter(2, block_size=BS)
    for k in range(200):
        router.choose(tokens(k, rng.randint(1, 200)), rng.randint(50, 4000))
    assert split_within(router.stats.routed)
    assert abs(router.load()[0] - router.load()[1]) <= 4000  # greedy: never more apart than one request


@pytest.mark.parametrize("frontends", [2, 3])
def test_mixed_sizes_ending_at_random_stay_balanced(frontends):
    rng = random.Random(1)
    router = RequestRouter(frontends, block_size=BS)
    live: list[tuple[int, int]] = []
    for k in range(600):
        size = rng.randint(50, 4000)
        live.append((router.choose(tokens(k, rng.randint(1, 200)), size), size))
        if len(live) > 40:
            router.release(*live.pop(rng.randrange(len(live))))
    share = 1 / frontends
    assert split_within(router.stats.routed, 0.8 * share)  # 40/60 for two front-ends
    assert split_within(router.load(), 0.6 * share)


def test_least_loaded_by_tokens_not_by_requests():
    router = RequestRouter(2, block_size=BS)
    assert router.choose(tokens(1, 8), 5000) == 0
    assert [router.choose(tokens(k, 8), 100) for k in range(2, 12)] == [1] * 10


# ---- affinity -----------------------------------------------------------------------------------------
def test_shared_long_prefix_goes_to_its_holder():
    router = RequestRouter(4, block_size=BS)
    system = tokens(0, 8 * BS)
    holder = router.choose(system + tokens(1, 20), 200)
    for k in range(2, 5):  # the other three get less load than the holder
        router.choose(tokens(k, 20), 100)
    assert router.load()[holder] == 200 and min(router.load()) == 100
    assert router.choose(system + tokens(5, 30), 200) == holder
    assert router.stats.affinity_hits == 1
    assert router.held_prefix(holder, system) == 8


def test_longest_held_run_wins():
    router = RequestRouter(3, block_size=BS)
    prefix = tokens(0, 6 * BS)
    short = router.choose(prefix[: 2 * BS] + tokens(1, 40), 100)
    long = router.choose(prefix + tokens(2, 40), 100, exclude={short})
    assert (router.held_prefix(short, prefix), router.held_prefix(long, prefix)) == (2, 6)
    assert router.choose(prefix + tokens(3, 10), 100) == long
    assert router.choose(prefix[: 2 * BS] + tokens(4, 10), 100) == short  # both hold 2: the less loaded


def test_a_block_differing_early_breaks_the_chain():
    router = RequestRouter(2, block_size=BS)
    prompt = tokens(0, 4 * BS)
    router.choose(prompt, 100)
    changed = list(prompt)
    changed[0] += 1
    assert router.held_prefix(0, changed) == 0
    assert router.choose(changed, 100) == 1  # no affinity: the least loaded


def test_partial_block_gives_no_affinity():
    router = RequestRouter(2, block_size=BS)
    router.choose(tokens(0, BS - 1), 100)
    assert router.choose(tokens(0, BS - 1), 100) == 1
    assert router.stats.affinity_hits == 0


def test_overloaded_holder_is_passed_over():
    router = RequestRouter(2, block_size=BS, overload=1.5, slack_tokens=256)
    prompt = tokens(0, 4 * BS)
    assert router.choose(prompt, 300) == 0
    assert router.choose(tokens(1, 8), 100) == 1
    router.choose(tokens(2, 8), 106, exclude={1})  # holder at 406 = 1.5 * 100 + 256: not yet over
    assert router.choose(prompt, 10) == 0
    assert router.load() == [416, 100]  # now over
    assert router.choose(prompt, 10) == 1
    assert (router.stats.affinity_hits, router.stats.diverted) == (1, 1)
    assert router.held_prefix(1, prompt) == 4  # the diverted request's front-end now holds it too


def test_affinity_off_balances_only():
    router = RequestRouter(2, block_size=BS, affinity=False)
    prompt = tokens(0, 4 * BS)
    assert [router.choose(prompt, 100) for _ in range(4)] == [0, 1, 0, 1]
    assert router.stats.affinity_hits == 0
    assert router.held_prefix(0, prompt) == 0


# ---- bookkeeping --------------------------------------------------------------------------------------
def test_release_lowers_load():
    router = RequestRouter(2, block_size=BS)
    router.choose(tokens(0, 8), 500)
    router.choose(tokens(1, 8), 300)
    assert router.load() == [500, 300]
    router.release(0, 500)
    assert router.load() == [0, 300] and router.in_flight() == [0, 1]
    assert router.choose(tokens(2, 8), 100) == 0
    with pytest.raises(ValueError):
        router.release(1, 301)  # more than it holds
    with pytest.raises(ValueError):
        RequestRouter(2).release(0, 0)  # nothing in flight
    assert router.load() == [100, 300]


def test_forget_drops_affinity_but_not_load():
    router = RequestRouter(2, block_size=BS)
    prompt = tokens(0, 4 * BS)
    router.choose(prompt, 200)
    router.choose(tokens(1, 8), 100)
    assert router.choose(prompt, 10) == 0
    router.forget(0)
    assert router.held_prefix(0, prompt) == 0
    assert router.load() == [210, 100]
    assert router.choose(prompt, 10) == 1


def test_exclude_is_respected():
    router = RequestRouter(3, block_size=BS)
    prompt = tokens(0, 4 * BS)
    assert router.choose(prompt, 100) == 0
    assert router.choose(prompt, 100, exclude={0}) == 1  # the holder is excluded
    assert router.choose(tokens(1, 8), 100, exclude={2}) in (0, 1)  # the least loaded is excluded
    for _ in range(20):
        assert router.choose(tokens(2, 8), 1, exclude={0, 2}) == 1
    with pytest.raises(ValueError):
        router.choose(prompt, 100, exclude={0, 1, 2})
    assert sum(router.stats.routed) == 23  # the refused request was not counted


def test_remembered_blocks_are_bounded_lru():
    router = RequestRouter(2, block_size=BS, remembered_blocks=6)
    a, b = tokens(1, 4 * BS), tokens(2, 4 * BS)
    router.choose(a, 100)
    router.choose(b, 100, exclude={1})
    assert len(router._held[0]) == 6
    # a's tail went first: its two leading blocks are still a hit
    assert (router.held_prefix(0, a), router.held_prefix(0, b)) == (2, 4)
    router.choose(a, 100, exclude={1})  # using a again makes it the most recent
    assert (router.held_prefix(0, a), router.held_prefix(0, b)) == (4, 2)
    for k in range(3, 50):
        router.choose(tokens(k, 4 * BS), 100, exclude={1})
        assert len(router._held[0]) == 6
    assert router.held_prefix(0, a) == 0


def test_routing_is_deterministic_across_processes():
    script = ("from epserve.cluster.serving.routing import RequestRouter as R\n"
              "r = R(3, block_size=4)\n"
              "print([r.choose([k % 5] * 12 + [k], 10 + k % 7) for k in range(40)], r.block_hashes(list(range(9))))")
    runs = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert len(runs) == 1


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        RequestRouter(0)
    with pytest.raises(ValueError):
        RequestRouter(2, block_size=0)
    with pytest.raises(ValueError):
        RequestRouter(2).choose([1, 2], -1)
