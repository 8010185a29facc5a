"""Expert parallelism over ``torch.distributed``: the front-end's dispatcher and the shard's side of it.

Ranks: 0 is the front-end, 1..N the expert shards; shard s owns experts [first_s, first_s + count_s) of every
MoE layer. Each step begins with a header from rank 0 (run a step, idle heartbeat, or stop); a
step then runs one exchange per MoE layer, and every rank joins every collective, with zero rows if it has
none:

  1. counts    all_to_all_single of row counts (rank 0 -> each shard: tokens that need it)
  2. dispatch  all_to_all_single of the rows: x [n, H] in the model dtype, plus [n, 2K] fp32 with the
               token's local expert ids on that shard (-1 for slots on other shards) and routing weights
  3. compute   the shard runs ``grouped_experts`` and sums its own top-k contributions per token in fp32
  4. combine   all_to_all_single of the fp32 partial sums back to rank 0, which adds the shards in fp32

A token goes once to each *distinct* shard it needs (not once per expert), so dispatch bytes are
H x (distinct shards hit) per token. The payload collectives are asynchronous: the front-end computes the
dense FFN while the rows travel and the shards compute, then waits (``submit`` / ``wait``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .model.moe import grouped_experts

OP_IDLE, OP_STEP, OP_STOP = 0, 1, 2


def expert_ranges(num_experts: int, num_shards: int) -> list[tuple[int, int]]:
    """(first, count) of each shard: contiguous, [s*E/N, (s+1)*E/N) with integer division."""
    bounds = [s * num_experts // num_shards for s in range(num_shards + 1)]
    return [(bounds[s], bounds[s + 1] - bounds[s]) for s in range(num_shards)]


def broadcast_header(op: int, device) -> int:
    """Rank 0's ``op`` to every rank (the others pass OP_IDLE = 0). An all-reduce rather than a broadcast,
    because a broadcast's root need not wait for its receivers: this way every header, the idle heartbeat
    too, waits for every rank, and a stalled shard is noticed within the collective deadline even while
    the front-end has no work."""
    header = torch.tensor([op if dist.get_rank() == 0 else OP_IDLE], dtype=torch.int64, device=device)
    dist.all_reduce(header)
    return int(header.item())


@dataclass
class DispatchStats:
    """Counters of the front-end's dispatcher (read by metrics and benchmarks)."""

    layers: int = 0
    rows: int = 0  # (token, shard) pairs sent
    token_slots: int = 0  # (token, expert) pairs routed
    bytes_dispatched: int = 0
    dispatch_seconds: float = 0.0  # counts exchange + posting the payload
    wait_seconds: float = 0.0  # waiting for the payload and the combine after the dense FFN
    tokens_per_shard: list[int] = field(default_factory=list)
    tokens_per_expert: list[int] = field(default_factory=list)
    tokens_per_layer_shard: list[list[int]] = field(default_factory=list)  # [layer][shard] rows (balancedness)


@dataclass
class _Pending:
    tokens: torch.Tensor  # [R] token of each row sent, grouped by shard
    rows_per_rank: list[int]
    works: list
    T: int
    H: int


