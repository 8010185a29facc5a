"""How the servers reach the engine: a Frontend actor of the cluster, or a Frontend object in this process
(``num_shards=0``). Both are driven through the same async API, so the gRPC and OpenAI servers do not care
which one they talk to."""

from __future__ import annotations

import asyncio
import inspect
from typing import AsyncIterator

import ray

from epserve.actors.frontend import Frontend


_pending: set[asyncio.Task] = set()  # aborts in flight (kept referenced until done)


def _cause(e: Exception) -> Exception:
    """The exception the Frontend raised, out of Ray's wrapper (RequestError keeps its field name)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, Exception) else e


class FrontendClient:
    def __init__(self, frontend):
        self.frontend = frontend
        self.local = isinstance(frontend, Frontend)

    async def _call(self, method: str, *args):
        if self.local:
            result = getattr(self.frontend, method)(*args)
            return await result if inspect.isawaitable(result) else result
        try:
            return await getattr(self.frontend, method).remote(*args)
        except ray.exceptions.RayTaskError as e:
            raise _cause(e) from None

    async def stream(self, prompt_ids: list[int], params: dict, request_id: str) -> AsyncIterator[dict]:
        """One dict per engine step: request_id, new_token_ids, new_logprobs, finished, finish_reason,
        num_prompt_tokens, num_output_tokens. Leaving early (cancel, disconnect) aborts the request."""
        finished = False
        try:
            if self.local:
                async for item in self.frontend.stream(prompt_ids, params, request_id):
                    finished = item["finished"]
                    yield item
            else:
                gen = self.frontend.stream.options(num_returns="streaming").remote(prompt_ids, params, request_id)
                async for ref in gen:
                    try:
                        item = await ref
                    except ray.exceptions.RayTaskError as e:
                        raise _cause(e) from None
                    finished = item["finished"]
                    yield item
        finally:
            if not finished:  # not awaited: the caller's task may be being cancelled right now
                task = asyncio.get_running_loop().create_task(self._abort_quietly(request_id))
                _pending.add(task)
                task.add_done_callback(_pending.discard)

    async def _abort_quietly(self, request_id: str) -> None:
        try:
            await self.abort(request_id)
        except Exception:  # noqa: BLE001 - the engine may be down; nothing left to free then
            pass

    async def abort(self, request_id: str) -> bool:
        return await self._call("abort", request_id)

    async def model_info(self) -> dict:
        return await self._call("model_info")

    async def ready(self) -> bool:
        try:
            return bool(await self._call("ready"))
        except (ray.exceptions.RayError, RuntimeError):
            return False

    async def stats(self) -> dict:
        return await self._call("stats")
