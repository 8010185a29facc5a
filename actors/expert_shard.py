"""The ExpertShard actor: owns the experts the cluster's placement (actors/placement.py) gives its slots in
every MoE layer, and serves the front-ends' per-layer exchanges (``dispatch.ShardExchange``,
``dispatch.serve_layer``) until told to stop, or until a collective fails.

A failed ``serve`` (a peer died or stalled: the collective deadline ran out) leaves the process group and
raises; the shard keeps its experts and waits for the cluster's supervisor to ``join`` it into a new group
and call ``serve`` again. A shard restarted by Ray (or recreated) reloads its experts in ``__init__``, and
those that moved to it since start-up at ``join``. ``serve`` also returns when the group is left for a
planned new one (the header's regroup flag, ``{"regroup": True}``).

Rebalancing (cluster/rebalancer.py): ``stage`` loads a new placement's experts beside the ones being served
(actors/expert_moves.py); the loop switches to them at the first header where every rank is ready.
"""

from __future__ import annotations

import os
import threading
import time

import torch

from . import dispatch, process_group
from .expert_moves import restage
from .metrics import ShardMetrics, report
from .model import cpu_threads, precision
from .model.config import ModelConfig
from .model.loader import load_expert_slots
from .placement import build
from .transport import ShmTransport, shm_available