class ExpertDispatcher:
    """The front-end's expert executor (see ``ExpertExecutor`` in ``model/gemma4.py``)."""

    def __init__(self, num_experts: int, num_shards: int, hidden: int, dtype, device, overlap: bool = True):
        self.overlap = overlap  # False: wait for the experts before the dense FFN (to measure the overlap)
        self.ranges = expert_ranges(num_experts, num_shards)
        self.num_shards, self.hidden, self.dtype, self.device = num_shards, hidden, dtype, device
        shard_of = torch.empty(num_experts, dtype=torch.long)
        for s, (first, count) in enumerate(self.ranges):
            shard_of[first : first + count] = s
        self.shard_of = shard_of.to(device)
        self.first_of_shard = torch.tensor([f for f, _ in self.ranges], device=device)
        self.stats = DispatchStats(tokens_per_shard=[0] * num_shards, tokens_per_expert=[0] * num_experts)
        self.on_dispatch = self.on_combine = None  # metrics hooks: called with each layer's seconds

    def begin_step(self) -> None:
        broadcast_header(OP_STEP, self.device)

    def submit(self, layer, x_TH, ids_TK, weights_TK) -> _Pending:
        t0 = time.perf_counter()
        T, K = ids_TK.shape
        shard_TK = self.shard_of[ids_TK]
        hits_TN = torch.zeros(T, self.num_shards, dtype=torch.bool, device=x_TH.device)
        hits_TN.scatter_(1, shard_TK, True)
        pairs = hits_TN.T.nonzero()  # (shard, token), grouped by shard
        dest, tokens = pairs[:, 0], pairs[:, 1]
        per_shard = hits_TN.sum(0).tolist()
        own = shard_TK[tokens] == dest[:, None]  # [R, K]: the slots this row's shard computes
        local_ids = torch.where(own, ids_TK[tokens] - self.first_of_shard[dest][:, None], -1)
        meta = torch.cat([local_ids.float(), torch.where(own, weights_TK[tokens], 0.0).float()], dim=1)
        rows = [0] + per_shard
        send_counts = torch.tensor(rows, dtype=torch.int64, device=self.device)
        dist.all_to_all_single(torch.empty_like(send_counts), send_counts)
        zeros = [0] * len(rows)
        works = [
            dist.all_to_all_single(torch.empty(0, self.hidden, dtype=x_TH.dtype, device=self.device),
                                   x_TH[tokens].contiguous(), zeros, rows, async_op=True),
            dist.all_to_all_single(torch.empty(0, 2 * K, dtype=torch.float32, device=self.device),
                                   meta.contiguous(), zeros, rows, async_op=True),
        ]
        s = self.stats
        s.layers += 1
        s.rows += len(tokens)
        s.token_slots += T * K
        s.bytes_dispatched += len(tokens) * (self.hidden * x_TH.element_size() + 2 * K * 4)
        while len(s.tokens_per_layer_shard) <= layer:
            s.tokens_per_layer_shard.append([0] * self.num_shards)
        for i, n in enumerate(per_shard):
            s.tokens_per_shard[i] += n
            s.tokens_per_layer_shard[layer][i] += n
        for e, n in enumerate(torch.bincount(ids_TK.reshape(-1), minlength=len(s.tokens_per_expert)).tolist()):
            s.tokens_per_expert[e] += n
        elapsed = time.perf_counter() - t0
        s.dispatch_seconds += elapsed
        if self.on_dispatch is not None:
            self.on_dispatch(elapsed)
        pending = _Pending(tokens, rows, works, T, self.hidden)
        return pending if self.overlap else self._finish(pending)

    def wait(self, p) -> torch.Tensor:
        return self._finish(p) if self.overlap else p

    def _finish(self, p: _Pending) -> torch.Tensor:
        t0 = time.perf_counter()
        for w in p.works:
            w.wait()
        partials = torch.empty(sum(p.rows_per_rank), p.H, dtype=torch.float32, device=self.device)
        dist.all_to_all_single(partials, torch.empty(0, p.H, dtype=torch.float32, device=self.device),
                               p.rows_per_rank, [0] * len(p.rows_per_rank))
        out_TH = torch.zeros(p.T, p.H, dtype=torch.float32, device=self.device)
        out_TH.index_add_(0, p.tokens, partials)  # rows are grouped by shard: shards added in rank order
        elapsed = time.perf_counter() - t0
        self.stats.wait_seconds += elapsed
        if self.on_combine is not None:
            self.on_combine(elapsed)
        return out_TH


def serve_layer(experts, hidden: int, top_k: int, dtype, device, world: int, on_compute=None) -> int:
    """The shard's side of one MoE layer's exchange; returns the rows it computed. ``on_compute`` (metrics)
    is called with the seconds the grouped expert compute took."""
    counts = torch.empty(world, dtype=torch.int64, device=device)
    dist.all_to_all_single(counts, torch.zeros(world, dtype=torch.int64, device=device))
    recv = counts.tolist()
    zeros = [0] * world
    x = torch.empty(sum(recv), hidden, dtype=dtype, device=device)
    meta = torch.empty(sum(recv), 2 * top_k, dtype=torch.float32, device=device)
    dist.all_to_all_single(x, torch.empty(0, hidden, dtype=dtype, device=device), recv, zeros)
    dist.all_to_all_single(meta, torch.empty(0, 2 * top_k, dtype=torch.float32, device=device), recv, zeros)
    ids, weights = meta[:, :top_k].long(), meta[:, top_k:]
    t0 = time.perf_counter()
    out = grouped_experts(x, ids, weights, experts)
    if on_compute is not None:
        on_compute(time.perf_counter() - t0)
    dist.all_to_all_single(torch.empty(0, hidden, dtype=torch.float32, device=device), out, zeros, recv)
    return len(x)
