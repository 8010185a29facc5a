"""``--calibrate``: measure this machine's costs for a model's shapes, as the cluster's actors compute them
(one thread each), and cache them under ~/.cache/epserve/plan/, keyed by the CPU, the dtype and the shapes.

* GEMM time tables: every front-end projection's shape (attention, dense MLP, router, head) at 1 to 1024 rows,
  through the model's own ``linear`` (oneDNN with the reordered weight);
* the grouped experts kernel (``moe.expert_outputs``, the shards' call): a fixed cost, a cost per expert with
  rows (its weights read) and per slot; and how much slower it runs while a second process runs it too
  (shards on different cores still share the memory bandwidth);
* a front-end engine with no experts (its exchange answered at once in-process): the steps' measured times
  less their GEMMs fit the attention's time per visible key, the elementwise time per token and layer, and the
  host's time per step and per request in it;
* the shared-memory transport between two processes: latency per message and bandwidth;
* with ``full``, one short ``epserve bench`` of the tiny model through a real cluster (1 shard): what it takes
  beyond the model's prediction, per output token (delivering each token from the engine to its client), is the
  cluster's host cost, kept per CPU for every model.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from epserve.actors.cache import cache_dir
from epserve.actors.model import precision
from epserve.actors.model.config import ModelConfig

from .stepmodel import Row, visible_keys

ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
HEAD_ROWS = (1, 2, 4, 8, 16, 32, 64)
QUICK_ROWS = (1, 16)


def log(message: str) -> None:
    print(f"calibrating: {message}", file=sys.stderr, flush=True)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def calibration_key(cfg: ModelConfig, dtype: torch.dtype, quick: bool) -> dict:
    shapes = {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "num_heads", "intermediate_size",
                                           "num_experts", "top_k", "moe_intermediate_size")}
    shapes["layers"] = [(cfg.attention(i).head_dim, cfg.attention(i).num_kv_heads) for i in range(cfg.num_layers)]
    return {"cpu": cpu_model(), "isa": precision.cpu_isa(), "cores": os.cpu_count(),
            "dtype": precision.dtype_name(dtype), "torch": torch.__version__, "quick": quick, "shapes": shapes}


def cache_file(key: dict, kind: str) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "plan" / f"{kind}-{digest}.json"


def calibration(cfg: ModelConfig, dtype: torch.dtype, quick: bool = False, refresh: bool = False) -> dict:
    """This machine's costs for ``cfg``'s shapes: cached, or measured now (a minute or two; ``quick``: seconds,
    coarse, without the cluster run)."""
    cal = model_costs(cfg, dtype, quick, refresh)
    cal["per_output_token_s"] = 0.0 if quick else cluster_overhead(dtype, refresh)
    return cal


def model_costs(cfg: ModelConfig, dtype: torch.dtype, quick: bool = False, refresh: bool = False) -> dict:
    key = calibration_key(cfg, dtype, quick)
    path = cache_file(key, "cpu")
    if path.exists() and not refresh:
        return json.loads(path.read_text())
    from . import measure

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cal = {"key": key, "cores": os.cpu_count(), "itemsize": torch.empty(0, dtype=dtype).element_size()}
        cal["gemm"] = measure.gemm_tables(cfg, dtype, QUICK_ROWS if quick else ROWS,
                                          QUICK_ROWS if quick else HEAD_ROWS, log)
        cal["experts"] = measure.experts(cfg, dtype, quick, log)
        cal["contention"] = measure.contention(cfg, dtype, quick, log) if (os.cpu_count() or 1) > 1 else 1.0
        cal.update(measure.exchange(quick, log))
        cal.update(fit_frontend(cfg, cal, measure.frontend_steps(cfg, dtype, quick, log)))
    finally:
        torch.set_num_threads(threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cal, indent=1) + "\n")
    log(f"saved {path}")
    return cal


def fit_frontend(cfg: ModelConfig, cal: dict, steps: list[tuple[list[Row], float]]) -> dict:
    """Least squares, non-negative, of each step's time beyond its GEMMs on: 1, requests, tokens x layers,
    visible keys x heads x head dim (summed over layers)."""
    from .cpudevice import CpuDevice

    from .stepmodel import Layout, StepModel

    device = CpuDevice({**cal, "attention_s": 0.0, "elementwise_s": 0.0, "step_s": 0.0, "step_per_seq_s": 0.0,
                        "experts": [0.0, 0.0, 0.0]}, cfg)
    gemms = StepModel(cfg, Layout(shards=0), device)
    names = ["step_s", "step_per_seq_s", "elementwise_s", "attention_s"]
    X, y = [], []
    for rows, seconds in steps:
        T = sum(r.n for r in rows)
        keys = sum(visible_keys(r, cfg.attention(i).window) * cfg.num_heads * cfg.attention(i).head_dim
                   for i in range(cfg.num_layers) for r in rows)
        X.append([1.0, len(rows), T * cfg.num_layers, keys])
        y.append(seconds - gemms.step(rows).seconds)
    from .measure import nonnegative_lstsq

    return dict(zip(names, nonnegative_lstsq(X, y)))


def cluster_overhead(dtype: torch.dtype, refresh: bool) -> float:
    """Seconds per output token that a real cluster (tiny model, 1 shard) takes beyond the model's
    prediction: measured once per CPU and dtype by a short bench."""
    key = {"cpu": cpu_model(), "isa": precision.cpu_isa(), "cores": os.cpu_count(),
           "dtype": precision.dtype_name(dtype), "torch": torch.__version__}
    path = cache_file(key, "cluster")
    if path.exists() and not refresh:
        return json.loads(path.read_text())["per_output_token_s"]
    from epserve.cluster.fixtures.checkpoint import preset

    from . import measure
    from .cpudevice import CpuDevice
    from .predict import Workload, predict
    from .stepmodel import Layout, StepModel

    cfg = preset("tiny")
    cal = model_costs(cfg, dtype)  # the model's part, as cached (a fresh one when the caller just made it)
    work = Workload(prompt_len=32, output_len=32, concurrency=8, requests=16)
    log("a short bench of the tiny model on a real cluster (1 shard) ...")
    measured = measure.cluster_bench(work, shards=1, dtype=precision.dtype_name(dtype))
    tokens = work.total_requests * work.output_len
    model = predict(StepModel(cfg, Layout(1, 1), CpuDevice(cal, cfg)), work)
    per_token = max(measured["elapsed_s"] - model.elapsed_s, 0.0) / tokens
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "per_output_token_s": per_token, "bench": measured,
                                "predicted_elapsed_s": model.elapsed_s}, indent=1) + "\n")
    return per_token
