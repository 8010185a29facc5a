"""Where a Frontend's request outputs go: each request's own queue (``Frontend.stream``), or a server's
shared one (``Frontend.submit`` + ``outputs``), which carries everything ready at once as one list, since a
Ray item costs the front-end's process about half a millisecond, and one per request and token cost a
64-request decode step tens of milliseconds. Used from the actor's event loop only (the engine thread hands
its outputs over with ``call_soon_threadsafe``)."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator


class OutputStreams:
    def __init__(self):
        self.by_request: dict[str, asyncio.Queue] = {}  # request id -> where its outputs go
        self.subscribers: dict[str, asyncio.Queue] = {}  # a server's output stream -> its queue

    def __len__(self) -> int:
        """Requests whose outputs still have somewhere to go."""
        return len(self.by_request)

    def subscriber(self, name: str) -> asyncio.Queue:
        return self.subscribers.setdefault(name, asyncio.Queue())

    def deliver(self, outputs: list) -> None:
        for out in outputs:
            q = self.by_request.get(out.request_id)
            if q is not None:
                q.put_nowait(out)
                if out.finished:
                    self.by_request.pop(out.request_id, None)

    def fail(self, loop, failure: Exception) -> None:
        """Every stream ends with ``failure`` (called from any thread)."""
        for q in {id(q): q for q in [*self.by_request.values(), *self.subscribers.values()]}.values():
            loop.call_soon_threadsafe(q.put_nowait, failure)

    async def follow(self, request_id: str, out_q: asyncio.Queue) -> AsyncIterator:
        """One request's outputs, until the finished one; raises the failure that ends it."""
        finished = False
        try:
            while not finished:
                item = await out_q.get()
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
        finally:
            self.by_request.pop(request_id, None)

    async def batches(self, name: str) -> AsyncIterator[list]:
        """The subscriber's outputs, everything ready at once as one list; raises the failure that ends it."""
        out_q = self.subscriber(name)
        try:
            while True:
                batch = [await out_q.get()]
                while not out_q.empty():
                    batch.append(out_q.get_nowait())
                failures = [item for item in batch if isinstance(item, Exception)]
                outputs = [item for item in batch if not isinstance(item, Exception)]
                if outputs:
                    yield outputs
                if failures:
                    raise failures[0]
        finally:
            self.subscribers.pop(name, None)
