"""Bring-up and shutdown of one cluster: a placement group with one bundle per actor, N ExpertShard actors
and a Frontend actor, one process group over them, and the shards' collective loops.

Every actor is named in the ``epserve`` namespace (``epserve-frontend``, ``epserve-shard-<i>``) so that
operators and tests can find them with ``ray.get_actor``.
"""

from __future__ import annotations

import logging
import sys
import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from epserve.actors.expert_shard import ExpertShard
from epserve.actors.frontend import Frontend

from .config import ClusterConfig

NAMESPACE = "epserve"
log = logging.getLogger("epserve.cluster")


def shard_name(i: int) -> str:
    return f"epserve-shard-{i}"


FRONTEND_NAME = "epserve-frontend"


class Cluster:
    def __init__(self, config: ClusterConfig):
        self.config = config
        self.frontend = None
        self.shards: list = []
        self.serve_refs: list = []
        self.pg = None
        self._started_ray = False

    # ---- bring-up ---------------------------------------------------------------------------------------
    def start(self) -> "Cluster":
        cfg = self.config
        if cfg.checkpoint is None:
            from .cli import builtin_checkpoint

            cfg.checkpoint = str(builtin_checkpoint())
        self._connect()
        use_gpu = self._use_gpu()
        world = cfg.shards + 1
        cpus = 1.0 if use_gpu else cfg.cpus_per_actor
        bundle = {"CPU": cpus, **({"GPU": 1} if use_gpu else {})}
        self._progress(f"placing {world} actors ({'1 GPU' if use_gpu else f'{cpus} CPU'} each, {cfg.placement})")
        self.pg = placement_group([bundle] * world, strategy=cfg.placement)
        ray.get(self.pg.ready(), timeout=cfg.start_timeout_s)

        def opts(i, name, concurrency):
            return dict(name=name, namespace=NAMESPACE, num_cpus=cpus, num_gpus=1 if use_gpu else 0,
                        max_concurrency=concurrency, scheduling_strategy=PlacementGroupSchedulingStrategy(
                            self.pg, placement_group_bundle_index=i))

        self._progress(f"loading experts on {cfg.shards} shard(s) and the rest on the front-end")
        self.shards = [ray.remote(ExpertShard).options(**opts(i + 1, shard_name(i), 4)).remote(
            cfg.checkpoint, i, cfg.shards, cfg.shard_threads) for i in range(cfg.shards)]
        self.frontend = ray.remote(Frontend).options(**opts(0, FRONTEND_NAME, 1000)).remote(
            cfg.checkpoint, cfg.shards, cfg.engine, cfg.frontend_threads, cfg.heartbeat_s,
            use_gpu if cfg.overlap_dense_ffn is None else cfg.overlap_dense_ffn)
        backend = "nccl" if use_gpu else "gloo"
        host, port = ray.get(self.frontend.open_store.remote(cfg.collective_timeout_s), timeout=cfg.start_timeout_s)
        self._progress(f"joining the {backend} process group ({world} ranks, store at {host}:{port})")
        joins = [self.frontend.join.remote(backend, host, port, cfg.collective_timeout_s)]
        joins += [s.join.remote(world, backend, host, port, cfg.collective_timeout_s) for s in self.shards]
        ray.get(joins, timeout=cfg.start_timeout_s)
        self.serve_refs = [s.serve.remote() for s in self.shards]
        ray.get(self.frontend.start.remote(), timeout=cfg.start_timeout_s)
        self._progress("ready")
        return self

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
        if self.config.device == "cuda" and gpus < self.config.shards + 1:
            raise RuntimeError(f"device=cuda needs {self.config.shards + 1} GPUs (one per actor), "
                               f"the Ray cluster has {gpus:g}")
        return self.config.device == "cuda" or (self.config.device == "auto" and gpus >= self.config.shards + 1)

    @staticmethod
    def _progress(message: str) -> None:
        print(f"[epserve] {message}", file=sys.stderr, flush=True)

    # ---- use --------------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: dict | None = None) -> list[dict]:
        return ray.get(self.frontend.generate.remote(prompts, params))

    def shard_info(self) -> list[dict]:
        return ray.get([s.info.remote() for s in self.shards])

    def stats(self) -> dict:
        return ray.get(self.frontend.stats.remote())

    # ---- shutdown ---------------------------------------------------------------------------------------
    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the engine (the shards leave their loops), then remove actors and placement group."""
        if self.frontend is not None:
            try:
                ray.get(self.frontend.stop.remote(), timeout=timeout_s)
                ray.wait(self.serve_refs, num_returns=len(self.serve_refs), timeout=timeout_s)
            except Exception as e:  # noqa: BLE001 - shut down whatever is left regardless
                log.warning("clean stop failed (%s); killing the actors", e)
        for actor in [self.frontend, *self.shards]:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        if self.pg is not None:
            remove_placement_group(self.pg)
        self.frontend, self.shards, self.serve_refs, self.pg = None, [], [], None
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.shutdown()


def wait_ready(cluster: Cluster, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ray.get(cluster.frontend.ready.remote()):
        if time.monotonic() > deadline:
            raise TimeoutError("the front-end did not become ready")
        time.sleep(0.1)
