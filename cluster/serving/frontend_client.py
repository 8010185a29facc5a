"""How the servers reach the engine: the cluster's Frontend actors, or a Frontend object in this process
(``num_shards=0``). Both are driven through the same async API, so the gRPC and OpenAI servers do not care
which one they talk to. What crosses is typed: ``SamplingParams`` in, ``RequestOutput`` and ``ModelInfo`` out.

With several front-ends, each new request goes to the one the router picks (routing.py: least loaded, with
prefix affinity).

A caller that leaves a stream early (it cancelled, its client went away, it stopped reading at a stop string,
the drain ran out) aborts the request here, and only here: the engine frees its KV blocks at once.

Migration: a Frontend actor that dies takes its engine's copy of the requests with it, but not this
client's: it keeps each request's prompt and the tokens already streamed, and moves the request to another
front-end (or, with one, to the restarted one) as a new request whose prompt is prompt + tokens so far and
whose budget is what is left; the caller sees the same stream go on, with no error and no token twice. For
greedy requests the tokens are the ones it would have had (the model is batch-invariant on the CPU kernels;
on GPUs up to kernel nondeterminism); a seeded sampled request continues with a fresh draw. A request moved
more than ``max_migrations`` times, or that finds no live front-end within ``migration_timeout_s``, ends with
``EngineFailure`` (UNAVAILABLE).

A client's requests to a Frontend actor share one stream of outputs (``Frontend.submit`` / ``outputs``),
which this client splits by request id: one Ray item per engine step rather than one per request and token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import uuid
from contextlib import aclosing
from typing import AsyncIterator

import ray

from epserve.actors.engine.engine import RequestOutput
from epserve.actors.engine.sampling import SamplingParams
from epserve.actors.frontend import EngineFailure, Frontend
from epserve.actors.model_info import ModelInfo

from .routing import RequestRouter

FRONTEND_LOST = "the front-end that ran this request was lost"
RETRY_S = 0.5  # between tries to hand a moved request to a front-end that is coming back


_pending: set[asyncio.Task] = set()  # aborts in flight (kept referenced until done)


class FrontendLost(EngineFailure):
    """The Frontend actor is gone (dead, or restarted without its requests): its requests move elsewhere."""


class Draining(RuntimeError):
    """The server is shutting down: the request was refused, or ended when the drain time ran out (gRPC
    UNAVAILABLE, HTTP 503: retriable elsewhere or later)."""


def _cause(e: Exception) -> Exception:
    """The exception the Frontend raised, out of Ray's wrapper (RequestError keeps its field name)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, Exception) else e


