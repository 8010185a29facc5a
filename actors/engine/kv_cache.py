"""KV-cache tensors and the paged attention context of one step.

Each layer owns K and V tensors ``[G, num_blocks * block_size, D]`` of its attention kind (head-major); a
block table maps a request's logical block j (positions j*bs .. j*bs+bs-1) to a physical block. A step
writes its new keys and values at their slots, then attends per group of requests: one group for
single-token (decode) rows and one for multi-token (prefill chunk) rows, so a decode batch is never padded
to a prefill's length.

* Decode rows on CPU (an fp32 or bf16 cache): the native kernel reads each request's keys and values where
  they lie in the blocks (``cpu_kernels.paged_decode_attention``): a gathered copy cost more than the
  attention itself.
* Otherwise (prefill chunks, GPUs): gather the *blocks* each request can see (whole ``[bs, D]`` runs per
  head) and run the batched ``masked_attention``; the positions of a gathered block that a query may not see
  (older than its window, not written yet) are masked by position, like padding.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from ..model import cpu_kernels
from ..model.attention import masked_attention
from ..model.config import FULL, SLIDING, ModelConfig

INVISIBLE = 1 << 40  # position given to padding keys: no query can see it


def block_bytes(cfg: ModelConfig, kind: str, block_size: int, dtype: torch.dtype) -> int:
    shape = cfg.full if kind == FULL else cfg.sliding
    layers = sum(t == kind for t in cfg.layer_types)
    return layers * 2 * block_size * shape.num_kv_heads * shape.head_dim * torch.empty(0, dtype=dtype).element_size()


def plan_blocks(cfg: ModelConfig, budget: int, block_size: int, max_seqs: int, max_chunk: int, dtype) -> dict:
    """Split a byte budget: the sliding pool gets what a full batch of windows needs (at most half of the
    budget), the full-attention pool gets the rest."""
    kinds = sorted(set(cfg.layer_types))
    if kinds == [FULL]:
        return {FULL: budget // block_bytes(cfg, FULL, block_size, dtype)}
    per_window = -(-(cfg.sliding.window - 1) // block_size) + 2
    want = max_seqs * per_window + -(-max_chunk // block_size)
    sliding_bytes = block_bytes(cfg, SLIDING, block_size, dtype)
    sliding = min(want, budget // 2 // sliding_bytes) if FULL in kinds else budget // sliding_bytes
    plan = {SLIDING: max(sliding, 1)}
    if FULL in kinds:
        plan[FULL] = max((budget - plan[SLIDING] * sliding_bytes) // block_bytes(cfg, FULL, block_size, dtype), 1)
    return plan


class KVCache:
    def __init__(self, cfg: ModelConfig, num_blocks: dict[str, int], block_size: int, dtype, device):
        self.block_size = block_size
        self.k, self.v = [], []
        for kind in cfg.layer_types:
            shape = cfg.full if kind == FULL else cfg.sliding
            size = (shape.num_kv_heads, num_blocks[kind] * block_size, shape.head_dim)
            self.k.append(torch.zeros(size, dtype=dtype, device=device))
            self.v.append(torch.zeros(size, dtype=dtype, device=device))


@dataclass
class Group:
    """Requests attended together: their query rows and the cache blocks of the keys they may see."""

    q_index: torch.Tensor  # [B, Q] rows of the step's flat tokens (padding: 0)
    q_pos: torch.Tensor  # [B, Q] positions (padding: -1)
    q_valid: torch.Tensor  # [B, Q] bool
    kv_blocks: torch.Tensor  # [B, NB] physical blocks (padding: 0)
    kv_lo: torch.Tensor  # [B] first visible position (kv_blocks[:, 0] holds it)
    kv_count: torch.Tensor  # [B] blocks of each request in kv_blocks
    block_size: int

    @functools.cached_property
    def kv_pos(self) -> torch.Tensor:
        """[B, NB * bs] positions of the gathered slots (padding: INVISIBLE), for the gathered path only (the
        native decode kernel reads the blocks in place); made on first use, once a step."""
        bs = self.block_size
        b_off = torch.arange(self.kv_blocks.shape[1], device=self.kv_blocks.device)
        logical = (self.kv_lo // bs)[:, None] + b_off
        pos = (logical[:, :, None] * bs + torch.arange(bs, device=logical.device)).flatten(1)
        valid = (b_off[None] < self.kv_count[:, None]).repeat_interleave(bs, 1)
        return torch.where(valid, pos, INVISIBLE)


@dataclass
class KindPlan:
    write_slots: torch.Tensor  # [T] where each new token's k/v goes
    groups: list[Group]


class PagedAttention:
    """The attention context of one step (see ``actors/model/attention.py``)."""

    def __init__(self, cache: KVCache, plans: dict[str, KindPlan]):
        self.cache, self.plans = cache, plans

    def attend(self, layer, shape, q, k, v):
        plan = self.plans[shape.kind]
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        kc.index_copy_(1, plan.write_slots, k.transpose(0, 1))
        vc.index_copy_(1, plan.write_slots, v.transpose(0, 1))
        bs = self.cache.block_size
        out = torch.empty_like(q)
        for g in plan.groups:
            if g.q_index.shape[1] == 1 and _in_place(kc, shape.head_dim):  # decode rows: no gathered copy
                if len(g.q_index) == len(q):  # every row decodes, in order: no gather and scatter of q and out
                    return cpu_kernels.paged_decode_attention(q, kc, vc, g.kv_blocks, g.q_pos[:, 0], g.kv_lo, bs)
                out[g.q_index[:, 0]] = cpu_kernels.paged_decode_attention(
                    q[g.q_index[:, 0]], kc, vc, g.kv_blocks, g.q_pos[:, 0], g.kv_lo, bs)
                continue
            k_seen, v_seen = (_gather_blocks(c, g.kv_blocks, bs) for c in (kc, vc))
            o = masked_attention(q[g.q_index], k_seen, v_seen, g.q_pos, g.kv_pos, shape.window)
            out[g.q_index[g.q_valid]] = o[g.q_valid]
        return out


def _gather_blocks(cache: torch.Tensor, blocks: torch.Tensor, bs: int) -> torch.Tensor:
    """[G, B, NB * bs, D]: the physical blocks [B, NB] of a layer's cache [G, slots, D], per head a dim-0
    gather of whole [bs, D] runs (5x faster than one 4-D index)."""
    G, _, D = cache.shape
    B, NB = blocks.shape
    out = cache.new_empty(G, B * NB, bs * D)
    for h in range(G):
        torch.index_select(cache[h].view(-1, bs * D), 0, blocks.flatten(), out=out[h])
    return out.view(G, B, NB * bs, D)


def _in_place(cache: torch.Tensor, head_dim: int) -> bool:
    """Whether the native decode kernel serves this cache (fp32 or bf16 on CPU; else the gathered torch
    path)."""
    return cache.dtype in (torch.float32, torch.bfloat16) and cache.device.type == "cpu" and head_dim % 8 == 0 \
        and cpu_kernels.available()


class TableArray:
    """One block table's int64 copy (``array``, at least ``size`` long) and the list it copies (``source``)."""

    __slots__ = ("source", "array", "size")

    def __init__(self, source: list[int]):
        self.source, self.array, self.size = source, np.zeros(2 * len(source) + 16, dtype=np.int64), 0


