"""The native bf16-weight CPU kernel and the bf16 expert storage built on it (actors/model/cpu_kernels.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from epserve.actors.model import cpu_kernels, cpu_threads, layers
from epserve.actors.model.loader import load_model
from epserve.actors.model.moe import AMX_MIN_ROWS, GROUPED_MM, expert_dtype
from epserve.actors.model.precision import cpu_flags

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler or no AVX2 on this machine")


@pytest.mark.parametrize("M, N, K", [(1, 1408, 2816), (2, 64, 704), (3, 64, 704), (4, 16, 72), (5, 32, 97),
                                     (7, 96, 64), (16, 16, 130), (13, 48, 1)])
def test_bf16_linear_equals_fp32_math(M, N, K):
    g = torch.Generator().manual_seed(M * N + K)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g).to(torch.bfloat16)
    ref = (x.double() @ w.double().T).float()
    y = cpu_kernels.bf16_linear(x, w)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    # fp32 accumulation over K terms of size ~1: a few ulps of sqrt(K)
    assert (y - ref).abs().max().item() <= 1e-5 * K**0.5


def test_bf16_linear_is_batch_invariant_and_takes_strided_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 2 * 256, generator=g)[:, :256]  # rows with a stride of 512
    w = torch.randn(96, 256, generator=g).to(torch.bfloat16)
    together = cpu_kernels.bf16_linear(x, w)
    for i in range(12):  # a row's result does not depend on the rows beside it (nor on the thread count)
        assert torch.equal(cpu_kernels.bf16_linear(x[i : i + 1], w)[0], together[i])
    torch.set_num_threads(1)
    try:
        assert torch.equal(cpu_kernels.bf16_linear(x, w), together)
    finally:
        torch.set_num_threads(2)


def test_grouped_linear_equals_one_gemm_per_group_and_is_batch_invariant():
    g = torch.Generator().manual_seed(1)
    counts = [0, 5, 1, 0, 9, 4, 2]  # empty groups, the remainders of 4-row tiles, several 4-row tiles
    w = torch.randn(len(counts), 48, 120, generator=g).to(torch.bfloat16)
    x = torch.randn(sum(counts), 120, generator=g)
    offsets = torch.tensor([0, *counts]).cumsum(0)
    y = cpu_kernels.grouped_linear(x, offsets, cpu_kernels.pack_panels(w))
    for e in range(len(counts)):
        rows = slice(offsets[e], offsets[e + 1])
        ref = (x[rows].double() @ w[e].double().T).float()
        if counts[e]:
            assert (y[rows] - ref).abs().max().item() <= 1e-5 * 120**0.5
        for r in range(offsets[e], offsets[e + 1]):  # each row alone: bit-identical
            assert torch.equal(cpu_kernels.bf16_linear(x[r : r + 1], w[e])[0], y[r])


@pytest.mark.skipif("avx512f" not in cpu_flags(), reason="no AVX-512 on this machine")
@pytest.mark.parametrize("N", [48, 96, 1408])  # 3 panels (a pair and one alone), 6, and the bench preset's gate/up
def test_avx512_kernel_gives_the_avx2_kernels_bits(N):
    """The AVX-512 micro-kernel (two panels a register) computes every output element as the same FMA chain
    over k as the AVX2 one: equal bits, for blocks of 1 to 8 rows (and the AVX2 kernel's 6-row blocks on a
    lone last panel), several experts in one call."""
    g = torch.Generator().manual_seed(N)
    counts = [1, 2, 3, 4, 5, 6, 7, 13, 0, 64]
    w = cpu_kernels.pack_panels((torch.randn(len(counts), N, 256, generator=g) / 16).to(torch.bfloat16))
    x = torch.randn(sum(counts), 256, generator=g)
    offsets = torch.tensor([0, *counts]).cumsum(0)
    wide = cpu_kernels.grouped_linear(x, offsets, w, wide=True)
    assert torch.equal(wide, cpu_kernels.grouped_linear(x, offsets, w, wide=False))
    assert wide.abs().sum() > 0


@pytest.mark.skipif(not cpu_kernels.amx_available(), reason="no AMX-BF16 on this machine")
# 48: a last column tile of 16 alone; K 2816 and 704: several blocks of k, the last one short at 704; K 96: an
# odd number of steps of k (the kernel for experts of at most 16 rows takes them in pairs); 768 x 2816: a matrix
# of more than 4 MB, whose experts of 17 to 64 rows take the kernel that reads the weights once
@pytest.mark.parametrize("N, K", [(64, 128), (48, 2816), (32, 704), (16, 96), (768, 2816)])
def test_amx_kernel_takes_one_kernel_per_expert_by_its_rows(N, K):
    """Experts with at least AMX_MIN_ROWS rows go through the AMX tiles, the rest through the dot kernel, in
    one call: each expert's rows come out exactly as if it were alone (as on a shard that holds only it), and
    within bf16 rounding of fp32 math; rows past a 16-row tile, and past a work item's 256 rows, included."""
    g = torch.Generator().manual_seed(N)
    big = AMX_MIN_ROWS
    counts = [0, big - 1, big + 1, 1, 17, 0, 300, big, 32]
    w = (torch.randn(len(counts), N, K, generator=g) / K**0.5).to(torch.bfloat16)
    offsets = torch.tensor([0, *counts]).cumsum(0)
    x = torch.randn(int(offsets[-1]), K, generator=g).to(torch.bfloat16)
    y = cpu_kernels.grouped_linear_amx(x, offsets, w, AMX_MIN_ROWS)
    for e, (lo, hi) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        alone = cpu_kernels.grouped_linear_amx(x[lo:hi], torch.tensor([0, hi - lo]), w[e : e + 1].contiguous(),
                                               AMX_MIN_ROWS)
        assert torch.equal(y[lo:hi], alone)
        exact = x[lo:hi].double() @ w[e].double().T
        assert (y[lo:hi].double() - exact).abs().amax(dim=1).le(2**-8 * exact.abs().amax(dim=1) + 1e-6).all()
    # a row of the 300 (the 32-row kernel), of the 17 and of the 32 (the 32-row kernel, or the kernel of at most
    # 64 rows for a large matrix), alone through the tiles (min_rows 1, the kernel of at most 16 rows): the same
    # bits
    for e, row in ((6, int(offsets[6]) + 290), (4, int(offsets[4]) + 16), (8, int(offsets[8]) + 5)):
        alone = cpu_kernels.grouped_linear_amx(x[row : row + 1], torch.tensor([0, 1]), w[e : e + 1].contiguous(), 1)
        assert torch.equal(alone[0], y[row])
    with pytest.raises(ValueError, match="N % 16"):
        cpu_kernels.grouped_linear_amx(x[:4, :96], torch.tensor([0, 4]), w[:1, :8, :96].contiguous(), 1)


