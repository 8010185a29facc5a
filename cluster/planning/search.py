"""``--budget-gpus B``: every split of B GPUs into M front-ends and N expert shards (M + N = B: a GPU left idle
never shortens a step), each predicted; the best for throughput and the best for inter-token latency among
those whose weights and KV cache fit."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from epserve.actors.model.config import ModelConfig

from .predict import Prediction, Workload, predict
from .stepmodel import Device, Layout, StepModel


@dataclass
class Candidate:
    layout: Layout
    prediction: Prediction
    fits: bool
    why: str = ""  # what does not fit


def candidates(cfg: ModelConfig, budget: int, base: Layout, work: Workload, make_device, fits,
               engine) -> list[Candidate]:
    """``make_device(layout) -> Device``; ``fits(layout) -> reason or ""``; ``engine(layout) -> EngineConfig``."""
    out = []
    nodes = max(base.nodes, math.ceil(budget / base.gpus_per_node))  # the budget's GPUs, on as few nodes
    for M in range(1, budget):
        N = budget - M
        if N > cfg.num_experts:
            continue
        layout = replace(base, frontends=M, shards=N, nodes=nodes)
        device: Device = make_device(layout)
        why = fits(layout)
        out.append(Candidate(layout, predict(StepModel(cfg, layout, device), work, engine(layout)), not why, why))
    return out


def best(cands: list[Candidate]) -> tuple[Candidate | None, Candidate | None]:
    """(the highest output tok/s, the lowest ITL) among the layouts that fit."""
    ok = [c for c in cands if c.fits]
    if not ok:
        return None, None
    return (max(ok, key=lambda c: c.prediction.output_tokens_per_s),
            min(ok, key=lambda c: (c.prediction.itl_s, -c.prediction.output_tokens_per_s)))
