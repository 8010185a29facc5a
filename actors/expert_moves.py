"""A shard's experts for a new placement, built beside the ones it serves (online rebalancing and a shard
taken back after a placement change): a layer whose slots did not change keeps its tensors; a changed one gets
new stacked tensors, each slot's weights copied from the experts the shard holds already or, for an expert
it does not hold, read from the checkpoint (only that expert's rows). The old layers serve until every rank
switches, so a shard holds both while the new ones are built: at most twice its changed layers' weights."""

from __future__ import annotations

import torch
from torch import nn

from .model.config import ModelConfig
from .model.loader import load_layer_experts
from .model.moe import Experts


def restage(checkpoint: str, cfg: ModelConfig, layers: list[Experts], held: list[list[int]],
            wanted: list[list[int]], dtype, device) -> tuple[list[Experts], int]:
    """The layers for the slots ``wanted[layer]`` from ``layers`` (holding ``held[layer]``); returns them and
    the bytes of expert weights that had to be read (the experts that moved here)."""
    out, moved = [], 0
    for layer, (experts, was, want) in enumerate(zip(layers, held, wanted)):
        if list(was) == list(want):
            out.append(experts)
            continue
        missing = [e for e in want if e not in was]
        loaded, nbytes = load_layer_experts(checkpoint, layer, missing, dtype, device) if missing else (None, 0)
        moved += nbytes
        where = {e: (experts, i) for i, e in enumerate(was)} | {e: (loaded, i) for i, e in enumerate(missing)}
        out.append(_stacked(cfg, [where[e] for e in want], loaded or experts))
    return out, moved


def _stacked(cfg: ModelConfig, rows: list[tuple[Experts, int]], like: Experts) -> Experts:
    """One layer's Experts whose slot s holds expert ``rows[s]`` (a module and its row), run as ``like`` runs
    (the same dtype and kernels: every layer of a shard picks the same path; packed rows stay per expert)."""
    with torch.device("meta"):
        layer = Experts(cfg, 0, len(rows))
    for name in ("gate_up_proj", "down_proj"):
        source = getattr(like, name)
        weights = torch.stack([getattr(m, name)[i] for m, i in rows]) if rows else source[:0].clone()
        setattr(layer, name, nn.Parameter(weights, requires_grad=False))
    layer.path = like.path
    return layer.eval()
