"""One engine step, phase by phase, for a layout of M front-ends and N expert shards.

A step is what each front-end computes: some decode rows and prefill chunks (``Row``s). Per MoE layer a
front-end runs attention (its projections and the attention over the cached keys), the router and the
elementwise work, dispatches its tokens to the shards, runs the dense FFN, and combines the shards' outputs;
after the last layer, the head and the sampler. Where the dense FFN runs is the cluster's choice
(``ClusterConfig.overlap_dense_ffn``): on GPUs while the rows travel and the experts compute (the layer
costs the longer of the two), on CPUs after the combine (the ranks share the cores).

Costs come from a ``Device`` (gpu.py: a roofline of the hardware table with fitted host costs; calibrate.py:
this machine, measured). The slowest shard sets the experts' time: with uniform routing its slots are the
mean plus ``sqrt(2 ln N)`` standard deviations (the expected maximum of N near-normal loads), and replicas of
the busiest experts (``--redundant-experts R``) shrink that excess by E / (E + R).

On a CPU every rank shares ``device.cores``: the shards' phase lasts at least their summed work over the
cores, and M front-ends (a what-if: the cluster runs one today) share them the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch

from epserve.actors.dispatch import row_bytes
from epserve.actors.model.config import FULL, ModelConfig

from .memory import shard_experts


class Device(Protocol):
    kind: str  # "gpu" or "cpu"
    cores: float  # cpu: the parallel capacity every rank shares; gpu: unused (each rank its own device)
    contention: float  # cpu: how much slower the experts run when shards compute at once (memory bandwidth)
    itemsize: int

    def gemm(self, rows: int, n: int, k: int) -> float: ...  # x [rows, k] @ w[n, k].T, a front-end's
    def experts(self, slots: float, active: float, held: int) -> float: ...  # one shard, one layer
    def attention(self, rows: int, keys: float, layer_kind: str) -> float: ...  # one layer, keys summed over rows
    def elementwise(self, tokens: int) -> float: ...  # one layer's norms, RoPE, routing, residuals
    def step_overhead(self, seqs: int, sampled: int) -> float: ...  # engine, scheduler, sampler (host)
    def exchange(self, nbytes: float, messages: int, cross_node: float) -> float: ...  # one rank's collective


@dataclass(frozen=True)
class Layout:
    frontends: int = 1
    shards: int = 2
    redundant: int = 0  # extra expert replicas per layer, over every shard
    nodes: int = 1
    gpus_per_node: int = 8
    link: str = "ib400"  # between nodes

    @property
    def ranks(self) -> int:
        return self.frontends + self.shards

    @property
    def cross_node(self) -> float:
        """Share of a rank's peers on other nodes (ranks spread evenly)."""
        if self.nodes <= 1:
            return 0.0
        per_node = math.ceil(self.ranks / self.nodes)
        return max(self.ranks - per_node, 0) / max(self.ranks - 1, 1)


@dataclass(frozen=True)
class Row:
    """One request's share of a step: ``n`` tokens from position ``start``; ``samples``: it ends its known
    tokens (a decode row, a prompt's last chunk) and draws a token."""

    start: int
    n: int
    samples: bool = True


PHASES = ("attention", "router and elementwise", "dense FFN", "experts (slowest shard)", "all-to-all",
          "head and sampler", "host overhead")


@dataclass
class StepTime:
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)  # critical-path seconds of each phase

    @property
    def bottleneck(self) -> str:
        return max(self.phases, key=self.phases.get)


def visible_keys(row: Row, window: int | None) -> float:
    """Keys the row's queries see, summed: query at position p sees p + 1 keys (at most the window)."""
    lo, hi = row.start + 1, row.start + row.n  # keys seen by its first and last query
    if window is None or hi <= window:
        return (lo + hi) * row.n / 2
    if lo >= window:
        return window * row.n
    below = window - lo  # queries still under the window
    return (lo + window - 1) * below / 2 + window * (row.n - below)


