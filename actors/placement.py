"""Where every routed expert lives, as data: for each MoE layer, each shard's slots, each slot holding one
expert. An expert may sit in several slots on different shards (replicas); every expert has at least one.
The front-ends route by it (``route``); each shard loads the experts of its slots (``experts_of``).

* ``contiguous``: shard s holds experts [s*E/N, (s+1)*E/N) of every layer, in order (the default), plus, with
  ``redundant`` R > 0, R extra slots per layer: replicas of experts spread over the layer (before any load is
  seen, a hot expert is not known), each on the shard with the fewest slots among those without that expert
  (slot counts within one of each other).
* ``balanced``: from a measured load per (layer, expert) (EPLB's recipe): with R >= E every expert first gets a
  copy per full pass (a replica of each, whatever the load), then the other extra slots go, one at a time, to
  the expert with the most load per copy, then the copies, heaviest first, each to the least-loaded shard that
  has a free slot and not that expert. Every shard keeps the slot count ``contiguous`` gives it (equal memory).
* ``from_json``: a pinned layout (``--expert-placement FILE``): ``{"layers": [[[experts of shard 0], [experts
  of shard 1], ...], ...]}`` with one entry per layer, or ``{"shards": [[...], ...]}`` for every layer alike.

A replicated expert's tokens are split over its replicas in turn, in token order (deterministic, balanced to
one token). Where a token's rows go changes nothing in the result: shards return every slot's output and the
front-end sums them in top-k order (actors/dispatch.py), with batch-invariant expert kernels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch


def expert_ranges(num_experts: int, num_shards: int) -> list[tuple[int, int]]:
    """(first, count) of each shard: contiguous, [s*E/N, (s+1)*E/N) with integer division."""
    bounds = [s * num_experts // num_shards for s in range(num_shards + 1)]
    return [(bounds[s], bounds[s + 1] - bounds[s]) for s in range(num_shards)]


class PlacementError(ValueError):
    """A placement that does not fit the model or the cluster (named in one line)."""


@dataclass
class Placement:
    num_experts: int
    slots: list[list[list[int]]]  # [layer][shard] -> the expert in each slot, slot by slot

    def __post_init__(self):
        self._check()
        L, E = self.num_layers, self.num_experts
        replicas = [[[] for _ in range(E)] for _ in range(L)]
        for layer, shards in enumerate(self.slots):
            for shard, experts in enumerate(shards):
                for slot, e in enumerate(experts):
                    replicas[layer][e].append((shard, slot))
        R = max(len(r) for layer in replicas for r in layer)
        self.max_replicas = R
        self.num_replicas = torch.tensor([[len(r) for r in layer] for layer in replicas])  # [L, E]
        pad = [[(r * R)[:R] for r in layer] for layer in replicas]  # cycled to R entries
        table = torch.tensor(pad, dtype=torch.long)  # [L, E, R, 2]
        self.replica_shard, self.replica_slot = table[..., 0].contiguous(), table[..., 1].contiguous()

    @property
    def num_layers(self) -> int:
        return len(self.slots)

    @property
    def num_shards(self) -> int:
        return len(self.slots[0])

    # ---- layouts
    @classmethod
    def contiguous(cls, num_layers: int, num_experts: int, num_shards: int, redundant: int = 0) -> "Placement":
        base = [list(range(first, first + count)) for first, count in expert_ranges(num_experts, num_shards)]
        _check_redundancy(num_experts, num_shards, redundant)
        passes, rest = divmod(redundant, num_experts)  # every expert once per full pass, then spread evenly
        spread = list(range(num_experts)) * passes + [r * num_experts // rest for r in range(rest)]
        home = {e: s for s, experts in enumerate(base) for e in experts}
        # one expert of each shard's range in turn, so that every shard keeps room for others' replicas
        turn = [sum(home[f] == home[e] for f in spread[:r]) for r, e in enumerate(spread)]
        spread = [e for _, _, e in sorted(zip(turn, [home[e] for e in spread], spread))]
        layer = _place(base, spread, [1.0] * num_experts, _capacity(num_experts, num_shards, redundant))
        return cls(num_experts, [[list(s) for s in layer] for _ in range(num_layers)])

    @classmethod
    def balanced(cls, load, num_shards: int, redundant: int = 0, current: "Placement | None" = None) -> "Placement":
        """The placement for ``load`` [layer][expert] (tokens routed to each expert in a window). With
        ``current`` (the placement served now), as close to it as the same balance allows: shards with the same
        slot count are interchangeable, so each layer's packed shards are matched to the current shards they
        share the most experts with, and an expert that stays keeps its place in the slot order."""
        load = [[float(x) for x in layer] for layer in load]
        E = len(load[0])
        _check_redundancy(E, num_shards, redundant)
        capacity = _capacity(E, num_shards, redundant)
        layers = [_pack(layer, capacity, redundant) for layer in load]
        if current is not None and current.num_shards == num_shards:
            layers = [_closest(packed, held, capacity) for packed, held in zip(layers, current.slots)]
        return cls(E, layers)

    @classmethod
    def from_json(cls, data: dict, num_layers: int, num_experts: int, num_shards: int) -> "Placement":
        if not isinstance(data, dict) or not ({"layers", "shards"} & set(data)):
            raise PlacementError('a placement is {"layers": [[[experts of shard 0], ...], ...]} or '
                                 '{"shards": [[experts of shard 0], ...]}')
        layers = data["layers"] if "layers" in data else [data["shards"]] * num_layers
        if len(layers) != num_layers:
            raise PlacementError(f"the placement has {len(layers)} layers; the model has {num_layers}")
        if any(len(shards) != num_shards for shards in layers):
            raise PlacementError(f"the placement names {len(layers[0])} shards per layer; the cluster has "
                                 f"{num_shards}")
        return cls(num_experts, [[list(experts) for experts in shards] for shards in layers])

    @staticmethod
    def read_json(path: str) -> dict:
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise PlacementError(f"cannot read the placement {path}: {e}") from None

    def to_json(self) -> dict:
        return {"layers": self.slots}

    def _check(self) -> None:
        E = self.num_experts
        for layer, shards in enumerate(self.slots):
            held = [e for experts in shards for e in experts]
            bad = [e for e in held if not (isinstance(e, int) and 0 <= e < E)]
            if bad:
                raise PlacementError(f"layer {layer}: expert {bad[0]!r} is not an expert id in [0, {E})")
            missing = sorted(set(range(E)) - set(held))
            if missing:
                raise PlacementError(f"layer {layer}: expert {missing[0]} (and {len(missing) - 1} more) has no "
                                     "slot on any shard")
            for shard, experts in enumerate(shards):
                if len(set(experts)) != len(experts):
                    raise PlacementError(f"layer {layer}: shard {shard} holds an expert twice")

    # ---- use
    def experts_of(self, shard: int) -> list[list[int]]:
        """The expert in each of the shard's slots, per layer."""
        return [shards[shard] for shards in self.slots]

    def route(self, layer: int, ids_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(shard, slot) [T, K] of each chosen expert: a replicated expert's tokens take its replicas in turn."""
        device = ids_TK.device
        if self.replica_shard.device != device:
            self.replica_shard, self.replica_slot = self.replica_shard.to(device), self.replica_slot.to(device)
            self.num_replicas = self.num_replicas.to(device)
        if self.max_replicas == 1:
            return self.replica_shard[layer, :, 0][ids_TK], self.replica_slot[layer, :, 0][ids_TK]
        flat = ids_TK.reshape(-1)
        order = torch.argsort(flat, stable=True)
        by_expert = flat[order]
        turn = torch.empty_like(flat)
        turn[order] = torch.arange(flat.numel(), device=device) - torch.searchsorted(by_expert, by_expert)
        replica = (turn % self.num_replicas[layer][flat]).view_as(ids_TK)
        return self.replica_shard[layer][ids_TK, replica], self.replica_slot[layer][ids_TK, replica]

    def restricted(self, shards: list[int]) -> "Placement":
        """The placement over some of the shards, in that order (a group without a lost shard); a
        PlacementError where an expert would have no slot left."""
        return Placement(self.num_experts, [[layer[s] for s in shards] for layer in self.slots])

    def balancedness(self, load) -> float:
        """What ``load`` [layer][expert] would make of the shards: max / mean of each shard's share (a
        replicated expert's load split evenly over its copies), mean over the layers with any load."""
        ratios = []
        for layer, shards in enumerate(self.slots):
            copies = self.num_replicas[layer].tolist()
            per_shard = [sum(load[layer][e] / copies[e] for e in experts) for experts in shards]
            if sum(per_shard):
                ratios.append(max(per_shard) * len(per_shard) / sum(per_shard))
        return sum(ratios) / len(ratios) if ratios else 1.0

    def slots_per_shard(self) -> list[int]:
        """The most slots a shard has in any layer (what it holds, in experts per layer)."""
        return [max(len(shards[s]) for shards in self.slots) for s in range(self.num_shards)]


def _check_redundancy(num_experts: int, num_shards: int, redundant: int) -> None:
    if redundant and num_shards < 2:
        raise PlacementError("redundant experts need at least 2 shards (a replica lives on another shard)")
    if redundant > num_experts * (num_shards - 1):
        raise PlacementError(f"{redundant} redundant experts per layer: at most {num_experts * (num_shards - 1)}"
                             f" fit on {num_shards} shards ({num_experts} experts, one copy per shard)")


def _capacity(num_experts: int, num_shards: int, redundant: int) -> list[int]:
    """Slots per shard: E + R spread as evenly as the shards allow (within one)."""
    slots = num_experts + redundant
    return [slots * (s + 1) // num_shards - slots * s // num_shards for s in range(num_shards)]


def _pack(load: list[float], capacity: list[int], redundant: int) -> list[list[int]]:
    """One layer of ``balanced``: the experts in each shard's slots."""
    E, N = len(load), len(capacity)
    passes, rest = divmod(redundant, E)  # as ``contiguous``: every expert once per full pass (R >= E keeps a
    copies = [1 + passes] * E  # replica of every expert, so that a lost shard stays covered), then by load
    for _ in range(rest):  # the expert with the most load per copy gets one more (ties: lower id)
        e = max((e for e in range(E) if copies[e] < N), key=lambda e: (load[e] / copies[e], -e))
        copies[e] += 1
    share = [load[e] / copies[e] for e in range(E)]
    items = sorted((e for e in range(E) for _ in range(copies[e])), key=lambda e: (-share[e], e))
    return _place([[] for _ in range(N)], items, share, capacity)


def _closest(packed: list[list[int]], held: list[list[int]], capacity: list[int]) -> list[list[int]]:
    """``packed``'s shards relabelled (among shards of equal slot count) to keep the most experts where they
    are in ``held``, greedily by overlap; each shard's experts in ``held``'s slot order, new ones after."""
    pairs = sorted(((len(set(p) & set(h)), i, j) for i, p in enumerate(packed) for j, h in enumerate(held)
                    if capacity[i] == capacity[j]), key=lambda t: (-t[0], t[1], t[2]))
    where: dict[int, int] = {}
    for _, i, j in pairs:
        if i not in where and j not in where.values():
            where[i] = j
    out: list[list[int]] = [[] for _ in held]
    for i, j in where.items():
        keep = set(packed[i])
        out[j] = [e for e in held[j] if e in keep] + [e for e in packed[i] if e not in held[j]]
    return out


def _place(shards: list[list[int]], items: list[int], share: list[float], capacity: list[int]) -> list[list[int]]:
    """Put each expert of ``items`` in turn on the lightest shard (by ``share`` per copy) with a free slot and
    without that expert. Where the greedy order paints itself into a corner (only shards that hold the expert
    have room: a nearly full layout), the copies are laid out by ``_realize`` instead, ignoring the shares."""
    N = len(shards)
    copies = [sum(e in shard for shard in shards) + items.count(e) for e in range(len(share))]
    weight = [sum(share[e] for e in shard) for shard in shards]
    for e in items:
        free = [s for s in range(N) if len(shards[s]) < capacity[s] and e not in shards[s]]
        if not free:
            return _realize(copies, capacity)
        s = min(free, key=lambda s: (weight[s], s))
        shards[s].append(e)
        weight[s] += share[e]
    return shards


def _realize(copies: list[int], capacity: list[int]) -> list[list[int]]:
    """Experts with the most copies first, each on the shards with the most free slots: this finds a layout
    with every copy on its own shard whenever one exists (the Gale-Ryser construction)."""
    shards: list[list[int]] = [[] for _ in capacity]
    for e in sorted(range(len(copies)), key=lambda e: (-copies[e], e)):
        roomiest = sorted(range(len(capacity)), key=lambda s: (len(shards[s]) - capacity[s], s))[:copies[e]]
        for s in roomiest:
            shards[s].append(e)
    return shards


def build(num_layers: int, num_experts: int, num_shards: int, redundant: int = 0,
          pinned: dict | None = None) -> Placement:
    """The cluster's placement from its settings (every rank builds the same one from the same settings)."""
    if pinned is not None:
        if redundant:
            raise PlacementError("a pinned placement names its replicas itself: redundant experts must be 0")
        return Placement.from_json(pinned, num_layers, num_experts, num_shards)
    return Placement.contiguous(num_layers, num_experts, num_shards, redundant)
