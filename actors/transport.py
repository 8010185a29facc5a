"""How the ranks of the expert exchange move bytes. The exchange (actors/dispatch.py) needs two collectives:
a header every rank joins (an element-wise max of small integer vectors) and an all-to-all of rows (dim 0 of a
2-D tensor, each rank sending every other a known number of rows). Two transports provide them:

* ``DistTransport``: ``torch.distributed`` (NCCL on GPUs, gloo on CPUs), for ranks anywhere.
* ``ShmTransport``: shared memory, for CPU ranks on one host. gloo's collectives go through loopback
  sockets, and with more processes than cores each one waits for the scheduler: measured here, a 3-rank
  all-to-all took 1.2-1.5 ms even for one row, against 0.3 ms with 2 ranks (docs/performance.md). Here every
  ordered pair of ranks has a mailbox in one segment: the sender copies its rows in and publishes a sequence
  number; the receiver waits for it (``kernels/shm_wait.c``: a short spin, polling that yields the core for up
  to 2 ms, then a futex sleep that wakes the moment the number is published), copies the rows out and
  acknowledges, which frees the mailbox. Only pairs that exchange rows (both sides know the counts) touch their
  mailbox.

Both fail the same way: a peer that does not answer within the deadline, or that left, raises a
``torch.distributed.DistError`` (``TransportError`` for shared memory), which the actors treat as a lost peer.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import uuid
from typing import Callable, Protocol

import torch
import torch.distributed as dist

from .model import cpu_kernels

CACHE_LINE = 64


class TransportError(dist.DistError):
    """A peer did not answer within the deadline, or left the group."""


class Transport(Protocol):
    rank: int
    world: int

    def header(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise max over every rank's int64 ``values``."""

    def all_to_all(self, send: torch.Tensor, send_rows: list[int], recv_rows: list[int],
                   async_op: bool = False) -> tuple[torch.Tensor, Callable[[], None]]:
        """Rows ``send_rows[p]`` of ``send`` (in rank order) to each rank p; returns the rows received from
        each rank (``recv_rows[p]``, in rank order) and a wait: once it returns, they are there."""

    def close(self) -> None: ...


class DistTransport:
    """The process group ``torch.distributed`` has (see actors/process_group.py)."""

    def __init__(self):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def header(self, values):
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return values

    def all_to_all(self, send, send_rows, recv_rows, async_op=False):
        recv = send.new_empty(sum(recv_rows), *send.shape[1:])
        work = dist.all_to_all_single(recv, send, recv_rows, send_rows, async_op=async_op)
        return recv, (work.wait if async_op else _done)

    def close(self):
        if dist.is_initialized():
            dist.destroy_process_group()


def _done():
    pass


