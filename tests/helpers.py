"""Helpers that several test modules use (imported as ``helpers``; test modules do not import each other).
Fixtures live in conftest.py."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import openai
import pytest
import uvicorn
import yaml
from fastapi import FastAPI
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epserve.actors.engine.config import EngineConfig
from epserve.actors.engine.engine import LLMEngine
from epserve.actors.engine.sampling import SamplingParams
from epserve.actors.frontend import Frontend
from epserve.cluster.serving.frontend_client import FrontendClient
from epserve.cluster.serving.grpc_server import GrpcEndpoint
from epserve.cluster.serving.local import LocalServer
from epserve.cluster.serving.openai import install
from epserve.cluster.serving.state import ServingState
from epserve.cluster.serving.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
EPSERVE = [sys.executable, "-m", "epserve.cluster.cli"]  # the command, as a user runs it
MAX_LEN = 512  # the context of the test servers (tiny_server)


def run(*args, check=True) -> subprocess.CompletedProcess:
    """``epserve ARGS...`` in a process of its own."""
    return subprocess.run([*EPSERVE, *map(str, args)], capture_output=True, text=True, timeout=300, check=check)


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free on 127.0.0.1 now, and never one handed out before in this process: a server's ports are
    taken one after another and bound only when it starts, and two calls can get the same free port (the
    likely cause of a CI run where the gRPC port answered a health check in HTTP/1)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def engine_greedy(model, prompts, max_tokens):
    """The in-process engine's greedy tokens (eos ignored): what every server must answer."""
    outs = LLMEngine(model, EngineConfig(max_num_seqs=64)).generate(
        prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    return [o.token_ids for o in outs]


def spanning_stop(pieces: list[str]) -> tuple[str, int]:
    """A 4-character stop string that starts in one streamed piece and ends in the next, first found at k."""
    text, end = "".join(pieces), 0
    for piece in pieces[:-1]:
        end += len(piece)
        if end >= 3 and len(text) >= end + 2:
            stop = text[end - 2:end + 2]
            if text.find(stop) == end - 2 and "\ufffd" not in stop:
                return stop, end - 2
    pytest.fail("no stop string candidate: pick another prompt")


def deploy_app_args() -> dict:
    """The arguments deploy/serve.yaml gives its application."""
    config = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    return config["applications"][0]["args"]


class HealthWatcher(threading.Thread):
    """A stock ``grpc.health.v1`` client polling the overall health of a gRPC address from before the server
    exists: the statuses it answered, in order (calls that found no server yet are not statuses)."""

    def __init__(self, target: str):
        super().__init__(daemon=True)
        self.target, self.seen, self.done = target, [], threading.Event()

    def run(self):
        with grpc.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while not self.done.is_set():
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                    if not self.seen or self.seen[-1] != status:
                        self.seen.append(status)
                except grpc.RpcError:
                    pass
                self.done.wait(0.05)


@contextlib.contextmanager
def tiny_server(tiny_dir, **cluster):
    """The Serve app of deploy/serve.yaml over the tiny checkpoint (a front-end and 2 shards, fp32, as the
    references it is compared with) on the session's Ray cluster, with ``cluster`` settings on top; shut down
    on exit. ``grpc_health_seen``: what a stock health client polling the gRPC port from before the start was
    told, until it said SERVING."""
    settings = deploy_app_args()  # the application of deploy/serve.yaml, on loopback ports, tiny checkpoint
    settings.update(grpc_host="127.0.0.1", grpc_port=free_port(), metrics_port=None, drain_s=5)
    settings["cluster"].update(checkpoint=str(tiny_dir), engine={"max_model_len": MAX_LEN, "max_num_seqs": 64},
                               dtype="float32")
    settings["cluster"].update(cluster)
    watcher = HealthWatcher(f"127.0.0.1:{settings['grpc_port']}")
    watcher.start()
    try:
        srv = LocalServer(settings, "127.0.0.1", free_port()).start(timeout_s=300)
        until = time.monotonic() + 10  # the gRPC health service follows the app's state within moments
        while watcher.seen[-1:] != ["SERVING"] and time.monotonic() < until:
            time.sleep(0.05)
    finally:
        watcher.done.set()
        watcher.join()
    srv.grpc_health_seen = watcher.seen
    try:
        yield srv
    finally:
        srv.shutdown()


MISSING_TOOL = "missing tool"


def missing_tool(name: str, how_to_get_it: str) -> str:
    """The skip reason of a test that needs a program this machine lacks: the run's summary counts them."""
    return f"{MISSING_TOOL} {name}: {how_to_get_it}"


def missing_tools_line(reasons: list[str]) -> str | None:
    """One line for the end of a run: how many tests skipped for which missing tool, and how to get it."""
    tools: dict[str, list] = {}
    for reason in reasons:
        found = re.search(rf"{MISSING_TOOL} (\S+): (.*)", reason)
        if found:
            tools.setdefault(found[1], [0, found[2]])[0] += 1
    if not tools:
        return None
    total = sum(n for n, _ in tools.values())
    return f"{total} test(s) skipped for a missing tool: " + "; ".join(
        f"{n} need {name} ({how})" for name, (n, how) in sorted(tools.items()))


class InProcessServer:
    """Both servers with no Ray: a Frontend in this process (every expert local, fp32 as the references)
    behind one ServingState, the OpenAI routes on a FastAPI app served by uvicorn on 127.0.0.1, and the gRPC
    endpoint in uvicorn's event loop (the one the Frontend delivers to). ``client``: the official OpenAI
    client; ``grpc_target``."""

    def __init__(self, checkpoint, model_name: str, engine: dict):
        self.tokenizer = Tokenizer.from_checkpoint(checkpoint)
        self.frontend = Frontend(str(checkpoint), 0, engine, dtype="float32")
        self.state = ServingState(model_name, self.tokenizer, client=FrontendClient(self.frontend),
                                  info=self.frontend.model_info())
        self.grpc_target = f"127.0.0.1:{free_port()}"

        @contextlib.asynccontextmanager
        async def lifespan(app):
            await self.frontend.start()  # in the server's event loop
            grpc_server = GrpcEndpoint(self.state, *self.grpc_target.split(":"))
            await grpc_server.start()
            await grpc_server.set_serving(True)
            yield
            await grpc_server.stop(1.0)
            await self.frontend.stop()

        self.app = install(FastAPI(lifespan=lifespan), self.state)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self.base = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key="unused", max_retries=0, timeout=60)

    def stop(self):
        self.client.close()
        self.server.should_exit = True
        self.thread.join(30)

    def post(self, path: str, body) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


def wait_idle(server: InProcessServer, timeout: float = 10.0) -> None:
    """Until the engine holds no request (an abort is queued when a stream is left, and runs moments later)."""
    deadline = time.monotonic() + timeout
    while server.frontend.engine.requests or server.frontend.engine.has_unfinished():
        assert time.monotonic() < deadline, "the engine still runs the request"
        time.sleep(0.02)
