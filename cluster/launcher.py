"""Bring-up and shutdown of one cluster: a placement group with one bundle per actor, M Frontend actors and N
ExpertShard actors, one process group over them, and the shards' collective loops.

Every actor is named in the ``epserve`` namespace (``epserve-frontend-<j>``, ``epserve-shard-<i>``) so that
operators and tests can find them with ``ray.get_actor``. Actors are created with ``max_restarts=-1``: Ray
restarts one that dies (its constructor reloads the weights), and the cluster's Supervisor
(cluster/supervisor.py) rebuilds the process group around it; the Supervisor's failure limit, not Ray's,
decides when to stop. Rank r of the process group is ``actor(r)``: r < M front-end r, M + i shard i.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import replace

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from epserve.actors.engine.sampling import SamplingParams
from epserve.actors.expert_shard import ExpertShard
from epserve.actors.frontend import Frontend
from epserve.actors.model import host_memory
from epserve.actors.model.config import ModelConfig
from epserve.actors.placement import Placement, build

from .config import ClusterConfig
from .fixtures.builtin import checkpoint_or_builtin
from .rebalancer import Rebalancer
from .supervisor import Supervisor

NAMESPACE = "epserve"
log = logging.getLogger("epserve.cluster")


def shard_name(i: int) -> str:
    return f"epserve-shard-{i}"


def frontend_name(j: int) -> str:
    return f"epserve-frontend-{j}"


TRANSPORTS = {"nccl": "NCCL", "gloo": "gloo", "shm": "shared memory (one host)"}


def bundles(cfg: ClusterConfig, cpus: float, use_gpu: bool) -> list[dict[str, float]]:
    """The placement group's bundle per rank: what the rank's actor asks for (CPU, and a GPU), plus its
    role's custom resources, which the actor itself does not ask for: reserving them in the bundle is what
    puts the bundle, and so the actor (also a recreated one), on a node of that role."""
    base = {"CPU": cpus, **({"GPU": 1} if use_gpu else {})}
    return [{**base, **cfg.frontend_resources} for _ in range(cfg.frontends)] + \
        [{**base, **cfg.shard_resources} for _ in range(cfg.shards)]


# How long an idle OpenMP worker of an actor that shares its cores spins before it sleeps (libgomp's spins)
SHORT_SPIN = {"OMP_WAIT_POLICY": "active", "GOMP_SPINCOUNT": "3000"}


def openmp_env(cfg: ClusterConfig, use_gpu: bool) -> dict[str, str]:
    """Environment of the actors' processes for OpenMP. CPU actors that share cores take turns on them. By
    default libgomp's idle workers spin for 300k rounds (about a millisecond) after each parallel region: a
    front-end's spinning worker then holds the core a shard has just been woken to compute on. Sleeping at once
    (passive) costs a futex wake-up at the start of every region instead, dozens a step. A short spin
    (``SHORT_SPIN``) covers the gaps between the regions of a layer and gives the core up within microseconds
    once the front-end waits for the shards. Measured on 2 cores (`tiny`, 1 front-end + 2 shards,
    docs/performance.md): passive over the default, 1530 -> 1890 output tok/s (Intel Xeon); the short spin over
    passive, a decode step 13.4 -> 10.4 ms (mean of 10 alternating runs, AMD EPYC), the `bench` preset's
    unchanged. Left alone with GPUs, with front-ends and shards bound to disjoint cores, and where the
    environment already says."""
    apart = cfg.frontend_cpus and cfg.shard_cpus and not set(cfg.frontend_cpus) & set(cfg.shard_cpus)
    if use_gpu or apart or {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ):
        return {}
    return dict(SHORT_SPIN)


class Cluster:
    def __init__(self, config: ClusterConfig, on_change=None):
        self.config = config
        self.on_change = on_change  # called when the cluster starts or stops serving (see Supervisor)
        self.frontends: list = []
        self.shards: list = []
        self.serve_refs: list = []  # each group member's collective loop, in ``members`` order
        self.members: list[int] = []  # the shards in the process group, in rank order (fewer when degraded)
        self.layout: Placement | None = None  # every shard's experts (the placement over all shards)
        self.epoch = 0  # the layout's: each rebalance adds one
        self.rebalancer = None
        self.pg = None
        self.supervisor: Supervisor | None = None
        self._started_ray = False

    # ---- bring-up ---------------------------------------------------------------------------------------
    def start(self) -> "Cluster":
        self.config = cfg = replace(self.config, checkpoint=checkpoint_or_builtin(self.config.checkpoint))
        self.placement_settings = self._placement_settings()
        self._connect()
        self.use_gpu = self._use_gpu()
        world = cfg.frontends + cfg.shards
        self.cpus = 1.0 if self.use_gpu else cfg.cpus_per_actor  # per actor
        where = "1 GPU" if self.use_gpu else f"{self.cpus} CPU"
        roles = "".join(f", {role} {res}" for role, res in (("front-end", cfg.frontend_resources),
                                                            ("shards", cfg.shard_resources)) if res)
        self._progress(f"placing {world} actors ({where} each, {cfg.placement}{roles})")
        self.pg = placement_group(bundles(cfg, self.cpus, self.use_gpu), strategy=cfg.placement)
        ray.get(self.pg.ready(), timeout=cfg.start_timeout_s)
        self._progress(f"loading experts on {cfg.shards} shard(s) and the rest on {cfg.frontends} front-end(s)")
        self.shards = [self._create(rank) for rank in range(cfg.frontends, world)]
        self.frontends = [self._create(rank) for rank in range(cfg.frontends)]
        # every rank has loaded its weights before any joins: the rendezvous then takes well under its deadline
        ray.get([self.actor(rank).ping.remote() for rank in range(world)], timeout=cfg.start_timeout_s)
        self._check_dtypes()
        reply = ray.get(self.frontend.experts.remote(), timeout=cfg.start_timeout_s)  # the start-up placement
        self.layout, self.members = Placement(reply["num_experts"], reply["layers"]), list(range(cfg.shards))
        self._progress(f"joining the group of {world} ranks")
        self.connect(cfg.start_timeout_s)
        self._progress(f"the ranks talk over {TRANSPORTS[self.backend]}; warming up (a full prefill chunk)")
        ray.get(self.start_frontends(), timeout=cfg.start_timeout_s)  # each returns once warm
        self.supervisor = Supervisor(self, self.on_change).start()
        if cfg.rebalance_interval_s:
            self.rebalancer = Rebalancer(self, cfg.rebalance_interval_s).start()
        self._progress("ready")
        return self

    @property
    def frontend(self):
        """Front-end 0: it opens every rendezvous."""
        return self.frontends[0] if self.frontends else None

    @property
    def world(self) -> int:
        return self.config.frontends + self.config.shards

    @property
    def degraded(self) -> list[int]:
        """The shards left out of the group (lost; their experts served by replicas until they are back)."""
        return [i for i in range(self.config.shards) if i not in self.members]

    def connect(self, timeout_s: float) -> None:
        """One group over every front-end and the shards in ``members``, on a new store at front-end 0, with
        the current ``layout``; starts the shards' loops."""
        cfg = self.config
        world = cfg.frontends + len(self.members)
        self.serve_refs = []  # the last group's loops are over; these are the new group's, once it stands
        self.backend = self._backend(timeout_s)
        host, port, capacity = ray.get(self.frontend.open_store.remote(cfg.collective_timeout_s, world),
                                       timeout=timeout_s)
        args = (self.backend, host, port, cfg.collective_timeout_s)
        group = {"members": self.members, "slots": self.layout.restricted(self.members).slots, "epoch": self.epoch}
        joins = [f.join.remote(*args, capacity, group) for f in self.frontends]
        joins += [self.shards[s].join.remote(world, *args, capacity, position, self.layout.experts_of(s), self.epoch)
                  for position, s in enumerate(self.members)]
        # every join settles (each within the store's deadline) before a failure is raised: a retry must not
        # find a rank still joining this group
        if ray.wait(joins, num_returns=len(joins), timeout=timeout_s)[1]:
            raise TimeoutError(f"the ranks did not join the process group within {timeout_s:.0f} s")
        ray.get(joins)
        self.serve_refs = [self.shards[s].serve.remote() for s in self.members]

    def move_experts(self, layout: Placement, timeout_s: float) -> tuple[int, int]:
        """Stage ``layout`` on every rank while serving (each shard loads the experts that move to it beside
        the ones it serves); the group switches to it at the first header where every rank is ready, between
        two steps. Returns (its epoch, the bytes moved). From here on, a new group starts with it."""
        epoch = self.epoch + 1
        self.layout, self.epoch = layout, epoch
        moved = ray.get([self.shards[s].stage.remote(epoch, layout.experts_of(s)) for s in self.members],
                        timeout=timeout_s)
        slots = layout.restricted(self.members).slots
        ray.get([f.stage.remote(epoch, slots) for f in self.frontends], timeout=timeout_s)
        return epoch, sum(moved)

    def start_frontends(self) -> list:
        """Start (or resume) every front-end's engine, each told who its peers are: refs to wait on."""
        return [f.start.remote([p for p in self.frontends if p is not f]) for f in self.frontends]

    # ---- the actors, by rank ----------------------------------------------------------------------------
    def actor(self, rank: int):
        M = self.config.frontends
        return self.frontends[rank] if rank < M else self.shards[rank - M]

    def is_frontend(self, rank: int) -> bool:
        return rank < self.config.frontends

    def shard_rank(self, shard: int) -> int:
        return self.config.frontends + shard

    def name(self, rank: int) -> str:
        M = self.config.frontends
        return frontend_name(rank) if rank < M else shard_name(rank - M)

    def role(self, rank: int) -> str:
        M = self.config.frontends
        if rank < M:
            return "the front-end" if M == 1 else f"front-end {rank}"
        return f"shard {rank - M}"

    def is_registered(self, rank: int) -> bool:
        """Whether the rank's name still resolves (a dead actor that Ray restarts keeps it)."""
        try:
            ray.get_actor(self.name(rank), namespace=NAMESPACE)
            return True
        except ValueError:
            return False

    def recreate(self, rank: int) -> None:
        """A new actor for a rank that is gone for good, under the same name, in the same bundle."""
        M = self.config.frontends
        if rank < M:
            self.frontends[rank] = self._create(rank)
        else:
            self.shards[rank - M] = self._create(rank)

    def _create(self, rank: int):
        cfg = self.config
        front = self.is_frontend(rank)
        options = dict(name=self.name(rank), namespace=NAMESPACE, max_restarts=-1,
                       num_cpus=self.cpus, num_gpus=1 if self.use_gpu else 0,
                       max_concurrency=1000 if front else 4,
                       scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg,
                                                                            placement_group_bundle_index=rank))
        env = {**openmp_env(cfg, self.use_gpu), **host_memory.actor_env(self.use_gpu)}
        if env:
            options["runtime_env"] = {"env_vars": env}
        if not front:
            return ray.remote(ExpertShard).options(**options).remote(
                cfg.checkpoint, rank - cfg.frontends, cfg.shards, cfg.shard_threads, cfg.dtype,
                self.placement_settings, cfg.frontends, cfg.micro_batches, cfg.shard_cpus)
        return ray.remote(Frontend).options(**options).remote(
            cfg.checkpoint, cfg.shards, cfg.engine, cfg.frontend_threads, cfg.heartbeat_s, cfg.overlap_dense_ffn,
            supervised=True, dtype=cfg.dtype, placement=self.placement_settings, frontend=rank,
            frontends=cfg.frontends, micro_batches=cfg.micro_batches, cpus=cfg.frontend_cpus)

    def _placement_settings(self) -> dict:
        """``placement.build``'s keywords, which every rank gets (a pinned file is read here, once). Checked
        against the model here when the checkpoint is readable from this process (else by the actors)."""
        cfg = self.config
        pinned = cfg.expert_placement
        if isinstance(pinned, str):
            pinned = Placement.read_json(pinned)
        settings = {"redundant": cfg.redundant_experts, "pinned": pinned}
        try:
            model = ModelConfig.from_json(cfg.checkpoint)
        except (OSError, ValueError):
            return settings
        build(model.num_layers, model.num_experts, cfg.shards, **settings)  # raises a PlacementError
        return settings

    def placement(self) -> Placement:
        """The experts' placement over every shard (the one the ranks route by, or will once staged)."""
        return self.layout

    def _backend(self, timeout_s: float) -> str:
        """NCCL with GPUs; for CPUs, shared memory when every rank is on one node (and can use it), else gloo.
        Asked at every (re)connect: a recreated actor may land on another node."""
        if self.use_gpu:
            return "nccl"
        if self.config.transport == "dist":
            return "gloo"
        ranks = [*range(self.config.frontends), *map(self.shard_rank, self.members)]
        where = ray.get([self.actor(rank).where.remote() for rank in ranks], timeout=timeout_s)
        one_host = len({node for node, _ in where}) == 1 and all(ok for _, ok in where)
        if self.config.transport == "shm" and not one_host:
            raise RuntimeError("transport=shm needs every actor on one node with /dev/shm and the CPU kernels; "
                               f"they are on {len({node for node, _ in where})} node(s)")
        return "shm" if one_host else "gloo"

    def _check_dtypes(self) -> None:
        """Every rank computes in the same dtype: the rows on the wire are in it. ``auto`` resolves per actor,
        so actors on machines of different kinds can disagree; then the dtype must be set explicitly."""
        fronts = ray.get([f.model_info.remote() for f in self.frontends])
        infos = [f.to_dict() for f in fronts] + ray.get([s.info.remote() for s in self.shards])
        if len({i["dtype"] for i in infos}) > 1:
            found = ", ".join(f"{self.role(r)} {i['dtype']} ({i['device']}, {i['cpu_isa']})"
                              for r, i in enumerate(infos))
            raise RuntimeError(f"dtype={self.config.dtype} resolved differently on the actors ({found}): set "
                               "dtype to float32 or bfloat16")

    def _connect(self) -> None:
        if ray.is_initialized():
            return
        if self.config.address:
            ray.init(address=self.config.address, namespace=NAMESPACE, log_to_driver=False)
        else:
            self._progress("starting a local Ray cluster")
            ray.init(namespace=NAMESPACE, log_to_driver=False, include_dashboard=False)
            self._started_ray = True

    def _use_gpu(self) -> bool:
        gpus = ray.cluster_resources().get("GPU", 0)
        if self.config.device == "cuda" and gpus < self.world:
            raise RuntimeError(f"device=cuda needs {self.world} GPUs (one per actor), the Ray cluster has {gpus:g}")
        return self.config.device == "cuda" or (self.config.device == "auto" and gpus >= self.world)

    @staticmethod
    def _progress(message: str) -> None:
        print(f"[epserve] {message}", file=sys.stderr, flush=True)

    # ---- use --------------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | dict | None = None) -> list[dict]:
        """Run prompts to completion as one batch, prompt i on front-end i mod M: [{token_ids, finish_reason}]
        in order."""
        params = SamplingParams(**params) if isinstance(params, dict) else params
        M = len(self.frontends)
        parts = ray.get([f.generate.remote(prompts[j::M], params) for j, f in enumerate(self.frontends)])
        return [parts[i % M][i // M] for i in range(len(prompts))]

    def shard_info(self) -> list[dict]:
        return ray.get([s.info.remote() for s in self.shards])

    def stats(self) -> dict:
        return ray.get(self.frontend.stats.remote())

    # ---- shutdown ---------------------------------------------------------------------------------------
    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the engine (the shards leave their loops), then remove actors and placement group."""
        if self.rebalancer is not None:
            self.rebalancer.stop(timeout_s)
            self.rebalancer = None
        if self.supervisor is not None:  # first: stopping is not a failure
            self.supervisor.stop(timeout_s)
            self.supervisor = None
        if self.frontends:
            try:  # every front-end at once: the group stops at the first stop header
                ray.get([f.stop.remote() for f in self.frontends], timeout=timeout_s)
                ray.wait(self.serve_refs, num_returns=len(self.serve_refs), timeout=timeout_s)
            except Exception as e:  # noqa: BLE001 - shut down whatever is left regardless
                log.warning("clean stop failed (%s); killing the actors", e)
        for actor in [*self.frontends, *self.shards]:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        if self.pg is not None:
            remove_placement_group(self.pg)
        self.frontends, self.shards, self.serve_refs, self.pg = [], [], [], None
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.shutdown()
