"""Where a CPU model's tensors live in host memory.

Weights in memory of torch's own (``resident``): a decode step streams every routed expert's weights once,
gigabytes of them, and a tile of 16 weight rows K elements apart touches 16 pages. A tensor read from a
safetensors file lives in the reader's buffer, in 4 KB pages; torch's own large blocks come in 2 MB pages
(actors/__init__.py turns that on). On a 2-core Xeon the experts of a `bench` decode step read at 21 GB/s
from the reader's buffer and at 28-29 GB/s from torch's, and the step went from 209 to 169 ms
(docs/performance.md "On a CPU with AMX").

Freed memory kept (``keep_freed_memory``): torch's CPU allocator keeps no cache, so every step's activations are
allocated and freed again, tens of MB a layer in a prefill chunk (the experts' rows: 2048 tokens x 8 x 2816 x 2
bytes = 92 MB). By default glibc serves a thread other than the main one from a heap of its own, mapped 64 MB
at a time and unmapped as it empties; gives every block over 32 MB a mapping of its own, unmapped when freed;
and trims its heaps: each layer then takes its memory fresh from the kernel, which zeroes it at the first touch
(9 % of a shard's CPU time in clear_page under perf; on one VM up to a third of a chunk's time). The policy
(``TUNABLES``) keeps it: every thread on the one heap (``arena_max``), no mapping per block (``mmap_max``), no
trimming (``trim_threshold``). On 2 cores (AMD EPYC, `bench` fp32, docs/performance.md) a cluster's prefill went
from 22.1 to 19.8 s and the engine's from 19.3 to 17.9. The cost: a process keeps its high-water mark, which a
server reaches on its first full chunk anyway. A process that drops what it held and goes on to other work
hands the kept blocks back (``give_back_freed_memory``): a test run between its modules kept 18 GB, and the Ray
actors it started next were killed for want of memory; a benchmark's in-process engine kept 11.9 GB, and the
kernel killed the benchmark when the vLLM server it started next loaded its weights.

Two ways in, one policy: actors get it as glibc tunables in their environment (``actor_env``, read as the
process starts: cluster/launcher.py); a process already running (the `epserve` program, the benchmarks; the
loader, for any other) sets it with ``mallopt`` (``keep_freed_memory``), before it starts a thread where it can:
a thread takes its heap at its first allocation, and keeps it. Left alone with GPUs (activations live on the
device) and where the environment already sets glibc tunables (the operator's word stands).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

TUNABLES = {"arena_max": 1, "mmap_max": 0, "trim_threshold": 2**32 - 1}
KEEP_FREED_MEMORY = ":".join(f"glibc.malloc.{name}={value}" for name, value in TUNABLES.items())
MALLOPT = {"arena_max": -8, "mmap_max": -4, "trim_threshold": -1}  # <malloc.h>'s M_ARENA_MAX, M_MMAP_MAX, ...
_libc = None
_kept: bool | None = None


def _c():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True) if sys.platform == "linux" else False
    return _libc


def resident(t: torch.Tensor, dtype: torch.dtype | None = None, device="cpu") -> torch.Tensor:
    """``t`` in ``dtype`` on ``device``: on CPU always a copy in torch's own memory, even in ``t``'s dtype."""
    out = torch.empty(t.shape, dtype=dtype or t.dtype, device=device)
    out.copy_(t)
    return out


def actor_env(use_gpu: bool) -> dict[str, str]:
    """The policy as the environment of an actor's process (CPU actors only; nothing where glibc tunables are
    already set)."""
    if use_gpu or "GLIBC_TUNABLES" in os.environ:
        return {}
    return {"GLIBC_TUNABLES": KEEP_FREED_MEMORY}


def keep_freed_memory() -> bool:
    """The policy for this process, from now on (once per process): call it before any thread starts (a thread
    that already has a heap of its own keeps it). False where the C library has no ``mallopt`` (not glibc) or
    the environment sets glibc tunables."""
    global _kept
    if _kept is None:
        libc = _c()
        _kept = bool(libc and hasattr(libc, "mallopt") and "GLIBC_TUNABLES" not in os.environ
                     and all(libc.mallopt(MALLOPT[name], value) == 1 for name, value in TUNABLES.items()))
    return _kept


def give_back_freed_memory() -> None:
    """Return the freed blocks kept so far to the kernel (glibc's malloc_trim, every arena)."""
    libc = _c()
    if libc and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
