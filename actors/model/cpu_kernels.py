"""Native CPU kernels, compiled on first use with the system C compiler and loaded with ctypes.

``grouped_linear(x, offsets, w)``: for every expert g, ``x[rows of g] @ w[g].T`` with fp32 activations and
bf16 weights packed by ``pack_panels``, in fp32, in one call for a whole MoE layer (``kernels/bf16_linear.c``).
It is what lets the routed experts stay in memory as bf16, the checkpoint's own dtype, while the model
computes in fp32 on CPU: a decode step reads half the expert bytes, and no call widens a weight matrix into
an fp32 copy. ``grouped_linear_bf16``: the same in bf16 (bf16 activations and weights in the checkpoint's
layout, fp32 accumulation) with AVX512-BF16's pair dot products (``kernels/bf16_dot.c``), for a model that
computes in bf16 on a CPU that has them. ``paged_decode_attention``: decode attention reading the KV cache's
blocks (fp32 or bf16) in place (``kernels/paged_attention.c``). Plain C (no torch headers), so it
compiles in about a second; the shared object is cached under ``$EPSERVE_CACHE/kernels`` (default
``~/.cache/epserve/kernels``) by a hash of the source and the compiler command, and written atomically, so
concurrent actors on one machine build it at most a few times and never load a half-written file.

Without a compiler, on a CPU without AVX2/FMA, or with ``EPSERVE_CPU_KERNELS=0``, ``available()`` is False:
the model keeps fp32 expert weights under fp32 compute (same results, more bytes) and uses torch's grouped
GEMM. ``bf16_dot_available()`` also needs AVX512-BF16. The kernels compile for AVX2; where the CPU has AVX-512
some take 16 lanes at a time (the same operations, so the same bits; ``EPSERVE_AVX512=0`` keeps them on 8).
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

from .precision import cpu_flags

log = logging.getLogger("epserve.kernels")
SOURCES = sorted(Path(__file__).with_name("kernels").glob("*.c"))
HEADERS = sorted(Path(__file__).with_name("kernels").glob("*.h"))  # in the digest: a change rebuilds
FLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
_lib: ctypes.CDLL | None | bool = None  # None: not tried yet; False: unavailable


def _cache_dir() -> Path:
    return Path(os.environ.get("EPSERVE_CACHE", Path.home() / ".cache" / "epserve")) / "kernels"


def _build() -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    command = [compiler, *FLAGS]
    sources = b"".join(f.read_bytes() for f in SOURCES + HEADERS)
    digest = hashlib.sha256(sources + " ".join(command).encode()).hexdigest()
    target = _cache_dir() / f"epserve-kernels-{digest[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([*command, *map(str, SOURCES), "-o", tmp, "-lm"], check=True, capture_output=True,
                           text=True, timeout=120)
            os.replace(tmp, target)
        except subprocess.CalledProcessError as e:
            names = ", ".join(f.name for f in SOURCES)
            raise RuntimeError(f"compiling {names} failed: {e.stderr.strip()[:500]}") from None
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
            lib.bf16_grouped_linear.argtypes = [ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, ctypes.c_int,
                                                ctypes.c_int]
            lib.bf16_grouped_linear.restype = None
            lib.bf16_dot_grouped_linear.argtypes = [ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, ctypes.c_int]
            lib.bf16_dot_grouped_linear.restype = None
            lib.bf16_amx_grouped_linear.argtypes = [ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, i64, ctypes.c_int]
            lib.bf16_amx_grouped_linear.restype = ctypes.c_int
            lib.bf16_amx_init.restype = ctypes.c_int
            _declare_fused(lib)
            lib.moe_dispatch_pack.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, i64, ptr, i64, ptr, ptr, ptr]
            lib.moe_dispatch_pack.restype = None
            lib.shm_wait.argtypes = [ptr, ctypes.c_uint32, i64, ptr]
            lib.shm_wait.restype = ctypes.c_int
            lib.shm_post.argtypes = [ptr, ctypes.c_uint32]
            lib.shm_post.restype = None
            lib.bind_team.argtypes = [ptr, ctypes.c_int, ctypes.c_int]
            lib.bind_team.restype = ctypes.c_int
            for name in ("paged_decode_attention_f32", "paged_decode_attention_bf16"):
                getattr(lib, name).argtypes = [ptr, ptr, ptr, i64, i64, ptr, i64, ptr, ptr, i64, i64, i64, i64,
                                               i64, ptr, ctypes.c_int]
                getattr(lib, name).restype = ctypes.c_int
            _lib = lib
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
            log.warning("bf16 CPU kernel unavailable (%s): expert weights stay fp32", e)
            _lib = False
    return _lib


def _declare_fused(lib) -> None:
    """Argument types of kernels/fused.c (pointers, int64 sizes, fp32 scalars, the dtype flag)."""
    p, i, f, flag = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    threads = ctypes.c_int  # the last argument of each
    signatures = {
        "fused_rms_norm": [p, flag, i, i, p, f, p, threads],
        "fused_add_rms_norm": [p, p, flag, i, i, p, f, p, threads],
        "fused_ffn_inputs": [p, flag, i, i, p, p, p, f, f, p, p, p, threads],
        "fused_ffn_output": [p, p, p, flag, i, i, p, p, p, f, f, p, threads],
        "fused_qkv": [p, p, p, i, i, i, flag, i, i, i, i, p, p, p, p, f, p, p, p, threads],
        "fused_route": [p, flag, i, i, i, p, p, p, threads],
        "fused_moe_align": [p, i, i, i, p, flag, i, p, p, p, threads],
        "fused_moe_combine": [p, flag, i, p, p, i, i, i, p, threads],
        "fused_gelu_mul": [p, p, i, flag, i, i, p, threads],
        "fused_softcap_argmax": [p, flag, i, i, f, p, p, threads],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, (i if name == "fused_moe_align" else None)


def available() -> bool:
    return bool(_load())


def lib():
    """The loaded kernels (``available()`` must be true)."""
    loaded = _load()
    if not loaded:
        raise RuntimeError("the CPU kernels are unavailable")
    return loaded


def bind_team(cpus: list[int], threads: int) -> bool:
    """Thread i of the calling thread's OpenMP team of ``threads`` to ``cpus[i % len(cpus)]`` from now on
    (``kernels/team.c``); False where a CPU was refused."""
    return lib().bind_team((ctypes.c_int * len(cpus))(*cpus), len(cpus), threads) == 0


def bf16_dot_available() -> bool:
    """Whether ``grouped_linear_bf16`` runs here (the kernels, and a CPU with AVX512-BF16)."""
    return "avx512_bf16" in cpu_flags() and available()


_amx: bool | None = None


def amx_available() -> bool:
    """Whether ``grouped_linear_amx`` runs here (the kernels, a CPU with AMX-BF16, and the kernel's grant of
    AMX state, which Linux gives a process on request)."""
    global _amx
    if _amx is None:
        _amx = {"amx_bf16", "amx_tile", "avx512_bf16"} <= cpu_flags() and available() and lib().bf16_amx_init() == 0
    return _amx


def packable(*widths: int) -> bool:
    """Whether matrices with these output widths can be packed (panels of 16 columns)."""
    return all(w % PANEL == 0 for w in widths)


PANEL = 16


def pack_panels(w: torch.Tensor) -> torch.Tensor:
    """The bf16 weights w [G, N, K] in the kernel's panel order (same shape and bytes, N a multiple of 16):
    panel p holds, for each k, columns 16p + i and 16p + 8 + i side by side (i < 8). What ``grouped_linear``
    reads; done once, when the weights are loaded."""
    G, N, K = w.shape
    if w.dtype != torch.bfloat16 or not packable(N):
        raise ValueError(f"pack_panels needs bf16 [G, N, K] with N % {PANEL} == 0, got {w.dtype} {tuple(w.shape)}")
    return w.view(G, N // PANEL, 2, PANEL // 2, K).permute(0, 1, 4, 3, 2).contiguous().view(G, N, K)


def unpack_panels(w: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_panels``: weights back in the checkpoint's order."""
    G, N, K = w.shape
    return w.view(G, N // PANEL, K, PANEL // 2, 2).permute(0, 1, 4, 3, 2).reshape(G, N, K)


def grouped_linear(x: torch.Tensor, offsets: torch.Tensor, w: torch.Tensor, check: bool = True,
                   wide: bool = True) -> torch.Tensor:
    """fp32 [S, N]: rows offsets[g] .. offsets[g + 1] of x [S, K] fp32 times w[g].T, where w [G, N, K] holds bf16
    weights packed by ``pack_panels``; offsets: int64 [G + 1], non-decreasing from 0 to S. Rows of x may be
    strided. ``check=False`` skips checking the offsets (the model's own, made by ``ops.moe_align``).
    ``wide``: the AVX-512 micro-kernel where the CPU has it (the same bits as the AVX2 one, twice the columns
    per instruction)."""
    ok = x.dtype == torch.float32 and packable(w.shape[1])
    return _grouped("bf16_grouped_linear", x, offsets, w, torch.float32, ok, check,
                    "fp32 x [S, K] and packed bf16 w [G, N, K]", int(wide))


def grouped_linear_bf16(x: torch.Tensor, offsets: torch.Tensor, w: torch.Tensor, check: bool = True) -> torch.Tensor:
    """bf16 [S, N]: as ``grouped_linear`` with bf16 x and w [G, N, K] in the checkpoint's layout (fp32
    accumulation, one rounding); N a multiple of 4, K of 32 (``dot_shapes``). Needs AVX512-BF16."""
    if "avx512_bf16" not in cpu_flags():
        raise RuntimeError("the bf16 dot-product kernel needs a CPU with AVX512-BF16")
    ok = x.dtype == torch.bfloat16 and dot_shapes(w.shape[1], x.shape[1])
    return _grouped("bf16_dot_grouped_linear", x, offsets, w, torch.bfloat16, ok, check,
                    "bf16 x [S, K] and bf16 w [G, N, K] with N % 4 == 0 and K % 32 == 0")


def grouped_linear_amx(x: torch.Tensor, offsets: torch.Tensor, w: torch.Tensor, min_rows: int,
                       check: bool = True) -> torch.Tensor:
    """As ``grouped_linear_bf16``, on AMX tiles for every expert with at least ``min_rows`` rows (the others
    through the dot kernel, in the same call); N a multiple of 16, K of 32 (``amx_shapes``). Needs
    ``amx_available()``."""
    if not amx_available():
        raise RuntimeError("the AMX kernel needs a CPU with AMX-BF16 (and the kernel's grant of AMX state)")
    ok = x.dtype == torch.bfloat16 and amx_shapes(w.shape[1], x.shape[1]) and x.stride(0) % 2 == 0
    return _grouped("bf16_amx_grouped_linear", x, offsets, w, torch.bfloat16, ok, check,
                    "bf16 x [S, K] and bf16 w [G, N, K] with N % 16 == 0 and K % 32 == 0", min_rows)


def linear_amx(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """bf16 [M, N] = x [M, K] @ w [N, K].T on AMX tiles (one group of ``grouped_linear_amx``; fewer than 3 rows
    through the dot kernel, which streams the weights a little faster). Called straight, with only the checks
    it needs: at decode a call's Python around the kernel cost as much as the kernel (~14 us against 4-5)."""
    (M, K), N = x.shape, w.shape[0]
    if not (x.dtype == w.dtype == torch.bfloat16 and w.dim() == 2 and w.shape[1] == K and x.stride(1) == 1
            and x.stride(0) % 2 == 0 and w.is_contiguous() and amx_shapes(N, K) and x.device.type == "cpu"
            and w.device.type == "cpu" and amx_available()):
        raise ValueError(f"linear_amx needs bf16 x [M, K] with rows of even stride and a contiguous bf16 w [N, K] "
                         f"with N % 16 == 0 and K % 32 == 0 on a CPU with AMX, got {x.dtype} {tuple(x.shape)} and "
                         f"{w.dtype} {tuple(w.shape)}")
    out, offsets = torch.empty(M, N, dtype=torch.bfloat16), _whole(M)  # held: the kernel reads it
    if _lib.bf16_amx_grouped_linear(x.data_ptr(), x.stride(0), offsets.data_ptr(), 1, w.data_ptr(),
                                    out.data_ptr(), N, N, K, 3, torch.get_num_threads()):
        raise MemoryError("bf16_amx_grouped_linear: no memory for the packed rows")
    return out


_WHOLE: dict[int, torch.Tensor] = {}


def _whole(rows: int) -> torch.Tensor:
    """offsets [0, rows]: one group of every row (kept for a decode step's row counts, read only)."""
    offsets = _WHOLE.get(rows)
    if offsets is None:
        offsets = torch.tensor([0, rows])
        if rows <= 1024:
            _WHOLE[rows] = offsets
    return offsets


def amx_shapes(n: int, k: int) -> bool:
    """Whether ``grouped_linear_amx`` takes weights [.., n, k]."""
    return n % 16 == 0 and k % 32 == 0


def _grouped(kernel: str, x, offsets, w, out_dtype, ok: bool, check: bool, needs: str, *extra) -> torch.Tensor:
    S, K = x.shape
    G, N = w.shape[0], w.shape[1]
    if (not ok or w.dtype != torch.bfloat16 or w.dim() != 3 or w.shape[2] != K or x.device.type != "cpu"
            or w.device.type != "cpu" or not w.is_contiguous()):
        raise ValueError(f"{kernel} needs {needs} on CPU, got {x.dtype} {tuple(x.shape)} and {w.dtype} "
                         f"{tuple(w.shape)}")
    if check:
        offsets = _checked_offsets(offsets, G, S)
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(S, N, dtype=out_dtype)
    if getattr(lib(), kernel)(x.data_ptr(), x.stride(0), offsets.data_ptr(), G, w.data_ptr(), out.data_ptr(),
                              out.stride(0), N, K, *extra, torch.get_num_threads()):
        raise MemoryError(f"{kernel}: no memory for the packed rows")
    return out


def dot_shapes(n: int, k: int) -> bool:
    """Whether ``grouped_linear_bf16`` takes weights [.., n, k]."""
    return n % 4 == 0 and k % 32 == 0


def _checked_offsets(offsets: torch.Tensor, groups: int, rows: int) -> torch.Tensor:
    offsets = offsets.to(torch.int64).contiguous()
    if offsets.shape != (groups + 1,) or offsets[0] != 0 or offsets[-1] != rows or (offsets.diff() < 0).any():
        raise ValueError(f"offsets must rise from 0 to {rows} over {groups + 1} entries, got "
                         f"{offsets.tolist()[:8]}...")
    return offsets


def bf16_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fp32 [M, N] = x [M, K] fp32 @ w [N, K] bf16 .T, w in checkpoint order (packs it first: for tests and
    benchmarks; the model packs its weights once)."""
    if w.dim() != 2:
        raise ValueError(f"bf16_linear needs a 2-D weight, got {tuple(w.shape)}")
    return grouped_linear(x, torch.tensor([0, x.shape[0]]), pack_panels(w[None]))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor,
                           pos: torch.Tensor, lo: torch.Tensor, block_size: int) -> torch.Tensor:
    """Attention of one query per request over its keys in the cache, read in place (CPU; an fp32 or a bf16
    cache, computed in fp32).

    q [B, N, D]; k_cache / v_cache [G, slots, D] (one layer, head-major); blocks [B, NB]: the physical blocks
    of each request's logical blocks lo // bs, lo // bs + 1, ...; pos [B]: the query's position, which sees
    the keys at positions lo .. pos. Returns [B, N, D] in q's dtype."""
    lib = _load()
    if not lib:
        raise RuntimeError("the CPU kernels are unavailable")
    B, N, D = q.shape
    G = k_cache.shape[0]
    kernel = {torch.float32: lib.paged_decode_attention_f32,
              torch.bfloat16: lib.paged_decode_attention_bf16}.get(k_cache.dtype)
    tensors = (q, k_cache, v_cache)
    if (kernel is None or v_cache.dtype != k_cache.dtype or any(t.device.type != "cpu" for t in tensors)
            or D % 8 or N % G):
        raise ValueError(f"paged_decode_attention needs CPU tensors, an fp32 or bf16 cache, D % 8 == 0 and "
                         f"N % G == 0, got q {tuple(q.shape)} {q.dtype}, cache {tuple(k_cache.shape)} {k_cache.dtype}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(2) != 1:
        raise ValueError("k and v caches must share a layout with contiguous head vectors")
    q32 = q.float().contiguous()
    blocks, pos, lo = (t.to(torch.int64).contiguous() for t in (blocks, pos, lo))
    out = torch.empty_like(q32)
    if kernel(q32.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(1), k_cache.stride(0),
              blocks.data_ptr(), blocks.shape[1], pos.data_ptr(), lo.data_ptr(), B, G, N // G, D, block_size,
              out.data_ptr(), torch.get_num_threads()):
        raise MemoryError("paged attention: no memory for the scores")
    return out.to(q.dtype)
