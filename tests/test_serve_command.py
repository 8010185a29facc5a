"""``epserve serve`` as a user runs it: it joins the test run's Ray cluster, prints where it listens, answers
over gRPC, and on SIGTERM shuts down cleanly, leaving no actor behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import ray

from epserve.cluster.client import request, stream

from test_grpc import free_port


def test_serve_answers_then_stops_on_sigterm(ray_session, tiny_dir, tmp_path):
    grpc_port, http_port = free_port(), free_port()
    address = ray.get_runtime_context().gcs_address
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "epserve.cluster.cli", "serve", "--checkpoint", str(tiny_dir),
                             "--shards", "2", "--address", address, "--grpc-port", str(grpc_port),
                             "--http-port", str(http_port)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 300
        while "is serving" not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "epserve serve did not come up"
            time.sleep(1)
        assert f"127.0.0.1:{grpc_port}" in (tmp_path / "serve.log").read_text()
        with open(os.devnull, "w") as sink:
            pieces = stream(f"127.0.0.1:{grpc_port}", request(prompt_ids=[5, 6, 7], max_tokens=4, ignore_eos=True),
                            timeout_s=60, out=sink)
        assert sum(len(p.token_ids) for p in pieces) == 4
        assert ray.get_actor("epserve-frontend", namespace="epserve") is not None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    for name in ["epserve-frontend", "epserve-shard-0", "epserve-shard-1"]:
        for _ in range(60):  # actors of the app die with their owner replica; bounded wait
            try:
                ray.get_actor(name, namespace="epserve")
            except ValueError:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"actor {name} still alive after shutdown")
