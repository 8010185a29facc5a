"""The Gemma 4 26B-A4B text decoder (section 1 of the model spec), single-device.

Parallelism is applied from outside, as in gpt-fast: the routed experts are reached through an *expert
executor* (``dispatch`` then ``combine``), local by default; the cluster's front-end passes its side of the
exchange with the expert shards (actors/dispatch.py). The dense MLP runs between ``dispatch`` and ``combine``,
which is what hides the all-to-all.

Each layer is also a generator of three stages (``stages``), split where the exchange's collectives are:
before the dispatch, before the combine and after it. ``forward`` runs them one after another; two
micro-batches can take turns (actors/model/micro_batches.py), so that one's attention runs while the shards
compute the other's experts.
Parameter names equal the checkpoint's keys without their prefix, so loading is a rename-free copy.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch
from torch import nn

from . import ops
from .attention import Attention, AttentionContext
from .config import FULL, SLIDING, ModelConfig
from .layers import RopeTable, linear
from .ops import RMSNorm
from .moe import DenseMLP, Experts, Router


ALL_EXPERTS = "all"


class ExpertExecutor(Protocol):
    def begin_step(self, tokens: int | list[int]) -> None:
        """A forward pass over ``tokens`` tokens starts (a count per micro-batch with several; the model
        runner says so; the exchange tells the shards)."""

    def dispatch(self, layer: int, x_TH, ids_TK, weights_TK): ...
    def combine(self, handle) -> torch.Tensor:
        """fp32 [T, H]: Σ_k w·expert(x) over every expert."""

    def uncounted(self):
        """A context in which steps count in no statistics (a warm-up)."""


class LocalExperts:
    """Runs each layer's own ``Experts`` module in this process."""

    def __init__(self, layers):
        self.layers = layers

    def begin_step(self, tokens: int | list[int]) -> None:
        pass

    def dispatch(self, layer, x_TH, ids_TK, weights_TK):
        return self.layers[layer].experts(x_TH, ids_TK, weights_TK)

    def combine(self, handle):
        return handle

    def uncounted(self):
        return contextlib.nullcontext()


class DecoderLayer(nn.Module):
    """One layer: attention, then the dense MLP and the MoE side by side on the same residual ``r``.

    The optional shared expert (``shared_expert_intermediate_size`` > 0; the released model has none: the
    "shared expert" of its model card is the dense MLP) reads what the routed experts read, the output of
    ``pre_feedforward_layernorm_2``, and its output is summed (fp32) with the routed experts' weighted sum
    before ``post_feedforward_layernorm_2``. It is an expert of the MoE that every token uses, as in
    DeepSeek-MoE and Qwen-MoE: it belongs to the mixture that the MoE branch's norm closes, not a second
    dense branch with norms of its own. It also keeps the split exact: on the cluster the front-end computes
    it while the shards compute theirs, and it is one more partial of the sum that is normalised once.
    """

    def __init__(self, cfg: ModelConfig, index: int, expert_range: tuple[int, int] | None):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.index = index
        self.kind = cfg.layer_types[index]
        self.self_attn = Attention(cfg, index)
        self.mlp = DenseMLP(H, cfg.intermediate_size)
        self.router = Router(cfg)
        self.experts = Experts(cfg, *expert_range) if expert_range else None
        self.shared_expert = (
            DenseMLP(H, cfg.shared_expert_intermediate_size) if cfg.shared_expert_intermediate_size else None
        )
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "post_feedforward_layernorm_1",
                     "pre_feedforward_layernorm_2", "post_feedforward_layernorm_2"):
            setattr(self, name, RMSNorm(H, eps))
        self.register_buffer("layer_scalar", torch.ones(1))

    def forward(self, h, rope, ctx: AttentionContext, experts: ExpertExecutor):
        return run_stages(self.stages(h, rope, ctx, experts))

    def stages(self, h, rope, ctx: AttentionContext, experts: ExpertExecutor):
        """The layer, yielding where another micro-batch may take its turn: before the dispatch, before the
        combine, after it (see micro_batches.py). Returns the layer's output."""
        eps = self.input_layernorm.eps
        r = ops.add_rms_norm(h, self.self_attn(self.input_layernorm(h), rope, ctx),
                             self.post_attention_layernorm.weight, eps)
        # the dense MLP's input, the experts' input and the router's, from r (spec §1.3)
        x_dense, x_experts, z = ops.ffn_inputs(r, self.pre_feedforward_layernorm.weight,
                                               self.pre_feedforward_layernorm_2.weight, self.router.scale,
                                               self.router.root, eps)
        weights, ids = self.router(z)
        yield
        handle = experts.dispatch(self.index, x_experts, ids, weights)
        m = self.mlp(x_dense)
        yield
        y = experts.combine(handle)  # fp32
        yield
        if self.shared_expert is not None:  # variants with a separate shared expert: it joins the routed sum
            y = y + self.shared_expert(x_experts).float()
        # post_feedforward_layernorm_2 only after every shard's partial is summed
        return ops.ffn_output(r, m, y, self.post_feedforward_layernorm_1.weight,
                              self.post_feedforward_layernorm_2.weight, self.post_feedforward_layernorm.weight,
                              self.layer_scalar, eps)


