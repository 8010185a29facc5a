"""The dtype policy (actors/model/precision.py), the grouped expert projections on every path, and bf16
accuracy against transformers.

bf16 acceptance rule: our bf16 logits' max|Δ| against transformers' fp32 logits is at most 1.5x transformers'
own bf16 max|Δ| against the same fp32 logits, on the same prompts (fp32 parity is gated elsewhere, with
``--dtype float32``, at 1e-5 x max|logit|).
"""

from __future__ import annotations

import pytest
import torch

from epserve.actors.model import cpu_kernels, moe, precision
from epserve.actors.model.layers import gelu_tanh
from epserve.actors.model.loader import load_model
from epserve.actors.model.moe import AMX, BF16_DOT, GROUPED_MM, PANELS, Experts
from epserve.cluster.fixtures.checkpoint import preset

BF16_BUDGET = 1.5  # our bf16 error may be at most this multiple of transformers' own bf16 error


# --------------------------------------------------------------------------------------------- the policy


@pytest.mark.parametrize("flags, isa", [
    ({"avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}, "amx_bf16"),
    ({"avx2", "fma", "avx512f", "avx512_bf16"}, "avx512_bf16"),
    ({"avx2", "fma", "avx512f"}, "avx512"),
    ({"avx2", "fma"}, "avx2"),
    ({"sse4_2"}, "baseline"),
    ({"avx2", "fma", "amx_bf16"}, "avx2"),  # AMX's bf16 without its tiles is not usable
])
def test_cpu_isa_is_read_from_the_flags(flags, isa):
    assert precision.cpu_isa(frozenset(flags)) == isa


@pytest.mark.parametrize("isa, want", [("amx_bf16", torch.bfloat16), ("avx512_bf16", torch.bfloat16),
                                       ("avx512", torch.float32), ("avx2", torch.float32),
                                       ("baseline", torch.float32)])
def test_auto_picks_bf16_only_where_the_cpu_has_native_bf16(isa, want):
    assert precision.resolve_dtype("auto", "cpu", isa=isa) == want
    assert precision.resolve_dtype("auto", "cuda", isa=isa) == torch.bfloat16  # GPUs: always bf16
    assert precision.resolve_dtype("float32", "cuda", isa=isa) == torch.float32  # explicit wins
    assert precision.resolve_dtype("bfloat16", "cpu", isa=isa) == torch.bfloat16


def test_auto_on_this_machine_follows_its_flags():
    native = {"avx512_bf16", "amx_bf16"} & precision.cpu_flags()
    assert precision.resolve_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16, got 'fp16'"):
        precision.resolve_dtype("fp16", "cpu")


# --------------------------------------------------------------------------------------------- grouped calls


def _experts(dtype_held, compute, E=8, H=64, I=32, seed=0):
    cfg = preset("tiny")
    g = torch.Generator().manual_seed(seed)
    m = Experts(cfg.__class__(**{**cfg.__dict__, "hidden_size": H, "moe_intermediate_size": I, "num_experts": E,
                                 "top_k": 3}))
    with torch.no_grad():
        m.gate_up_proj.data = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dtype_held)
        m.down_proj.data = (torch.randn(E, H, I, generator=g) / I**0.5).to(dtype_held)
    reference = (m.gate_up_proj.detach().clone(), m.down_proj.detach().clone())
    return m.prepare_(compute), reference


def _reference_experts(x, ids, weights, gate_up, down, compute):
    """Σ_k w·expert(x), one expert at a time: obviously right (the computation in ``compute``)."""
    out = torch.zeros(x.shape[0], gate_up.shape[2])
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            gate, up = (x[t] @ gate_up[e].to(compute).T).chunk(2)
            out[t] += weights[t, k] * (gelu_tanh(gate) * up @ down[e].to(compute).T).float()
    return out


PATHS = [(PANELS, torch.bfloat16, torch.float32, cpu_kernels.available()),
         (AMX, torch.bfloat16, torch.bfloat16, cpu_kernels.amx_available()),
         (BF16_DOT, torch.bfloat16, torch.bfloat16, cpu_kernels.bf16_dot_available()),
         (GROUPED_MM, torch.float32, torch.float32, True),
         (GROUPED_MM, torch.bfloat16, torch.bfloat16, not cpu_kernels.bf16_dot_available())]


@pytest.mark.parametrize("path, held, compute, here", PATHS, ids=[f"{p}-{c}" for p, _, c, _ in PATHS])
def test_each_projection_is_one_grouped_call_not_one_per_expert(path, held, compute, here, monkeypatch):
    if not here:
        pytest.skip(f"the {path} path does not run on this CPU")
    if path == BF16_DOT:  # what a CPU with AVX512-BF16 but no AMX takes
        monkeypatch.setattr(cpu_kernels, "amx_available", lambda: False)
    m, (gate_up, down) = _experts(held, compute)
    assert m.path == path
    T = 40
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, 64, generator=g).to(compute)
    ids = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(T)])  # every expert gets rows
    weights = torch.rand(T, 3, generator=g)
    calls = []
    backends = {PANELS: "grouped_linear", BF16_DOT: "grouped_linear_bf16", AMX: "grouped_linear_amx"}
    owner, name = (cpu_kernels, backends[path]) if path in backends else (moe, "grouped_mm")
    inner = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **k: calls.append(a[0].shape[0]) or inner(*a, **k))
    out = m(x, ids, weights)
    assert calls == [3 * T, 3 * T]  # gate/up then down: each over every (token, expert) row at once
    ref = _reference_experts(x, ids, weights, gate_up, down, compute)
    tol = 1e-5 if compute == torch.float32 else 2e-2  # bf16: activations rounded to bf16 between the two
    assert (out - ref).abs().max().item() <= tol * ref.abs().max().item()


