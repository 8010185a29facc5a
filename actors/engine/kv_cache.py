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

from dataclasses import dataclass

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
    kv_pos: torch.Tensor  # [B, NB * bs] positions of the gathered slots (padding: INVISIBLE)
    kv_lo: torch.Tensor  # [B] first visible position (kv_blocks[:, 0] holds it)


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


def _padded(rows: list[list[int]]) -> torch.Tensor:
    """[B, max len] long tensor of ragged lists (padding 0), built in one call."""
    width = max(map(len, rows), default=0) or 1
    return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long)


def flat_positions(start_t: torch.Tensor, len_t: torch.Tensor):
    """For requests computing positions [start, start + length), laid out one after another: each request's
    first row, the request of each row, and each row's position."""
    offsets = torch.cumsum(len_t, 0) - len_t
    owner = torch.repeat_interleave(torch.arange(len(start_t)), len_t)
    return offsets, owner, start_t[owner] + torch.arange(len(owner)) - offsets[owner]


def plan_step(starts: list[int], lengths: list[int], tables: list[dict[str, list[int]]], windows: dict,
              block_size: int, device) -> dict[str, KindPlan]:
    """Slots to write and keys to read for requests computing positions [start, start + length); tensor ops
    over the whole batch (no Python loop over requests or tokens)."""
    start_t, len_t = torch.tensor(starts, dtype=torch.long), torch.tensor(lengths, dtype=torch.long)
    offsets, owner, new_pos = flat_positions(start_t, len_t)
    members = [(len_t == 1).nonzero().squeeze(1), (len_t > 1).nonzero().squeeze(1)]  # decode, prefill chunks
    plans = {}
    for kind, window in windows.items():
        table_t = _padded([t[kind] for t in tables])  # [B, blocks]; dropped sliding blocks are never read

        def slots(rows, pos, table_t=table_t):
            """Cache slots of positions pos [..] of requests rows [..]."""
            return table_t[rows, pos // block_size] * block_size + pos % block_size

        groups = []
        for idx in members:
            if idx.numel() == 0:
                continue
            s, n = start_t[idx], len_t[idx]
            q_off = torch.arange(int(n.max()))
            q_valid = q_off[None] < n[:, None]
            lo = torch.zeros_like(s) if window is None else torch.clamp(s - (window - 1), min=0)
            first, end = lo // block_size, (s + n - 1) // block_size + 1  # the blocks holding [lo, s + n)
            b_off = torch.arange(int((end - first).max()))
            logical = first[:, None] + b_off[None]
            b_valid = logical < end[:, None]
            logical = torch.where(b_valid, logical, 0)
            k_pos = (logical[:, :, None] * block_size + torch.arange(block_size)).flatten(1)
            k_pos = torch.where(b_valid.repeat_interleave(block_size, 1), k_pos, INVISIBLE)
            groups.append(Group(
                torch.where(q_valid, offsets[idx][:, None] + q_off, 0).to(device),
                torch.where(q_valid, s[:, None] + q_off, -1).to(device), q_valid.to(device),
                torch.where(b_valid, table_t[idx[:, None], logical], 0).to(device), k_pos.to(device), lo.to(device)))
        plans[kind] = KindPlan(slots(owner, new_pos).to(device), groups)
    return plans
