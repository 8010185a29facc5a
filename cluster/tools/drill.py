"""Recovery drills: a steady load of requests against a running server, a fault injected into its cluster
mid-run, and what the clients and the health service saw.

The load: streaming gRPC requests, or, given the server's HTTP address, a mix of four kinds in turn (``KINDS``:
gRPC streaming and unary, OpenAI HTTP streaming and not), every one greedy with ``ignore_eos``, so that each
request's tokens can be compared with the in-process engine's.

Faults (``FAULTS``): ``shard-kill`` (``ray.kill`` of a shard: gone for good, so it is recreated),
``shard-stall`` (SIGSTOP of a shard's process: alive but silent, so it must be found by the collective
deadline and killed; the driver must run on the shard's node) and ``frontend-kill`` (``ray.kill`` of a
front-end with ``no_restart=False``: Ray restarts it; its requests move). benchmarks/recovery_time.py times
them and tests/test_recovery.py checks them. ``none`` injects nothing: the same load and checks with no fault
(or with a change of the cluster's own, such as online rebalancing).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import aiohttp
import grpc
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..api import inference_pb2_grpc as pb_grpc
from ..launcher import NAMESPACE, frontend_name, shard_name
from .client import request

FAULTS = ("shard-kill", "shard-stall", "frontend-kill")
KINDS = ("grpc-stream", "grpc-unary", "http-stream", "http-unary")
SERVING, NOT_SERVING = "SERVING", "NOT_SERVING"


def inject(fault: str, shard: int = 1, frontend: int = 0) -> int | None:
    """Inject ``fault``; returns the pid of a stopped process (``shard-stall``), else None."""
    if fault == "none":
        return None
    if fault == "frontend-kill":
        ray.kill(ray.get_actor(frontend_name(frontend), namespace=NAMESPACE), no_restart=False)
        return None
    actor = ray.get_actor(shard_name(shard), namespace=NAMESPACE)
    if fault == "shard-kill":
        ray.kill(actor)
        return None
    if fault == "shard-stall":
        pid = ray.get(actor.info.remote(), timeout=30)["pid"]
        os.kill(pid, signal.SIGSTOP)
        return pid
    raise ValueError(f"fault must be one of {FAULTS} or none, got {fault!r}")


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


class HealthWatch:
    """Polls the server's gRPC health service in a thread and records every change of status."""

    def __init__(self, target: str, period_s: float = 0.1):
        self.target, self.period_s = target, period_s
        self.changes: list[tuple[float, str]] = []  # (time.monotonic(), status), each a change
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="epserve-health-watch", daemon=True)

    def __enter__(self) -> "HealthWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self._stop.is_set():
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
                except grpc.RpcError as e:
                    name = e.code().name  # not answering at all
                if not self.changes or self.changes[-1][1] != name:
                    self.changes.append((time.monotonic(), name))
                self._stop.wait(self.period_s)

    def first(self, status: str, after: float) -> float | None:
        return next((t for t, s in self.changes if s == status and t >= after), None)

    def wait_serving_again(self, since: float, timeout_s: float) -> float:
        """The time of the first SERVING after a NOT_SERVING that began after ``since``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            down = self.first(NOT_SERVING, since)
            up = self.first(SERVING, down) if down is not None else None
            if up is not None:
                return up
            time.sleep(self.period_s)
        raise TimeoutError(f"not SERVING again within {timeout_s:.0f} s of the fault; health: {self.changes}")


@dataclass
class Outcome:
    """One request of the load: its tokens, and the status it ended with (OK, or the error's: for HTTP, the
    gRPC code of the same meaning, with the HTTP status in ``details``)."""

    kind: str = KINDS[0]
    tokens: list[int] = field(default_factory=list)
    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""


@dataclass
class Drill:
    fault: str
    outcomes: list[Outcome]
    fault_at: float  # time.monotonic() of the injection
    tokens_at_fault: list[int]  # what each request had received by then
    not_serving_at: float | None  # health went NOT_SERVING (None: it never did, see ``run``'s ``pause``)
    serving_at: float | None  # and SERVING again
    health: list[tuple[float, str]]
    stopped_pid: int | None = None

    @property
    def longest_not_serving_s(self) -> float:
        """The longest time the health service was not SERVING after the fault (0: never)."""
        longest, down = 0.0, None
        for t, status in self.health:
            if status != SERVING and down is None and t >= self.fault_at:
                down = t
            elif status == SERVING and down is not None:
                longest, down = max(longest, t - down), None
        return longest if down is None else float("inf")

    @property
    def detection_s(self) -> float:
        return self.not_serving_at - self.fault_at

    @property
    def recovery_s(self) -> float:
        return self.serving_at - self.fault_at


def run(target: str, prompts: list[list[int]], max_tokens: int, fault: str, after_tokens: int = 4,
        timeout_s: float = 300.0, http: str | None = None, frontend: int = 0, pause: bool = True) -> Drill:
    """Send every prompt at once (all gRPC streams, or with ``http``, the base URL of the OpenAI server, the
    four ``KINDS`` in turn); once each stream has ``after_tokens`` tokens, inject ``fault`` (into front-end
    ``frontend`` for ``frontend-kill``); wait for every request to end and the health service to be SERVING
    again (within ``timeout_s`` in all). ``pause`` False: the fault need not take the health service down (a
    shard lost in degraded mode, whose pause may be shorter than the health poll); then the drill ends once
    every request has ended and the health service says SERVING."""
    deadline = time.monotonic() + timeout_s
    kinds = [KINDS[i % len(KINDS)] if http else KINDS[0] for i in range(len(prompts))]
    with HealthWatch(target) as health:
        outcomes, fault_at, at_fault, pid = asyncio.run(asyncio.wait_for(
            _load(target, http, prompts, kinds, max_tokens, fault, frontend, after_tokens, timeout_s), timeout_s))
        if pause or health.first(NOT_SERVING, fault_at) is not None:
            serving_at = health.wait_serving_again(fault_at, max(deadline - time.monotonic(), 1.0))
        else:
            serving_at = None
            while health.changes[-1][1] != SERVING and time.monotonic() < deadline:
                time.sleep(health.period_s)
    return Drill(fault, outcomes, fault_at, at_fault, health.first(NOT_SERVING, fault_at), serving_at,
                 health.changes, pid)


async def _load(target, http, prompts, kinds, max_tokens, fault, frontend, after_tokens, timeout_s):
    received = [0] * len(prompts)
    streams = [i for i, kind in enumerate(kinds) if kind.endswith("stream")]  # what shows progress
    all_started = asyncio.Event()

    def progress(i: int, tokens: list[int]) -> None:
        received[i] = len(tokens)
        if min(received[j] for j in streams) >= after_tokens:
            all_started.set()

    async with grpc.aio.insecure_channel(target) as channel, aiohttp.ClientSession() as session:
        stub = pb_grpc.InferenceStub(channel)

        async def one(i: int) -> Outcome:
            out = Outcome(kinds[i])
            try:
                if kinds[i].startswith("grpc"):
                    await _grpc(stub, out, prompts[i], max_tokens, timeout_s, lambda: progress(i, out.tokens))
                else:
                    await _http(session, http, out, prompts[i], max_tokens, timeout_s,
                                lambda: progress(i, out.tokens))
            except grpc.aio.AioRpcError as e:
                out.code, out.details = e.code(), e.details() or ""
            all_started.set()  # a request that ended early must not hold the fault back forever
            return out

        tasks = [asyncio.ensure_future(one(i)) for i in range(len(prompts))]
        await all_started.wait()
        at_fault = list(received)
        fault_at = time.monotonic()
        pid = await asyncio.to_thread(inject, fault, 1, frontend)
        return list(await asyncio.gather(*tasks)), fault_at, at_fault, pid


async def _grpc(stub, out: Outcome, prompt: list[int], max_tokens: int, timeout_s: float, progress) -> None:
    req = request(prompt_ids=prompt, max_tokens=max_tokens, ignore_eos=True)
    if out.kind == "grpc-unary":
        out.tokens += (await stub.Complete(req, timeout=timeout_s)).token_ids
        return
    async for piece in stub.Generate(req, timeout=timeout_s):
        out.tokens += piece.token_ids
        progress()


HTTP_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
              503: grpc.StatusCode.UNAVAILABLE}


async def _http(session, base: str, out: Outcome, prompt: list[int], max_tokens: int, timeout_s: float,
                progress) -> None:
    streamed = out.kind == "http-stream"
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
            "return_token_ids": True, "stream": streamed}
    async with session.post(f"{base}/v1/completions", json=body,
                            timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
        if r.status != 200:
            out.code, out.details = HTTP_CODES.get(r.status, grpc.StatusCode.UNKNOWN), f"HTTP {r.status}: " \
                f"{await r.text()}"
            return
        if not streamed:
            out.tokens += (await r.json())["choices"][0]["token_ids"]
            return
        async for line in r.content:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                out.code, out.details = grpc.StatusCode.UNKNOWN, str(chunk["error"])
                return
            out.tokens += chunk["choices"][0].get("token_ids") or []
            progress()
