"""The Ray Serve application: one ingress replica that brings up the cluster (Frontend + ExpertShards),
serves the OpenAI-compatible HTTP API through Serve's HTTP proxy and the gRPC API on its own grpc.aio
server, and reports NOT_SERVING until the cluster is ready, and again while it recovers from a lost actor
(cluster/supervisor.py): requests are then refused as retriable (gRPC UNAVAILABLE, HTTP 503) until it
serves again, or for good once recovery has given up (``/health`` says why).

``serve run deploy/serve.yaml`` and ``epserve serve`` (local.py) run this same application (``build_app``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from fastapi import FastAPI
from ray import serve

from ..fixtures.builtin import checkpoint_or_builtin
from ..launcher import Cluster
from .config import ServerConfig
from .frontend_client import FrontendClient
from .grpc_server import GrpcEndpoint
from .metrics import MetricsEndpoint, metrics_response
from .openai import router
from .state import ServingState, model_name_of
from .tokenizer import Tokenizer

log = logging.getLogger("epserve.serve")
TEARDOWN_S = 60.0  # stopping the gRPC server and the cluster after the drain
app = FastAPI(title="epserve", description="Gemma 4 26B-A4B, expert-parallel on Ray")
app.include_router(router)  # before @serve.ingress, which freezes a copy of the app


def _log_like_serve() -> None:
    """epserve's loggers (one line per request, with its id) write where the replica's Serve logs go."""
    ours, serves = logging.getLogger("epserve"), logging.getLogger("ray.serve")
    ours.setLevel(logging.INFO)
    for handler in serves.handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)
    ours.propagate = False


# Everything the class uses must be defined above it: Serve serializes the class when it is decorated.
@serve.deployment(num_replicas=1, max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0.1},
                  health_check_period_s=5, graceful_shutdown_timeout_s=ServerConfig.drain_s + TEARDOWN_S)
@serve.ingress(app)
class Ingress:
    async def __init__(self, config: ServerConfig):
        _log_like_serve()
        checkpoint = checkpoint_or_builtin(config.cluster.checkpoint)
        self.config, self.cluster_config = config, replace(config.cluster, checkpoint=checkpoint)
        self.state = ServingState(model_name=config.model_name or model_name_of(checkpoint),
                                  tokenizer=Tokenizer.from_checkpoint(checkpoint), token=config.bearer_token())
        self.grpc = GrpcEndpoint(self.state, config.grpc_host, config.grpc_port, tls=config.tls)
        await self.grpc.start()
        log.info("gRPC endpoint on %s:%d (NOT_SERVING until the cluster is ready)", self.grpc.host, self.grpc.port)
        # Prometheus: the whole cluster as one target (metrics.py); a port only when the settings ask
        self.metrics_endpoint = MetricsEndpoint(config.metrics_host, config.metrics_port).start()
        self.cluster: Cluster | None = None
        self.client: FrontendClient | None = None
        self.error: str | None = None
        self._loop = asyncio.get_running_loop()
        self._bringup = self._loop.create_task(self._start_cluster())

    async def _start_cluster(self) -> None:
        # the served app is Serve's copy of ``app`` (self.app, there once __init__ has returned)
        self.app.state.epserve = self.state
        try:
            self.cluster = await asyncio.to_thread(Cluster(self.cluster_config, self._on_cluster_change).start)
            self.metrics_endpoint.cluster = self.cluster
            self.client = FrontendClient(self.cluster.frontends, block_size=self.cluster_config.engine.block_size,
                                         max_migrations=self.config.max_migrations)
            self.metrics_endpoint.client = self.client
            self.state.info = await self.client.model_info()
            await self._follow_cluster()
            log.info("cluster ready: %d front-end(s), %d shard(s), model %s", self.cluster_config.frontends,
                     self.cluster_config.shards, self.state.model_name)
        except Exception as e:  # noqa: BLE001 - surfaced by the health check
            self.error = f"{type(e).__name__}: {e}"
            log.error("cluster start failed: %s", self.error)

    def _on_cluster_change(self, *_) -> None:  # the supervisor's thread: recovering, recovered, given up
        asyncio.run_coroutine_threadsafe(self._follow_cluster(), self._loop).result(timeout=30)

    async def _follow_cluster(self) -> None:
        """Serve exactly while the cluster's supervisor says so (read afresh: calls may come in any order)."""
        if self.client is None:
            return  # still starting: _start_cluster follows once the client is there
        serving = self.cluster.supervisor.serving
        self.client.frontends = list(self.cluster.frontends)  # a recreated front-end is a new actor
        self.state.client = self.client if serving else None
        self.state.stopped = self.cluster.supervisor.failed
        await self.grpc.set_serving(serving and not self.state.draining)

    async def check_health(self) -> None:
        """Serve's health check: failing only for a failed start (starting and recovering are healthy, just
        NOT_SERVING; a cluster that gave up recovering stays NOT_SERVING rather than being restarted)."""
        if self.error:
            raise RuntimeError(self.error)

    @app.get("/health")
    async def health(self) -> dict:
        supervisor = getattr(self.cluster, "supervisor", None)
        return {"status": "SERVING" if self.state.ready and not self.state.draining else "NOT_SERVING",
                "error": self.error or getattr(supervisor, "failed", None),
                "recovering": getattr(supervisor, "recovering", None)}

    @app.get("/stats")
    async def stats(self) -> dict:
        return await self.state.client.stats() if self.state.ready else {}

    @app.get("/metrics")
    async def prometheus_metrics(self):
        return await metrics_response(self.metrics_endpoint)

    async def drain(self, timeout_s: float | None = None) -> dict:
        """Stop admitting (new requests get UNAVAILABLE / 503; health says NOT_SERVING), let the requests in
        flight finish for up to ``timeout_s`` (default: the drain_s setting), then end the rest with
        UNAVAILABLE. Returns how many were in flight and how many were ended."""
        self.state.draining = True
        await self.grpc.set_serving(False)
        client = getattr(self, "client", None)
        in_flight = client.in_flight if client is not None else 0
        timeout_s = self.config.drain_s if timeout_s is None else timeout_s
        ended = await client.drain(timeout_s) if client is not None else 0
        if in_flight:
            log.info("drained: %d request(s) were in flight, %d ended unfinished", in_flight, ended)
        return {"in_flight": in_flight, "ended": ended}

    async def __del__(self):
        if getattr(self, "grpc", None) is not None:  # Serve stops the replica: drain first (at once if drained)
            await self.drain()
        if getattr(self, "metrics_endpoint", None) is not None:
            await asyncio.to_thread(self.metrics_endpoint.stop)
        if getattr(self, "grpc", None) is not None:
            await self.grpc.stop(1.0)
        if getattr(self, "cluster", None) is not None:
            await asyncio.to_thread(self.cluster.shutdown)


def build_app(args: dict | ServerConfig | None = None):
    """Serve application builder (``import_path: epserve.cluster.serve_app:build_app``). ``args``: the
    ServerConfig's fields (config.py), checked here: a setting it does not know fails the build."""
    config = args if isinstance(args, ServerConfig) else ServerConfig.from_dict(args)
    # Serve kills a stopping replica after graceful_shutdown_timeout_s: room for the drain and the teardown
    return Ingress.options(graceful_shutdown_timeout_s=config.drain_s + TEARDOWN_S).bind(config)
