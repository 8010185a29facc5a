"""KV-cache tensors and the paged attention context of one step.

Each layer owns flat K and V tensors ``[num_blocks * block_size, G, D]`` of its attention kind; a block table
maps a request's logical block j (positions j*bs .. j*bs+bs-1) to a physical block. A step writes its new
keys and values at their slots, then gathers, per group of requests, the keys each request can see and runs
the batched ``masked_attention`` once per group: one group for single-token (decode) rows and one for
multi-token (prefill chunk) rows, so a decode batch is never padded to a prefill's length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
            size = (num_blocks[kind] * block_size, shape.num_kv_heads, shape.head_dim)
            self.k.append(torch.zeros(size, dtype=dtype, device=device))
            self.v.append(torch.zeros(size, dtype=dtype, device=device))


@dataclass
class Group:
    """Requests attended together: their query rows and the cache slots of the keys they may see."""

    q_index: torch.Tensor  # [B, Q] rows of the step's flat tokens (padding: 0)
    q_pos: torch.Tensor  # [B, Q] positions (padding: -1)
    q_valid: torch.Tensor  # [B, Q] bool
    kv_slots: torch.Tensor  # [B, K] cache slots (padding: 0)
    kv_pos: torch.Tensor  # [B, K] positions (padding: INVISIBLE)


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
        kc.index_copy_(0, plan.write_slots, k)
        vc.index_copy_(0, plan.write_slots, v)
        out = torch.empty_like(q)
        for g in plan.groups:
            o = masked_attention(q[g.q_index], kc[g.kv_slots], vc[g.kv_slots], g.q_pos, g.kv_pos, shape.window)
            out[g.q_index[g.q_valid]] = o[g.q_valid]
        return out


def _pad(rows: list[torch.Tensor], fill) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=fill)


def plan_step(starts: list[int], lengths: list[int], tables: list[dict[str, list[int]]], windows: dict,
              block_size: int, device) -> dict[str, KindPlan]:
    """Slots to write and keys to read for requests computing positions [start, start + length)."""
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    single = [i for i, n in enumerate(lengths) if n == 1]
    multi = [i for i, n in enumerate(lengths) if n > 1]
    plans = {}
    for kind, window in windows.items():
        table_t = [torch.tensor(t[kind], dtype=torch.long) for t in tables]

        def slots(i, lo, hi, table_t=table_t):
            """Cache slots of request i's positions [lo, hi), and the positions."""
            p = torch.arange(lo, hi)
            return table_t[i][p // block_size] * block_size + p % block_size, p

        write = torch.cat([slots(i, s, s + n)[0] for i, (s, n) in enumerate(zip(starts, lengths))])
        groups = []
        for members in (single, multi):
            if not members:
                continue
            q_idx, q_pos, kv_slots, kv_pos = [], [], [], []
            for i in members:
                s, n = starts[i], lengths[i]
                q_idx.append(torch.arange(offsets[i], offsets[i] + n))
                q_pos.append(torch.arange(s, s + n))
                lo = 0 if window is None else max(0, s - (window - 1))
                sl, p = slots(i, lo, s + n)
                kv_slots.append(sl)
                kv_pos.append(p)
            q_pos_t = _pad(q_pos, -1)
            groups.append(Group(_pad(q_idx, 0).to(device), q_pos_t.to(device), (q_pos_t >= 0).to(device),
                                _pad(kv_slots, 0).to(device), _pad(kv_pos, INVISIBLE).to(device)))
        plans[kind] = KindPlan(write.to(device), groups)
    return plans
