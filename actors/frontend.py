"""The Frontend actor: the engine (scheduler, KV cache, attention, dense FFN, router, sampler) with its side of
the expert exchange (``dispatch.FrontendExchange``) as its expert executor.

One engine thread owns the model, the engine and the process group; everything else reaches it through a
command queue (add, abort, score) and gets results back through asyncio queues, so the actor's async
methods (called by the servers, possibly many at once) never block on the model. A server's requests share
one output stream (``submit`` + ``outputs``): each step's outputs for all of them cross as one Ray item
(actors/output_streams.py). While there is no work, the engine thread sends the shards an idle heartbeat
before the collective deadline runs out.

Several front-ends (``frontends`` M, this one ``frontend`` j: rank j of the group) each run an engine of their
own over the one pool of shards, in lockstep (actors/dispatch.py): while any of them steps, the others join
every header and every layer's exchange with zero rows; a front-end that begins a step while the group is
idle wakes the others first (``wake``, through the handles ``start`` was given).

Failures: when a step or a heartbeat fails (a shard died, or a collective ran past its deadline), a
``supervised`` front-end (the cluster's, see cluster/supervisor.py) suspends instead of failing: it stops
stepping, puts every running request back in the waiting queue to be recomputed from the tokens it already
has (the failed step's KV is incomplete; nothing of it was sampled), leaves the process group so that the
peers' collectives fail at once, and tells the supervisor (``watch`` returns). Requests keep their output
streams: once the supervisor has rebuilt the process group and called ``start`` again, they continue where
they were, so their clients see a pause and the same tokens. ``fail`` ends the suspension with an error
instead: every request in flight, and every later one, gets ``EngineFailure`` with the reason. Planned
changes need no suspension: ``regroup`` leaves the group after the next step, as every rank does (``parked``:
requests kept as they are), for a new ``join``; ``stage`` gives the next expert placement (rebalancing).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import asdict
from typing import AsyncIterator

import torch

from . import dispatch, process_group
from .commands import CommandQueue
from .engine.config import EngineConfig
from .engine.engine import LLMEngine, RequestOutput
from .engine.sampling import SamplingParams
from .metrics import FrontendMetrics, report
from .output_streams import OutputStreams
from .model.attention import WholeSequence
from .model import cpu_threads, precision
from .model.loader import load_model
from .model.micro_batches import forward_parts
from .placement import Placement, build
from .transport import shm_available
from .model_info import ModelInfo

log = logging.getLogger("epserve.frontend")


class EngineFailure(RuntimeError):
    """The engine stopped for good (a collective failed or a peer died, and no recovery followed, or the
    front-end itself was lost); requests in flight are ended with it. Retriable: the cluster may be back."""


class Frontend:
    def __init__(self, checkpoint: str, num_shards: int, engine_config: EngineConfig | dict | None = None,
                 threads: int | None = None, heartbeat_s: float = 1.0, overlap: bool | None = None,
                 supervised: bool = False, dtype: str = "auto", placement: dict | None = None,
                 frontend: int = 0, frontends: int = 1, micro_batches: int = 1, cpus: list[int] | None = None):
        process_group.bind_cpus(cpus)
        torch.set_num_threads(threads or torch.get_num_threads())
        self.device = process_group.device_for_actor()
        self.dtype = precision.resolve_dtype(dtype, self.device)
        log.info("front-end on %s", precision.describe(self.device, self.dtype))
        # num_shards = 0: every expert in this process, no process group (the in-process server)
        self.model = load_model(checkpoint, self.dtype, self.device, expert_range=None if num_shards else "all")
        cfg = self.model.cfg
        self.dispatcher = None
        if num_shards:
            where = build(cfg.num_layers, cfg.num_experts, num_shards, **(placement or {}))  # as the shards do
            self.dispatcher = dispatch.FrontendExchange(dispatch.Ranks(frontends, num_shards, micro_batches), where,
                                                        cfg.hidden_size, cfg.top_k, self.dtype, self.device, overlap)
        if isinstance(engine_config, dict):
            engine_config = EngineConfig(**engine_config)
        self.engine = LLMEngine(self.model, engine_config, experts=self.dispatcher)
        self.checkpoint, self.num_shards, self.heartbeat_s = checkpoint, num_shards, heartbeat_s
        self.frontend, self.frontends = frontend, frontends  # this front-end's rank, and how many there are
        self._peers: list = []  # the other front-ends' actor handles (``start``)
        self._woken = False  # a peer began a step while the group was idle: join its header now
        facts = self.model_info()
        self._metrics = FrontendMetrics(self.dispatcher, num_shards,  # Prometheus; see actors/metrics.py
                                        info={"dtype": facts.dtype, "device": facts.device, "cpu_isa": facts.cpu_isa},
                                        frontend=self.frontend)
        self._commands, self._streams = CommandQueue(), OutputStreams()
        self._thread, self._store = None, None
        self.error: str | None = None  # the engine stopped for good
        self.supervised = supervised  # a failed collective suspends the engine (else: error)
        self.suspended: str | None = None  # why the engine waits for a new process group
        self.parked, self._parked_event = False, None  # left the group for a planned new one (``regroup``)
        self._suspension: asyncio.Event | None = None  # set when the engine suspends (see watch)
        self.step_seconds = 0.0

    # ---- wiring -----------------------------------------------------------------------------------------
    def open_store(self, timeout_s: float, world: int | None = None) -> tuple[str, int, int]:
        """A new rendezvous of ``world`` ranks (default: every rank): (host, port, the largest message a step
        may send between two ranks)."""
        self._store, host, port = process_group.open_store(world or self.dispatcher.ranks.world, timeout_s)
        cfg = self.model.cfg
        capacity = dispatch.max_message_bytes(self.engine.config.max_num_batched_tokens, self.dispatcher.ranks,
                                              cfg.hidden_size, cfg.top_k, self.dtype)
        return host, port, capacity

    async def join(self, backend: str, host: str, port: int, timeout_s: float, capacity: int = 0,
                   group: dict | None = None) -> bool:
        """Join a new group; ``group``: its shape, if not the start-up one (``members``: the shard at each
        shard position; ``slots``: the placement over them; ``epoch``: the placement's)."""
        if group is not None:
            d = self.dispatcher
            d.regroup(dispatch.Ranks(d.ranks.frontends, len(group["members"]), d.ranks.micro_batches),
                      Placement(self.model.cfg.num_experts, group["slots"]), group["members"], group["epoch"])
        self.dispatcher.transport = await asyncio.to_thread(
            process_group.join, self.frontend, self.dispatcher.ranks.world, backend, host, port, timeout_s,
            self._store if self.frontend == 0 else None, capacity)
        return True

    def where(self) -> tuple[str, bool]:
        """(this actor's Ray node, whether it can use the shared-memory transport): see Cluster.connect."""
        return process_group.node_id(), shm_available()

    async def start(self, peers: list | None = None) -> bool:
        """Start the engine thread (after ``join``), or resume a suspended one (after a new ``join``). A start
        returns once the warm-up is done (the thread runs commands only after it): a request sent once the
        cluster says it is ready waits for none. ``peers``: the other front-ends' actors (new ones after a recovery)."""
        self._peers = list(peers or [])
        if self.dispatcher is not None:
            self.dispatcher.wake_peers = self._wake_peers if self._peers else None
        # a fresh event before the engine can run (and fail) again; the previous one set: no watch stays pending
        previous, self._suspension = self._suspension, asyncio.Event()
        if previous is not None:
            previous.set()
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name="epserve-engine", daemon=True)
            self._thread.start()
            return await self._call(lambda: True)
        return await self._call(self._resume)

    async def watch(self) -> str:
        """Returns why, once the engine has suspended after a failure (the supervisor's notification)."""
        await self._suspension.wait()
        return self.suspended or self.error or "the engine stopped"

    async def suspend(self, reason: str) -> bool:
        """Suspend the engine now (the supervisor saw a peer die first); returns once no step runs. False
        for a front-end whose engine never started (a new incarnation: it holds no requests). The group is
        aborted first, where the transport can (shared memory): a step waiting for a dead peer fails now."""
        if self._thread is None:
            return False
        abort = getattr(self.dispatcher and self.dispatcher.transport, "abort", None)
        if abort is not None:
            abort()
        return await self._call(lambda: self._suspend(reason))

    async def regroup(self) -> bool:
        """Leave the group after the next step, as every rank does (the header says so), for a new ``join``
        and ``start``; no request is recomputed. Returns once this front-end has left."""
        self._parked_event = asyncio.Event()
        if not self.parked:
            self.dispatcher.regroup_requested = True
            self._commands.post(lambda: None)  # an idle engine thread sends the header now
            await self._parked_event.wait()
        return True

    def stage(self, epoch: int, slots: list[list[list[int]]]) -> None:
        """Route by the placement ``slots`` from the first header at which every rank is ready for ``epoch``."""
        self.dispatcher.stage(epoch, Placement(self.model.cfg.num_experts, slots))

    async def fail(self, message: str) -> bool:
        """Give up: end every request, and refuse later ones, with ``EngineFailure(message)``."""
        if self._thread is None:  # nothing runs yet: only later requests to refuse
            self.error = message
            return True
        return await self._call(lambda: self._suspend(message) and self._end(message))

    def ping(self) -> bool:
        return True

    def wake(self) -> None:
        """A peer begins a step: join the group's next header now (not at the next heartbeat)."""
        self._commands.post(lambda: setattr(self, "_woken", True))  # read by the engine thread

    def _wake_peers(self) -> None:  # in the engine thread; a peer that is gone learns of the step otherwise
        for peer in self._peers:
            peer.wake.remote()

    async def stop(self) -> bool:
        """Stop the engine thread; it tells the shards to leave their loop."""
        if self._thread and self._thread.is_alive():
            self._commands.stop()
            await asyncio.to_thread(self._thread.join, 30)
        return True

    # ---- requests ---------------------------------------------------------------------------------------
    async def stream(self, prompt_ids: list[int], params: SamplingParams | None = None,
                     request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields what each step produced for the request; the last one is ``finished``. A caller that leaves
        early aborts the request itself (cluster/serving/frontend_client.py): this only stops delivering."""
        out_q: asyncio.Queue = asyncio.Queue()
        rid = await self._add(prompt_ids, params or SamplingParams(), request_id, out_q)
        async for item in self._streams.follow(rid, out_q):
            yield item

    async def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                     subscriber: str) -> str:
        """Add a request whose outputs go to the stream ``outputs(subscriber)``; returns its id."""
        return await self._add(prompt_ids, params, request_id, self._streams.subscriber(subscriber))

    async def _add(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None,
                   out_q: asyncio.Queue) -> str:
        if self.error:
            raise EngineFailure(self.error)

        def add():  # registered in the engine thread, before any step can produce output for it
            rid = self.engine.add_request(prompt_ids, params, request_id)
            self._streams.by_request[rid] = out_q
            self._metrics.on_add(self.engine.requests[rid])
            return rid

        return await self._call(add)

    async def outputs(self, subscriber: str) -> AsyncIterator[list[RequestOutput]]:
        """The outputs of the requests ``submit``ted for ``subscriber``, everything ready at once as one list
        (one per step while they run). Ends with ``EngineFailure`` when the engine stops for good."""
        async for outputs in self._streams.batches(subscriber):
            yield outputs

    async def generate(self, prompts: list[list[int]], params: SamplingParams | None = None) -> list[dict]:
        """Run prompts to completion as one continuous batch: [{token_ids, finish_reason}] in order."""

        async def one(prompt):
            tokens, reason = [], None
            async for out in self.stream(prompt, params):
                tokens += out.new_token_ids
                reason = out.finish_reason
            return {"token_ids": tokens, "finish_reason": reason}

        return list(await asyncio.gather(*(one(p) for p in prompts)))

    async def abort(self, request_id: str) -> bool:
        return await self._call(lambda: self._abort(request_id))

    def _abort(self, request_id: str) -> bool:  # in the engine thread
        self._streams.by_request.pop(request_id, None)
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
                # one part (the other micro-batch, if any, empty); no dispatcher: local experts
                hidden = forward_parts(self.model, [(ids, pos, WholeSequence(pos))], self.dispatcher)[0]
                return self.model.logits(hidden).float().cpu()

        return await self._call(run)

    def stats(self) -> dict:
        e = self.engine
        d = self.dispatcher.counters() if self.dispatcher else dispatch.DispatchStats()
        return {"running": len(e.scheduler.running), "waiting": len(e.scheduler.waiting), "kv_usage": e.kv_usage,
                "kv_blocks_used": e.blocks.num_used(), "steps": e.num_steps, "preemptions":
                e.scheduler.num_preemptions, "prefix_hit_tokens": e.blocks.stats.hit_tokens,
                "prefix_queried_tokens": e.blocks.stats.queried_tokens, "step_seconds": self.step_seconds,
                "dispatch": asdict(d), "error": self.error, "suspended": self.suspended, "parked": self.parked}

    def model_info(self) -> ModelInfo:
        return ModelInfo.of(self)

    def experts(self) -> dict:
        """Where the routed experts live (per layer, each shard's slots; none when this actor runs them) and
        the routed load so far (``epserve experts``)."""
        d = self.dispatcher
        stats = asdict(d.counters() if d else dispatch.DispatchStats())
        load = d.load_LE.tolist() if d is not None and d.load_LE is not None else None
        return {"num_experts": self.model.cfg.num_experts, "layers": d.slots_by_shard() if d else [],
                "members": d.members if d else [], "epoch": d.epoch if d else 0, "tokens_per_layer_expert": load,
                **{k: stats[k] for k in ("tokens_per_shard", "tokens_per_expert", "tokens_per_layer_shard")}}

    def ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and (self.error, self.suspended) == (None, None)

    def metrics(self) -> dict:
        """This actor's Prometheus metric families and health, for the ingress's scrape target."""
        return report(self._metrics.registry, ready=self.ready(), error=self.error)

    # ---- the engine thread ------------------------------------------------------------------------------
    async def _call(self, fn):
        if self.error:
            raise EngineFailure(self.error)
        return await self._commands.call(fn)

    def _run(self) -> None:
        self._last_header, warm_up = time.monotonic(), self.engine.config.warm_up
        if self.device.type == "cpu":
            cpu_threads.bind_team()  # this thread's OpenMP team, one thread per core (see cpu_threads.py)
        try:
            while self.error is None:
                try:  # the warm-up first (the shards warm up too), once: a shard lost in it is recovered as in
                    if warm_up:  # a step
                        warm_up = False
                        self.engine.warm_up()
                    if not self._commands.run(self._wait_until()):
                        break
                    if not (self.suspended or self.parked or self._left()):  # (a command's header may say so)
                        self._step_or_heartbeat()
                        self._left()
                except dispatch.GroupStopped:  # another front-end stopped the group: it is gone
                    self._end("the cluster stopped")
                    return
                except Exception as e:  # noqa: BLE001 - a failed collective (or step): suspend, or stop
                    if not self.supervised:
                        raise
                    self._suspend(f"{type(e).__name__}: {e}")
                self._metrics.refresh(self.engine)
            if self.dispatcher and self.error is None and not (self.suspended or self.parked):
                self.dispatcher.stop()
        except Exception as e:  # noqa: BLE001 - every waiting request learns why
            self._metrics.on_engine_error()
            self._end(f"{type(e).__name__}: {e}")
        finally:
            if self.dispatcher:
                process_group.leave()
            if self.error:  # commands queued while the engine ended
                self._commands.fail_all(EngineFailure(self.error))

    def _wait_until(self) -> float | None:
        """How long the command queue may block: not at all while there is work (here, or at another
        front-end: the group is not idle); until the next heartbeat is due while idle; a heartbeat's time at
        most while suspended (nothing to send then)."""
        if self.suspended or self.parked:
            return time.monotonic() + self.heartbeat_s
        d = self.dispatcher
        busy = self.engine.has_unfinished() or self._woken or (d and (not d.group_idle or d.regroup_requested))
        return None if busy else self._last_header + self.heartbeat_s

    def _step_or_heartbeat(self) -> None:
        d = self.dispatcher
        if self.engine.has_unfinished():
            headers = d.headers if d else 0
            t0 = time.perf_counter()
            outputs = self.engine.step()  # the model runner's begin_step sends the step's header
            elapsed = time.perf_counter() - t0
            self._metrics.on_step(elapsed, self.engine.last_step_tokens, outputs)
            if outputs:
                self._loop.call_soon_threadsafe(self._streams.deliver, outputs)  # one wake-up per step
            self.step_seconds += elapsed
            if d and d.headers == headers:  # nothing was scheduled: the group still waits for this header
                self._idle_header()
            self._last_header = time.monotonic()
        elif self._woken or (d and (not d.group_idle or d.regroup_requested)) or \
                time.monotonic() - self._last_header >= self.heartbeat_s:
            self._idle_header()

    def _idle_header(self) -> None:
        self._woken = False
        if self.dispatcher and self.dispatcher.idle() == dispatch.OP_STOP:
            raise dispatch.GroupStopped("the cluster is stopping")
        self._last_header = time.monotonic()

    def _suspend(self, reason: str) -> bool:  # in the engine thread
        if self.suspended is None:
            self.suspended = reason
            self._metrics.on_engine_error()
            self.engine.scheduler.preempt_all()  # recomputed from their tokens once the group is back
            if self.dispatcher:
                process_group.leave()  # the peers' pending collectives fail now, not at their deadline
            self._loop.call_soon_threadsafe(lambda: self._suspension.set())  # the event of this run
        return True

    def _left(self) -> bool:  # in the engine thread: leave the group if the last header said so (``regroup``)
        if self.dispatcher and self.dispatcher.leaving:
            self.parked, self.dispatcher.leaving = True, False
            process_group.leave()
            self._loop.call_soon_threadsafe(lambda: self._parked_event and self._parked_event.set())
        return self.parked

    def _resume(self) -> bool:  # in the engine thread, after a new join
        self.suspended, self.parked, self._last_header = None, False, time.monotonic()
        return True

    def _end(self, message: str) -> bool:  # in the engine thread: every request fails, the thread exits
        self.error = message
        self._metrics.on_requests_failed()
        failure = EngineFailure(message)
        self._streams.fail(self._loop, failure)
        self._commands.fail_all(failure)
        self._loop.call_soon_threadsafe(lambda: self._suspension.set())
        return True
