"""Bytes per rank: each front-end's weights by role and its KV cache, each shard's experts (and replicas).

The KV cache is sized as the engine sizes it (``actors/engine/kv_cache.plan_blocks``): of the budget, the
sliding-window pool gets what a full batch of windows needs (at most half), the full-attention pool the
rest; the full layers' blocks are the tokens of context the front-end can hold. On a GPU the budget is what
is left after the weights and the activations; on ``cpu`` it is the engine's own setting
(``EngineConfig.kv_cache_bytes``), which the front-end allocates whatever the memory."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from epserve.actors.engine.config import EngineConfig
from epserve.actors.engine.kv_cache import block_bytes, plan_blocks
from epserve.actors.model.config import FULL, SLIDING, ModelConfig
from epserve.actors.placement import expert_ranges

from .params import FRONTEND_ROLES, count_params

RESERVE = 0.08  # of a GPU's memory, kept for the CUDA context, the allocator's slack and NCCL's buffers


@dataclass
class Rank:
    role: str  # "frontend" or "shard"
    index: int
    weight_bytes: int
    by_role: dict[str, int]
    capacity_bytes: int  # the device's memory (cpu: the host's, shared by every rank)
    kv_bytes: int = 0
    kv_tokens: int = 0  # context tokens the full-attention layers can hold (sliding layers bounded)
    kv_blocks: dict[str, int] = field(default_factory=dict)
    activation_bytes: int = 0
    experts_per_layer: int = 0  # shards: experts held per layer, replicas included

    @property
    def used_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.activation_bytes

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes


def activation_bytes(cfg: ModelConfig, engine: EngineConfig, itemsize: int) -> int:
    """The largest step's transient tensors on a front-end: a chunk's widest projections (q of a full layer,
    the dense MLP's gate and up) and its hidden states, plus fp32 logits of every sampling request."""
    shape = cfg.full if FULL in cfg.layer_types else cfg.sliding
    widest = max(2 * cfg.num_heads * shape.head_dim, 2 * cfg.intermediate_size, cfg.top_k * cfg.hidden_size)
    per_token = (4 * cfg.hidden_size + widest) * itemsize
    return engine.max_num_batched_tokens * per_token + engine.max_num_seqs * cfg.vocab_size * 4


def shard_experts(num_experts: int, shards: int, redundant: int) -> list[tuple[int, int]]:
    """(own experts, replicas) per layer of each shard: its contiguous range, and its share of the
    ``redundant`` extra copies of the busiest experts."""
    extra = expert_ranges(redundant, shards) if redundant else [(0, 0)] * shards
    return [(count, more) for (_, count), (_, more) in zip(expert_ranges(num_experts, shards), extra)]


def kv_plan(cfg: ModelConfig, budget: int, engine: EngineConfig, dtype: torch.dtype) -> tuple[dict, int]:
    """(blocks per attention kind, context tokens) for a KV budget, as the engine splits it."""
    if budget < block_bytes(cfg, FULL if FULL in cfg.layer_types else SLIDING, engine.block_size, dtype):
        return {}, 0
    blocks = plan_blocks(cfg, budget, engine.block_size, engine.max_num_seqs, engine.max_num_batched_tokens,
                         dtype)
    kind = FULL if FULL in blocks else SLIDING
    return blocks, blocks[kind] * engine.block_size


def plan_memory(cfg: ModelConfig, frontends: int, shards: int, redundant: int, capacity_bytes: int,
                dtype: torch.dtype, engine: EngineConfig, kv_budget: int | None = None) -> list[Rank]:
    """Every rank, front-ends first. ``kv_budget`` None: what each front-end has left (a GPU's memory)."""
    params = count_params(cfg)
    size = torch.empty(0, dtype=dtype).element_size()
    by_role = {role: n * size for role, n in params.by_role().items() if role in FRONTEND_ROLES}
    weights = sum(by_role.values())
    acts = activation_bytes(cfg, engine, size)
    ranks = []
    for i in range(frontends):
        budget = kv_budget if kv_budget is not None else int(capacity_bytes * (1 - RESERVE)) - weights - acts
        blocks, tokens = kv_plan(cfg, max(budget, 0), engine, dtype)
        kv = sum(n * block_bytes(cfg, kind, engine.block_size, dtype) for kind, n in blocks.items())
        ranks.append(Rank("frontend", i, weights, dict(by_role), capacity_bytes, kv, tokens, blocks, acts))
    per_expert = params.per_expert * cfg.num_layers * size  # one expert id, every layer
    for s, (own, more) in enumerate(shard_experts(cfg.num_experts, shards, redundant)):
        roles = {"experts": own * per_expert, "replicas": more * per_expert}
        ranks.append(Rank("shard", s, sum(roles.values()), roles, capacity_bytes, experts_per_layer=own + more))
    return ranks
