"""Native CPU kernels, compiled on first use with the system C compiler and loaded with ctypes.

``bf16_linear(x, w)``: ``x @ w.T`` for fp32 activations and bf16 weights, in fp32 (``kernels/bf16_linear.c``).
It is what lets the routed experts stay in memory as bf16, the checkpoint's own dtype, while the model
computes in fp32 on CPU: a decode step reads half the expert bytes. Plain C (no torch headers), so it
compiles in about a second; the shared object is cached under ``$EPSERVE_CACHE/kernels`` (default
``~/.cache/epserve/kernels``) by a hash of the source and the compiler command, and written atomically, so
concurrent actors on one machine build it at most a few times and never load a half-written file.

Without a compiler, on a CPU without AVX2/FMA, or with ``EPSERVE_CPU_KERNELS=0``, ``available()`` is False
and the model keeps fp32 expert weights (same results, more bytes).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("epserve.kernels")
SOURCE = Path(__file__).with_name("kernels") / "bf16_linear.c"
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]
_lib: ctypes.CDLL | None | bool = None  # None: not tried yet; False: unavailable


def _cache_dir() -> Path:
    return Path(os.environ.get("EPSERVE_CACHE", Path.home() / ".cache" / "epserve")) / "kernels"


def _build() -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    command = [compiler, *FLAGS]
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(command).encode()).hexdigest()[:16]
    target = _cache_dir() / f"bf16_linear-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([*command, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True,
                           timeout=120)
            os.replace(tmp, target)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"compiling {SOURCE.name} failed: {e.stderr.strip()[:500]}") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def _load():
    global _lib
    if _lib is None:
        try:
            if os.environ.get("EPSERVE_CPU_KERNELS", "1") == "0":
                raise RuntimeError("disabled by EPSERVE_CPU_KERNELS=0")
            if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
                raise RuntimeError(f"needs AVX2, this CPU offers {torch.backends.cpu.get_cpu_capability()}")
            lib = ctypes.CDLL(str(_build()))
            i64, ptr = ctypes.c_int64, ctypes.c_void_p
            lib.bf16_linear.argtypes = [ptr, i64, ptr, ptr, i64, i64, i64, i64, ctypes.c_int]
            lib.bf16_linear.restype = None
            _lib = lib
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
            log.warning("bf16 CPU kernel unavailable (%s): expert weights stay fp32", e)
            _lib = False
    return _lib


def available() -> bool:
    return bool(_load())


def bf16_linear(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [M, N] = x [M, K] fp32 @ w [N, K] bf16 .T (rows of x may be strided; w contiguous)."""
    lib = _load()
    if not lib:
        raise RuntimeError("the bf16 CPU kernel is unavailable")
    M, K = x.shape
    N = w.shape[0]
    if x.dtype != torch.float32 or w.dtype != torch.bfloat16 or w.shape[1] != K or x.device.type != "cpu":
        raise ValueError(f"bf16_linear needs fp32 x [M, K] and bf16 w [N, K] on CPU, got {x.dtype} "
                         f"{tuple(x.shape)} and {w.dtype} {tuple(w.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    w = w.contiguous()
    if out is None:
        out = torch.empty(M, N, dtype=torch.float32)
    lib.bf16_linear(x.data_ptr(), x.stride(0), w.data_ptr(), out.data_ptr(), out.stride(0), M, N, K,
                    torch.get_num_threads())
    return out