@pytest.mark.skipif(not cpu_kernels.amx_available(), reason="no AMX-BF16 on this machine")
def test_model_linears_take_the_amx_kernel_at_decode_rows_and_onednn_above(monkeypatch):
    """A long-lived bf16 weight (``Linear``, the tied head) goes through the AMX kernel at up to AMX_ROWS
    rows, strided rows and a leading batch shape included, and through oneDNN above; both within bf16 rounding
    of fp32 math."""
    calls = []
    kernel = cpu_kernels.linear_amx
    monkeypatch.setattr(cpu_kernels, "linear_amx", lambda x, w: calls.append(len(x)) or kernel(x, w))
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(96, 320, generator=g) / 320**0.5).to(torch.bfloat16)
    for rows in (1, 2, 5, layers.AMX_ROWS, layers.AMX_ROWS + 1):
        x = torch.randn(rows, 2 * 320, generator=g).to(torch.bfloat16)[:, :320]  # rows 640 apart
        y = layers.linear(x, w, pack=True)
        exact = x.double() @ w.double().T
        assert (y.double() - exact).abs().amax(dim=1).le(2**-8 * exact.abs().amax(dim=1) + 1e-6).all()
    assert calls == [1, 2, 5, layers.AMX_ROWS]
    assert layers.linear(torch.ones(2, 3, 320, dtype=torch.bfloat16), w, pack=True).shape == (2, 3, 96)
    assert layers.linear(torch.ones(4, 320), w.float(), pack=True).dtype == torch.float32  # fp32: oneDNN
    assert calls == [1, 2, 5, layers.AMX_ROWS, 6]


@pytest.mark.skipif(not cpu_kernels.amx_available(), reason="no AMX-BF16 on this machine")
def test_amx_linear_called_straight_on_a_prefill_sized_input():
    """``linear_amx`` past the row counts whose offsets it keeps (1024) gives rows within bf16 rounding too."""
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(32, 64, generator=g) / 8).to(torch.bfloat16)
    x = torch.randn(1100, 64, generator=g).to(torch.bfloat16)
    exact = x.double() @ w.double().T
    y = cpu_kernels.linear_amx(x, w)
    assert (y.double() - exact).abs().amax(dim=1).le(2**-8 * exact.abs().amax(dim=1) + 1e-6).all()


