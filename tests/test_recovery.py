"""Recovery from a lost actor, end to end: a real Serve app on the session's Ray cluster (a front-end and
two expert shards), real gRPC and HTTP on 127.0.0.1, and faults injected mid-run under a load of concurrent
requests (cluster/tools/drill.py): a shard killed, a shard stopped with SIGSTOP, the front-end killed. The
tests share one server, which each leaves serving again. Several front-ends: tests/test_frontends.py."""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest
import ray

from epserve.cluster.tools import drill
from epserve.cluster.launcher import NAMESPACE, shard_name

from helpers import engine_greedy, tiny_server

STREAMS, MAX_TOKENS = 32, 40
BOUND_S = 240  # a generous bound for one drill: load, fault, recovery, the rest of the load


@pytest.fixture(scope="module")
def server(ray_session, tiny_dir):
    # the default deadlines (10 s collective, 3 s probe), but failures enough for a slow, shared machine
    with tiny_server(tiny_dir, max_failures=10) as srv:
        yield srv


@pytest.fixture(scope="module")
def want(tiny_model):
    return engine_greedy(tiny_model, mixed_prompts(STREAMS), MAX_TOKENS)


def shard_pid(i: int) -> int:
    return ray.get(ray.get_actor(shard_name(i), namespace=NAMESPACE).info.remote(), timeout=30)["pid"]


def mixed_prompts(n: int) -> list[list[int]]:
    return [[3 + i, 7, 11 + (i * 13) % 900] + [i % 50 + 3] * (i % 9) for i in range(n)]


def assert_paused_not_failed(d: drill.Drill, want: list[list[int]]) -> None:
    assert max(d.tokens_at_fault) < MAX_TOKENS, "the fault came after a request had finished"
    assert [(o.kind, o.code, o.details) for o in d.outcomes] == [(o.kind, grpc.StatusCode.OK, "")
                                                                 for o in d.outcomes]
    assert [o.tokens for o in d.outcomes] == want  # the same greedy tokens as without the fault
    assert d.not_serving_at is not None and d.fault_at < d.not_serving_at < d.serving_at


@pytest.mark.timeout(BOUND_S + 60)
def test_killed_shard_is_recreated_and_every_stream_completes(server, want):
    old_pid = shard_pid(1)
    d = drill.run(server.grpc_target, mixed_prompts(STREAMS), MAX_TOKENS, "shard-kill", timeout_s=BOUND_S)
    assert_paused_not_failed(d, want)
    assert shard_pid(1) != old_pid  # a new shard, in the same name, reloaded its experts and serves


@pytest.mark.timeout(BOUND_S + 60)
def test_stalled_shard_is_detected_killed_and_replaced(server, want):
    d = None
    try:
        d = drill.run(server.grpc_target, mixed_prompts(STREAMS), MAX_TOKENS, "shard-stall", timeout_s=BOUND_S)
        assert_paused_not_failed(d, want)
        # found by the collective deadline (10 s), not by luck; then replaced by a restarted process
        assert d.detection_s >= 5
        deadline = time.monotonic() + 30
        while drill.process_exists(d.stopped_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not drill.process_exists(d.stopped_pid)
        assert shard_pid(1) != d.stopped_pid
    finally:  # never leave a stopped process behind
        if d is not None and d.stopped_pid and drill.process_exists(d.stopped_pid):
            os.kill(d.stopped_pid, signal.SIGKILL)


@pytest.mark.timeout(BOUND_S + 60)
def test_killed_frontend_is_restarted_and_its_requests_go_on_there(server, tiny_model):
    """One front-end: its requests wait for the restarted one and continue there from their tokens, over gRPC
    and HTTP, streaming or not; every client sees the tokens it would have had, with no error."""
    prompts = mixed_prompts(48)
    d = drill.run(server.grpc_target, prompts, MAX_TOKENS, "frontend-kill", timeout_s=BOUND_S,
                  http=server.http_base)
    assert_paused_not_failed(d, engine_greedy(tiny_model, prompts, MAX_TOKENS))
