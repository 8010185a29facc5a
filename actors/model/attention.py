"""Self-attention of one Gemma 4 layer, and the masked attention kernel every KV-cache layout shares.

The module computes q, k, v for the step's new tokens and hands them to an *attention context*
(``ctx.attend``), which stores k/v wherever its cache keeps them and returns the attention output. The model
therefore does not know how the cache is laid out: the paged engine cache and the cache-free
``WholeSequence`` context below both end in ``masked_attention``.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from . import ops
from .config import AttentionShape, ModelConfig
from .layers import JointLinears, Linear
from .ops import RMSNorm


def masked_attention(q, k, v, q_pos, k_pos, window: int | None):
    """Batched causal attention with an optional sliding window; scaling 1.0 (Gemma 4).

    q [B, Q, N, D], k/v [G, B, K, D] (head-major, N = G * n), q_pos [B, Q], k_pos [B, K] (positions; padding
    keys carry a position no query can see). A key u is visible to a query t iff u <= t and, with a window W,
    t - u < W. torch's fused attention (on a CPU its flash kernel: 2-4x the two batched GEMMs around an fp32
    softmax in bf16, 1.2-1.4x in fp32, docs/performance.md "Prefill chunk, by part"): the softmax and the
    sums run in fp32 blocks, so a bf16 model is no less exact than transformers' eager attention, which rounds
    the probabilities to bf16. A query that sees no key (padding) gets the first one: its row is discarded,
    and it stays a number.
    """
    delta = q_pos[:, :, None] - k_pos[:, None, :]  # [B, Q, K]
    visible = delta >= 0
    if window is not None:
        visible &= delta < window
    visible[..., 0] |= ~visible.any(dim=-1)
    out = nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(0, 1), v.transpose(0, 1),
                                                     attn_mask=visible[:, None], scale=1.0, enable_gqa=True)
    return out.transpose(1, 2)


class AttentionContext(Protocol):
    def attend(self, layer: int, shape: AttentionShape, q, k, v) -> torch.Tensor:
        """q [T, N, D], k/v [T, G, D] of the step's tokens -> attention output [T, N, D]."""


class WholeSequence:
    """Context for one sequence given whole (no cache): positions ``0..T-1``. The parity reference."""

    def __init__(self, positions: torch.Tensor):
        self.positions = positions

    def attend(self, layer, shape, q, k, v):
        pos = self.positions[None]
        head_major = lambda t: t.transpose(0, 1)[:, None]  # noqa: E731 - [T, G, D] -> [G, 1, T, D]
        return masked_attention(q[None], head_major(k), head_major(v), pos, pos, shape.window)[0]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.shape = shape = cfg.attention(layer)
        H, N, G, D = cfg.hidden_size, cfg.num_heads, shape.num_kv_heads, shape.head_dim
        self.q_proj = Linear(H, N * D)
        self.k_proj = Linear(H, G * D)
        self.v_proj = None if shape.k_eq_v else Linear(H, G * D)
        self.o_proj = Linear(N * D, H)
        self.qkv_proj = JointLinears(self.q_proj, self.k_proj, self.v_proj)
        self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.eps = cfg.rms_norm_eps

    def forward(self, x, rope, ctx: AttentionContext):
        """x [T, H] (already input-normed); rope = (cos, sin) [T, D] of this layer's kind."""
        T, D = x.shape[0], self.shape.head_dim
        q_raw, k_raw, *v_raw = (t.view(T, -1, D) for t in self.qkv_proj(x))
        v_raw = v_raw[0] if v_raw else k_raw  # k_eq_v: V from the raw k
        # q and k: their norms, then RoPE; v: an unweighted norm
        q, k, v = ops.qkv(q_raw, k_raw, v_raw, self.q_norm.weight, self.k_norm.weight, *rope, self.eps)
        out = ctx.attend(self.layer, self.shape, q, k, v)
        return self.o_proj(out.reshape(T, -1))
