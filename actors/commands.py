"""The Frontend's command queue: functions that must run in its engine thread (which owns the model, the
engine and the process group), sent from the actor's event loop, each with a future for its result."""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import time

import torch


class CommandQueue:
    def __init__(self):
        self._queue: queue.Queue = queue.Queue()

    async def call(self, fn):
        """``fn()`` run in the engine thread; its result (or exception) here."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((fn, fut))
        return await asyncio.wrap_future(fut)

    def post(self, fn) -> None:
        """``fn()`` run in the engine thread; nobody waits for it."""
        self._queue.put((fn, concurrent.futures.Future()))

    def stop(self) -> None:
        """``run`` returns False once it reaches this."""
        self._queue.put(None)

    def run(self, wait_until: float | None) -> bool:
        """In the engine thread: run every queued command (a burst of requests joins one batch); when idle,
        wait for one until ``wait_until`` (None: not at all). False once stop is reached."""
        while True:
            timeout = None if wait_until is None else wait_until - time.monotonic()
            try:
                command = self._queue.get(timeout=timeout) if timeout and timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                return True
            if command is None:
                return False
            fn, fut = command
            try:
                fut.set_result(fn())
            except torch.distributed.DistError as e:
                fut.set_exception(e)
                raise  # the process group is broken: the engine suspends or stops
            except Exception as e:  # noqa: BLE001 - a bad command fails its caller, not the engine
                fut.set_exception(e)
            wait_until = None  # after the first command, only drain what is already queued

    def fail_all(self, failure: Exception) -> None:
        """Every command still queued fails with ``failure``."""
        while True:
            try:
                command = self._queue.get_nowait()
            except queue.Empty:
                return
            if command:
                command[1].set_exception(failure)
