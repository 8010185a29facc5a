"""The CPU building blocks the engine's speed rests on, each against the plain alternative, on the bench
preset's shapes:

    python benchmarks/cpu_kernels.py

1. Routed experts: the grouped bf16 kernel (``cpu_kernels.grouped_linear``: panel-packed bf16 weights read
   directly, fp32 math, every expert in one call) against one BLAS GEMM per expert on fp32 weights, from the
   few rows an expert gets per decode step to a prefill chunk's; on a CPU with AVX-512, its AVX2 micro-kernel
   beside it.
   In bf16 (CPUs with AVX512-BF16): the dot-product kernel (``cpu_kernels.grouped_linear_bf16``) against torch's
   grouped GEMM (oneDNN: AMX tiles where the CPU has them, one call per expert) and, with AMX, our tile kernel
   (``cpu_kernels.grouped_linear_amx``, what the model uses there).
2. The dense projections and the tied head: ``x @ w.T``, ``(w @ x.T).T`` and oneDNN with the weight
   reordered once (``layers.linear(..., pack=True)``, what the model uses); in bf16 with AMX, oneDNN against
   the AMX kernel from 1 to 2048 rows (the model takes the kernel up to ``layers.AMX_ROWS``).
3. A fresh multi-megabyte tensor with and without transparent huge pages (actors/__init__.py), in a child
   process each, since the setting is read once per process.
4. A decode step's expert projections reading the weights where the checkpoint reader left them (its buffer,
   in 4 KB pages) and from a copy in torch's memory (2 MB pages: what the loader makes, host_memory.py).
5. A front-end's dispatch rows for one layer: the native pass (``dispatch_rows.pack_rows``) against the same in
   tensor ops (what a GPU runs).

Writes its tables to docs/performance.md under "CPU kernels".
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

from common import git_revision, machine, write_section

H, I = 2816, 704  # bench preset: hidden, expert width


def best_of(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def experts_table(num_experts: int = 32) -> str:
    from epserve.actors.model import cpu_kernels
    from epserve.actors.model.precision import cpu_flags

    if not cpu_kernels.available():
        return "bf16 kernel unavailable on this machine."
    g = torch.Generator().manual_seed(0)
    w16 = torch.randn(num_experts, 2 * I, H, generator=g).to(torch.bfloat16)
    packed, w32 = cpu_kernels.pack_panels(w16), w16.float()
    # the AVX-512 micro-kernel where the CPU has it (the model's), and the AVX2 one it falls back to
    wide = "avx512f" in cpu_flags()
    lines = ["| threads | rows per expert | bf16 kernel | fp32 BLAS per expert | speed-up | AVX2 micro-kernel |",
             "|---|---|---|---|---|---|"]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for rows in (1, 4, 8, 16, 128):
            x = torch.randn(num_experts * rows, H, generator=g)
            offsets = torch.arange(0, num_experts * rows + 1, rows)
            k = best_of(lambda x=x, o=offsets: cpu_kernels.grouped_linear(x, o, packed))
            b = best_of(lambda x=x, r=rows: [(w32[e] @ x[e * r : (e + 1) * r].T).T for e in range(num_experts)])
            narrow = best_of(lambda x=x, o=offsets: cpu_kernels.grouped_linear(x, o, packed, wide=False)) if wide else k
            flops = 2 * num_experts * rows * 2 * I * H
            lines.append(f"| {threads} | {rows} | {1000 * k:.1f} ms ({flops / k / 1e9:.1f} GFLOP/s) | {1000 * b:.1f} ms "
                         f"({flops / b / 1e9:.1f} GFLOP/s) | {b / k:.2f}x | "
                         + (f"{1000 * narrow:.1f} ms ({flops / narrow / 1e9:.1f} GFLOP/s) |" if wide else "(the same) |"))
    return "\n".join(lines)


def bf16_experts_table(num_experts: int = 128) -> str:
    from epserve.actors.model import cpu_kernels, moe

    if not cpu_kernels.bf16_dot_available():
        return "No AVX512-BF16 on this machine: bf16 experts run through torch's grouped GEMM only."
    kernels = {"dot kernel": lambda x, o, w: cpu_kernels.grouped_linear_bf16(x, o, w),
               "torch grouped GEMM": lambda x, o, w: moe.grouped_mm(x, w, o)}
    if cpu_kernels.amx_available():
        kernels["AMX kernel (the model's)"] = lambda x, o, w: cpu_kernels.grouped_linear_amx(x, o, w, moe.AMX_MIN_ROWS)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(num_experts, 2 * I, H, generator=g).to(torch.bfloat16)  # 1 GB: read from memory, not cache
    lines = ["| threads | rows per expert | " + " | ".join(kernels) + " |", "|---" * (2 + len(kernels)) + "|"]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for rows in (1, 4, 8, 16, 64, 128, 256):
            x = torch.randn(num_experts * rows, H, generator=g).to(torch.bfloat16)
            offsets = torch.arange(0, num_experts * rows + 1, rows)
            flops = 2 * num_experts * rows * 2 * I * H
            times = [best_of(lambda f=f, x=x, o=offsets: f(x, o, w)) for f in kernels.values()]
            lines.append(f"| {threads} | {rows} | " + " | ".join(f"{1000 * t:.1f} ms ({flops / t / 1e9:.0f} GFLOP/s)"
                                                                  for t in times) + " |")
    return "\n".join(lines)


def linear_table() -> str:
    from epserve.actors.model.layers import linear

    torch.set_num_threads(os.cpu_count())
    shapes = {"q (sliding)": (H, 4096), "o (sliding)": (4096, H), "dense gate/up": (H, 2112),
              "dense down": (2112, H), "q (full)": (H, 8192), "tied head": (H, 32768)}
    lines = ["| rows | projection | x @ w.T | (w @ x.T).T | oneDNN, reordered weight |", "|---|---|---|---|---|"]
    for rows in (64, 2048):
        for name, (k, n) in shapes.items():
            x, w = torch.randn(rows, k), torch.randn(n, k)
            a = best_of(lambda x=x, w=w: x @ w.T)
            b = best_of(lambda x=x, w=w: (w @ x.T).T.contiguous())
            c = best_of(lambda x=x, w=w: linear(x, w, pack=True))
            lines.append(f"| {rows} | {name} [{k} -> {n}] | {1000 * a:.1f} ms | {1000 * b:.1f} ms | "
                         f"{1000 * c:.1f} ms ({2 * rows * k * n / c / 1e9:.0f} GFLOP/s) |")
    return "\n".join(lines)


def bf16_linear_table(copies_bytes: float = 1e9) -> str:
    """The model's bf16 projections: oneDNN (reordered weight) against the AMX kernel, each call on another copy
    of the weight (``copies_bytes`` of them, more than an L3 holds), so the weights come from memory as in a
    step."""
    from epserve.actors.model import cpu_kernels, host_memory
    from epserve.actors.model.layers import _onednn_weight

    if not cpu_kernels.amx_available():
        return ""
    torch.set_num_threads(os.cpu_count())
    shapes = {"q (sliding)": (H, 4096), "o (full)": (8192, H), "dense down": (2112, H), "tied head": (H, 32768)}
    lines = ["| projection | " + " | ".join(f"{r} rows" for r in BF16_ROWS) + " |", "|---" * (1 + len(BF16_ROWS)) + "|"]
    for name, (k, n) in shapes.items():
        copies = max(3, int(copies_bytes // (2 * n * k)))
        ws = [host_memory.resident(torch.randn(n, k).to(torch.bfloat16)) for _ in range(copies)]
        packed = [_onednn_weight(w) for w in ws]
        cells = []
        for rows in BF16_ROWS:
            x = torch.randn(rows, k).to(torch.bfloat16)
            onednn = median_over(lambda p, x=x: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""), packed)
            amx = median_over(lambda w, x=x: cpu_kernels.linear_amx(x, w), ws)
            cells.append(f"{1000 * onednn:.2f} / {1000 * amx:.2f} ms ({amx / onednn:.2f})")
        lines.append(f"| {name} [{k} -> {n}] | " + " | ".join(cells) + " |")
        del ws, packed
    return "\n".join(lines)


BF16_ROWS = (1, 16, 64, 128, 512, 2048)


def median_over(fn, weights) -> float:
    """The median time of ``fn`` over every weight in turn (after one pass to warm up)."""
    for w in weights[:2]:
        fn(w)
    times = []
    for w in weights:
        t0 = time.perf_counter()
        fn(w)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def dispatch_line(tokens: int = 64, shards: int = 2) -> str:
    """A layer's dispatch rows on the `bench` preset (128 experts, top-8): the native pass against tensor ops."""
    from epserve.actors.dispatch_rows import pack_rows, row_bytes, torch_pack_rows
    from epserve.actors.placement import build

    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(128, generator=g)[:8] for _ in range(tokens)])
    shard, slot = build(1, 128, shards).route(0, ids)
    x, size = torch.randn(tokens, H).to(torch.bfloat16), row_bytes(H, 8, torch.bfloat16)
    times = {name: min(best_of(lambda f=f: f(x, shard, slot, shards, size), 50) for _ in range(3))
             for name, f in (("native", pack_rows), ("tensor ops", torch_pack_rows))}
    return (f"A layer's dispatch rows ({tokens} tokens, top-8 of 128 experts, {shards} shards, bf16): "
            + ", ".join(f"{name} {1e6 * t:.0f} us" for name, t in times.items()) + ".")


