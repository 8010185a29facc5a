"""The small steps of a decoder layer, each one call: RMSNorm (alone, after attention with the residual, the
three inputs of the feed-forward block, and the layer's end), q/k/v norms with RoPE, the router's top-k, the
experts' sort and weighted sum, GeGLU's gelu x up; and the head's soft-cap with the greedy choice.

Each op has a torch definition (``torch_*``, the model spec's math as transformers computes it; used on GPUs
and as the oracle in tests) and, on CPUs, a native kernel (``kernels/fused.c``) that computes the same in one
pass: at decode these steps are a few thousand numbers per token, and as chains of torch operators they cost
more in per-operator overhead than in arithmetic. The kernels round to the model dtype where torch stores an
intermediate tensor, so a bf16 model rounds where transformers' does. Where a step takes a tanh (GELU, the
soft-cap), the kernel's is within 1.4 ulp of fp32 where torch's is within 0.6 (measured over [-12, 12]), so a
bf16 result may differ from torch's by one bf16 ulp (~0.4 % of GELU's outputs, nearly all where the GELU is
near 0 and 1 + tanh cancels), an fp32 one in its last bits.

Legend: T tokens, H hidden, E experts, K top-k, N / G query / KV heads, D head dim, S expert rows.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from . import cpu_kernels
from .layers import apply_rope, derived, gelu_tanh, rms_norm as torch_rms_norm

MAX_DIM = 16384  # the widest row the kernels take (their scratch rows; kernels/fused.c)
_TYPE = {torch.float32: 0, torch.bfloat16: 1}


def native(*tensors: torch.Tensor, widest: int | None = MAX_DIM) -> bool:
    """Whether the native kernels serve these tensors (CPU, fp32 or bf16, contiguous rows within ``widest``:
    MAX_DIM for a kernel with scratch rows, None for one without)."""
    return all(t.device.type == "cpu" and t.dtype in _TYPE and t.is_contiguous()
               and (widest is None or t.shape[-1] <= widest) for t in tensors) and cpu_kernels.available()


def _f32(w: torch.Tensor | None):
    """The fp32 values of a (long-lived) weight, as a pointer: widened once and kept with the weight."""
    if w is None:
        return None
    return derived(w, "_fp32", lambda t: t.float().contiguous()).data_ptr()


def _ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


def _threads() -> int:
    return torch.get_num_threads()


# ---------------------------------------------------------------------------------------------- norms


class RMSNorm(nn.Module):
    """A norm's weight (the checkpoint's parameter) and eps; its forward is ``rms_norm``."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)



def rms_norm(x_TH, weight, eps: float):
    if not native(x_TH):
        return torch_rms_norm(x_TH, weight, eps)
    y = torch.empty_like(x_TH)
    cpu_kernels.lib().fused_rms_norm(_ptr(x_TH), _TYPE[x_TH.dtype], x_TH.numel() // x_TH.shape[-1], x_TH.shape[-1],
                                     _f32(weight), eps, _ptr(y), _threads())
    return y


def torch_add_rms_norm(residual_TH, x_TH, weight, eps: float):
    return residual_TH + torch_rms_norm(x_TH, weight, eps)


def add_rms_norm(residual_TH, x_TH, weight, eps: float):
    """residual + rms_norm(x, weight): the residual after attention."""
    if not native(residual_TH, x_TH):
        return torch_add_rms_norm(residual_TH, x_TH, weight, eps)
    out = torch.empty_like(x_TH)
    T, H = x_TH.shape
    cpu_kernels.lib().fused_add_rms_norm(_ptr(residual_TH), _ptr(x_TH), _TYPE[x_TH.dtype], T, H, _f32(weight), eps,
                                         _ptr(out), _threads())
    return out


def torch_ffn_inputs(r_TH, w_dense, w_experts, router_scale, root: float, eps: float):
    return (torch_rms_norm(r_TH, w_dense, eps), torch_rms_norm(r_TH, w_experts, eps),
            torch_rms_norm(r_TH, None, eps) * router_scale * root)


def ffn_inputs(r_TH, w_dense, w_experts, router_scale, root: float, eps: float):
    """The feed-forward block's three inputs from the residual r: (dense MLP's, experts', router's)."""
    if not native(r_TH):
        return torch_ffn_inputs(r_TH, w_dense, w_experts, router_scale, root, eps)
    outs = [torch.empty_like(r_TH) for _ in range(3)]
    T, H = r_TH.shape
    cpu_kernels.lib().fused_ffn_inputs(_ptr(r_TH), _TYPE[r_TH.dtype], T, H, _f32(w_dense), _f32(w_experts),
                                       _f32(router_scale), root, eps, *map(_ptr, outs), _threads())
    return tuple(outs)


