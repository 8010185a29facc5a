"""The failure limit, end to end: with ``max_failures: 1`` the first lost shard is recovered and the second,
within ``failure_window_s``, ends recovery in a clean error that every client sees (a server of its own, after
tests/test_recovery.py's, on the session's Ray cluster)."""

from __future__ import annotations

import json
import time
import urllib.request

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epserve.cluster.api import inference_pb2_grpc as pb_grpc
from epserve.cluster.tools.client import request
from epserve.cluster.launcher import NAMESPACE, shard_name

from helpers import engine_greedy, tiny_server

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def wait_for(health, status, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == status:
            return
        time.sleep(0.1)
    pytest.fail(f"health did not become {health_pb2.HealthCheckResponse.ServingStatus.Name(status)} "
                f"within {timeout_s} s")


@pytest.mark.timeout(420)
def test_failures_beyond_the_limit_end_in_a_clean_error(ray_session, tiny_dir, tiny_model):
    prompt = [5, 6, 7, 8]
    want = engine_greedy(tiny_model, [prompt], 6)[0]
    with tiny_server(tiny_dir, max_failures=1, failure_window_s=600) as srv:
        with grpc.insecure_channel(srv.grpc_target) as channel:
            stub, health = pb_grpc.InferenceStub(channel), health_pb2_grpc.HealthStub(channel)
            # the first failure: recovered in place
            ray.kill(ray.get_actor(shard_name(1), namespace=NAMESPACE))  # Ray restarts it
            wait_for(health, NOT_SERVING, 30)
            wait_for(health, SERVING, 180)
            served = stub.Complete(request(prompt_ids=prompt, max_tokens=6, ignore_eos=True), timeout=60)
            assert list(served.token_ids) == want
            # the second within the window is one more than allowed: recovery gives up, for good
            ray.kill(ray.get_actor(shard_name(0), namespace=NAMESPACE))
            wait_for(health, NOT_SERVING, 30)
            time.sleep(5)  # it stays down (no recovery is attempted)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                stub.Complete(request(prompt_ids=prompt, max_tokens=6, ignore_eos=True), timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "stopped serving" in err.value.details() and "more than the 1 allowed" in err.value.details()
        base = f"http://127.0.0.1:{srv.http_port}"
        with urllib.request.urlopen(f"{base}/health", timeout=30) as r:
            status = json.loads(r.read())
        assert status["status"] == "NOT_SERVING" and "more than the 1 allowed" in status["error"]
        body = json.dumps({"model": tiny_dir.name, "prompt": [5, 6], "max_tokens": 2}).encode()
        post = urllib.request.Request(f"{base}/v1/completions", body, {"content-type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as http_err:
            urllib.request.urlopen(post, timeout=30)
        assert http_err.value.code == 503
        assert "more than the 1 allowed" in json.loads(http_err.value.read())["error"]["message"]
