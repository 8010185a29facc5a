"""Experts that move while the cluster serves, and a lost shard that does not stop it:

* a shard's new slots built beside the old ones (actors/expert_moves.py) hold exactly what loading them from
  the checkpoint gives, and only the experts that moved are read;
* online rebalancing (cluster/rebalancer.py) on a skewed checkpoint while 32 streams run: no error, the
  in-process engine's tokens, experts moved and counted;
* degraded mode (cluster/supervisor.py): with every expert replicated, a shard killed under 48 requests; all
  complete with the right tokens, the health service is back within the collective deadline, and the shard
  rejoins once it is back.

Real Serve apps on the session's Ray cluster, real gRPC and HTTP on 127.0.0.1."""

from __future__ import annotations

import time
import urllib.request

import grpc
import pytest
import torch

from epserve.actors.expert_moves import restage
from epserve.actors.model.config import ModelConfig
from epserve.actors.model.loader import load_expert_slots, load_model
from epserve.actors.placement import Placement
from epserve.cluster.fixtures.checkpoint import preset, write_checkpoint
from epserve.cluster.tools import drill, experts

from helpers import engine_greedy, tiny_server
from test_recovery import BOUND_S, mixed_prompts

MAX_TOKENS = 40
COLLECTIVE_DEADLINE_S = 10.0  # the cluster's default collective_timeout_s


def metric(server, name: str) -> float:
    """The sum of a metric's samples on the server's /metrics."""
    with urllib.request.urlopen(f"{server.http_base}/metrics", timeout=30) as r:
        lines = r.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.split("{")[0].split(" ")[0] == name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_restaged_slots_hold_what_loading_them_gives(tiny_dir, dtype):
    cfg = ModelConfig.from_json(tiny_dir)
    old = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12]]
    new = [[0, 1, 2, 3], [7, 15, 4], [], [12, 10, 11, 0]]  # layer 0 kept, 1 partly moved, 2 emptied, 3 reordered
    layers, _, _ = load_expert_slots(tiny_dir, old, dtype)
    moved_layers, moved = restage(str(tiny_dir), cfg, layers, old, new, dtype, "cpu")
    direct, _, _ = load_expert_slots(tiny_dir, new, dtype)
    assert moved_layers[0] is layers[0]  # an unchanged layer is not copied
    for got, want, slots in zip(moved_layers, direct, new):
        assert all(torch.equal(a, b) for a, b in zip(got.unpacked(), want.unpacked()))
        assert got.path == want.path or not slots  # the same kernels (an empty layer runs none)
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 2  # bf16 in the checkpoint
    assert moved == 2 * per_expert  # only 15 (layer 1) and 0 (layer 3) were not held there: read


def test_a_balanced_placement_with_a_replica_of_every_expert_survives_a_lost_shard():
    load = [[100.0 / (1 + e) for e in range(16)]] * 2  # skewed
    p = Placement.balanced(load, num_shards=3, redundant=16)
    assert bool((p.num_replicas == 2).all())  # every expert twice, not the hottest thrice and a cold one once
    for lost in range(3):
        p.restricted([s for s in range(3) if s != lost])  # every expert still has a slot
    assert p.balancedness(load) < Placement.contiguous(2, 16, 3, 16).balancedness(load)


def test_a_new_balanced_placement_keeps_experts_where_they_are_as_far_as_balance_allows():
    load = [[100.0 / (1 + (e * 7) % 16) for e in range(16)], [float(e % 5) for e in range(16)]]
    shifted = [layer[3:] + layer[:3] for layer in load]  # the hot experts change
    start = Placement.contiguous(2, 16, 4, 8)
    free, close = Placement.balanced(shifted, 4, 8), Placement.balanced(shifted, 4, 8, current=start)
    assert close.balancedness(shifted) == free.balancedness(shifted)  # the same balance
    assert sorted(map(sorted, close.slots[0])) == sorted(map(sorted, free.slots[0]))  # relabelled shards only

    def moved(a, b):
        return sum(len(set(y) - set(x)) for la, lb in zip(a.slots, b.slots) for x, y in zip(la, lb))

    assert moved(start, close) < moved(start, free)
    again = Placement.balanced(shifted, 4, 8, current=close)
    assert again.slots == close.slots  # the same load again: nothing moves, not even within a shard


