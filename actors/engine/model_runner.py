"""Runs one scheduled batch through the model: flat token layout, paged-attention plan, logits of the
requests that reached the end of their known tokens (the only ones that sample)."""

from __future__ import annotations

import torch

from ..model.config import FULL, SLIDING
from ..model.gemma4 import ExpertExecutor, Gemma4Model
from ..model.micro_batches import forward_parts, split
from .config import EngineConfig
from .kv_cache import KVCache, PagedAttention, plan_blocks, plan_step, table_arrays
from .scheduler import Batch


class ModelRunner:
    def __init__(self, model: Gemma4Model, cfg: EngineConfig, experts: ExpertExecutor | None = None):
        self.model, self.cfg, self.experts = model, cfg, experts
        mcfg = model.cfg
        self.device = model.embed_tokens.weight.device
        self.num_blocks = cfg.num_blocks or plan_blocks(mcfg, cfg.kv_cache_bytes, cfg.block_size, cfg.max_num_seqs,
                                                        cfg.max_num_batched_tokens, model.dtype)
        kinds = sorted(set(mcfg.layer_types))
        missing = [k for k in kinds if k not in self.num_blocks]
        if missing:
            raise ValueError(f"EngineConfig.num_blocks has no entry for {missing}")
        self.windows = {k: (mcfg.sliding.window if k == SLIDING else None) for k in kinds}
        self.num_blocks = {k: self.num_blocks[k] for k in kinds}
        self.cache = KVCache(mcfg, self.num_blocks, cfg.block_size, model.dtype, self.device)

    @property
    def full_capacity(self) -> int:
        """Tokens one request could hold on the full-attention layers (the context limit)."""
        return self.num_blocks.get(FULL, 1 << 30) * self.cfg.block_size

    @torch.inference_mode()
    def run(self, batch: Batch) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        """-> (logits [S, V] fp32, indices into batch.seqs of the S requests that sample this step, each
        one's argmax [S])."""
        rows, sampling, end = [], [], 0
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new)):
            end += n
            if seq.num_computed + n == seq.num_tokens:
                sampling.append(i)
                rows.append(end - 1)
        # with micro-batches on the cluster, two halves of the requests (in order) that take turns
        cut = split(batch.num_new) if getattr(self.experts, "micro_batches", 1) > 1 else len(batch.seqs)
        parts = [self._part(batch.seqs[:cut], batch.num_new[:cut])]
        if cut < len(batch.seqs):
            parts.append(self._part(batch.seqs[cut:], batch.num_new[cut:]))
        hidden = [h for h in forward_parts(self.model, parts, self.experts) if h is not None]
        hidden = hidden[0] if len(hidden) == 1 else torch.cat(hidden)
        logits, argmax = self.model.logits_and_argmax(hidden[torch.tensor(rows, dtype=torch.long, device=self.device)])
        return logits.cpu(), sampling, argmax.cpu()

    def _part(self, seqs: list, num_new: list[int]) -> tuple:
        """(input ids, positions, paged-attention context) of some of a step's requests."""
        starts = [s.num_computed for s in seqs]
        ids = [t for seq, n in zip(seqs, num_new) for t in seq.token_ids[seq.num_computed : seq.num_computed + n]]
        positions, plans = plan_step(starts, num_new, [table_arrays(s) for s in seqs], self.windows,
                                     self.cfg.block_size, self.device)
        return torch.tensor(ids, device=self.device), positions, PagedAttention(self.cache, plans)
