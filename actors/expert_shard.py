"""The ExpertShard actor: owns the experts the cluster's placement (actors/placement.py) gives its slots in
every MoE layer, and serves the front-ends' per-layer exchanges (``dispatch.ShardExchange``,
``dispatch.serve_layer``) until told to stop, or until a collective fails.

A failed ``serve`` (a peer died or stalled: the collective deadline ran out) leaves the process group and
raises; the shard keeps its experts and waits for the cluster's supervisor to ``join`` it into a new group
and call ``serve`` again. A shard restarted by Ray (or recreated) reloads its experts in ``__init__``.
"""

from __future__ import annotations

import os
import threading
import time

import torch

from . import dispatch, process_group
from .metrics import ShardMetrics, report
from .model import precision
from .model.config import ModelConfig
from .model.loader import load_expert_slots
from .placement import build
from .transport import shm_available


class ExpertShard:
    def __init__(self, checkpoint: str, shard: int, num_shards: int, threads: int = 1, dtype: str = "auto",
                 placement: dict | None = None, frontends: int = 1, micro_batches: int = 1,
                 cpus: list[int] | None = None):
        """``placement``: the cluster's placement settings (``placement.build``'s keywords), the same on every
        rank, so that every rank derives the same placement."""
        process_group.bind_cpus(cpus)
        torch.set_num_threads(threads)
        self.device = process_group.device_for_actor()
        self.dtype = precision.resolve_dtype(dtype, self.device)
        self.shard, self.num_shards = shard, num_shards
        cfg = ModelConfig.from_json(checkpoint)
        self.experts = build(cfg.num_layers, cfg.num_experts, num_shards, **(placement or {})).experts_of(shard)
        self.ranks = dispatch.Ranks(frontends, num_shards, micro_batches)
        self.layers, self.cfg, self.load_report = load_expert_slots(checkpoint, self.experts, self.dtype,
                                                                    self.device)
        self.rows_served = 0
        self.compute_seconds = 0.0  # grouped expert compute, summed over layers and steps (benchmarks)
        self.steps = 0
        self.error: str | None = None
        self._lock = threading.Lock()
        self._metrics = ShardMetrics(shard)  # Prometheus; see actors/metrics.py

    def info(self) -> dict:
        """What this shard holds: the expert in each slot, per layer, and the bytes resident for them."""
        tensors = [t for e in self.layers for t in (e.gate_up_proj, e.down_proj)]
        resident = sum(t.numel() * t.element_size() for t in tensors)
        held = precision.dtype_name(tensors[0].dtype) if tensors else None  # bf16 on CPU: see moe.expert_dtype
        return {"shard": self.shard, "experts": self.experts, "device": str(self.device),
                "dtype": precision.dtype_name(self.dtype), "cpu_isa": precision.cpu_isa(),
                "resident_expert_bytes": resident, "expert_dtype": held, "loaded_bytes": self.load_report.bytes,
                "loaded_tensors": self.load_report.tensors, "pid": os.getpid()}

    def join(self, world_size: int, backend: str, host: str, port: int, timeout_s: float,
             capacity: int = 0) -> bool:
        self.transport = process_group.join(self.ranks.shard_rank(self.shard), world_size, backend, host, port,
                                            timeout_s, capacity=capacity)
        self.error = None  # a new group: the last loop's failure is over
        return True

    def where(self) -> tuple[str, bool]:
        """(this actor's Ray node, whether it can use the shared-memory transport)."""
        return process_group.node_id(), shm_available()

    def serve(self) -> dict:
        """Run the collective loop until the front-end says stop; returns a summary (raises on failure)."""
        ep = dispatch.ShardExchange(self.ranks, self.transport, self.cfg.hidden_size, self.cfg.top_k, self.dtype,
                                    self.device)
        try:
            while True:
                op = ep.next_op()
                if op == dispatch.OP_STOP:
                    break
                if op == dispatch.OP_STEP:
                    for layer, experts in enumerate(self.layers):
                        for micro_batch in range(self.ranks.micro_batches):
                            rows = dispatch.serve_layer(ep, layer, experts, self._on_compute, micro_batch)
                            self.rows_served += rows
                            self._metrics.rows.inc(rows)
                    self.steps += 1
                    self._metrics.steps.inc()
        except Exception as e:  # noqa: BLE001 - reported to the front-end and the driver
            self.error = f"{type(e).__name__}: {e}"
            raise
        finally:
            process_group.leave()
        return {"steps": self.steps, "rows": self.rows_served}

    def _on_compute(self, seconds: float) -> None:
        self.compute_seconds += seconds
        self._metrics.compute.observe(seconds)

    def stats(self) -> dict:
        return {"steps": self.steps, "rows": self.rows_served, "compute_seconds": self.compute_seconds,
                "error": self.error, "time": time.time()}

    def ping(self) -> bool:
        return True

    def metrics(self) -> dict:
        """This actor's Prometheus metric families and health, for the ingress's scrape target."""
        return report(self._metrics.registry, shard=self.shard, start_time=self._metrics.start_time,
                      error=self.error)
