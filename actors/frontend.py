"""The Frontend actor: the engine (scheduler, KV cache, attention, dense FFN, router, sampler) with the
expert dispatcher as its expert executor.

One engine thread owns the model, the engine and the process group; everything else reaches it through a
command queue (add, abort, score) and gets results back through asyncio queues, so the actor's async
methods (called by the servers, possibly many at once) never block on the model. While there is no work,
the engine thread sends the shards an idle heartbeat before the collective deadline runs out.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from dataclasses import asdict

import torch

from . import dispatch, process_group
from .engine.config import EngineConfig
from .engine.engine import LLMEngine
from .engine.sampling import SamplingParams
from .metrics import FrontendMetrics, report
from .model.attention import WholeSequence
from .model.loader import load_model


class EngineFailure(RuntimeError):
    """The engine stopped (a collective failed or a peer died); requests in flight are ended with it."""


class Frontend:
    def __init__(self, checkpoint: str, num_shards: int, engine_config: EngineConfig | dict | None = None,
                 threads: int | None = None, heartbeat_s: float = 1.0, overlap: bool = True):
        if threads:
            torch.set_num_threads(threads)
        self.device = process_group.device_for_actor()
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        # num_shards = 0: every expert in this process, no process group (the in-process server)
        self.model = load_model(checkpoint, self.dtype, self.device, expert_range=None if num_shards else "all")
        cfg = self.model.cfg
        self.dispatcher = dispatch.ExpertDispatcher(cfg.num_experts, num_shards, cfg.hidden_size, self.dtype,
                                                    self.device, overlap) if num_shards else None
        if isinstance(engine_config, dict):
            engine_config = EngineConfig(**engine_config)
        self.engine = LLMEngine(self.model, engine_config, experts=self.dispatcher)
        self._metrics = FrontendMetrics(self.dispatcher, num_shards)  # Prometheus; see actors/metrics.py
        self.num_shards, self.heartbeat_s = num_shards, heartbeat_s
        self.checkpoint = checkpoint
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, asyncio.Queue] = {}
        self._thread: threading.Thread | None = None
        self._store = None
        self.error: str | None = None
        self.step_seconds = 0.0

    # ---- wiring -----------------------------------------------------------------------------------------
    def open_store(self, timeout_s: float) -> tuple[str, int]:
        self._store, host, port = process_group.open_store(self.num_shards + 1, timeout_s)
        return host, port

    async def join(self, backend: str, host: str, port: int, timeout_s: float) -> bool:
        await asyncio.to_thread(process_group.join, 0, self.num_shards + 1, backend, host, port, timeout_s,
                                self._store)
        return True

    async def start(self) -> bool:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="epserve-engine", daemon=True)
        self._thread.start()
        return True

    async def stop(self) -> bool:
        """Stop the engine thread; it tells the shards to leave their loop."""
        if self._thread and self._thread.is_alive():
            self._commands.put(None)
            await asyncio.to_thread(self._thread.join, 30)
        return True

    # ---- requests ---------------------------------------------------------------------------------------
    async def stream(self, prompt_ids: list[int], params: dict | None = None, request_id: str | None = None):
        """Yields one dict per step with the request's new tokens; the last one has ``finished``."""
        if self.error:
            raise EngineFailure(self.error)
        sp = SamplingParams(**(params or {}))
        out_q: asyncio.Queue = asyncio.Queue()

        def add():  # registered in the engine thread, before any step can produce output for it
            rid = self.engine.add_request(prompt_ids, sp, request_id)
            self._streams[rid] = out_q
            self._metrics.on_add(self.engine.requests[rid])
            return rid

        rid = await self._call(add)
        finished = False
        try:
            while not finished:
                item = await out_q.get()
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield asdict(item)
        finally:
            self._streams.pop(rid, None)
            if not finished and not self.error:  # the caller went away: free its blocks at once
                self._post(lambda: self._abort(rid))

    async def generate(self, prompts: list[list[int]], params: dict | None = None) -> list[dict]:
        """Run prompts to completion as one continuous batch: [{token_ids, finish_reason}] in order."""

        async def one(prompt):
            tokens, reason = [], None
            async for out in self.stream(prompt, params):
                tokens += out["new_token_ids"]
                reason = out["finish_reason"]
            return {"token_ids": tokens, "finish_reason": reason}

        return list(await asyncio.gather(*(one(p) for p in prompts)))

    async def abort(self, request_id: str) -> bool:
        return await self._call(lambda: self._abort(request_id))

    def _abort(self, request_id: str) -> bool:  # in the engine thread
        aborted = self.engine.abort(request_id)
        if aborted:
            self._metrics.on_abort(request_id)
        return aborted

    async def score(self, prompt_ids: list[int]) -> torch.Tensor:
        """fp32 logits [T, V] of a whole prompt through the cluster (no KV cache): for parity checks."""

        def run():
            with torch.inference_mode():
                ids = torch.tensor(prompt_ids, device=self.device)
                pos = torch.arange(len(prompt_ids), device=self.device)
                hidden = self.model(ids, pos, WholeSequence(pos), self.dispatcher)  # None: local experts
                return self.model.logits(hidden).float().cpu()

        return await self._call(run)

    def stats(self) -> dict:
        e = self.engine
        d = self.dispatcher.stats if self.dispatcher else dispatch.DispatchStats()
        return {"running": len(e.scheduler.running), "waiting": len(e.scheduler.waiting), "kv_usage": e.kv_usage,
                "kv_blocks_used": e.blocks.num_used(), "steps": e.num_steps, "preemptions":
                e.scheduler.num_preemptions, "prefix_hit_tokens": e.blocks.stats.hit_tokens,
                "prefix_queried_tokens": e.blocks.stats.queried_tokens, "step_seconds": self.step_seconds,
                "dispatch": asdict(d), "error": self.error}

    def model_info(self) -> dict:
        c = self.model.cfg
        return {"vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_layers": c.num_layers,
                "num_experts": c.num_experts, "top_k": c.top_k, "num_shards": self.num_shards,
                "max_model_len": self.engine.max_model_len, "eos_token_ids": list(c.eos_token_ids),
                "device": str(self.device), "dtype": str(self.dtype).replace("torch.", "")}

    def ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def metrics(self) -> dict:
        """This actor's Prometheus metric families and health, for the ingress's scrape target."""
        return report(self._metrics.registry, ready=self.ready(), error=self.error)

    # ---- the engine thread ------------------------------------------------------------------------------
    async def _call(self, fn):
        if self.error:
            raise EngineFailure(self.error)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, fut))
        return await asyncio.wrap_future(fut)

    def _post(self, fn) -> None:
        """Queue a command without waiting for it (safe from a finally block of a cancelled stream)."""
        self._commands.put((fn, concurrent.futures.Future()))

    def _deliver(self, item) -> None:
        q = self._streams.get(item.request_id)
        if q is not None:
            self._loop.call_soon_threadsafe(q.put_nowait, item)

    def _run(self) -> None:
        last_header = time.monotonic()
        try:
            while self._run_commands(wait_until=None if self.engine.has_unfinished()
                                     else last_header + self.heartbeat_s):
                if self.engine.has_unfinished():
                    t0 = time.perf_counter()
                    outputs = self.engine.step()  # the model's begin_step sends the STEP header
                    elapsed = time.perf_counter() - t0
                    self._metrics.on_step(elapsed, self.engine.last_step_tokens, outputs)
                    for out in outputs:
                        self._deliver(out)
                    self.step_seconds += elapsed
                    last_header = time.monotonic()
                elif time.monotonic() - last_header >= self.heartbeat_s:
                    if self.dispatcher:
                        dispatch.broadcast_header(dispatch.OP_IDLE, self.device)
                    last_header = time.monotonic()
                self._metrics.refresh(self.engine)
            if self.dispatcher:
                dispatch.broadcast_header(dispatch.OP_STOP, self.device)
        except Exception as e:  # noqa: BLE001 - every waiting request learns why
            self.error = f"{type(e).__name__}: {e}"
            self._metrics.on_engine_error()
            failure = EngineFailure(self.error)
            for q in list(self._streams.values()):
                self._loop.call_soon_threadsafe(q.put_nowait, failure)
            self._fail_commands(failure)
        finally:
            if self.dispatcher:
                process_group.leave()

    def _run_commands(self, wait_until: float | None) -> bool:
        """Run every queued command (a burst of requests joins one batch); when idle, wait for one until the
        next heartbeat is due. False once stop is requested."""
        while True:
            timeout = None if wait_until is None else wait_until - time.monotonic()
            try:
                command = self._commands.get(timeout=timeout) if timeout and timeout > 0 else \
                    self._commands.get_nowait()
            except queue.Empty:
                return True
            if command is None:
                return False
            fn, fut = command
            try:
                fut.set_result(fn())
            except torch.distributed.DistError:
                raise  # the process group is broken: the engine stops
            except Exception as e:  # noqa: BLE001 - a bad command fails its caller, not the engine
                fut.set_exception(e)
            wait_until = None  # after the first command, only drain what is already queued

    def _fail_commands(self, failure: Exception) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command:
                command[1].set_exception(failure)
