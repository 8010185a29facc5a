"""``epserve serve`` / ``epserve demo``: the Serve application (app.py) run from this process, on a Ray cluster
started here or joined, with Serve's HTTP proxy (HTTPS with the settings' TLS files).

Whatever can be checked here is checked before Ray starts, so that a bad setting is one line and no waiting:
the ports (each must be free to listen on) and, on a Ray cluster started here, the checkpoint. Serve's own
progress lines stay out of the way (its driver-side logger is set to warnings): what this process says is
what it did.
"""

from __future__ import annotations

import logging
import socket
import sys
import time

import ray
from ray import serve

from epserve.actors.model.loader import Checkpoint

from ..launcher import NAMESPACE
from .app import TEARDOWN_S, build_app
from .config import ServerConfig

APP = "epserve"
log = logging.getLogger("epserve.serve")


class LocalServer:
    """Starts the app (``start``: once the checks pass, Ray, Serve's HTTP proxy, the app; then waits until it
    says SERVING) and stops it (``shutdown``: drains first). A context manager."""

    def __init__(self, config: ServerConfig | dict, http_host: str = "127.0.0.1", http_port: int = 8000):
        self.config = config if isinstance(config, ServerConfig) else ServerConfig.from_dict(config)
        self.http_host, self.http_port = http_host, http_port
        self._started_ray = self._deployed = self._up = False

    @property
    def grpc_target(self) -> str:
        return self.config.grpc_target

    @property
    def http_base(self) -> str:
        return f"http://{self.http_host}:{self.http_port}"

    @property
    def metrics_url(self) -> str | None:
        port = self.config.metrics_port
        return f"http://{self.config.metrics_host}:{port}/metrics" if port else None

    def check(self) -> None:
        """What can be found wrong before Ray starts: a busy port; a checkpoint that is not one (only on a Ray
        cluster started here: one that is joined may have it on its own nodes)."""
        cfg = self.config
        check_port_free("gRPC", cfg.grpc_host, cfg.grpc_port, "--grpc-port")
        check_port_free("HTTP", self.http_host, self.http_port, "--http-port")
        check_port_free("metrics", cfg.metrics_host, cfg.metrics_port, "--metrics-port")
        if cfg.cluster.checkpoint is not None and cfg.cluster.address is None:
            Checkpoint(cfg.cluster.checkpoint)  # its config and weight files: a CheckpointError or ConfigError

    def start(self, timeout_s: float = 900.0) -> LocalServer:
        self.check()
        progress("starting Ray, Serve and the cluster (a minute or so the first time) ...")
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its progress lines in this process
        if not ray.is_initialized():
            ray.init(address=self.config.cluster.address, namespace=NAMESPACE, log_to_driver=False,
                     include_dashboard=False, logging_level=logging.WARNING)
            self._started_ray = self.config.cluster.address is None
        tls = self.config.tls
        serve.start(http_options={"host": self.http_host, "port": self.http_port,
                                  **(tls.http_options() if tls else {})})
        self._deployed = True
        serve.run(build_app(self.config), name=APP, route_prefix="/", blocking=False)
        self.health_seen = wait_serving(APP, timeout_s)
        self._up = True
        return self

    def shutdown(self) -> None:
        """Drain (up to the drain_s setting) an app that came up, delete it; then stop Ray when started here
        (which stops Serve with it), else Serve."""
        if not ray.is_initialized():  # start() failed before it connected: nothing runs
            return
        try:
            if self._up:
                try:
                    serve.get_app_handle(APP).drain.remote().result(timeout_s=self.config.drain_s + TEARDOWN_S)
                except Exception as e:  # noqa: BLE001 - stop regardless
                    log.warning("drain failed (%s: %s); stopping anyway", type(e).__name__, e)
            if self._deployed:
                serve.delete(APP)
            if not self._started_ray:
                serve.shutdown()
        finally:
            if self._started_ray:
                ray.shutdown()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.shutdown()


class StartFailed(RuntimeError):
    """The application did not come up (the message says why, in one line)."""


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
    (StartFailed for a failed start, or none within ``timeout_s``); returns the statuses seen."""
    app, deadline, seen = serve.get_app_handle(app_name), time.monotonic() + timeout_s, []
    while time.monotonic() < deadline:
        try:
            health = app.health.remote().result(timeout_s=5)
        except TimeoutError:  # the replica is still being created, or cannot be
            status = serve.status().applications.get(app_name)
            if status is not None and status.status == "DEPLOY_FAILED":
                raise StartFailed(f"the server failed to start: {_last_line(status.message)}") from None
            continue
        if health.get("error"):
            raise StartFailed(f"the server failed to start: {health['error']}")
        if not seen or seen[-1] != health["status"]:
            seen.append(health["status"])
        if health["status"] == "SERVING":
            return seen
        time.sleep(0.5)
    raise StartFailed(f"the server did not become SERVING within {timeout_s:.0f}s")


def _last_line(message: str) -> str:
    """A deployment's failure message is its replica's whole traceback: the exception's line says why."""
    lines = [line for line in (message or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "unknown reason"


def progress(message: str) -> None:
    print(f"[epserve] {message}", file=sys.stderr, flush=True)