class Gemma4Model(nn.Module):
    """expert_range = (first, count) of the routed experts held here: all by default, None for none (the
    cluster front-end, whose experts live on the shards)."""

    def __init__(self, cfg: ModelConfig, expert_range: tuple[int, int] | None | str = ALL_EXPERTS):
        super().__init__()
        if expert_range == ALL_EXPERTS:
            expert_range = (0, cfg.num_experts)
        self.cfg, self.expert_range = cfg, expert_range
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, expert_range) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.local_experts = LocalExperts(self.layers) if expert_range else None
        self._inv_freq, self._rope = {}, {}

    @property
    def dtype(self):
        return self.embed_tokens.weight.dtype

    def inv_freq(self, kind: str) -> torch.Tensor:
        if kind not in self._inv_freq:
            shape = self.cfg.full if kind == FULL else self.cfg.sliding
            self._inv_freq[kind] = shape.rope.inv_freq(shape.head_dim)
        return self._inv_freq[kind]

    def rope(self, kind: str, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin [T, D] of this kind's rotary embedding at ``positions`` (``layers.RopeTable``)."""
        if kind not in self._rope:
            self._rope[kind] = RopeTable(self.inv_freq(kind))
        return self._rope[kind](positions, dtype)

    def forward(self, input_ids, positions, ctx: AttentionContext, experts: ExpertExecutor | None = None):
        """input_ids, positions [T] -> final-normed hidden states [T, H]."""
        return run_stages(self.stages(input_ids, positions, ctx, experts))

    def stages(self, input_ids, positions, ctx: AttentionContext, experts: ExpertExecutor | None = None):
        """``forward`` as a generator of every layer's stages (``DecoderLayer.stages``)."""
        experts = experts or self.local_experts
        if experts is None:
            raise RuntimeError("this model was built without experts: pass an expert executor")
        dtype = self.dtype
        h = self.embed_tokens(input_ids) * torch.tensor(self.cfg.embed_scale).to(dtype)
        ropes = {k: self.rope(k, positions, dtype) for k in (SLIDING, FULL)}
        for layer in self.layers:
            h = yield from layer.stages(h, ropes[layer.kind], ctx, experts)
        return self.norm(h)

    def logits(self, hidden):
        """fp32 logits: the tied head on the unscaled embedding, then the final soft-cap, each step rounded to
        the model dtype (as transformers computes them)."""
        return self.logits_and_argmax(hidden)[0]

    def logits_and_argmax(self, hidden):
        """(fp32 logits [R, V], each row's argmax [R]): the greedy tokens come out of the soft-cap's pass."""
        return ops.softcap_argmax(linear(hidden, self.embed_tokens.weight, pack=True), self.cfg.final_logit_softcapping)


def run_stages(stages):
    """Run a generator of stages to its end; its return value."""
    while True:
        try:
            next(stages)
        except StopIteration as done:
            return done.value


def count_text_parameters(cfg: ModelConfig) -> int:
    """Parameters of the text decoder (persistent buffers included), counted on the meta device."""
    with torch.device("meta"):
        model = Gemma4Model(cfg)
    return sum(t.numel() for t in model.state_dict().values())


def count_active_parameters(cfg: ModelConfig) -> int:
    """Parameters one token uses: everything but the routed experts, plus top_k experts per layer."""
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    all_experts = cfg.num_layers * cfg.num_experts * per_expert
    return count_text_parameters(cfg) - all_experts + cfg.num_layers * cfg.top_k * per_expert