FRESH = """
import os, sys, time
os.environ["THP_MEM_ALLOC_ENABLE"] = sys.argv[1]
import torch
torch.set_num_threads(2)
best = 1e9
for _ in range(5):
    t0 = time.perf_counter(); torch.zeros(16384, 2816); best = min(best, time.perf_counter() - t0)
print(best)
"""


def fresh_tensor_table() -> str:
    times = {}
    for thp in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", FRESH, thp], check=True, capture_output=True, text=True)
        times[thp] = float(out.stdout.strip())
    return (f"A fresh zero-filled [16384, 2816] fp32 tensor (184 MB, one prefill step's expert rows): "
            f"{1000 * times['0']:.0f} ms in 4 KiB pages, {1000 * times['1']:.0f} ms with transparent huge pages.")


def weights_memory_line(rows: int = 4) -> str:
    from safetensors import safe_open

    from common import checkpoint
    from epserve.actors.model import cpu_kernels, host_memory, moe

    if not cpu_kernels.bf16_dot_available():
        return ""
    torch.set_num_threads(os.cpu_count())
    path = checkpoint("bench", layout="text-only")
    with safe_open(next(path.glob("*.safetensors")), framework="pt") as f:
        key = next(k for k in f.keys() if k.endswith("layers.0.experts.gate_up_proj"))
        read = f.get_slice(key)[:]  # [128, 1408, 2816] bf16, 1 GB
    project = (lambda x, o, w: cpu_kernels.grouped_linear_amx(x, o, w, moe.AMX_MIN_ROWS)) \
        if cpu_kernels.amx_available() else cpu_kernels.grouped_linear_bf16
    x = torch.randn(read.shape[0] * rows, read.shape[2]).to(torch.bfloat16)
    offsets = torch.arange(0, x.shape[0] + 1, rows)
    times = {}
    for name, w in (("the reader's buffer", read), ("torch's memory", host_memory.resident(read))):
        times[name] = best_of(lambda w=w: project(x, offsets, w))
    return ("A decode step's gate/up projection of one layer (128 experts, " + f"{rows} rows each, "
            f"{read.nbytes / 1e9:.2f} GB of weights), weights in " + ", in ".join(
                f"{name}: {1000 * t:.1f} ms ({read.nbytes / t / 1e9:.1f} GB/s)" for name, t in times.items()) + ".")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    experts, bf16_experts = experts_table(), bf16_experts_table()
    linear, bf16_linear = linear_table(), bf16_linear_table()
    fresh, weights, dispatch = fresh_tensor_table(), weights_memory_line(), dispatch_line()
    body = f"""
Command: `python benchmarks/cpu_kernels.py` (revision {git_revision()}; {machine()}). Best of 3.

Routed experts, 32 experts' gate/up matrices [{2 * I}, {H}] against the same number of rows each:

{experts}

Routed experts in bf16 compute, 128 experts' gate/up matrices, the same number of rows each:

{bf16_experts}

Dense projections at decode (64 rows) and prefill (2048 rows), {os.cpu_count()} threads:

{linear}

The same in bf16 on a CPU with AMX: oneDNN (weight reordered once) / the AMX kernel (``cpu_kernels.linear_amx``,
what the model uses at up to ``layers.AMX_ROWS`` rows), the median over calls on distinct copies of the weight
(1 GB of them: read from memory, as in a step), {os.cpu_count()} threads:

{bf16_linear}

{fresh}

{weights}

{dispatch}
"""
    print(body)
    if not args.no_write:
        write_section("CPU kernels", body)


if __name__ == "__main__":
    main()
