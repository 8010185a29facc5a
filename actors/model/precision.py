"""Which dtype the model computes in: ``--dtype auto|float32|bfloat16``, resolved at run time per device.

``auto`` is bf16 on CUDA, and on a CPU bf16 only where the CPU has native bf16 matrix arithmetic (AMX-BF16 or
AVX512-BF16): there a bf16 GEMM runs 3-4x an fp32 one (docs/performance.md). Elsewhere bf16 arithmetic is
emulated and slower than fp32, so ``auto`` computes in fp32 and keeps the routed experts bf16 in memory when
the checkpoint stores them so (``moe.expert_dtype``: exact, and half the bytes a decode step reads).

The CPU's instruction set is read from the kernel's flags (``/proc/cpuinfo``), falling back to what torch
reports; every function takes it as an argument, so tests can resolve a policy for a CPU they do not run on.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}
NATIVE_BF16_ISAS = ("amx_bf16", "avx512_bf16")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@cache
def cpu_flags() -> frozenset[str]:
    """This machine's CPU feature flags (empty where the kernel does not list them)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_isa(flags: frozenset[str] | set[str] | None = None) -> str:
    """The CPU's best matrix instruction set, by name: ``amx_bf16``, ``avx512_bf16``, ``avx512``, ``avx2`` or
    ``baseline``. ``flags``: the CPU's feature flags (default: this machine's)."""
    if flags is None:
        flags = cpu_flags()
        if not flags:  # no /proc/cpuinfo (not Linux): what torch dispatches to, without bf16 detail
            return {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability(), "baseline")
    if {"amx_bf16", "amx_tile"} <= flags:
        return "amx_bf16"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= flags else "baseline"


def native_bf16(isa: str) -> bool:
    return isa in NATIVE_BF16_ISAS


def resolve_dtype(requested: str | torch.dtype, device, isa: str | None = None) -> torch.dtype:
    """The compute dtype for ``requested`` (auto, float32, bfloat16) on ``device``; ``isa`` as ``cpu_isa``
    (default: this machine's)."""
    if isinstance(requested, torch.dtype):
        requested = dtype_name(requested)
    if requested not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {requested!r}")
    if DTYPES[requested] is not None:
        return DTYPES[requested]
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if native_bf16(isa or cpu_isa()) else torch.float32


def describe(device, dtype: torch.dtype) -> str:
    """One line for the start-up log: the device, its ISA (CPU) and the compute dtype chosen."""
    device = torch.device(device)
    where = f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f"cpu ({cpu_isa()})"
    return f"{where}, compute dtype {dtype_name(dtype)}"
