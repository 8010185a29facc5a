"""The feed-forward parts of a Gemma 4 layer: the dense GeGLU MLP, the router and the routed experts.

Legend: T tokens, H hidden, E experts (local to this process), K top-k slots, I expert width.
The experts compute is one function, ``grouped_experts``, used both by the in-process model and by the
expert-shard actors: tokens are sorted by expert once, each expert runs one GEMM over all of its tokens, and
each token's K contributions are summed in fp32 (weights applied before the sum), so a shard can return one
partial sum per token.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers import gelu_tanh, rms_norm


class DenseMLP(nn.Module):
    """GeGLU MLP: down(gelu_tanh(gate x) * up x). The always-on dense FFN, and the optional shared expert."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Reads the raw residual; returns fp32 routing weights [T, K] and expert ids [T, K] (sorted by prob)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))
        self.top_k, self.eps, self.root = cfg.top_k, cfg.rms_norm_eps, cfg.hidden_size**-0.5

    def forward(self, r):
        z = rms_norm(r, None, self.eps) * self.scale * self.root
        probs = torch.softmax(self.proj(z), dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[ids], ids


SMALL_M = 32  # up to this many rows, x @ w.T is computed as (w @ x.T).T


def linear_rows(x, w):
    """x @ w.T. For a few rows (decode: a handful of tokens per expert) the CPU GEMM packs the whole weight
    before using it; as (w @ x.T).T it streams the weight once instead, about 2.5x faster at 4 rows."""
    return (w @ x.T).T if x.shape[0] <= SMALL_M else x @ w.T


def grouped_experts(x_TH, ids_TK, weights_TK, gate_up_EIH, down_EHI) -> torch.Tensor:
    """Σ_k w[t,k] · expert_{ids[t,k]}(x[t]) in fp32 [T, H]. ids are local expert ids; -1 marks a slot that
    belongs to another process and is skipped."""
    T, H = x_TH.shape
    K = ids_TK.shape[1]
    flat_ids = ids_TK.reshape(-1)
    mine = (flat_ids >= 0).nonzero().squeeze(1)
    if mine.numel() == 0:
        return torch.zeros(T, H, dtype=torch.float32, device=x_TH.device)
    # torch.sort as transformers' grouped_mm path: the same row order inside each expert's GEMM
    order = torch.sort(flat_ids[mine]).indices
    slots = mine[order]  # (token, slot) pairs sorted by expert
    expert_of = flat_ids[slots]
    token_of = slots // K
    counts = torch.bincount(expert_of, minlength=gate_up_EIH.shape[0]).tolist()
    xs = x_TH[token_of]
    ys = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(counts):  # one GEMM per expert that has tokens: never a loop over tokens
        if n:
            gate, up = linear_rows(xs[start : start + n], gate_up_EIH[e]).chunk(2, dim=-1)
            ys[start : start + n] = linear_rows(gelu_tanh(gate) * up, down_EHI[e])
            start += n
    # w·y per (token, slot), then summed over the K slots in top-k order, in fp32 (transformers' grouped_mm
    # reduction; an index_add_ in expert order is a different fp32 association)
    weighted_SH = torch.zeros(T * K, H, dtype=torch.float32, device=x_TH.device)
    weighted_SH[slots] = ys.float() * weights_TK.reshape(-1)[slots, None]
    return weighted_SH.view(T, K, H).sum(dim=1)


class Experts(nn.Module):
    """The routed experts ``[first, first + count)`` of one layer, stored as in the checkpoint."""

    def __init__(self, cfg: ModelConfig, first: int = 0, count: int | None = None):
        super().__init__()
        count = cfg.num_experts - first if count is None else count
        H, I = cfg.hidden_size, cfg.moe_intermediate_size
        self.first, self.count = first, count
        self.gate_up_proj = nn.Parameter(torch.empty(count, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(count, H, I))

    def forward(self, x_TH, ids_TK, weights_TK):
        """ids are global expert ids; slots outside this range contribute nothing."""
        local = ids_TK - self.first
        local = torch.where((local >= 0) & (local < self.count), local, -1)
        return grouped_experts(x_TH, local, weights_TK, self.gate_up_proj, self.down_proj)