def table_arrays(seq) -> dict[str, TableArray]:
    """A request's block tables as int64 arrays, kept on the request (``Sequence.block_arrays``) and extended
    each step by the blocks appended since the last: building them from the lists every step cost O(context)
    a request (32 ms a step for 64 requests at 32k tokens). A table only grows at its end; a block dropped
    from a sliding window keeps its old number here, never read (the plan reads from the window's first
    block on); a new list (an admission) is copied whole."""
    arrays = seq.block_arrays
    for kind, table in seq.block_tables.items():
        held, n = arrays.get(kind), len(table)
        if held is not None and held.source is table and held.size == n:
            continue  # most steps: no new block
        if held is None or held.source is not table or n > len(held.array):
            held = arrays[kind] = TableArray(table)
        held.array[held.size:n] = table[held.size:n]
        held.size = n
    return arrays


def flat_positions(starts: np.ndarray, lengths: np.ndarray):
    """For requests computing positions [start, start + length), laid out one after another: each request's
    first row, the request of each row, and each row's position."""
    offsets = np.cumsum(lengths) - lengths
    owner = np.repeat(np.arange(len(starts)), lengths)
    return offsets, owner, starts[owner] + np.arange(len(owner)) - offsets[owner]


def plan_step(starts: list[int], lengths: list[int], tables: list[dict[str, TableArray]], windows: dict,
              block_size: int, device) -> tuple[torch.Tensor, dict[str, KindPlan]]:
    """(positions [T], the plan per attention kind): slots to write and keys to read for requests computing
    positions [start, start + length), ``tables`` their ``table_arrays``. Array ops over the whole batch in
    numpy (a few microseconds less per op than torch's at these sizes, and 30-odd ops a step); the only loop
    over requests slices each one's visible blocks out of its table."""
    start_a, len_a = np.asarray(starts, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
    offsets, owner, new_pos = flat_positions(start_a, len_a)
    members = [m for m in (np.flatnonzero(len_a == 1), np.flatnonzero(len_a > 1)) if m.size]  # decode, chunks
    put = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    plans = {}
    for kind, window in windows.items():
        lo = np.zeros_like(start_a) if window is None else np.maximum(start_a - (window - 1), 0)
        first, end = lo // block_size, (start_a + len_a - 1) // block_size + 1  # the blocks holding [lo, s + n)
        count = end - first
        # each request's visible blocks, one request after another (dropped sliding blocks are never read)
        seen = np.concatenate([t[kind].array[f:e] for t, f, e in zip(tables, first.tolist(), end.tolist())])
        row = np.cumsum(count) - count  # where each request's blocks start in ``seen``
        write = seen[row[owner] + new_pos // block_size - first[owner]] * block_size + new_pos % block_size
        groups = []
        for idx in members:
            s, n, c = start_a[idx], len_a[idx], count[idx]
            q_off = np.arange(n.max())
            q_valid = q_off[None] < n[:, None]
            b_off = np.arange(c.max())
            b_valid = b_off[None] < c[:, None]
            blocks = np.where(b_valid, seen[np.where(b_valid, row[idx][:, None] + b_off, 0)], 0)
            groups.append(Group(put(np.where(q_valid, offsets[idx][:, None] + q_off, 0)),
                                put(np.where(q_valid, s[:, None] + q_off, -1)), put(q_valid), put(blocks),
                                put(lo[idx]), put(c), block_size))
        plans[kind] = KindPlan(put(write), groups)
    return put(new_pos), plans
