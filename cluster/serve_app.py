"""The Ray Serve application: one ingress replica that brings up the cluster (Frontend + ExpertShards),
serves the OpenAI-compatible HTTP API through Serve's HTTP proxy and the gRPC API on its own grpc.aio
server, and reports NOT_SERVING until the cluster is ready.

``serve run deploy/serve.yaml`` and ``epserve serve`` run this same application (``build_app``).
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI
from ray import serve

from .config import ClusterConfig
from . import openai_api
from .frontend_client import FrontendClient
from .grpc_server import GrpcEndpoint
from .metrics import MetricsEndpoint, metrics_response
from .serving import ServingState

log = logging.getLogger("epserve.serve")
app = FastAPI(title="epserve", description="Gemma 4 26B-A4B, expert-parallel on Ray")
app.include_router(openai_api.router)  # before @serve.ingress, which freezes a copy of the app


def _load_tokenizer(checkpoint: str):
    from .tokenizer import Tokenizer

    return Tokenizer.from_checkpoint(checkpoint)


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
                  health_check_period_s=5, graceful_shutdown_timeout_s=30)
@serve.ingress(app)
class Ingress:
    async def __init__(self, settings: dict | None = None):
        _log_like_serve()
        settings = dict(settings or {})
        self.cluster_config = ClusterConfig.from_dict(settings.get("cluster", {}))
        if self.cluster_config.checkpoint is None:
            from .cli import builtin_checkpoint

            self.cluster_config.checkpoint = str(builtin_checkpoint())
        checkpoint = self.cluster_config.checkpoint
        self.state = ServingState(model_name=settings.get("model_name") or ServingState.name_of(checkpoint),
                                  checkpoint=checkpoint, tokenizer=_load_tokenizer(checkpoint))
        self.grpc = GrpcEndpoint(self.state, settings.get("grpc_host", "127.0.0.1"),
                                 int(settings.get("grpc_port", 50051)))
        await self.grpc.start()
        log.info("gRPC endpoint on %s:%d (NOT_SERVING until the cluster is ready)", self.grpc.host, self.grpc.port)
        # Prometheus: the whole cluster as one target (cluster/metrics.py); a port only when settings ask
        self.metrics_endpoint = MetricsEndpoint(settings.get("metrics_host", "127.0.0.1"),
                                                settings.get("metrics_port")).start()
        self.cluster = None
        self.error: str | None = None
        self._bringup = asyncio.get_running_loop().create_task(self._start_cluster())

    async def _start_cluster(self) -> None:
        from .launcher import Cluster

        try:
            self.cluster = await asyncio.to_thread(Cluster(self.cluster_config).start)
            self.metrics_endpoint.cluster = self.cluster
            client = FrontendClient(self.cluster.frontend)
            self.state.info = await client.model_info()
            # the served app is Serve's copy of ``app`` (self.app); the OpenAI routes read their state there
            self.app.state.epserve = await openai_api.OpenAIState.create(client, self.state.model_name,
                                                                         tokenizer=self.state.tokenizer)
            self.state.client = client
            await self.grpc.set_serving(True)
            log.info("cluster ready: %d shard(s), model %s", self.cluster_config.shards, self.state.model_name)
        except Exception as e:  # noqa: BLE001 - surfaced by the health check
            self.error = f"{type(e).__name__}: {e}"
            log.error("cluster start failed: %s", self.error)

    async def check_health(self) -> None:
        """Serve's health check: failing only for a failed start (starting is healthy, just NOT_SERVING)."""
        if self.error:
            raise RuntimeError(self.error)

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "SERVING" if self.state.ready else "NOT_SERVING", "error": self.error}

    @app.get("/stats")
    async def stats(self) -> dict:
        return await self.state.client.stats() if self.state.ready else {}

    @app.get("/metrics")
    async def prometheus_metrics(self):
        return await metrics_response(self.metrics_endpoint)

    def grpc_address(self) -> str:
        return f"{self.grpc.host}:{self.grpc.port}"

    async def __del__(self):
        if getattr(self, "metrics_endpoint", None) is not None:
            await asyncio.to_thread(self.metrics_endpoint.stop)
        if getattr(self, "grpc", None) is not None:
            await self.grpc.stop(1.0)
        if getattr(self, "cluster", None) is not None:
            await asyncio.to_thread(self.cluster.shutdown)



def build_app(args: dict | None = None):
    """Serve application builder (``import_path: epserve.cluster.serve_app:build_app``). ``args``: cluster
    (ClusterConfig fields), grpc_host, grpc_port, model_name, metrics_host, metrics_port (Prometheus)."""
    return Ingress.bind(dict(args or {}))


class LocalServer:
    """``epserve serve`` / ``epserve demo``: Ray (started here, or joined), Serve's HTTP proxy, the app; then
    waits until the gRPC health service says SERVING. A context manager that shuts everything down."""

    def __init__(self, settings: dict, http_host: str = "127.0.0.1", http_port: int = 8000,
                 address: str | None = None):
        self.settings, self.http_host, self.http_port, self.address = settings, http_host, http_port, address
        self._started_ray = False

    @property
    def grpc_target(self) -> str:
        return f"{self.settings.get('grpc_host', '127.0.0.1')}:{self.settings.get('grpc_port', 50051)}"

    @property
    def metrics_url(self) -> str | None:
        port = self.settings.get("metrics_port")
        return f"http://{self.settings.get('metrics_host', '127.0.0.1')}:{port}/metrics" if port else None

    def start(self, timeout_s: float = 900.0) -> "LocalServer":
        import ray

        if not ray.is_initialized():
            ray.init(address=self.address, namespace="epserve", log_to_driver=False, include_dashboard=False)
            self._started_ray = self.address is None
        serve.start(http_options={"host": self.http_host, "port": self.http_port})
        serve.run(build_app(self.settings), name="epserve", route_prefix="/", blocking=False)
        self.health_seen = wait_serving(self.grpc_target, timeout_s)
        return self

    def shutdown(self) -> None:
        import ray

        try:
            serve.delete("epserve")
            serve.shutdown()
        finally:
            if self._started_ray:
                ray.shutdown()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.shutdown()


def wait_serving(target: str, timeout_s: float) -> list[str]:
    """Poll the standard gRPC health service until SERVING (raises TimeoutError); returns the statuses seen."""
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline, seen = time.monotonic() + timeout_s, []
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
                if not seen or seen[-1] != name:
                    seen.append(name)
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return seen
            except grpc.RpcError:
                pass  # not listening yet
            time.sleep(0.5)
    raise TimeoutError(f"the server at {target} did not become SERVING within {timeout_s:.0f}s")
