"""The Ray Serve application: one ingress replica that brings up the cluster (Frontend + ExpertShards),
serves the OpenAI-compatible HTTP API through Serve's HTTP proxy and the gRPC API on its own grpc.aio
server, and reports NOT_SERVING until the cluster is ready, and again while it recovers from a lost actor
(cluster/supervisor.py): requests are then refused as retriable (gRPC UNAVAILABLE, HTTP 503) until it
serves again, or for good once recovery has given up (``/health`` says why).

``serve run deploy/serve.yaml`` and ``epserve serve`` run this same application (``build_app``).
"""

from __future__ import annotations

import asyncio
import logging
import socket

from fastapi import FastAPI
from ray import serve

from .config import ClusterConfig
from . import openai_api
from .frontend_client import FrontendClient
from .grpc_server import GrpcEndpoint
from .metrics import MetricsEndpoint, metrics_response
from .security import BearerToken, TLSFiles
from .serving import ServingState

log = logging.getLogger("epserve.serve")
DRAIN_S = 30.0  # how long requests in flight may run on once shutdown begins
TEARDOWN_S = 60.0  # stopping the gRPC server and the cluster after the drain
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
                  health_check_period_s=5, graceful_shutdown_timeout_s=DRAIN_S + TEARDOWN_S)
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
                                  checkpoint=checkpoint, tokenizer=_load_tokenizer(checkpoint),
                                  token=BearerToken.from_settings(settings))
        self.drain_s = float(settings.get("drain_s", DRAIN_S))
        self.grpc = GrpcEndpoint(self.state, settings.get("grpc_host", "127.0.0.1"),
                                 int(settings.get("grpc_port", 50051)), tls=TLSFiles.from_settings(settings),
                                 token=self.state.token)
        await self.grpc.start()
        log.info("gRPC endpoint on %s:%d (NOT_SERVING until the cluster is ready)", self.grpc.host, self.grpc.port)
        # Prometheus: the whole cluster as one target (cluster/metrics.py); a port only when settings ask
        self.metrics_endpoint = MetricsEndpoint(settings.get("metrics_host", "127.0.0.1"),
                                                settings.get("metrics_port")).start()
        self.cluster = None
        self.client: FrontendClient | None = None
        self.error: str | None = None
        self._loop = asyncio.get_running_loop()
        self._bringup = asyncio.get_running_loop().create_task(self._start_cluster())

    async def _start_cluster(self) -> None:
        from .launcher import Cluster

        try:
            self.cluster = await asyncio.to_thread(Cluster(self.cluster_config, self._on_cluster_change).start)
            self.metrics_endpoint.cluster = self.cluster
            self.client = FrontendClient(self.cluster.frontend)
            self.state.info = await self.client.model_info()
            # the served app is Serve's copy of ``app`` (self.app); the OpenAI routes read their state there
            self.app.state.epserve = await openai_api.OpenAIState.create(self.client, self.state.model_name,
                                                                         tokenizer=self.state.tokenizer,
                                                                         token=self.state.token)
            await self._follow_cluster()
            log.info("cluster ready: %d shard(s), model %s", self.cluster_config.shards, self.state.model_name)
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
        self.client.frontend = self.cluster.frontend  # a recreated front-end is a new actor
        self.state.client = self.client if serving else None
        self.app.state.epserve.client = self.client if serving else None
        self.state.stopped = self.app.state.epserve.stopped = self.cluster.supervisor.failed
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

    def grpc_address(self) -> str:
        return f"{self.grpc.host}:{self.grpc.port}"

    async def drain(self, timeout_s: float | None = None) -> dict:
        """Stop admitting (new requests get UNAVAILABLE / 503; health says NOT_SERVING), let the requests in
        flight finish for up to ``timeout_s`` (default: the drain_s setting), then end the rest with
        UNAVAILABLE. Returns how many were in flight and how many were ended."""
        self.state.draining = True
        if getattr(self.app.state, "epserve", None) is not None:
            self.app.state.epserve.draining = True
        await self.grpc.set_serving(False)
        client = getattr(self, "client", None)
        in_flight = client.in_flight if client is not None else 0
        ended = await client.drain(self.drain_s if timeout_s is None else timeout_s) if client is not None else 0
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



