"""One Prometheus scrape target for the whole cluster, served by the Serve ingress replica.

Each actor keeps its own ``CollectorRegistry`` (``epserve.actors.metrics``) and answers ``metrics()`` with its
collected metric families. ``ClusterCollector`` is a prometheus_client collector that, on every scrape, sends
that call to every Frontend and every ExpertShard of the cluster at once (one Ray actor call each, bounded by
``timeout_s``), merges the families by name (a front-end's series carry its ``frontend`` label, a shard's its
``shard`` label) and adds what only the ingress knows:

* ``epserve:frontend_up{frontend}``: the front-end answered and its engine thread runs without error;
* ``epserve:shard_up{shard}``: the shard answered and its collective loop has not failed;
* ``epserve:shard_restarts_total{shard}``: new incarnations of a shard seen (its actor start time changed
  between two scrapes: a Ray restart or a replacement by the cluster);
* from the ingress's ``FrontendClient`` (``client``): ``epserve:routed_requests_total{frontend}``,
  ``epserve:prefix_affinity_routes_total`` and ``epserve:request_migrations_total``;
* from the cluster's Supervisor: ``epserve:recoveries_total``,
  ``epserve:frontend_replacements_total{frontend}``, ``epserve:degraded_recoveries_total`` and
  ``epserve:shards_out_of_group``; from its Rebalancer: ``epserve:rebalances_total`` (the bytes moved are
  each shard's own ``epserve:expert_moved_bytes_total{shard}``).

``MetricsEndpoint`` owns that collector's registry. The ingress replica (``app.py``) starts it:
with ``metrics_port`` set (``epserve serve --metrics-port P``, ``metrics_port`` in ``deploy/serve.yaml``) it
serves http://<metrics_host>:P/metrics from prometheus_client's own threaded HTTP server, and the same text
is served at ``/metrics`` of the Serve HTTP app. Starting it in the replica rather than in the driver means
``serve run deploy/serve.yaml`` exposes it too, and the target lives on the node of the ingress replica: one
target per node that runs an ingress replica (with the one replica of today, one per cluster).

Both always answer in the classic text format (0.0.4), whatever the scraper's Accept header asks:
prometheus_client 0.26's OpenMetrics output turns the colon of ``epserve:`` into ``_`` in sample lines but
not in their HELP/TYPE lines (prometheus/client_python#1177), which Prometheus, asking for OpenMetrics
first, cannot ingest.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

import ray
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from epserve.actors.metrics import counter, gauge, merge

log = logging.getLogger("epserve.metrics")
__all__ = ["ClusterCollector", "MetricsEndpoint", "metrics_response"]


class ClusterCollector(Collector):
    def __init__(self, timeout_s: float = 5.0):
        self.cluster = None  # a launcher.Cluster once it is up
        self.client = None  # the ingress's FrontendClient once it is up (routing and migration counts)
        self.timeout_s = timeout_s
        self._lock = threading.Lock()  # concurrent scrapes: one at a time (restart detection keeps state)
        self._start_times: dict[int, float] = {}
        self._restarts: dict[int, int] = {}

    def collect(self):
        with self._lock:
            return self._collect()

    def _collect(self) -> list:
        cluster = self.cluster
        frontends = list(getattr(cluster, "frontends", None) or [])
        shards = list(getattr(cluster, "shards", None) or []) if frontends else []
        reports = self._ask([*frontends, *shards])
        # before the cluster is up, front-end 0 (every cluster has one) is down: the series exist from the
        # first scrape, so that a slow start is not taken for missing metrics
        front, shard_reports = reports[:len(frontends)] or [None], reports[len(frontends):]
        front_up = {(str(j),): 1.0 if rep is not None and rep.get("ready") else 0.0 for j, rep in enumerate(front)}
        up, restarts = {}, {}
        for i, rep in enumerate(shard_reports):
            up[(str(i),)] = 1.0 if rep is not None and rep.get("error") is None else 0.0
            if rep is not None:
                seen = self._start_times.get(i)
                if seen is not None and rep["start_time"] != seen:
                    self._restarts[i] = self._restarts.get(i, 0) + 1
                self._start_times[i] = rep["start_time"]
            restarts[(str(i),)] = self._restarts.get(i, 0)
        own = [
            gauge("frontend_up", "1 if the front-end answered and its engine runs without error.", front_up,
                  ["frontend"]),
            gauge("shard_up", "1 if the expert shard answered and its collective loop has not failed.", up,
                  ["shard"]),
            counter("shard_restarts", "New incarnations of the shard's actor seen by the ingress.", restarts,
                    ["shard"]),
            *self._ingress_counters(len(front)),
        ]
        return merge([rep["families"] for rep in reports if rep is not None] + [own])

    def _ingress_counters(self, n: int) -> list:
        """Routing and migrations (the client), recoveries (the supervisor): zeros until they exist, so that
        every series is there from the first scrape."""
        client = self.client
        stats = client.router.stats if client is not None else None
        routed = dict(enumerate(stats.routed)) if stats is not None else {}
        recoveries = list(getattr(getattr(self.cluster, "supervisor", None), "recoveries", None) or [])
        replaced = collections.Counter(j for r in recoveries for j in r.frontends_lost)
        rebalancer = getattr(self.cluster, "rebalancer", None)
        return [
            counter("routed_requests", "Requests the ingress sent to each front-end (a request moved off a lost "
                    "front-end counts again where it goes).", _per_frontend(routed, n), ["frontend"]),
            counter("prefix_affinity_routes", "Requests sent to a front-end for the prompt prefix it holds rather "
                    "than for its load.", {(): stats.affinity_hits if stats is not None else 0}, []),
            counter("request_migrations", "Requests moved off a lost front-end to another (or to its "
                    "replacement).", {(): client.migrations if client is not None else 0}, []),
            counter("recoveries", "Recoveries of the cluster from a failure (detection to serving again).",
                    {(): len(recoveries)}, []),
            counter("frontend_replacements", "Recoveries in which the front-end was lost and replaced (the "
                    "requests it held moved).", _per_frontend(replaced, n), ["frontend"]),
            counter("degraded_recoveries", "Recoveries that went on without a lost shard, its experts served by "
                    "replicas on the others.", {(): sum(1 for r in recoveries if r.shards_out)}, []),
            gauge("shards_out_of_group", "Shards left out of the process group (lost; their experts served by "
                  "replicas until they rejoin).", {(): len(getattr(self.cluster, "degraded", None) or [])}, []),
            counter("rebalances", "Expert placements switched to by online rebalancing.",
                    {(): rebalancer.rebalances if rebalancer is not None else 0}, []),
        ]

    def _ask(self, actors: list) -> list[dict | None]:
        """Every actor's ``metrics()`` report, asked at once; None for an actor that failed or was late."""
        refs = []
        for actor in actors:
            try:
                refs.append(actor.metrics.remote())
            except Exception:  # noqa: BLE001 - a dead handle is a down actor
                refs.append(None)
        pending = [r for r in refs if r is not None]
        if pending:
            ray.wait(pending, num_returns=len(pending), timeout=self.timeout_s)
        reports = []
        for ref in refs:
            try:
                reports.append(ray.get(ref, timeout=0) if ref is not None else None)
            except Exception as e:  # noqa: BLE001 - dead, restarting, or slower than timeout_s
                log.debug("metrics call failed: %s", e)
                reports.append(None)
        return reports