def test_packing_round_trips_and_bad_shapes_or_offsets_are_refused():
    w = torch.randn(3, 32, 5).to(torch.bfloat16)
    packed = cpu_kernels.pack_panels(w)
    assert packed.shape == w.shape and not torch.equal(packed, w)
    assert torch.equal(cpu_kernels.unpack_panels(packed), w)
    with pytest.raises(ValueError, match="N % 16"):
        cpu_kernels.pack_panels(torch.zeros(1, 24, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="offsets"):
        cpu_kernels.grouped_linear(torch.zeros(3, 5), torch.tensor([0, 2, 2, 2]), packed)


def test_bf16_linear_refuses_wrong_dtypes():
    with pytest.raises(ValueError, match="fp32 x"):
        cpu_kernels.bf16_linear(torch.zeros(2, 8, dtype=torch.bfloat16), torch.zeros(16, 8, dtype=torch.bfloat16))


def test_bf16_experts_give_the_fp32_experts_logits(tiny_dir, tiny_model, tools):
    """The tiny checkpoint is bf16 on disk: holding its experts as bf16 (the grouped kernel) must give the
    logits of widened fp32 experts within the parity tolerance."""
    assert tiny_model.layers[0].experts.gate_up_proj.dtype == torch.bfloat16
    assert expert_dtype(torch.float32, torch.float32, "cpu", tiny_model.cfg) == torch.float32  # fp32 on disk stays fp32
    wide = load_model(tiny_dir)
    for layer in wide.layers:
        gate_up, down = layer.experts.unpacked()
        layer.experts.gate_up_proj.data, layer.experts.down_proj.data = gate_up.float(), down.float()
        layer.experts.path = GROUPED_MM
    for T in (3, 80):  # few rows per expert (a decode step) and many (a prefill chunk)
        ids = tools.random_ids(tiny_model.cfg.vocab_size, T, seed=T)
        tools.assert_parity(tools.our_logits(wide, ids), tools.our_logits(tiny_model, ids), f"T={T}")


@pytest.mark.parametrize("G, n, D, window", [(2, 2, 64, None), (1, 16, 136, 5), (3, 1, 8, 1), (2, 9, 512, 40)])
def test_paged_decode_attention_equals_masked_attention_on_gathered_keys(G, n, D, window):
    """The in-place kernel against ``masked_attention`` over keys gathered by position: GQA groups wider than
    its 8-head register tile, head dims that are not multiples of 64, windows of 1 and more, contexts that
    start and end mid-block, blocks in shuffled physical order."""
    from epserve.actors.model.attention import masked_attention

    g = torch.Generator().manual_seed(G * 1000 + n * 10 + D)
    bs, num_blocks, B = 4, 40, 5
    k_cache = torch.randn(G, num_blocks * bs, D, generator=g)
    v_cache = torch.randn(G, num_blocks * bs, D, generator=g)
    pos = torch.tensor([0, 3, 9, 17, 30])
    lo = pos - (window - 1) if window else torch.zeros_like(pos)
    lo = lo.clamp(min=0)
    physical = torch.randperm(num_blocks, generator=g)
    width = int((pos // bs - lo // bs).max()) + 1
    blocks = torch.zeros(B, width, dtype=torch.long)
    for b in range(B):  # request b's logical block j lives in physical block physical[8 * b + j]
        count = int(pos[b] // bs - lo[b] // bs) + 1
        blocks[b, :count] = physical[8 * b + lo[b] // bs : 8 * b + lo[b] // bs + count]
    q = torch.randn(B, G * n, D, generator=g) * 0.3
    out = cpu_kernels.paged_decode_attention(q, k_cache, v_cache, blocks, pos, lo, bs)
    for b in range(B):
        u = torch.arange(int(pos[b]) + 1)
        slots = physical[8 * b + u // bs] * bs + u % bs
        ref = masked_attention(q[b : b + 1, None], k_cache[:, slots][:, None], v_cache[:, slots][:, None],
                               pos[b : b + 1, None], u[None], window)[0, 0]
        assert (out[b] - ref).abs().max().item() <= 1e-5, f"request {b}"


def test_a_nan_key_makes_its_requests_attention_nan_and_no_others():
    """As torch's softmax: a NaN score is not hidden by the vectorized exp's clamp."""
    bs, B, G, n, D = 4, 2, 1, 2, 16
    k_cache, v_cache = torch.randn(G, 8 * bs, D), torch.randn(G, 8 * bs, D)
    blocks = torch.tensor([[0, 1, 2], [3, 4, 5]])
    pos, lo = torch.tensor([9, 9]), torch.zeros(2, dtype=torch.long)
    k_cache[0, 5] = float("nan")  # request 0's key at position 5 (block 1, slot 1)
    out = cpu_kernels.paged_decode_attention(torch.randn(B, G * n, D), k_cache, v_cache, blocks, pos, lo, bs)
    assert out[0].isnan().all() and not out[1].isnan().any()


@pytest.mark.skipif(sys.platform != "linux", reason="libgomp's call, on Linux")
def test_a_thread_can_hand_back_its_openmp_team():
    """The engine is built on one thread and steps on another: the builder's OpenMP team must go, or every
    parallel region of the engine wakes sleeping workers (cpu_threads.py). torch's runtime has the call."""
    torch.ones(1 << 16).add_(1)  # a parallel region: this thread now has a team
    assert cpu_threads.release_team()
    assert torch.equal(torch.ones(1 << 16).add_(1), torch.full((1 << 16,), 2.0))  # and makes a new one at need


# In a process of its own: binding pins threads for good, and this one's are the test runner's.
BIND_PROBE = """
import glob, json, os, threading, torch
from epserve.actors.model import cpu_threads
torch.set_num_threads(len(os.sched_getaffinity(0)))
def run():
    cpus = cpu_threads.bind_team()
    pinned = [open(f).read().split("Cpus_allowed_list:")[1].split()[0] for f in glob.glob("/proc/self/task/*/status")]
    total = torch.ones(1 << 20).add_(1).sum().item()  # regions still run on the bound team
    print(json.dumps({"cpus": cpus, "mine": sorted(os.sched_getaffinity(0)), "pinned": pinned, "total": total}))
threading.Thread(target=run).start()
"""


@pytest.mark.skipif(sys.platform != "linux" or len(os.sched_getaffinity(0)) < 2, reason="Linux, 2 CPUs or more")
def test_the_engine_threads_team_keeps_one_thread_per_cpu():
    """A team spanning the process's CPUs is bound one thread per CPU, the calling thread on the first: the
    scheduler cannot put a woken worker on the core of the thread that woke it (cpu_threads.py)."""
    env = {k: v for k, v in os.environ.items() if k not in cpu_threads.AFFINITY_ENV}
    out = subprocess.run([sys.executable, "-c", BIND_PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    cpus = sorted(os.sched_getaffinity(0))
    assert got["cpus"] == cpus and got["mine"] == cpus[:1]
    for cpu in cpus[1:]:
        assert str(cpu) in got["pinned"], f"no thread of the team on CPU {cpu}: {got['pinned']}"
    assert got["total"] == 2.0 * (1 << 20)


PIN_PROBE = """
import json, os, threading, torch
from epserve.actors.model import cpu_threads
torch.set_num_threads(1)
got = {}
def run():
    got["cpu"] = cpu_threads.pin_thread(1)
    got["mine"] = sorted(os.sched_getaffinity(0))
thread = threading.Thread(target=run)
thread.start()
thread.join()
print(json.dumps({**got, "process": sorted(os.sched_getaffinity(0))}))
"""


@pytest.mark.skipif(sys.platform != "linux" or len(os.sched_getaffinity(0)) < 2, reason="Linux, 2 CPUs or more")
def test_a_thread_that_computes_alone_is_pinned_to_its_cpu_and_only_it():
    """A shard's serving thread on the front-end's host: the CPU after the first (cpu_threads.py)."""
    env = {k: v for k, v in os.environ.items() if k not in cpu_threads.AFFINITY_ENV}
    out = subprocess.run([sys.executable, "-c", PIN_PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    got, cpus = json.loads(out.stdout.strip().splitlines()[-1]), sorted(os.sched_getaffinity(0))
    assert got["cpu"] == cpus[1] and got["mine"] == [cpus[1]]
    assert got["process"] == cpus  # the other threads keep every CPU


def test_a_team_that_does_not_span_the_cpus_or_that_the_environment_places_stays_free(monkeypatch):
    assert cpu_threads.bind_team(threads=1) is None
    if len(os.sched_getaffinity(0)) > 2:
        assert cpu_threads.bind_team(threads=2) is None
    if torch.get_num_threads() > 1:
        assert cpu_threads.pin_thread(1) is None  # a team of more than one is bind_team's
    monkeypatch.setenv("OMP_PROC_BIND", "true")
    assert cpu_threads.bind_team(threads=len(os.sched_getaffinity(0)) + 1) is None
    assert cpu_threads.pin_thread(1) is None
