"""glibc's malloc told to keep the memory a CPU process frees, for its next allocation.

torch's CPU allocator keeps no cache: every step's activations are allocated and freed again, on the `bench`
preset hundreds of MB a prefill layer per process. By default glibc serves a thread other than the main one
from a heap of its own, mapped 64 MB at a time and unmapped as it empties; gives every block over 32 MB a
mapping of its own, unmapped when freed; and trims its heaps. Each layer then takes its memory fresh from the
kernel, which zeroes it at the first touch (2 MB pages, actors/__init__.py: 9% of a shard's CPU time in
clear_page, measured with perf). ``KEEP_FREED_MEMORY`` keeps it: every thread on the one heap
(``arena_max``), no mapping per block (``mmap_max``), no trimming (``trim_threshold``).

Measured on 2 cores (AMD EPYC, `bench` fp32, benchmarks/step_phases.py, docs/performance.md): 1 front-end + 2
shards, prefill 22.1 -> 19.8 s (each shard's expert compute 10.4 -> 8.2 s; the one heap alone gave 20.1 s, no
mapping and no trimming alone 22.1 s); the engine computing on the main thread 19.3 -> 17.9 s; decode steps
unchanged. The cost: a process keeps the memory of its largest step (its resident memory does not shrink
after a peak); in that run the peak resident memory of a shard was 3.1 GB against 3.3, of the front-end 4.3
against 4.2.

Two ways in, one policy: the actors get it as glibc tunables in their environment (``actor_env``, set before
the process starts: cluster/launcher.py), a process already running (``epserve generate`` and ``bench`` with
the engine in-process, the benchmarks) sets it with ``mallopt`` before it starts a thread
(``keep_freed_memory``): a thread takes its heap at its first allocation, and keeps it. Left alone with GPUs
(activations live on the device) and where the environment already sets glibc tunables.
"""

from __future__ import annotations

import ctypes
import os

TUNABLES = {"arena_max": 1, "mmap_max": 0, "trim_threshold": 2**32 - 1}
KEEP_FREED_MEMORY = ":".join(f"glibc.malloc.{name}={value}" for name, value in TUNABLES.items())
MALLOPT = {"arena_max": -8, "mmap_max": -4, "trim_threshold": -1}  # <malloc.h>'s M_ARENA_MAX, M_MMAP_MAX, ...


def actor_env(use_gpu: bool) -> dict[str, str]:
    """Environment of an actor's process (CPU actors only; nothing where glibc tunables are already set)."""
    if use_gpu or "GLIBC_TUNABLES" in os.environ:
        return {}
    return {"GLIBC_TUNABLES": KEEP_FREED_MEMORY}


def keep_freed_memory() -> bool:
    """The same for this process, from now on: call it before any thread starts (a thread that already has
    a heap of its own keeps it). False where the C library has no ``mallopt`` (not glibc) or the
    environment sets glibc tunables."""
    if "GLIBC_TUNABLES" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(MALLOPT[name], value) == 1 for name, value in TUNABLES.items())
