"""How the servers reach the engine: a Frontend actor of the cluster, or a Frontend object in this process
(``num_shards=0``). Both are driven through the same async API, so the gRPC and OpenAI servers do not care
which one they talk to. What crosses is typed: ``SamplingParams`` in, ``RequestOutput`` and ``ModelInfo`` out.

A caller that leaves a stream early (it cancelled, its client went away, it stopped reading at a stop string,
the drain ran out) aborts the request here, and only here: the engine frees its KV blocks at once.

A Frontend actor that dies takes the requests it held with it: their calls end with ``EngineFailure`` and a
message that says so (the servers answer UNAVAILABLE: retriable, since the cluster restarts the front-end).

A client's requests to a Frontend actor share one stream of outputs (``Frontend.submit`` / ``outputs``),
which this client splits by request id: one Ray item per engine step rather than one per request and token.
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from contextlib import aclosing
from typing import AsyncIterator

import ray

from epserve.actors.engine.engine import RequestOutput
from epserve.actors.engine.sampling import SamplingParams
from epserve.actors.frontend import EngineFailure, Frontend
from epserve.actors.model_info import ModelInfo

FRONTEND_LOST = ("the front-end was lost with this request (it is being restarted; the request's progress is "
                 "gone): retry it")


_pending: set[asyncio.Task] = set()  # aborts in flight (kept referenced until done)


class Draining(RuntimeError):
    """The server is shutting down: the request was refused, or ended when the drain time ran out (gRPC
    UNAVAILABLE, HTTP 503: retriable elsewhere or later)."""


def _cause(e: Exception) -> Exception:
    """The exception the Frontend raised, out of Ray's wrapper (RequestError keeps its field name)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, Exception) else e


class FrontendClient:
    def __init__(self, frontend):
        self.frontend = frontend
        self.local = isinstance(frontend, Frontend)
        self.accepting = True  # False once draining: new streams raise Draining
        self._live: dict[object, asyncio.Future] = {}  # per stream in flight: its pending next output
        self._ended: set[object] = set()  # streams that the drain ends
        self._subscriber = uuid.uuid4().hex  # this client's stream of outputs on the Frontend actor
        self._requests: dict[str, asyncio.Queue] = {}  # request id -> its outputs, split off that stream
        self._reader: asyncio.Task | None = None

    @property
    def in_flight(self) -> int:
        return len(self._live)

    async def _call(self, method: str, *args):
        if self.local:
            result = getattr(self.frontend, method)(*args)
            return await result if inspect.isawaitable(result) else result
        try:
            return await getattr(self.frontend, method).remote(*args)
        except ray.exceptions.RayTaskError as e:
            raise _cause(e) from None
        except ray.exceptions.RayActorError:
            raise EngineFailure(FRONTEND_LOST) from None

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
        out_q: asyncio.Queue = asyncio.Queue()
        self._requests[request_id] = out_q
        try:
            self._open_outputs()
            await self._call("submit", prompt_ids, params, request_id, self._subscriber)
            while True:
                item = await out_q.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            self._requests.pop(request_id, None)

    def _open_outputs(self) -> None:
        """The stream of this client's outputs, opened on first use and again after it ended (the actor was
        restarted, or its engine stopped)."""
        if self._reader is None or self._reader.done():
            outputs = self.frontend.outputs.options(num_returns="streaming").remote(self._subscriber)
            self._reader = asyncio.get_running_loop().create_task(self._read_outputs(outputs))

    async def _read_outputs(self, outputs) -> None:
        """Hand each output to its request; when the stream ends, every request still waiting ends with why."""
        failure: Exception = EngineFailure(FRONTEND_LOST)
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
            for q in self._requests.values():
                q.put_nowait(failure)

    async def _abort_quietly(self, request_id: str) -> None:
        try:
            await self.abort(request_id)
        except Exception:  # noqa: BLE001 - the engine may be down; nothing left to free then
            pass

    async def abort(self, request_id: str) -> bool:
        return await self._call("abort", request_id)

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
        return await self._call("stats")