def build_app(args: dict | None = None):
    """Serve application builder (``import_path: epserve.cluster.serve_app:build_app``). ``args``: cluster
    (ClusterConfig fields), grpc_host, grpc_port, model_name, metrics_host, metrics_port (Prometheus),
    drain_s (graceful shutdown), tls_cert_file and tls_key_file (gRPC over TLS), auth_token_file or
    auth_token_env (where the bearer token is: a file, or an environment variable of the replica)."""
    args = dict(args or {})
    # Serve kills a stopping replica after graceful_shutdown_timeout_s: room for the drain and the teardown
    drain_s = float(args.get("drain_s", DRAIN_S))
    return Ingress.options(graceful_shutdown_timeout_s=drain_s + TEARDOWN_S).bind(args)


class LocalServer:
    """``epserve serve`` / ``epserve demo``: once the gRPC and metrics ports are known to be free here, Ray
    (started here, or joined), Serve's HTTP proxy (HTTPS with the settings' TLS files), the app; then waits
    until the app says SERVING. A context manager that shuts everything down, draining first."""

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

        settings = self.settings
        check_port_free("gRPC", settings.get("grpc_host", "127.0.0.1"), settings.get("grpc_port", 50051),
                        "--grpc-port")
        check_port_free("metrics", settings.get("metrics_host", "127.0.0.1"), settings.get("metrics_port"),
                        "--metrics-port")
        if not ray.is_initialized():
            ray.init(address=self.address, namespace="epserve", log_to_driver=False, include_dashboard=False)
            self._started_ray = self.address is None
        tls = TLSFiles.from_settings(self.settings)
        serve.start(http_options={"host": self.http_host, "port": self.http_port,
                                  **(tls.http_options() if tls else {})})
        serve.run(build_app(self.settings), name="epserve", route_prefix="/", blocking=False)
        self.health_seen = wait_serving("epserve", timeout_s)
        return self

    def shutdown(self) -> None:
        """Drain (up to the drain_s setting), then delete the app, stop Serve, and Ray when started here."""
        import ray

        if not ray.is_initialized():  # start() failed before it connected: nothing runs
            return
        try:
            drain_s = float(self.settings.get("drain_s", DRAIN_S))
            try:
                serve.get_app_handle("epserve").drain.remote().result(timeout_s=drain_s + TEARDOWN_S)
            except Exception as e:  # noqa: BLE001 - an app that never came up has nothing to drain
                log.warning("drain failed (%s: %s); stopping anyway", type(e).__name__, e)
            serve.delete("epserve")
            serve.shutdown()
        finally:
            if self._started_ray:
                ray.shutdown()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.shutdown()


class PortUnavailable(ValueError):
    """A port of the settings that cannot be listened on: a bad setting (the CLI prints it as one line)."""


def check_port_free(what: str, host: str, port: int | None, option: str) -> None:
    """Fail at once, naming the port, when nothing can listen on host:port here (port 0 or None: none asked).
    Else the replica's constructor would fail, and Serve retry it, while the caller waits for SERVING; or,
    for gRPC, whose servers bind with SO_REUSEPORT, the replica would share the port with another gRPC server
    (an earlier epserve, say), which would then answer part of the calls and health checks."""
    if not port:
        return
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections in TIME_WAIT do not count
            probe.bind((host, int(port)))
    except OSError as e:
        raise PortUnavailable(f"cannot listen on {host}:{port} for {what}: {e.strerror or e} (choose another "
                              f"port with {option})") from None


def wait_serving(app_name: str, timeout_s: float) -> list[str]:
    """Poll the app's health (through its Serve handle, whatever the transport security) until SERVING
    (raises TimeoutError, or RuntimeError for a failed start); returns the statuses seen."""
    import time

    app, deadline, seen = serve.get_app_handle(app_name), time.monotonic() + timeout_s, []
    while time.monotonic() < deadline:
        try:
            health = app.health.remote().result(timeout_s=5)
        except TimeoutError:  # the replica is still being created, or cannot be
            status = serve.status().applications.get(app_name)
            if status is not None and status.status == "DEPLOY_FAILED":
                raise RuntimeError(f"the server failed to start: {status.message}") from None
            continue
        if health.get("error"):
            raise RuntimeError(f"the server failed to start: {health['error']}")
        if not seen or seen[-1] != health["status"]:
            seen.append(health["status"])
        if health["status"] == "SERVING":
            return seen
        time.sleep(0.5)
    raise TimeoutError(f"the server did not become SERVING within {timeout_s:.0f}s")