class ExpertShard:
    def __init__(self, checkpoint: str, shard: int, num_shards: int, threads: int = 1, dtype: str = "auto",
                 placement: dict | None = None, frontends: int = 1, micro_batches: int = 1,
                 cpus: list[int] | None = None):
        """``placement``: the cluster's placement settings (``placement.build``'s keywords), the same on every
        rank, so that every rank derives the same placement."""
        process_group.bind_cpus(cpus)
        self.cpus = cpus
        torch.set_num_threads(threads)
        self.device = process_group.device_for_actor()
        self.dtype = precision.resolve_dtype(dtype, self.device)
        self.shard, self.num_shards = shard, num_shards
        cfg = ModelConfig.from_json(checkpoint)
        self.checkpoint = checkpoint
        self.experts = build(cfg.num_layers, cfg.num_experts, num_shards, **(placement or {})).experts_of(shard)
        self.ranks = dispatch.Ranks(frontends, num_shards, micro_batches)
        self.rank = self.ranks.shard_rank(shard)  # in the group (without a lost shard, it may be another)
        self.epoch = 0  # the placement's (a rebalanced one is given at ``join`` or ``stage``d)
        self._staged: tuple[int, list[list[int]], list] | None = None  # (epoch, experts, their layers)
        self.moved_bytes = self.moved_bytes_last = 0
        self.layers, self.cfg, self.load_report = load_expert_slots(checkpoint, self.experts, self.dtype,
                                                                    self.device)
        self.rows_served = 0
        self.compute_seconds = 0.0  # grouped expert compute, summed over layers and steps (benchmarks)
        self.steps = 0
        self.error: str | None = None
        self._lock = threading.Lock()
        self._metrics = ShardMetrics(shard)  # Prometheus; see actors/metrics.py
        cpu_threads.release_team()  # this thread's OpenMP team: Ray may call ``serve`` on another thread

    def info(self) -> dict:
        """What this shard holds: the expert in each slot, per layer, and the bytes resident for them."""
        tensors = [t for e in self.layers for t in (e.gate_up_proj, e.down_proj)]
        resident = sum(t.numel() * t.element_size() for t in tensors)
        held = precision.dtype_name(tensors[0].dtype) if tensors else None  # bf16 on CPU: see moe.expert_dtype
        return {"shard": self.shard, "experts": self.experts, "epoch": self.epoch, "moved_bytes": self.moved_bytes,
                "device": str(self.device),
                "dtype": precision.dtype_name(self.dtype), "cpu_isa": precision.cpu_isa(),
                "resident_expert_bytes": resident, "expert_dtype": held, "loaded_bytes": self.load_report.bytes,
                "loaded_tensors": self.load_report.tensors, "pid": os.getpid()}

    def join(self, world_size: int, backend: str, host: str, port: int, timeout_s: float, capacity: int = 0,
             position: int | None = None, experts: list[list[int]] | None = None, epoch: int = 0) -> bool:
        """Join a new group as its shard at ``position`` (default: this shard's index; without a lost shard
        the positions close up), holding ``experts`` (the cluster's placement ``epoch``: a shard restarted
        after a rebalance loads the experts that moved to it, before it joins)."""
        position = self.shard if position is None else position
        self.ranks = dispatch.Ranks(self.ranks.frontends, world_size - self.ranks.frontends, self.ranks.micro_batches)
        self.rank = self.ranks.shard_rank(position)
        if experts is not None:
            with self._lock:
                staged = self._staged if self._staged and self._staged[1] == experts else None
                layers = staged[2] if staged else self._restage(experts)
                self.layers, self.experts, self._staged = layers, experts, None
        self.epoch = epoch
        self.transport = process_group.join(self.rank, world_size, backend, host, port, timeout_s,
                                            capacity=capacity)
        self.error = None  # a new group: the last loop's failure is over
        return True

    def stage(self, epoch: int, experts: list[list[int]]) -> int:
        """Load the experts of the placement ``epoch`` beside the ones being served (while serving); the loop
        switches to them at the first header where every rank is ready. Returns the bytes that moved here."""
        with self._lock:
            if epoch <= self.epoch:
                return 0
            layers = self._restage(experts)
            self._staged = (epoch, experts, layers)
        return self.moved_bytes_last

    def _restage(self, experts: list[list[int]]) -> list:
        layers, self.moved_bytes_last = restage(self.checkpoint, self.cfg, self.layers, self.experts, experts,
                                                self.dtype, self.device)
        self.moved_bytes += self.moved_bytes_last
        self._metrics.moved.inc(self.moved_bytes_last)
        return layers

    def _switch(self, epoch: int) -> None:
        """Serve the staged placement from this header on (every rank switches at the same one)."""
        with self._lock:
            staged, self._staged = self._staged, None
        if staged is None or staged[0] != epoch:
            raise RuntimeError(f"the group switched to placement {epoch}; this shard has {staged and staged[0]}")
        self.epoch, self.experts, self.layers = staged
        self._metrics.epoch.set(epoch)

    def where(self) -> tuple[str, bool]:
        """(this actor's Ray node, whether it can use the shared-memory transport)."""
        return process_group.node_id(), shm_available()

    def serve(self) -> dict:
        """Run the collective loop until the front-end says stop; returns a summary (raises on failure)."""
        if self.device.type == "cpu" and self.cpus is None and isinstance(self.transport, ShmTransport):
            cpu_threads.pin_thread(self.shard + 1)  # one host: a core of its own, after the front-end's first
        ep = dispatch.ShardExchange(self.ranks, self.transport, self.cfg.hidden_size, self.cfg.top_k, self.dtype,
                                    self.device)
        try:
            while True:
                staged = self._staged
                op = ep.next_op(staged[0] if staged else self.epoch)
                if ep.header.epoch > self.epoch:
                    self._switch(ep.header.epoch)
                if op == dispatch.OP_STOP:
                    break
                if op in dispatch.STEPS:
                    counted = op == dispatch.OP_STEP  # not a warm-up
                    for layer, experts in enumerate(self.layers):
                        for micro_batch in range(self.ranks.micro_batches):
                            timer = self._on_compute if counted else None
                            rows = dispatch.serve_layer(ep, layer, experts, timer, micro_batch)
                            if counted:
                                self.rows_served += rows
                                self._metrics.rows.inc(rows)
                    if counted:
                        self.steps += 1
                        self._metrics.steps.inc()
                if ep.header.regroup:  # a planned new group: this one ends after the step
                    return {"steps": self.steps, "rows": self.rows_served, "regroup": True}
        except Exception as e:  # noqa: BLE001 - reported to the front-end and the driver
            self.error = f"{type(e).__name__}: {e}"
            raise
        finally:
            process_group.leave()
        return {"steps": self.steps, "rows": self.rows_served, "regroup": False}

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
