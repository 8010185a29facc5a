"""Many front-ends over one pool of expert shards, end to end: a real Serve app with 2 front-ends and 2 shards
on the session's Ray cluster, real gRPC and HTTP on 127.0.0.1. The ingress routes each request to the least
loaded front-end, with prefix affinity (cluster/serving/routing.py), and moves a lost front-end's requests to
the other one (cluster/serving/frontend_client.py). Parity for M x N: tests/test_cluster.py."""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import ray

from epserve.cluster.api import inference_pb2_grpc as pb_grpc
from epserve.cluster.launcher import NAMESPACE, frontend_name
from epserve.cluster.tools import drill
from epserve.cluster.tools.client import request

from helpers import engine_greedy, tiny_server
from test_recovery import BOUND_S, MAX_TOKENS, assert_paused_not_failed, mixed_prompts


@pytest.fixture(scope="module")
def server(ray_session, tiny_dir):
    with tiny_server(tiny_dir, frontends=2, max_failures=10) as srv:
        yield srv


def stats(server) -> dict:
    with urllib.request.urlopen(f"{server.http_base}/stats", timeout=30) as r:
        return json.loads(r.read())


def complete(server, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Every prompt at once over gRPC (unary); their tokens in order."""
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.InferenceStub(channel)

        def one(prompt):
            return list(stub.Complete(request(prompt_ids=prompt, max_tokens=max_tokens, ignore_eos=True),
                                      timeout=120).token_ids)

        with ThreadPoolExecutor(len(prompts)) as pool:
            return list(pool.map(one, prompts))


def test_a_burst_is_split_between_the_frontends(server, tiny_model):
    before = stats(server)["router"]["routed"]
    prompts = [[5 + i, 9, 2 * i + 3] for i in range(64)]
    assert complete(server, prompts, 4) == engine_greedy(tiny_model, prompts, 4)
    after = stats(server)
    routed = [a - b for a, b in zip(after["router"]["routed"], before)]
    assert sum(routed) == 64 and 0.4 <= routed[0] / 64 <= 0.6, routed
    # each front-end's engine ran its share
    assert all(s["steps"] > 0 for s in after["frontends"])


def test_a_shared_prefix_goes_where_it_is_held(server, tiny_model):
    prefix = [(7 * i) % 500 + 3 for i in range(96)]  # six full KV blocks
    prompts = [prefix + [600 + i] for i in range(6)]
    first = stats(server)
    complete(server, prompts[:1], 2)
    for prompt in prompts[1:]:  # one at a time: the router knows where the prefix went
        complete(server, [prompt], 2)
    after = stats(server)
    grew = [a["prefix_hit_tokens"] - b["prefix_hit_tokens"] for a, b in zip(after["frontends"], first["frontends"])]
    assert after["router"]["affinity_hits"] - first["router"]["affinity_hits"] == 5
    assert sorted(grew) == [0, 5 * 96], grew  # the five followers hit the prefix, on one front-end


@pytest.mark.timeout(BOUND_S + 60)
@pytest.mark.parametrize("fault", ["frontend-kill", "shard-kill"])
def test_lost_actor_under_48_requests_loses_none(server, tiny_model, fault):
    """Front-end 0 killed: its requests move to front-end 1 and go on from their tokens. A shard killed:
    every front-end pauses and resumes. Either way all 48 (gRPC and HTTP, streaming or not) complete with
    the tokens they would have had."""
    prompts = mixed_prompts(48)
    old = ray.get_actor(frontend_name(0), namespace=NAMESPACE)
    d = drill.run(server.grpc_target, prompts, MAX_TOKENS, fault, timeout_s=BOUND_S, http=server.http_base)
    assert_paused_not_failed(d, engine_greedy(tiny_model, prompts, MAX_TOKENS))
    if fault == "frontend-kill":
        assert stats(server)["migrations"] > 0
        assert ray.get(old.ready.remote(), timeout=30)  # restarted by Ray, back in the group
