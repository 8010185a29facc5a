"""Where a CPU model's tensors live in host memory.

Weights in memory of torch's own (``resident``): a decode step streams every routed expert's weights once,
gigabytes of them, and a tile of 16 weight rows K elements apart touches 16 pages. A tensor read from a
safetensors file lives in the reader's buffer, in 4 KB pages; torch's own large blocks come in 2 MB pages
(actors/__init__.py turns that on). On a 2-core Xeon the experts of a `bench` decode step read at 21 GB/s
from the reader's buffer and at 28-29 GB/s from torch's, and the step went from 209 to 169 ms
(docs/performance.md "On a CPU with AMX").

Freed memory kept (``keep_freed_memory``): a prefill chunk allocates activations of tens of MB per layer
(the experts' rows: 2048 tokens x 8 x 2816 x 2 bytes = 92 MB), which glibc maps fresh from the kernel and
unmaps on free; faulting them in again on every call cost this VM up to a third of a chunk's time. glibc's own switches
(no mmap for big blocks, no trimming) make it reuse the freed blocks instead; the process keeps the
high-water mark of its activations, which a server reaches on its first full chunk anyway. A process that
drops what it held and goes on to other work (a test run, between its modules) hands the kept blocks back with
``give_back_freed_memory``: a test run kept 18 GB of freed blocks, and the Ray actors it started next were
killed for want of memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
_libc = None
_kept = False


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


def keep_freed_memory() -> None:
    """Have glibc keep freed blocks for reuse rather than give them back to the kernel (once per process)."""
    global _kept
    libc = _c()
    if _kept or not libc or not hasattr(libc, "mallopt"):
        return
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)  # an int: 1 GB of free space at the heap's top before trimming
    _kept = True


def give_back_freed_memory() -> None:
    """Return the freed blocks kept so far to the kernel (glibc's malloc_trim, every arena)."""
    libc = _c()
    if libc and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
