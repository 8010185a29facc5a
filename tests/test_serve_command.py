"""``epserve serve`` and ``epserve client`` as a user runs them: the server joins the test run's Ray cluster on
free ports, prints where it listens, answers the client and Prometheus, and on SIGTERM drains (refuses new
requests, lets those in flight finish within ``--drain-s``, ends the rest with UNAVAILABLE) and shuts down
cleanly, leaving no actor behind; on a busy port it fails at once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import ray
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from epserve.cluster.api import inference_pb2_grpc as pb_grpc
from epserve.cluster.tools.client import request

from helpers import EPSERVE, engine_greedy, free_port

DRAIN_S = 6.0


@pytest.fixture
def other_grpc_server():
    """Another gRPC server answering health checks with SERVING, on a port of its own (bound as gRPC binds,
    with SO_REUSEPORT, so a second gRPC server could bind the same port and share its connections)."""
    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(0)


@pytest.mark.parametrize("option", ["--grpc-port", "--http-port", "--metrics-port"])
def test_serve_fails_at_once_on_a_busy_port(ray_session, tiny_dir, other_grpc_server, option):
    ports = {"--grpc-port": free_port(), "--http-port": free_port(), "--metrics-port": free_port(),
             option: other_grpc_server}
    started = time.monotonic()
    done = subprocess.run([*EPSERVE, "serve", "--checkpoint", str(tiny_dir), "--address",
                           ray.get_runtime_context().gcs_address, *(str(a) for kv in ports.items() for a in kv)],
                          capture_output=True, text=True, timeout=120)
    assert time.monotonic() - started < 60  # before Ray or Serve is asked for anything
    assert done.returncode == 2 and "is serving" not in done.stdout, done.stdout + done.stderr
    what = {"--grpc-port": "gRPC", "--http-port": "HTTP", "--metrics-port": "metrics"}[option]
    assert done.stderr.strip() == (f"epserve serve: error: cannot listen on 127.0.0.1:{other_grpc_server} for "
                                   f"{what}: Address already in use (choose another port with {option})")


@dataclass
class Served:
    proc: subprocess.Popen
    target: str  # gRPC host:port
    http_port: int
    metrics_port: int
    log: Path  # its stdout and stderr

    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture(scope="module")
def served(ray_session, tiny_dir, tmp_path_factory):
    """``epserve serve`` (2 shards, the tiny checkpoint) on free ports, until a test stops it or the module ends."""
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([*EPSERVE, "serve", "--checkpoint", str(tiny_dir), "--shards", "2",
                                 "--address", ray.get_runtime_context().gcs_address, "--grpc-port", str(grpc_port),
                                 "--http-port", str(http_port), "--metrics-port", str(metrics_port),
                                 "--drain-s", str(DRAIN_S), "--dtype", "float32"],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = Served(proc, f"127.0.0.1:{grpc_port}", http_port, metrics_port, log)
    try:
        deadline = time.monotonic() + 300
        while "is serving" not in server.output():
            assert proc.poll() is None, server.output()[-3000:]
            assert time.monotonic() < deadline, "epserve serve did not come up"
            time.sleep(1)
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_client_streams_the_answer(served, tiny_dir, tiny_model):
    from epserve.cluster.serving.tokenizer import Tokenizer

    assert served.target in served.output()
    tok = Tokenizer.from_checkpoint(tiny_dir)
    prompt = "Hello, experts"
    want = engine_greedy(tiny_model, [tok.encode(prompt)], 6)[0]
    done = subprocess.run([*EPSERVE, "client", "--address", served.target, "--prompt", prompt, "--max-tokens", "6",
                           "--ignore-eos"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == tok.decode(want) + "\n"  # streamed as it came: the engine's greedy answer
    assert re.fullmatch(rf"\[request \S+: {len(tok.encode(prompt))} prompt \+ 6 generated tokens\]\n", done.stderr)


def test_client_with_bad_input_is_one_line(served):
    done = subprocess.run([*EPSERVE, "client", "--address", served.target, "--prompt-ids", "5,5000"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"epserve client: error: {served.target}: INVALID_ARGUMENT: token_ids: token ids "
                                  "[5000] are outside the vocabulary [0, 1024)"), done.stderr


def test_metrics_port_serves_the_whole_cluster(served):
    url = f"http://127.0.0.1:{served.metrics_port}/metrics"
    assert f"Prometheus metrics on {url}" in served.output()
    with urllib.request.urlopen(url, timeout=30) as response:
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    assert {n for n in families if n.startswith("epserve:")} >= {"epserve:frontend_up", "epserve:shard_up",
                                                                 "epserve:request_success"}
    assert [s.value for s in families["epserve:frontend_up"].samples] == [1.0]
    assert {s.labels["shard"]: s.value for s in families["epserve:shard_up"].samples} == {"0": 1.0, "1": 1.0}


def bench(target: str, *flags) -> tuple[subprocess.CompletedProcess, list[str]]:
    """``epserve bench`` against ``target`` with a small workload: the process, and the cells of its table's
    row."""
    done = subprocess.run([*EPSERVE, "bench", "--target", target, "--requests", "6", "--prompt-len", "12",
                           "--output-len", "4", "--concurrency", "3", "--warmup", "1", *flags],
                          capture_output=True, text=True, timeout=300)
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 3 |")]
    assert len(rows) == 1, done.stdout + done.stderr
    return done, [cell.strip() for cell in rows[0].strip("|").split("|")]


@pytest.mark.parametrize("scheme", ["grpc", "http"])
def test_bench_against_the_server_needs_no_flag_about_the_model(served, scheme):
    """The workload's prompt ids come from the served model's vocabulary (1024 here), as its ModelInfo or
    /v1/models card says: every request completes."""
    target = f"grpc://{served.target}" if scheme == "grpc" else f"http://127.0.0.1:{served.http_port}"
    done, (concurrency, completed, errors, *_, first_error) = bench(target)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (completed, errors, first_error) == ("6", "0", "")


def test_bench_shows_why_requests_failed(served):
    done, (concurrency, completed, errors, *_, first_error) = bench(f"grpc://{served.target}", "--vocab-size",
                                                                     "5000")
    assert done.returncode == 1 and (completed, errors) == ("0", "6")
    assert first_error.startswith("RequestFailed: INVALID_ARGUMENT: token_ids: token ids [")
    assert "outside the vocabulary [0, 1024)" in first_error


def test_serve_drains_then_stops_on_sigterm(served):
    proc, target = served.proc, served.target
    assert ray.get_actor("epserve-frontend-0", namespace="epserve") is not None
    # in flight at SIGTERM: one stream that can finish within the drain time, one that cannot
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        short, long = InFlight(stub, 24), InFlight(stub, 3000)
        assert short.started.wait(60) and long.started.wait(60)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        health_stub = health_pb2_grpc.HealthStub(channel)
        while health_stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() - signalled < 30, "health still SERVING after SIGTERM"
            time.sleep(0.1)
        with pytest.raises(grpc.RpcError) as refused:  # a new request while draining
            list(stub.Generate(request(prompt_ids=[5, 6], max_tokens=2), timeout=30))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in refused.value.details()
        short.join(60)
        long.join(60)
    assert short.outcome == (grpc.StatusCode.OK, 24)
    assert long.outcome[0] == grpc.StatusCode.UNAVAILABLE and 0 < long.outcome[1] < 3000
    assert "shut down before the request finished" in long.details
    assert DRAIN_S - 1 < long.ended - signalled < DRAIN_S + 30  # ended by the drain time, not at once
    assert proc.wait(timeout=120) == 0
    for name in ["epserve-frontend-0", "epserve-shard-0", "epserve-shard-1"]:
        for _ in range(60):  # actors of the app die with their owner replica; bounded wait
            try:
                ray.get_actor(name, namespace="epserve")
            except ValueError:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"actor {name} still alive after shutdown")


class InFlight(threading.Thread):
    """A streaming request in a thread: ``started`` once its first token is in; then ``outcome`` (status code,
    tokens received), ``details`` and ``ended`` (monotonic time)."""

    def __init__(self, stub, max_tokens: int):
        super().__init__(daemon=True)
        self.stub, self.max_tokens = stub, max_tokens
        self.started = threading.Event()
        self.outcome, self.details, self.ended = None, "", None
        self.start()

    def run(self):
        tokens = 0
        try:
            for piece in self.stub.Generate(request(prompt_ids=[5, 6, 7], max_tokens=self.max_tokens,
                                                    ignore_eos=True), timeout=120):
                tokens += len(piece.token_ids)
                self.started.set()
            self.outcome = (grpc.StatusCode.OK, tokens)
        except grpc.RpcError as e:
            self.outcome, self.details = (e.code(), tokens), e.details()
        self.ended = time.monotonic()
        self.started.set()
