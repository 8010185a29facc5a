"""Where every routed expert lives: for each MoE layer, expert e -> (shard, slot), slot being its place among
that shard's experts of the layer. The front-ends route by it (``route``); each shard loads the experts of
its slots (``experts_of``).

``contiguous`` is the default layout: shard s holds experts [s*E/N, (s+1)*E/N) of every layer, in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def expert_ranges(num_experts: int, num_shards: int) -> list[tuple[int, int]]:
    """(first, count) of each shard: contiguous, [s*E/N, (s+1)*E/N) with integer division."""
    bounds = [s * num_experts // num_shards for s in range(num_shards + 1)]
    return [(bounds[s], bounds[s + 1] - bounds[s]) for s in range(num_shards)]


@dataclass
class Placement:
    num_layers: int
    num_experts: int
    num_shards: int
    shard_of: torch.Tensor  # [L, E] the shard of each layer's expert
    slot_of: torch.Tensor  # [L, E] its slot there

    @classmethod
    def contiguous(cls, num_layers: int, num_experts: int, num_shards: int) -> "Placement":
        shard_of = torch.empty(num_experts, dtype=torch.long)
        slot_of = torch.empty(num_experts, dtype=torch.long)
        for s, (first, count) in enumerate(expert_ranges(num_experts, num_shards)):
            shard_of[first : first + count] = s
            slot_of[first : first + count] = torch.arange(count)
        return cls(num_layers, num_experts, num_shards, shard_of.repeat(num_layers, 1), slot_of.repeat(num_layers, 1))

    def to(self, device) -> "Placement":
        return Placement(self.num_layers, self.num_experts, self.num_shards, self.shard_of.to(device),
                         self.slot_of.to(device))

    def route(self, layer: int, ids_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(shard, slot) [T, K] of each chosen expert."""
        return self.shard_of[layer][ids_TK], self.slot_of[layer][ids_TK]

    def experts_of(self, shard: int, layer: int) -> list[int]:
        """The global expert id in each of the shard's slots of the layer, slot by slot."""
        mine = (self.shard_of[layer] == shard).nonzero().squeeze(1)
        return mine[torch.argsort(self.slot_of[layer][mine])].tolist()