@pytest.mark.skipif(not cpu_kernels.bf16_dot_available(), reason="this CPU has no AVX512-BF16")
@pytest.mark.parametrize("counts, N, K", [([0, 5, 1, 0, 9, 4, 2], 48, 128), ([3], 1408, 2816), ([1, 2], 4, 32)])
def test_bf16_dot_kernel_rounds_fp32_sums_once_and_is_batch_invariant(counts, N, K):
    g = torch.Generator().manual_seed(N + K)
    w = (torch.randn(len(counts), N, K, generator=g) / K**0.5).to(torch.bfloat16)
    x = torch.randn(sum(counts), K, generator=g).to(torch.bfloat16)
    offsets = torch.tensor([0, *counts]).cumsum(0)
    y = cpu_kernels.grouped_linear_bf16(x, offsets, w)
    assert y.dtype == torch.bfloat16
    for e in range(len(counts)):
        rows = slice(int(offsets[e]), int(offsets[e + 1]))
        ref = x[rows].double() @ w[e].double().T
        # fp32 accumulation then one rounding to bf16: within one bf16 ulp (2^-8 relative) of the exact sum
        assert ((y[rows].double() - ref).abs() <= 2**-8 * ref.abs() + 1e-6 * K**0.5).all()
        for r in range(rows.start, rows.stop):  # a row alone gives the same bits
            alone = cpu_kernels.grouped_linear_bf16(x[r : r + 1], torch.tensor([0, 1]), w[e : e + 1])
            assert torch.equal(alone[0], y[r])


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler or no AVX2 on this machine")
def test_paged_decode_attention_reads_a_bf16_cache():
    """The bf16 cache widens exactly to fp32: the kernel on a bf16 cache equals the kernel on that cache
    widened to fp32 (then rounded to bf16 once)."""
    g = torch.Generator().manual_seed(3)
    G, n, D, bs, B = 2, 4, 64, 4, 3
    k = torch.randn(G, 40 * bs, D, generator=g).to(torch.bfloat16)
    v = torch.randn(G, 40 * bs, D, generator=g).to(torch.bfloat16)
    q = torch.randn(B, G * n, D, generator=g).to(torch.bfloat16)
    blocks = torch.stack([torch.randperm(40, generator=g)[:10] for _ in range(B)])
    pos, lo = torch.tensor([5, 17, 30]), torch.tensor([0, 4, 13])
    ours = cpu_kernels.paged_decode_attention(q, k, v, blocks, pos, lo, bs)
    wide = cpu_kernels.paged_decode_attention(q.float(), k.float(), v.float(), blocks, pos, lo, bs)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, wide.to(torch.bfloat16))


