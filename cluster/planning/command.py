"""``epserve plan``: from the options to the plan (memory per rank, the predicted step and workload, the
budget's best layouts), printed as a table or JSON, and optionally written as Helm values."""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

from epserve.actors.engine.config import EngineConfig
from epserve.actors.model import precision
from epserve.actors.model.config import ModelConfig

from . import report
from .hardware import GPUS, LINKS
from .memory import RESERVE, plan_memory
from .params import count_params
from .predict import Workload, predict
from .search import best, candidates
from .stepmodel import Layout, StepModel

ALIASES = {"released": "gemma-4-26b-a4b"}


def model_config(args) -> tuple[ModelConfig, str]:
    if args.checkpoint:
        return ModelConfig.from_json(args.checkpoint), Path(args.checkpoint).name
    from epserve.cluster.fixtures.checkpoint import preset

    name = ALIASES.get(args.preset, args.preset)
    return preset(name), name


def gpu_name(text: str) -> str:
    names = {n.lower(): n for n in (*GPUS, "cpu")}
    if text.lower() not in names:
        raise ValueError(f"unknown --gpu {text!r}: choose one of {', '.join(names.values())}")
    return names[text.lower()]


def check(args, gpu: str) -> None:
    """One-line errors for options that cannot make a plan."""
    for name in ("frontends", "shards", "nodes", "gpus_per_node", "prompt_len", "output_len", "concurrency",
                 "requests", "budget_gpus"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.redundant_experts < 0:
        raise ValueError(f"--redundant-experts must be >= 0, got {args.redundant_experts}")
    if args.link not in LINKS:
        raise ValueError(f"unknown --link {args.link!r}: choose one of {', '.join(LINKS)}")
    if args.calibrate and gpu != "cpu":
        raise ValueError("--calibrate measures this machine: use it with --gpu cpu")
    if args.budget_gpus is not None:
        if gpu == "cpu":
            raise ValueError("--budget-gpus plans GPUs: give a --gpu other than cpu")
        if args.budget_gpus < 2:
            raise ValueError(f"--budget-gpus must be >= 2 (a front-end and a shard), got {args.budget_gpus}")
        used = (args.frontends or 0) + (args.shards or 0)
        if used > args.budget_gpus:
            raise ValueError(f"--frontends {args.frontends or 0} + --shards {args.shards or 0} = {used} GPUs "
                             f"exceed --budget-gpus {args.budget_gpus}")


def main(args) -> int:
    gpu = gpu_name(args.gpu)
    check(args, gpu)
    cfg, name = model_config(args)
    dtype = precision.resolve_dtype(args.dtype, "cpu" if gpu == "cpu" else "cuda")
    work = Workload(args.prompt_len, args.output_len, args.concurrency, args.requests)
    layout = Layout(args.frontends or 1, args.shards or 2, args.redundant_experts, args.nodes or 1,
                    args.gpus_per_node, args.link)
    if args.nodes is None and gpu != "cpu":
        layout = replace(layout, nodes=math.ceil(layout.ranks / layout.gpus_per_node))
    if layout.shards > cfg.num_experts:
        raise ValueError(f"--shards {layout.shards} exceeds the model's {cfg.num_experts} experts per layer")
    if gpu != "cpu" and layout.ranks > layout.nodes * layout.gpus_per_node and args.budget_gpus is None:
        raise ValueError(f"{layout.ranks} ranks do not fit --nodes {layout.nodes} x --gpus-per-node "
                         f"{layout.gpus_per_node} GPUs")
    target = Target(gpu, cfg, dtype, args)

    def engine(lay: Layout) -> EngineConfig:  # each front-end's: its share of the requests
        return EngineConfig(max_num_seqs=-(-work.concurrency // lay.frontends), enable_prefix_caching=False)

    def memory(lay: Layout):
        ranks = plan_memory(cfg, lay.frontends, lay.shards, lay.redundant, target.capacity, dtype, engine(lay),
                            target.kv_budget)
        return ranks, report.memory_problems(ranks, lay, work, gpu == "cpu", target.capacity, RESERVE)

    search = None
    if args.budget_gpus:
        cands = candidates(cfg, args.budget_gpus, layout, work, target.device, lambda lay: "; ".join(memory(lay)[1]),
                           engine)
        search = (cands, *best(cands))
        if args.frontends is None and args.shards is None:
            if search[1] is None:
                raise ValueError(f"no split of {args.budget_gpus} {gpu} GPUs holds this model and workload: "
                                 f"{cands[-1].why}")
            layout = search[1].layout
    ranks, problems = memory(layout)
    prediction = predict(StepModel(cfg, layout, target.device(layout)), work, engine(layout), target.per_token)
    plan = report.build(name, count_params(cfg), gpu, dtype, layout, work, ranks, prediction, problems,
                        target.source, search)
    if args.helm_values:
        report.write_helm_values(plan, args.helm_values)
        print(f"wrote {args.helm_values}", file=sys.stderr)
    print(json.dumps(plan) if args.json else report.table(plan))
    return 0


class Target:
    """What the plan is for: a GPU of the hardware table, or this machine (its calibration)."""

    def __init__(self, gpu: str, cfg: ModelConfig, dtype, args):
        self.gpu, self.cfg, self.dtype = gpu, cfg, dtype
        if gpu == "cpu":
            from .calibrate import calibration

            self.cal = calibration(cfg, dtype, quick=args.quick, refresh=args.calibrate)
            key = self.cal["key"]
            self.capacity, self.kv_budget = _host_memory(), EngineConfig().kv_cache_bytes
            self.source = (f"calibrated on this machine: {key['cpu']} ({key['isa']}, {self.cal['cores']} cores), "
                           f"{precision.dtype_name(dtype)}{', quick' if args.quick else ''}")
            self.per_token = self.cal.get("per_output_token_s", 0.0)
        else:
            self.hw = GPUS[gpu]
            self.capacity, self.kv_budget = int(self.hw.hbm_bytes), None
            self.source, self.per_token = self.hw.source, 0.0

    def device(self, layout: Layout):
        if self.gpu == "cpu":
            from .cpudevice import CpuDevice

            return CpuDevice(self.cal, self.cfg)
        from .gpu import GpuDevice

        return GpuDevice(self.hw, self.cfg, layout.link, itemsize=self.dtype.itemsize)


def _host_memory() -> int:
    """This machine's memory, which every rank of a CPU cluster shares."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
