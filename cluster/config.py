"""Cluster settings: one dataclass, from YAML or the command line. Defaults serve the built-in tiny model
on a local Ray cluster started on demand."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from epserve.actors.engine.config import EngineConfig

PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class ClusterConfig:
    checkpoint: str | None = None  # None: the built-in tiny model
    shards: int = 2  # ExpertShard actors
    address: str | None = None  # an existing Ray cluster ("auto", "host:6379"); None: start one locally
    placement: str = "PACK"  # placement-group strategy; STRICT_SPREAD puts every actor on its own node
    device: str = "auto"  # auto: one GPU per actor when the cluster has enough, else CPU
    cpus_per_actor: float = 0.2  # on CPU-only clusters: a front-end and 4 shards start on one core
    frontend_threads: int | None = None  # torch threads of the front-end (None: torch's default)
    shard_threads: int = 1
    collective_timeout_s: float = 60.0  # deadline of every collective: a dead peer is an error, not a hang
    # Run the dense FFN while the experts' all-to-all is in flight. None: on with GPUs, off on CPU-only
    # clusters, where the shards already use every core while the front-end waits (docs/performance.md)
    overlap_dense_ffn: bool | None = None
    heartbeat_s: float = 1.0  # idle front-end pings the shards this often (must be well under the timeout)
    start_timeout_s: float = 600.0  # placement, weight loading and process-group wiring
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self):
        if isinstance(self.engine, dict):
            self.engine = EngineConfig(**self.engine)
        if self.shards < 1:
            raise ValueError(f"shards must be >= 1, got {self.shards}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if not 0 < self.heartbeat_s < self.collective_timeout_s / 2:
            raise ValueError("heartbeat_s must be positive and under half of collective_timeout_s")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ClusterConfig":
        data = yaml.safe_load(Path(path).read_text()) or {}
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict) -> "ClusterConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown cluster settings {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)