class ShmTransport:
    """Mailboxes in one shared-memory segment, one per ordered pair of ranks, each ``capacity`` bytes.

    Layout: a closed flag; per ordered pair (src, dst) a control line (the sequence number src published, and
    on a line of its own the number dst consumed, and the message's size); then every pair's data."""

    def __init__(self, name: str, rank: int, world: int, capacity: int, timeout_s: float, create: bool):
        self.rank, self.world, self.capacity = rank, world, capacity
        self.timeout_ns = int(timeout_s * 1e9)
        pairs = world * world
        self._data_at = CACHE_LINE * (1 + 2 * pairs)
        self.path = os.path.join(SHM_DIR, name)
        # tmpfs pages are taken as they are first written: a mailbox costs what its largest message used
        fd = os.open(self.path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        try:
            if create:
                os.ftruncate(fd, self._data_at + pairs * capacity)
            self.map = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        self._anchor = ctypes.c_char.from_buffer(self.map)  # released before the map closes
        self.base = ctypes.addressof(self._anchor)
        self.sent = [0] * world  # messages this rank sent to each rank
        self.received = [0] * world  # and received from each
        self._lib = cpu_kernels.lib()
        self._lock = threading.Lock()  # ``abort`` (another thread) against ``close``

    # ---- the segment's words
    def _closed(self) -> int:
        return self.base

    def _published(self, src: int, dst: int) -> int:  # uint32 sequence number, then uint64 size
        return self.base + CACHE_LINE * (1 + 2 * (src * self.world + dst))

    def _consumed(self, src: int, dst: int) -> int:
        return self._published(src, dst) + CACHE_LINE

    def _data(self, src: int, dst: int) -> int:
        return self.base + self._data_at + (src * self.world + dst) * self.capacity

    def _wait(self, word: int, target: int, what: str) -> None:
        code = self._lib.shm_wait(word, target & 0xFFFFFFFF, self.timeout_ns, self._closed())
        if code == -1:
            raise TransportError(f"rank {self.rank}: no {what} within {self.timeout_ns / 1e9:g} s")
        if code == -2:
            raise TransportError(f"rank {self.rank}: a peer left the group while waiting for {what}")

    # ---- messages
    def _send(self, dst: int, data: torch.Tensor) -> None:
        nbytes = data.numel() * data.element_size()
        if nbytes > self.capacity:
            raise TransportError(f"a message of {nbytes} bytes exceeds the shared-memory mailbox's "
                                 f"{self.capacity} (the step is larger than the exchange was sized for)")
        self._wait(self._consumed(self.rank, dst), self.sent[dst], f"room to send to rank {dst}")
        ctypes.memmove(self._data(self.rank, dst), data.data_ptr(), nbytes)
        ctypes.c_uint64.from_address(self._published(self.rank, dst) + 8).value = nbytes
        self.sent[dst] += 1
        self._lib.shm_post(self._published(self.rank, dst), self.sent[dst] & 0xFFFFFFFF)

    def _receive(self, src: int, into: torch.Tensor) -> None:
        self._wait(self._published(src, self.rank), self.received[src] + 1, f"rows from rank {src}")
        nbytes = ctypes.c_uint64.from_address(self._published(src, self.rank) + 8).value
        want = into.numel() * into.element_size()
        if nbytes != want:
            raise TransportError(f"rank {src} sent {nbytes} bytes where {want} were expected")
        ctypes.memmove(into.data_ptr(), self._data(src, self.rank), nbytes)
        self.received[src] += 1
        self._lib.shm_post(self._consumed(src, self.rank), self.received[src] & 0xFFFFFFFF)

    def header(self, values):
        values = values.contiguous()
        for p in range(self.world):
            if p != self.rank:
                self._send(p, values)
        out, theirs = values.clone(), torch.empty_like(values)
        for p in range(self.world):
            if p != self.rank:
                self._receive(p, theirs)
                torch.maximum(out, theirs, out=out)
        return out

    def all_to_all(self, send, send_rows, recv_rows, async_op=False):
        send = send.contiguous()
        starts = [0]
        for n in send_rows:
            starts.append(starts[-1] + n)
        recv = send.new_empty(sum(recv_rows), *send.shape[1:])
        recv_starts = [0]
        for n in recv_rows:
            recv_starts.append(recv_starts[-1] + n)
        for p in range(self.world):
            if p != self.rank and send_rows[p]:
                self._send(p, send[starts[p] : starts[p + 1]])
        if send_rows[self.rank]:
            recv[recv_starts[self.rank] : recv_starts[self.rank + 1]] = send[starts[self.rank] : starts[self.rank + 1]]

        def wait():
            for p in range(self.world):
                if p != self.rank and recv_rows[p]:
                    self._receive(p, recv[recv_starts[p] : recv_starts[p + 1]])

        if async_op:
            return recv, wait
        wait()
        return recv, _done

    def unlink(self) -> None:
        """Remove the segment's name once every rank has mapped it: the memory lives while a rank holds it
        and goes with the last one, however the ranks end (a killed process leaves nothing in /dev/shm)."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def abort(self) -> None:
        """From any thread: every wait in the group, this rank's own too, fails within a moment."""
        with self._lock:
            if self.map is not None:
                self._lib.shm_post(self._closed(), 1)

    def close(self) -> None:
        """Leave: every peer's wait fails within a moment (it sees the closed flag when it next wakes)."""
        with self._lock:
            if self.map is None:
                return
            self._lib.shm_post(self._closed(), 1)
            del self._anchor
            self.base = 0
            self.map.close()
            self.map = None


SHM_DIR = "/dev/shm"


def shm_available() -> bool:
    """Whether this process can use the shared-memory transport (Linux's /dev/shm, the native kernels)."""
    return os.path.isdir(SHM_DIR) and cpu_kernels.available()


def new_segment_name() -> str:
    return f"epserve-{uuid.uuid4().hex[:16]}"