def torch_ffn_output(r_TH, m_TH, y_TH, w1, w2, w_post, layer_scalar, eps: float):
    m1 = torch_rms_norm(m_TH, w1, eps)
    m2 = torch_rms_norm(y_TH.to(r_TH.dtype), w2, eps)  # the experts' fp32 sum, normed once whole
    return (r_TH + torch_rms_norm(m1 + m2, w_post, eps)) * layer_scalar


def ffn_output(r_TH, m_TH, y_TH, w1, w2, w_post, layer_scalar, eps: float):
    """The layer's output: (r + norm(norm(m)·w1 + norm(y)·w2)·w_post) · layer_scalar, m the dense MLP's
    output, y the experts' fp32 sum."""
    if not native(r_TH, m_TH) or y_TH.dtype != torch.float32:
        return torch_ffn_output(r_TH, m_TH, y_TH, w1, w2, w_post, layer_scalar, eps)
    h = torch.empty_like(r_TH)
    T, H = r_TH.shape
    y_TH = y_TH.contiguous()  # held here: the kernel reads it after _ptr returns
    cpu_kernels.lib().fused_ffn_output(_ptr(r_TH), _ptr(m_TH), _ptr(y_TH), _TYPE[r_TH.dtype], T, H,
                                       _f32(w1), _f32(w2), _f32(w_post), float(layer_scalar), eps, _ptr(h), _threads())
    return h


# ---------------------------------------------------------------------------------------------- attention


def torch_qkv(q_TND, k_TGD, v_TGD, wq, wk, cos_TD, sin_TD, eps: float):
    return (apply_rope(torch_rms_norm(q_TND, wq, eps), cos_TD, sin_TD),
            apply_rope(torch_rms_norm(k_TGD, wk, eps), cos_TD, sin_TD), torch_rms_norm(v_TGD, None, eps))


def qkv(q_TND, k_TGD, v_TGD, wq, wk, cos_TD, sin_TD, eps: float):
    """q = rope(q_norm(q)), k = rope(k_norm(k)), v = norm(v) from the raw projections (v may be k: k_eq_v),
    each token's heads one run (the column blocks of a joint projection's output, or tensors of their own)."""
    raw = (q_TND, k_TGD, v_TGD)
    if not (native(cos_TD, sin_TD) and all(t.dtype == cos_TD.dtype and t.device.type == "cpu" and t.stride(2) == 1
                                          and t.stride(1) == t.shape[2] <= MAX_DIM for t in raw)):
        return torch_qkv(q_TND, k_TGD, v_TGD, wq, wk, cos_TD, sin_TD, eps)
    (T, N, D), G = q_TND.shape, k_TGD.shape[1]
    q, k, v = torch.empty(T, N, D, dtype=q_TND.dtype), *(torch.empty(T, G, D, dtype=q_TND.dtype) for _ in "kv")
    cpu_kernels.lib().fused_qkv(*map(_ptr, raw), *(t.stride(0) for t in raw), _TYPE[q.dtype], T, N, G, D, _f32(wq),
                                _f32(wk), _ptr(cos_TD), _ptr(sin_TD), eps, _ptr(q), _ptr(k), _ptr(v), _threads())
    return q, k, v


# ---------------------------------------------------------------------------------------------- experts


def torch_route(logits_TE, top_k: int, per_expert_scale):
    probs = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * per_expert_scale[ids], ids


def route(logits_TE, top_k: int, per_expert_scale):
    """fp32 routing weights [T, K] and expert ids [T, K]: softmax over every expert in fp32, the top-k
    (descending), renormalised, times per_expert_scale."""
    if not native(logits_TE):
        return torch_route(logits_TE, top_k, per_expert_scale)
    T, E = logits_TE.shape
    weights = torch.empty(T, top_k, dtype=torch.float32)
    ids = torch.empty(T, top_k, dtype=torch.int64)
    cpu_kernels.lib().fused_route(_ptr(logits_TE), _TYPE[logits_TE.dtype], T, E, top_k, _f32(per_expert_scale),
                                  _ptr(weights), _ptr(ids), _threads())
    return weights, ids


