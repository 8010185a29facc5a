"""Cluster settings: one dataclass, from the server's settings (cluster/serving/config.py) or the command line.
Defaults serve the built-in tiny model on a local Ray cluster started on demand."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields

from epserve.actors.engine.config import EngineConfig
from epserve.actors.model.precision import DTYPES

PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")  # the launcher sizes these itself


@dataclass
class ClusterConfig:
    checkpoint: str | None = None  # None: the built-in tiny model
    shards: int = 2  # ExpertShard actors
    # Frontend actors (attention data-parallel): each runs its own engine over the one pool of experts; the
    # ingress routes every new request to one of them (cluster/serving/routing.py)
    frontends: int = 1
    # Ping-pong: 2 splits each front-end's step in two halves that take turns, so that one half's attention
    # runs while the shards compute the other's experts (actors/model/micro_batches.py). Same tokens either
    # way; it pays where front-ends and shards do not share cores (GPUs, or CPU actors bound apart below)
    micro_batches: int = 1
    address: str | None = None  # an existing Ray cluster ("auto", "host:6379"); None: start one locally
    placement: str = "PACK"  # placement-group strategy; STRICT_SPREAD puts every actor on its own node
    device: str = "auto"  # auto: one GPU per actor when the cluster has enough, else CPU
    # Compute dtype (actors/model/precision.py): auto is bf16 on GPUs and on CPUs with native bf16 matrix
    # arithmetic (AMX-BF16, AVX512-BF16), else fp32 (with bf16-stored experts); float32 or bfloat16 force it
    dtype: str = "auto"
    # How the ranks exchange rows on CPUs: auto is shared memory when every actor is on one node, else gloo
    # (actors/transport.py); shm insists on shared memory, dist on torch.distributed. GPUs: always NCCL
    transport: str = "auto"
    # Where the routed experts live (actors/placement.py): R extra slots per layer holding replicas of experts
    # (spread over the experts and the shards), or a pinned placement: a JSON file's path, or its mapping
    redundant_experts: int = 0
    expert_placement: str | dict | None = None
    # Online rebalancing (cluster/rebalancer.py): every this many seconds, a placement from the measured load
    # (the redundant slots to the hottest experts), moved to while serving when it is clearly better. 0: off
    rebalance_interval_s: float = 0.0
    cpus_per_actor: float = 0.2  # on CPU-only clusters: a front-end and 4 shards start on one core
    # Custom Ray resources added to the front-end's placement bundle and to each shard's, so that each actor
    # lands on a node that advertises its role (the Helm chart's {"frontend": 1} / {"expert": 1}). Empty: any
    # node with a free CPU (and GPU)
    frontend_resources: dict[str, float] = field(default_factory=dict)
    shard_resources: dict[str, float] = field(default_factory=dict)
    frontend_threads: int | None = None  # torch threads of the front-end (None: torch's default)
    shard_threads: int = 1
    # CPU cores the actors' processes may run on (Linux sched_setaffinity; None: any): the front-ends on some,
    # the shards on others, so that their work overlaps instead of taking turns on the same cores. With None on
    # one host, the front-end's threads and each shard's still keep a core each (actors/model/cpu_threads.py;
    # OMP_PROC_BIND=false in the actors' environment leaves them free)
    frontend_cpus: list[int] | None = None
    shard_cpus: list[int] | None = None
    # Deadline of every collective: a stalled peer is detected within it, never a hang. It must stay well
    # above the longest legitimate gap between two collectives (one layer's compute on the slowest rank)
    collective_timeout_s: float = 10.0
    # Run the dense FFN while the experts' all-to-all is in flight. None: on with GPUs, off on CPU-only
    # clusters, where the shards already use every core while the front-end waits (docs/performance.md)
    overlap_dense_ffn: bool | None = None
    heartbeat_s: float = 1.0  # idle front-end pings the shards this often (must be well under the timeout)
    start_timeout_s: float = 600.0  # placement, weight loading, process-group wiring and the warm-up
    # Recovery (cluster/supervisor.py): more than max_failures failures within failure_window_s end in a
    # clean error instead of another recovery; 0 turns recovery off (the first failure is final)
    max_failures: int = 3
    failure_window_s: float = 600.0
    probe_timeout_s: float = 3.0  # an actor that does not answer a ping within this is stalled: it is killed
    recovery_timeout_s: float = 300.0  # restarting (reloading) actors and rejoining, per recovery attempt
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self):
        if isinstance(self.engine, dict):
            self.engine = EngineConfig(**known_fields(EngineConfig, self.engine, "engine settings"))
        if self.shards < 1:
            raise ValueError(f"shards must be >= 1, got {self.shards}")
        if self.frontends < 1:
            raise ValueError(f"frontends must be >= 1, got {self.frontends}")
        if self.micro_batches not in (1, 2):
            raise ValueError(f"micro_batches must be 1 or 2, got {self.micro_batches}")
        for name in ("frontend_cpus", "shard_cpus"):
            cpus = getattr(self, name)
            if cpus is not None and (not isinstance(cpus, list) or not cpus or
                                     not all(isinstance(c, int) and c >= 0 for c in cpus)):
                raise ValueError(f"{name} must be a non-empty list of CPU numbers, got {cpus!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.rebalance_interval_s < 0:
            raise ValueError(f"rebalance_interval_s must be >= 0 (0: off), got {self.rebalance_interval_s}")
        if self.rebalance_interval_s and self.expert_placement is not None:
            raise ValueError("rebalance_interval_s moves the experts: it cannot be used with a pinned "
                             "expert_placement")
        if self.redundant_experts < 0:
            raise ValueError(f"redundant_experts must be >= 0, got {self.redundant_experts}")
        if self.transport not in ("auto", "shm", "dist"):
            raise ValueError(f"transport must be auto, shm or dist, got {self.transport!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not 0 < self.heartbeat_s < self.collective_timeout_s / 2:
            raise ValueError("heartbeat_s must be positive and under half of collective_timeout_s")
        if self.max_failures < 0:
            raise ValueError(f"max_failures must be >= 0, got {self.max_failures}")
        for name in ("failure_window_s", "probe_timeout_s", "recovery_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("frontend_resources", "shard_resources"):
            _check_resources(name, getattr(self, name))

    @classmethod
    def from_dict(cls, data: dict) -> ClusterConfig:
        return cls(**known_fields(cls, data, "cluster settings"))

    def to_dict(self) -> dict:
        return asdict(self)


def known_fields(cls, data, what: str) -> dict:
    """``data`` when each of its keys is a field of the dataclass ``cls``; else a one-line ValueError that names
    the unknown ones (a misspelt setting must not be ignored)."""
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be a mapping, got {data!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; known: {sorted(known)}")
    return data


def _check_resources(name: str, resources) -> None:
    if not isinstance(resources, dict):
        raise ValueError(f"{name} must be a mapping of Ray resource names to amounts, got {resources!r}")
    for key, amount in resources.items():
        if not isinstance(key, str) or not key or key in BUILTIN_RESOURCES:
            raise ValueError(f"{name}: {key!r} is not a custom Ray resource name (CPU and GPU are set by the "
                             f"launcher)")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 < amount < math.inf:
            raise ValueError(f"{name}[{key!r}] must be a positive number, got {amount!r}")


def cluster_settings(args) -> dict:
    """The ClusterConfig fields of the command line's ``--frontends``, ``--micro-batches``,
    ``--redundant-experts``, ``--rebalance-interval-s`` and ``--expert-placement`` (commands without them get
    the defaults)."""
    options = vars(args)
    settings = {"frontends": options.get("frontends", 1), "micro_batches": options.get("micro_batches", 1),
                "redundant_experts": options.get("redundant_experts") or 0,
                "rebalance_interval_s": options.get("rebalance_interval_s") or 0.0,
                "expert_placement": options.get("expert_placement") and os.path.abspath(options["expert_placement"])}
    if not args.shards and (settings["redundant_experts"] or settings["expert_placement"]
                            or settings["rebalance_interval_s"]):
        raise ValueError("--redundant-experts, --expert-placement and --rebalance-interval-s place experts on "
                         "shards: add --shards N")
    if not args.shards and (settings["frontends"] > 1 or settings["micro_batches"] > 1):
        raise ValueError("--frontends and --micro-batches work over a pool of expert shards: add --shards N")
    return settings
