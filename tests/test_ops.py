"""The fused steps of a decoder layer (actors/model/ops.py): each native kernel against its torch definition,
in fp32 and in bf16, on shapes with remainders (widths that are not multiples of 8, one row, a k_eq_v v)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from epserve.actors.model import cpu_kernels, ops
from epserve.actors.model.config import RopeConfig
from epserve.actors.model.layers import rms_norm, rope_tables
from epserve.actors.model.precision import cpu_flags

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler or no AVX2 on this machine")
DTYPES = [torch.float32, torch.bfloat16]


def close(ours, ref, dtype):
    """fp32: a few ulps of the tensor's scale (the sums of squares add in another order, tanh and exp are
    another implementation); bf16: at most a rounding or two apart."""
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    ours, ref = ours.float(), ref.float()
    tol = 1e-6 if dtype == torch.float32 else 2**-7
    assert (ours - ref).abs().max() <= tol * ref.abs().max(), (ours - ref).abs().max().item()


def rand(*shape, dtype, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, H", [(1, 8), (5, 37), (64, 256)])
def test_norms(dtype, T, H):
    x, h, w = rand(T, H, dtype=dtype), rand(T, H, dtype=dtype, seed=1), rand(H, dtype=dtype, seed=2) + 1
    close(ops.rms_norm(x, w, 1e-6), rms_norm(x, w, 1e-6), dtype)
    close(ops.rms_norm(x, None, 1e-6), rms_norm(x, None, 1e-6), dtype)
    close(ops.add_rms_norm(h, x, w, 1e-6), ops.torch_add_rms_norm(h, x, w, 1e-6), dtype)
    scale = rand(H, dtype=dtype, seed=3) + 1
    for ours, ref in zip(ops.ffn_inputs(x, w, scale, w * 2, H**-0.5, 1e-6),
                         ops.torch_ffn_inputs(x, w, scale, w * 2, H**-0.5, 1e-6)):
        close(ours, ref, dtype)
    m, y, lam = rand(T, H, dtype=dtype, seed=4), rand(T, H, dtype=torch.float32, seed=5), torch.tensor([0.7]).to(dtype)
    close(ops.ffn_output(h, m, y, w, scale, w * 3, lam, 1e-6),
          ops.torch_ffn_output(h, m, y, w, scale, w * 3, lam, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_each_row_of_a_batch_gets_the_bits_it_gets_alone(dtype):
    """The small steps are batch-invariant: a row's result does not depend on the rows beside it or on how the
    threads split them (the cluster's shards and the in-process model agree; prefill and decode agree)."""
    T, H, N, G, D = 13, 332, 9, 2, 40
    x, h, m = (rand(T, H, dtype=dtype, seed=s) for s in range(3))
    w, scale, y = rand(H, dtype=dtype, seed=3) + 1, rand(H, dtype=dtype, seed=4) + 1, rand(T, H, dtype=torch.float32)
    lam = torch.tensor([0.7]).to(dtype)
    q, k, v = rand(T, N, D, dtype=dtype, seed=5), rand(T, G, D, dtype=dtype, seed=6), rand(T, G, D, dtype=dtype, seed=7)
    cos, sin = rope_tables(RopeConfig(10_000.0, 0.5).inv_freq(D), torch.arange(T), dtype)
    steps = {
        "rms_norm": lambda r: [ops.rms_norm(x[r], w, 1e-6)],
        "add_rms_norm": lambda r: [ops.add_rms_norm(h[r], x[r], w, 1e-6)],
        "ffn_inputs": lambda r: ops.ffn_inputs(x[r], w, scale, w * 2, H**-0.5, 1e-6),
        "ffn_output": lambda r: [ops.ffn_output(h[r], m[r], y[r], w, scale, w * 3, lam, 1e-6)],
        "qkv": lambda r: ops.qkv(q[r], k[r], v[r], w[:D], scale[:D], cos[r], sin[r], 1e-6),
    }
    for name, step in steps.items():
        whole = step(slice(None))
        for t in range(T):
            for ours, alone in zip(whole, step(slice(t, t + 1))):
                assert torch.equal(ours[t : t + 1], alone), (name, t)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k_eq_v", [True, False])
def test_qkv_norms_and_rope(dtype, k_eq_v):
    T, N, G, D = 7, 4, 2, 24
    q, k = rand(T, N, D, dtype=dtype), rand(T, G, D, dtype=dtype, seed=1)
    v = k if k_eq_v else rand(T, G, D, dtype=dtype, seed=2)
    wq, wk = rand(D, dtype=dtype, seed=3) + 1, rand(D, dtype=dtype, seed=4) + 1
    cos, sin = rope_tables(RopeConfig(10_000.0, 0.5).inv_freq(D), torch.arange(40, 40 + T), dtype)
    for ours, ref in zip(ops.qkv(q, k, v, wq, wk, cos, sin, 1e-6), ops.torch_qkv(q, k, v, wq, wk, cos, sin, 1e-6)):
        close(ours, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qkv_reads_the_column_blocks_of_one_joint_projection(dtype):
    """q, k and v as views of one [T, (N + 2G) D] output (``layers.JointLinears``): the same bits as from
    tensors of their own."""
    T, N, G, D = 5, 4, 2, 32
    joint = rand(T, (N + 2 * G) * D, dtype=dtype)
    q, k, v = (t.view(T, -1, D) for t in joint.split([N * D, G * D, G * D], dim=-1))
    assert not q.is_contiguous()
    wq, wk = rand(D, dtype=dtype, seed=3) + 1, rand(D, dtype=dtype, seed=4) + 1
    cos, sin = rope_tables(RopeConfig(10_000.0, 0.5).inv_freq(D), torch.arange(T), dtype)
    for ours, own in zip(ops.qkv(q, k, v, wq, wk, cos, sin, 1e-6),
                         ops.qkv(q.contiguous(), k.contiguous(), v.contiguous(), wq, wk, cos, sin, 1e-6)):
        assert ours.is_contiguous() and torch.equal(ours, own)


@pytest.mark.parametrize("dtype", DTYPES)
def test_route_picks_the_top_k_and_weighs_them(dtype):
    T, E, K = 33, 20, 4
    g = torch.Generator().manual_seed(0)  # distinct logits, exact in bf16 too: the top-k is unambiguous
    logits = torch.stack([torch.randperm(E, generator=g) * 0.25 - 2 for _ in range(T)]).to(dtype)
    scale = rand(E, dtype=dtype, seed=1).abs() + 0.5
    w, ids = ops.route(logits, K, scale)
    w_ref, ids_ref = ops.torch_route(logits, K, scale)
    assert torch.equal(ids, ids_ref) and w.dtype == torch.float32
    assert torch.allclose(w, w_ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_align_and_combine(dtype):
    T, K, E, H = 11, 3, 5, 16
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(-1, E, (T, K), generator=g)  # -1: another process's slot
    x, w = rand(T, H, dtype=dtype), torch.rand(T, K, generator=g)
    xs, offsets, row_of_slot, S = ops.moe_align(ids, E, x)
    xs_ref, offsets_ref, rows_ref, S_ref = ops.torch_moe_align(ids, E, x)
    assert S == S_ref == int((ids >= 0).sum())
    assert torch.equal(offsets, offsets_ref) and torch.equal(row_of_slot, rows_ref) and torch.equal(xs, xs_ref)
    ys = rand(S, H, dtype=dtype, seed=1)
    strided = w.T.contiguous().T  # the shards' weights are a strided view too
    out = ops.moe_combine(ys, strided, row_of_slot, S)
    assert torch.allclose(out, ops.torch_moe_combine(ys, w, row_of_slot, S), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_mul_on_the_halves_of_one_projection_and_on_two(dtype):
    """GeGLU's activation from the two halves of the experts' gate/up projection (rows 2I apart) and from the
    dense MLP's two projections; large negative inputs (gelu -> 0 through 1 + tanh) and exact zeros included."""
    S, I = 37, 136
    gate_up = rand(S, 2 * I, dtype=dtype, scale=4.0)
    gate_up[0, :4] = torch.tensor([0.0, -12.0, 12.0, -3.5]).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    close(ops.gelu_mul(gate, up), ops.torch_gelu_mul(gate, up), dtype)
    gate, up = gate.contiguous(), up.contiguous()
    close(ops.gelu_mul(gate, up), ops.torch_gelu_mul(gate, up), dtype)
    assert ops.gelu_mul(gate[:0], up[:0]).shape == (0, I)


WIDE_BITS = r"""
import sys, torch
from epserve.actors.model import cpu_kernels, ops
torch.manual_seed(0)
out = []
for dtype in (torch.float32, torch.bfloat16):
    x = torch.randn(5, 2 * 152) * 6
    x[0, :8] = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-30, 9.0, -9.0])
    gate, up = x.to(dtype).chunk(2, dim=-1)
    out.append(ops.gelu_mul(gate, up).float())
    logits = (torch.randn(3, 1000) * 40).to(dtype)  # 1000: a last 8 after the 16s
    logits[1, 7], logits[2, :] = float("nan"), -float("inf")
    out += [t.float() for t in ops.softcap_argmax(logits, 30.0)] + [ops.softcap_argmax(logits, 0.0)[1].float()]
    for D in (144, 256, 512):  # decode attention's values: a last range of 16 columns, two and four of 128
        k, v = (torch.randn(2, 24, D).to(dtype) for _ in "kv")
        blocks, pos, lo = torch.tensor([[2, 0, 5], [1, 3, 4]]), torch.tensor([10, 7]), torch.tensor([0, 2])
        out.append(cpu_kernels.paged_decode_attention(torch.randn(2, 6, D), k, v, blocks, pos, lo, 4))
torch.save(out, sys.argv[1])
"""


@pytest.mark.skipif(not {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= cpu_flags(), reason="no AVX-512 here")
def test_16_lane_paths_give_the_8_lane_bits(tmp_path):
    """Where the CPU has AVX-512, GeGLU, the soft-cap (and its argmax) and decode attention's weighted sum of
    values run 16 lanes at a time: the same operations as the 8-lane paths, so the same bits, NaN, infinities,
    -0 and a last 8 columns included (``EPSERVE_AVX512=0`` forces 8 lanes)."""
    script = tmp_path / "wide.py"
    script.write_text(WIDE_BITS)
    runs = []
    for flag in ("1", "0"):
        subprocess.run([sys.executable, str(script), str(tmp_path / flag)], check=True, timeout=120,
                       env=os.environ | {"EPSERVE_AVX512": flag})
        runs.append(torch.load(tmp_path / flag))
    for wide, narrow in zip(*runs):
        assert torch.equal(wide.view(torch.int32), narrow.view(torch.int32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cap", [30.0, 0.0])
def test_softcap_and_the_greedy_token_in_one_pass(dtype, cap):
    """The soft-capped fp32 logits (each step rounded to the model dtype, as torch) and each row's argmax:
    the first of equal maxima, a NaN before any number (torch.argmax), a vocabulary wider than the scratch rows
    of the other kernels."""
    R, V = 5, 40_000
    logits = rand(R, V, dtype=dtype, scale=20.0)
    logits[1, 7] = logits[1, 9] = 500.0  # ties: the first
    logits[2, 11] = float("nan")
    ours, argmax = ops.softcap_argmax(logits, cap)
    ref, ref_argmax = ops.torch_softcap_argmax(logits, cap)
    assert ours.dtype == torch.float32 and torch.isnan(ours[2, 11])
    finite = ~torch.isnan(ref)
    close(torch.where(finite, ours, 0.0), torch.where(finite, ref, 0.0), dtype)
    assert argmax.tolist() == ref_argmax.tolist() and argmax[1] == 7 and argmax[2] == 11