class FrontendClient:
    def __init__(self, frontends, block_size: int = 16, affinity: bool = True, max_migrations: int = 3,
                 migration_timeout_s: float = 300.0):
        """``frontends``: a Frontend in this process, or the cluster's Frontend actors (one or a list, in rank
        order; the list may be replaced, e.g. by a recreated actor, while requests run)."""
        self.frontends = list(frontends) if isinstance(frontends, (list, tuple)) else [frontends]
        self.local = isinstance(self.frontends[0], Frontend)
        self.router = RequestRouter(len(self.frontends), block_size=block_size, affinity=affinity)
        self.max_migrations, self.migration_timeout_s = max_migrations, migration_timeout_s
        self.migrations = 0  # requests moved to another front-end (metrics)
        self.accepting = True  # False once draining: new streams raise Draining
        self._live: dict[object, asyncio.Future] = {}  # per stream in flight: its pending next output
        self._ended: set[object] = set()  # streams that the drain ends
        self._subscriber = uuid.uuid4().hex  # this client's stream of outputs on each Frontend actor
        self._requests: dict[str, asyncio.Queue] = {}  # engine request id -> its outputs, split off a stream
        self._reader_of: dict[str, asyncio.Task] = {}  # engine request id -> the stream it arrives on
        self._engine_id: dict[str, tuple[int, str]] = {}  # request id -> (front-end, engine request id) now
        self._readers: dict[int, asyncio.Task] = {}  # per front-end

    @property
    def frontend(self):
        """Front-end 0 (model facts, admin calls)."""
        return self.frontends[0]

    @property
    def in_flight(self) -> int:
        return len(self._live)

    async def _call(self, method: str, *args, frontend: int = 0):
        actor = self.frontends[frontend]
        if self.local:
            result = getattr(actor, method)(*args)
            return await result if inspect.isawaitable(result) else result
        try:
            return await getattr(actor, method).remote(*args)
        except ray.exceptions.RayTaskError as e:
            raise _cause(e) from None
        except ray.exceptions.RayActorError:
            raise FrontendLost(FRONTEND_LOST) from None

    async def stream(self, prompt_ids: list[int], params: SamplingParams,
                     request_id: str) -> AsyncIterator[RequestOutput]:
        """What each engine step produced for the request, until one is ``finished``. Leaving early (cancel,
        disconnect, closing this iterator, the drain running out) aborts the request."""
        if not self.accepting:
            raise Draining("the server is shutting down: retry on another replica or later")
        outputs = self.frontend.stream(prompt_ids, params, request_id) if self.local else \
            self._remote_stream(prompt_ids, params, request_id)
        finished = False
        try:
            async with aclosing(self._until_drained(outputs)) as steps:
                async for out in steps:
                    finished = out.finished
                    yield out
        except (GeneratorExit, asyncio.CancelledError, Draining):
            if not finished:  # not awaited: the caller's task may be being cancelled right now
                task = asyncio.get_running_loop().create_task(self._abort_quietly(request_id))
                _pending.add(task)
                task.add_done_callback(_pending.discard)
            raise

    async def _until_drained(self, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        """``outputs``, each awaited as a future of its own that ``drain`` can cancel: a stream still in flight
        when the drain time runs out ends with Draining. Closes ``outputs`` when it ends."""
        key, it, step = object(), outputs.__aiter__(), None
        try:
            while True:
                self._live[key] = step = asyncio.ensure_future(it.__anext__())
                try:
                    out = await step
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if key in self._ended:
                        raise Draining("the server shut down before the request finished: retry it") from None
                    raise
                yield out
        finally:
            self._live.pop(key, None)
            self._ended.discard(key)
            if step is None or step.done():  # (a step still running ends the stream by itself)
                await it.aclose()

    async def drain(self, timeout_s: float) -> int:
        """Refuse new streams, wait up to ``timeout_s`` for those in flight to finish, and end the rest with
        Draining. Returns how many were ended."""
        self.accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._live and loop.time() < deadline:
            await asyncio.sleep(0.05)
        left = list(self._live.items())
        for key, step in left:
            self._ended.add(key)
            step.cancel()
        return len(left)

    async def _remote_stream(self, prompt_ids: list[int], params: SamplingParams,
                             request_id: str) -> AsyncIterator[RequestOutput]:
        """The request on the front-end the router picks, moved to another when that one is lost."""
        load = len(prompt_ids) + params.max_tokens  # the KV it may hold
        generated: list[int] = []  # tokens streamed so far
        lost: set[int] = set()  # front-ends this request was lost on
        moves = 0
        try:
            while True:
                engine_id = request_id if not moves else f"{request_id}.{moves}"  # never twice in one engine
                out_q = await self._place(prompt_ids + generated, _rest(params, generated), request_id, engine_id,
                                          load, lost)
                try:
                    while True:
                        item = await out_q.get()
                        if isinstance(item, Exception):
                            raise item
                        if moves:  # counted from the request's start, as the caller knows it
                            item = dataclasses.replace(item, request_id=request_id,
                                                       num_prompt_tokens=len(prompt_ids),
                                                       num_output_tokens=len(generated) + item.num_output_tokens)
                        generated += item.new_token_ids
                        yield item
                        if item.finished:
                            return
                except FrontendLost:
                    self._lose(request_id, load, lost)
                    moves += 1
                    self.migrations += 1
                    if moves > self.max_migrations:
                        raise EngineFailure(f"{FRONTEND_LOST}, {moves} times (at most {self.max_migrations} moves "
                                            "per request): retry it") from None
                finally:
                    self._requests.pop(engine_id, None)
                    self._reader_of.pop(engine_id, None)
        finally:
            placed = self._engine_id.pop(request_id, None)
            if placed is not None:
                self.router.release(placed[0], load)

    async def _place(self, prompt_ids: list[int], params: SamplingParams, request_id: str, engine_id: str,
                     load: int, lost: set[int]) -> asyncio.Queue:
        """Submit the request (or its continuation) as ``engine_id`` to the router's pick among the front-ends
        it was not lost on; when it was lost on every one, to the first that comes back. Returns the queue its
        outputs arrive on."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.migration_timeout_s
        everyone = set(range(len(self.frontends)))
        while True:
            if lost >= everyone:  # wait for them to come back (restarted by Ray, or recreated)
                lost.clear()
                await asyncio.sleep(RETRY_S)
            frontend = self.router.choose(prompt_ids, load, exclude=lost)
            self._engine_id[request_id] = (frontend, engine_id)
            out_q = self._requests[engine_id] = asyncio.Queue()
            self._reader_of[engine_id] = self._open_outputs(frontend)
            try:
                await self._call("submit", prompt_ids, params, engine_id, self._subscriber, frontend=frontend)
                return out_q
            except FrontendLost:
                self._requests.pop(engine_id, None)
                self._reader_of.pop(engine_id, None)
                self._lose(request_id, load, lost)
                if loop.time() > deadline:
                    raise EngineFailure(f"{FRONTEND_LOST}, and no front-end took the request within "
                                        f"{self.migration_timeout_s:g} s: retry it") from None

    def _lose(self, request_id: str, load: int, lost: set[int]) -> None:
        """The request's front-end is gone: its load and its prefixes with it."""
        frontend, _ = self._engine_id.pop(request_id)
        self.router.release(frontend, load)
        self.router.forget(frontend)
        lost.add(frontend)

    def _open_outputs(self, frontend: int) -> asyncio.Task:
        """The stream of this client's outputs from a front-end, opened on first use and again after it ended
        (the actor was restarted, or its engine stopped)."""
        reader = self._readers.get(frontend)
        if reader is None or reader.done():
            outputs = self.frontends[frontend].outputs.options(num_returns="streaming").remote(self._subscriber)
            reader = self._readers[frontend] = asyncio.get_running_loop().create_task(self._read_outputs(outputs))
        return reader

    async def _read_outputs(self, outputs) -> None:
        """Hand each output to its request; when the stream ends, every request still waiting on it ends with
        why (``FrontendLost``: the requests move)."""
        failure: Exception = FrontendLost(FRONTEND_LOST)
        me = asyncio.current_task()
        try:
            async for ref in outputs:
                for out in await ref:
                    q = self._requests.get(out.request_id)
                    if q is not None:
                        q.put_nowait(out)
        except ray.exceptions.RayTaskError as e:
            failure = _cause(e)
        except ray.exceptions.RayActorError:
            pass
        except asyncio.CancelledError:  # this client's loop is closing: the actor may stop sending
            ray.cancel(outputs)
            raise
        finally:
            for rid, q in self._requests.items():
                if self._reader_of.get(rid) is me:
                    q.put_nowait(failure)

    async def _abort_quietly(self, request_id: str) -> None:
        try:
            await self.abort(request_id)
        except Exception:  # noqa: BLE001 - the engine may be down; nothing left to free then
            pass

    async def abort(self, request_id: str) -> bool:
        frontend, engine_id = self._engine_id.get(request_id, (0, request_id))
        return await self._call("abort", engine_id, frontend=frontend)

    async def model_info(self) -> ModelInfo:
        return await self._call("model_info")

    async def experts(self) -> dict:
        return await self._call("experts")

    async def ready(self) -> bool:
        try:
            return bool(await self._call("ready"))
        except (ray.exceptions.RayError, RuntimeError):
            return False

    async def stats(self) -> dict:
        """Front-end 0's engine stats; with several, each one's under ``frontends`` and the counts summed."""
        each = await asyncio.gather(*(self._call("stats", frontend=j) for j in range(len(self.frontends))))
        if len(each) == 1:
            return each[0]
        summed = {k: sum(s[k] for s in each) for k in ("running", "waiting", "kv_blocks_used", "steps",
                                                       "prefix_hit_tokens", "prefix_queried_tokens")}
        return {**summed, "kv_usage": max(s["kv_usage"] for s in each), "frontends": each,
                "router": dataclasses.asdict(self.router.stats), "migrations": self.migrations}


def _rest(params: SamplingParams, generated: list[int]) -> SamplingParams:
    """What is left of a request's budget once ``generated`` tokens are out."""
    if not generated:
        return params
    return dataclasses.replace(params, max_tokens=params.max_tokens - len(generated),
                               min_tokens=max(params.min_tokens - len(generated), 0))