def _per_frontend(values: dict[int, float], n: int) -> dict[tuple, float]:
    """``values`` by front-end index, for each of the ``n`` front-ends (0 where absent)."""
    return {(str(j),): values.get(j, 0) for j in range(n)}


def _collector_attribute(name: str) -> property:
    """An attribute of the endpoint that is its collector's (the ingress sets it once the cluster is up)."""
    return property(lambda self: getattr(self.collector, name),
                    lambda self, value: setattr(self.collector, name, value))


class MetricsEndpoint:
    """The ingress replica's scrape target: ``start()`` serves http://host:port/metrics when a port is set
    (0 picks a free one); ``render()`` is the same text for the Serve app's ``/metrics`` route."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, timeout_s: float = 5.0):
        self.collector = ClusterCollector(timeout_s)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self.host, self.port = host, port
        self._server = None

    cluster = _collector_attribute("cluster")
    client = _collector_attribute("client")

    def start(self) -> "MetricsEndpoint":
        if self.port is not None and self._server is None:
            self._server = make_server(self.host, int(self.port), _text_format(make_wsgi_app(self.registry)),
                                       ThreadingWSGIServer, handler_class=_QuietHandler)
            self.port = self._server.server_port
            threading.Thread(target=self._server.serve_forever, name="epserve-metrics", daemon=True).start()
            log.info("Prometheus metrics on %s", self.url)
        return self

    @property
    def url(self) -> str | None:
        return f"http://{self.host}:{self.port}/metrics" if self._server is not None else None

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _text_format(app):
    """The WSGI app without content negotiation: the classic text format (see the module's docstring)."""

    def text_only(environ, start_response):
        return app({k: v for k, v in environ.items() if k != "HTTP_ACCEPT"}, start_response)

    return text_only


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # no line per scrape
        pass


async def metrics_response(endpoint: MetricsEndpoint):
    """The Serve app's ``/metrics`` route: the same text as the metrics port, rendered off the event loop."""
    return Response(await asyncio.to_thread(endpoint.render), media_type=CONTENT_TYPE_LATEST)