@pytest.fixture(scope="module")
def skewed_dir(tmp_path_factory):
    return write_checkpoint(preset("tiny"), tmp_path_factory.mktemp("tiny-skewed"), seed=1, router_skew=3.0)


@pytest.mark.timeout(BOUND_S + 120)
def test_rebalancing_while_32_streams_run_changes_no_token(ray_session, skewed_dir):
    """Two front-ends: both route by the new placement from the same header as the shards."""
    prompts = mixed_prompts(32)
    max_tokens = 120  # long enough for the load window to fill and the experts to move while they run
    want = engine_greedy(load_model(skewed_dir), prompts, max_tokens)
    with tiny_server(skewed_dir, shards=2, frontends=2, redundant_experts=4, rebalance_interval_s=0.3) as server:
        outcomes = drill.run(server.grpc_target, prompts, max_tokens, "none", timeout_s=BOUND_S, pause=False).outcomes
        rebalances = metric(server, "epserve:rebalances_total")
        moved, epochs = metric(server, "epserve:expert_moved_bytes_total"), metric(server, "epserve:placement_epoch")
        shown = experts.fetch(server.grpc_target)  # what `epserve experts` shows
    assert [(o.code, o.details) for o in outcomes] == [(grpc.StatusCode.OK, "")] * len(prompts)
    assert [o.tokens for o in outcomes] == want
    assert rebalances >= 1 and moved > 0 and epochs == 2 * rebalances  # both shards serve the last placement
    assert shown.placement_epoch == rebalances and list(shown.shards_in_group) == [0, 1]
    assert "after rebalancing" in experts.report(shown)


@pytest.mark.timeout(BOUND_S + 120)
@pytest.mark.parametrize("frontends", [1, 2])
def test_a_lost_shard_with_replicas_everywhere_does_not_stop_48_requests(ray_session, tiny_dir, tiny_model,
                                                                         frontends):
    """3 shards, 16 redundant slots: every expert on two shards. Shard 1 killed for good mid-run: the group
    goes on without it at once (its experts from the replicas), the cluster recreates it and takes it back
    (with two front-ends, both leave the group after the same step for it)."""
    prompts = mixed_prompts(48)
    with tiny_server(tiny_dir, shards=3, frontends=frontends, redundant_experts=16, max_failures=10) as server:
        d = drill.run(server.grpc_target, prompts, MAX_TOKENS, "shard-kill", timeout_s=BOUND_S,
                      http=server.http_base, pause=False)
        degraded = metric(server, "epserve:degraded_recoveries_total")
        deadline = time.monotonic() + 120
        while metric(server, "epserve:shards_out_of_group") and time.monotonic() < deadline:
            time.sleep(0.5)
        out = metric(server, "epserve:shards_out_of_group")
        shown = experts.fetch(server.grpc_target)
        after = drill.run(server.grpc_target, prompts[:8], MAX_TOKENS, "none", timeout_s=BOUND_S, pause=False)
    assert max(d.tokens_at_fault) < MAX_TOKENS, "the fault came after a request had finished"
    assert [(o.kind, o.code, o.details) for o in d.outcomes] == [(o.kind, grpc.StatusCode.OK, "") for o in d.outcomes]
    assert [o.tokens for o in d.outcomes] == engine_greedy(tiny_model, prompts, MAX_TOKENS)
    assert d.longest_not_serving_s <= COLLECTIVE_DEADLINE_S, d.health
    assert degraded == 1 and out == 0  # went on without the shard, then took the new one back
    assert list(shown.shards_in_group) == [0, 1, 2] and shown.placement_epoch == 0
    assert [o.tokens for o in after.outcomes] == engine_greedy(tiny_model, prompts[:8], MAX_TOKENS)