# --------------------------------------------------------------------------------------------- accuracy


def _logit_errors(path, prompts, tools, hf_class):
    """max|Δ| against transformers' fp32 logits of (our bf16 model, transformers' bf16 model)."""
    ref32 = tools.hf_load(hf_class, path)
    ref16 = hf_class.from_pretrained(str(path), attn_implementation="eager", dtype=torch.bfloat16).eval()
    ours16 = load_model(path, dtype=torch.bfloat16)
    assert ours16.layers[0].experts.gate_up_proj.dtype == torch.bfloat16
    ours, theirs = 0.0, 0.0
    for ids in prompts:
        exact = tools.hf_logits(ref32, ids)
        ours = max(ours, (tools.our_logits(ours16, ids).float() - exact).abs().max().item())
        theirs = max(theirs, (tools.hf_logits(ref16, ids) - exact).abs().max().item())
    return ours, theirs


@pytest.fixture(scope="module")
def hf_saved_dir(tmp_path_factory, tools):
    """A checkpoint written by transformers' own save_pretrained (fp32 on disk), text-only layout."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    torch.manual_seed(5)
    config = Gemma4TextConfig(vocab_size=512, hidden_size=128, intermediate_size=192, num_hidden_layers=4,
                              layer_types=["sliding_attention", "sliding_attention", "sliding_attention",
                                           "full_attention"], num_attention_heads=4, num_key_value_heads=2,
                              head_dim=32, global_head_dim=64, num_global_key_value_heads=1, attention_k_eq_v=True,
                              sliding_window=16, num_experts=16, top_k_experts=4, moe_intermediate_size=64,
                              final_logit_softcapping=30.0, enable_moe_block=True, hidden_size_per_layer_input=0,
                              hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, tie_word_embeddings=True)
    model = Gemma4ForCausalLM(config)
    tools.randomize_hf_(model, seed=55)
    path = tmp_path_factory.mktemp("hf-saved-bf16-check")
    model.save_pretrained(path)
    return path


def test_bf16_logits_are_as_close_to_fp32_as_transformers_own_bf16(tiny_dir, hf_saved_dir, tools):
    from transformers import AutoModelForCausalLM, Gemma4ForCausalLM

    for path, cls, vocab in ((tiny_dir, AutoModelForCausalLM, 1024), (hf_saved_dir, Gemma4ForCausalLM, 512)):
        prompts = [tools.random_ids(vocab, T, seed=T) for T in (7, 48, 80)]
        ours, theirs = _logit_errors(path, prompts, tools, cls)
        assert theirs > 0  # transformers' bf16 does differ from its fp32: the comparison means something
        assert ours <= BF16_BUDGET * theirs, (f"{path.name}: our bf16 max|Δ| {ours:.3f} > {BF16_BUDGET} x "
                                              f"transformers' bf16 max|Δ| {theirs:.3f}")


def test_grouped_mm_without_a_grouped_kernel_is_one_padded_batched_gemm(monkeypatch):
    """Where torch has no grouped GEMM for a dtype (fp32 on some CUDA builds), the groups' rows go through
    one batched GEMM, padded to the longest group: the same products."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(10, 16, generator=g), torch.randn(4, 8, 16, generator=g)
    offsets = torch.tensor([0, 4, 4, 9, 10])
    grouped = moe.grouped_mm(x, w, offsets)
    monkeypatch.setattr(moe, "_NO_GROUPED_MM", {("cpu", torch.float32)})
    bmm_calls = []
    inner = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: bmm_calls.append(1) or inner(*a))
    assert torch.allclose(moe.grouped_mm(x, w, offsets), grouped, atol=1e-6) and bmm_calls == [1]
    per_group = torch.cat([x[a:b] @ w[e].T for e, (a, b) in enumerate(zip(offsets[:-1], offsets[1:]))])
    assert torch.allclose(grouped, per_group, atol=1e-6)