def torch_moe_align(ids_TK, num_experts: int, x_TH):
    """(xs [S, H], offsets [E + 1], row_of_slot [T * K] (S for another process's slot), S)."""
    T, K = ids_TK.shape
    flat = ids_TK.reshape(-1)
    mine = (flat >= 0).nonzero().squeeze(1)
    slots = mine[torch.sort(flat[mine], stable=True).indices]  # (token, slot) pairs in expert order
    S = slots.numel()
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=x_TH.device)
    torch.cumsum(torch.bincount(flat[slots], minlength=num_experts), 0, out=offsets[1:])
    row_of_slot = torch.full((T * K,), S, dtype=torch.int64, device=x_TH.device)
    row_of_slot[slots] = torch.arange(S, device=x_TH.device)
    return x_TH[slots // K], offsets, row_of_slot, S


def moe_align(ids_TK, num_experts: int, x_TH):
    """The rows of the (token, slot) pairs with a local expert (id >= 0), grouped by expert, token order
    within an expert: (xs [S, H], offsets [E + 1], row_of_slot [T * K] (S for another process's slot), S)."""
    if not native(x_TH) or ids_TK.device.type != "cpu":
        return torch_moe_align(ids_TK, num_experts, x_TH)
    T, K = ids_TK.shape
    ids = ids_TK.contiguous()
    xs = torch.empty(T * K, x_TH.shape[1], dtype=x_TH.dtype)
    offsets = torch.empty(num_experts + 1, dtype=torch.int64)
    row_of_slot = torch.empty(T * K, dtype=torch.int64)
    S = cpu_kernels.lib().fused_moe_align(_ptr(ids), T, K, num_experts, _ptr(x_TH), _TYPE[x_TH.dtype], x_TH.shape[1],
                                          _ptr(offsets), _ptr(row_of_slot), _ptr(xs), _threads())
    return xs[:S], offsets, row_of_slot, S


def torch_moe_combine(ys_SH, weights_TK, row_of_slot, S: int):
    T, K = weights_TK.shape
    weighted = torch.cat([ys_SH.float(), ys_SH.new_zeros(1, ys_SH.shape[1], dtype=torch.float32)])
    weighted[:S] *= weights_TK.reshape(-1)[torch.argsort(row_of_slot)[:S], None]
    # w·y per (token, slot) back in token order, then summed over the K slots in top-k order, in fp32
    # (transformers' grouped_mm reduction; an index_add_ in expert order is a different fp32 association)
    return weighted[row_of_slot].view(T, K, -1).sum(dim=1)


def moe_combine(ys_SH, weights_TK, row_of_slot, S: int):
    """Σ_k w[t, k] · ys[row of (t, k)] in fp32 [T, H], k in top-k order; another process's slots add nothing."""
    if not native(ys_SH) or weights_TK.device.type != "cpu":
        return torch_moe_combine(ys_SH, weights_TK, row_of_slot, S)
    T, K = weights_TK.shape
    out = torch.empty(T, ys_SH.shape[1], dtype=torch.float32)
    weights_TK = weights_TK.contiguous()  # held here: the kernel reads it after _ptr returns
    cpu_kernels.lib().fused_moe_combine(_ptr(ys_SH), _TYPE[ys_SH.dtype], S, _ptr(weights_TK),
                                        _ptr(row_of_slot), T, K, ys_SH.shape[1], _ptr(out), _threads())
    return out


def torch_gelu_mul(gate_SI, up_SI):
    return gelu_tanh(gate_SI) * up_SI


def gelu_mul(gate_SI, up_SI):
    """GeGLU's activation gelu_tanh(gate) * up: rows of gate and up the same distance apart (the halves of one
    [S, 2I] projection, or two [S, I] ones)."""
    S, I = gate_SI.shape
    rows = lambda t: t.device.type == "cpu" and t.dtype in _TYPE and t.stride(1) == 1  # noqa: E731
    if not (rows(gate_SI) and rows(up_SI) and up_SI.dtype == gate_SI.dtype and gate_SI.stride() == up_SI.stride()
            and I % 8 == 0 and cpu_kernels.available()):
        return torch_gelu_mul(gate_SI, up_SI)
    out = torch.empty(S, I, dtype=gate_SI.dtype)
    cpu_kernels.lib().fused_gelu_mul(_ptr(gate_SI), _ptr(up_SI), gate_SI.stride(0), _TYPE[gate_SI.dtype], S, I,
                                     _ptr(out), _threads())
    return out


# ---------------------------------------------------------------------------------------------- the head


def torch_softcap_argmax(logits_RV, cap: float):
    capped = (cap * torch.tanh(logits_RV / cap) if cap else logits_RV).float()
    return capped, capped.argmax(dim=-1)


def softcap_argmax(logits_RV, cap: float):
    """(fp32 cap · tanh(logits / cap) [R, V], rounded to the logits' dtype at each step as torch stores it, and
    each row's argmax [R]: the greedy token, found in the same pass)."""
    R, V = logits_RV.shape
    if not native(logits_RV, widest=None) or V % 8:
        return torch_softcap_argmax(logits_RV, cap)
    out = torch.empty(R, V, dtype=torch.float32)
    argmax = torch.empty(R, dtype=torch.int64)
    cpu_kernels.lib().fused_softcap_argmax(_ptr(logits_RV), _TYPE[logits_RV.dtype], R, V, float(cap or 0.0),
                                           _ptr(out), _ptr(argmax), _threads())
    return out, argmax