class StepModel:
    def __init__(self, cfg: ModelConfig, layout: Layout, device: Device, overlap: bool | None = None):
        self.cfg, self.layout, self.device = cfg, layout, device
        self.overlap = device.kind == "gpu" if overlap is None else overlap
        # no shards: every expert in the front-end's process, no exchange (the in-process engine)
        self.local = layout.shards == 0
        held = shard_experts(cfg.num_experts, max(layout.shards, 1), layout.redundant)
        self.own = [own for own, _ in held]
        self.kinds = [(cfg.attention(cfg.layer_types.index(k)), cfg.layer_types.count(k))
                      for k in dict.fromkeys(cfg.layer_types)]  # each attention shape, with its layer count
        self.held = [own + more for own, more in held]

    # ---- the shards' load ---------------------------------------------------------------------------------
    def shard_load(self, tokens: float) -> tuple[float, float, float]:
        """(slots, distinct experts, dispatched rows) of the slowest shard for ``tokens`` tokens over every
        front-end."""
        N, E, K = max(self.layout.shards, 1), self.cfg.num_experts, self.cfg.top_k
        own = max(self.own)
        slots = tokens * K
        p = own / E
        mean = slots * p
        excess = math.sqrt(2 * math.log(N) * slots * p * (1 - p)) if N > 1 else 0.0
        excess *= E / (E + self.layout.redundant)
        worst = min(mean + excess, tokens * min(K, own))
        active = own * (1 - (1 - 1 / E) ** slots) + (max(self.held) - own) * (1 - (1 - 1 / E) ** slots)
        miss = math.comb(E - own, K) / math.comb(E, K) if E - own >= K else 0.0
        return worst, min(active, max(self.held)), tokens * (1 - miss) * (worst / mean if mean else 1.0)

    # ---- one step ------------------------------------------------------------------------------------------
    def step(self, rows: list[Row]) -> StepTime:
        cfg, d, lay = self.cfg, self.device, self.layout
        H, M, N = cfg.hidden_size, lay.frontends, max(lay.shards, 1)
        T = sum(r.n for r in rows)
        sampled = sum(r.samples for r in rows)
        ph = dict.fromkeys(PHASES, 0.0)
        if T == 0:
            return StepTime(0.0, ph)
        # every front-end's share of the cores (a CPU): M of them compute at once
        fe_share = max(1.0, M / d.cores) if d.kind == "cpu" else 1.0
        slots, active, shard_rows = self.shard_load(M * T)
        expert_s = d.experts(slots, active, max(self.held))
        if d.kind == "cpu" and not self.local and N > 1:
            # every shard computes at once on the shared cores, and they share the memory bandwidth
            mean_slots = M * T * cfg.top_k / N
            mean_active = min(cfg.num_experts / N, active)
            expert_s = d.contention * max(expert_s, N * d.experts(mean_slots, mean_active, max(self.held)) / d.cores)
        dispatch_bytes = shard_rows / M * row_bytes(H, cfg.top_k, _dtype(d.itemsize))
        combine_bytes = slots / M * H * d.itemsize
        # a front-end sends to (receives from) N shards; a shard from M front-ends: the busier side counts
        exchange = 0.0 if self.local else (
            d.exchange(max(N * dispatch_bytes, M * dispatch_bytes), max(N, M), lay.cross_node)
            + d.exchange(max(N * combine_bytes, M * combine_bytes), max(N, M), lay.cross_node))
        router = d.gemm(T, cfg.num_experts, H)
        dense = (2 * d.gemm(T, cfg.intermediate_size, H) + d.gemm(T, H, cfg.intermediate_size))
        if cfg.shared_expert_intermediate_size:
            dense += 3 * d.gemm(T, cfg.shared_expert_intermediate_size, H)
        for shape, count in self.kinds:
            q, kv = cfg.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
            keys = sum(visible_keys(r, shape.window) for r in rows)
            attn = (d.gemm(T, q, H) + d.gemm(T, kv, H) * (1 if shape.k_eq_v else 2) + d.gemm(T, H, q)
                    + d.attention(T, keys, FULL if shape.window is None else shape.kind))
            ph["attention"] += count * attn * fe_share
            ph["router and elementwise"] += count * (router + d.elementwise(T)) * fe_share
            # with the overlap the dense FFN runs while the rows travel and the experts compute: only what
            # it takes beyond them is on the critical path
            ph["dense FFN"] += count * (max(dense * fe_share - exchange - expert_s, 0.0)
                                        if self.overlap and not self.local else dense * fe_share)
            ph["all-to-all"] += count * exchange
            ph["experts (slowest shard)"] += count * expert_s
        ph["head and sampler"] = d.gemm(sampled, cfg.vocab_size, H) * fe_share
        header = 0.0 if self.local else d.exchange(8 * (1 + M), lay.ranks - 1, lay.cross_node)
        ph["host overhead"] = d.step_overhead(len(rows), sampled) + header
        return StepTime(sum(ph.values()), ph)


def _dtype(itemsize: int) -> torch.dtype:
    return torch.bfloat16 if itemsize == 2 else torch.float32
