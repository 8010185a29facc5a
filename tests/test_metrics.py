"""Observability end to end, with real components only.

* The alert rules pass ``promtool check rules`` and their unit tests (``promtool test rules``), and the local
  scrape config passes ``promtool check config``.
* The Grafana dashboard takes its datasource from the ``${datasource}`` variable, shows every metric, and has
  panels per front-end.
* A live 2-shard cluster (the real Serve app via ``LocalServer``, with its metrics port) serves a few gRPC
  requests while Debian's ``prometheus`` binary scrapes its one target every second; then every dashboard
  expression and every alert expression is evaluated through Prometheus' HTTP API and returns data, and the
  scraped values are checked exactly: token and request counters against what the gRPC client received,
  per-expert and per-shard counts against an independent count of the router's choices (the same prompts
  through the in-process engine with a recording expert executor). Then a cancelled request counts as
  aborted, and last a killed shard shows as down, the engine error is counted, EngineErrors fires and
  ShardDown goes pending.
* A shard actor restarted by Ray is counted in ``epserve:shard_restarts_total`` by the ingress's collector.
* Two front-ends (a cluster of 2 front-ends and 1 shard, with the ingress's client and metrics endpoint in this
  process, scraped by its own Prometheus): every series a front-end exports carries its ``frontend`` label, the
  ingress's per-front-end series are there for both, the routed-request counts are the client's router's, and
  every dashboard and alert expression evaluates, the per-front-end panels with a series per front-end.

Grafana's own variables are replaced for Prometheus: ``$__rate_interval`` by 1m, ``$__range`` by 5m.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
import ray
import torch
import yaml

from epserve.actors.placement import expert_ranges
from epserve.actors.engine.config import EngineConfig
from epserve.actors.engine.engine import LLMEngine
from epserve.actors.engine.sampling import SamplingParams
from epserve.actors.model.config import FULL, SLIDING
from epserve.actors.model import precision
from epserve.actors.model.gemma4 import LocalExperts
from epserve.cluster.api import inference_pb2 as pb
from epserve.cluster.api import inference_pb2_grpc as pb_grpc
from epserve.cluster.serving.local import LocalServer

from helpers import free_port, missing_tool

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "epserve-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
SCRAPE_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
NO_PROMETHEUS = missing_tool("prometheus", "Debian's prometheus package, with promtool: apt-get install -y "
                             "prometheus (.ci/run installs it)")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMETHEUS)
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason=NO_PROMETHEUS)

# Every metric the target exports (counters by their sample name) and its type; each has a dashboard panel.
COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
METRICS = {
    "epserve:request_success_total": COUNTER, "epserve:prompt_tokens_total": COUNTER,
    "epserve:generation_tokens_total": COUNTER, "epserve:time_to_first_token_seconds": HISTOGRAM,
    "epserve:inter_token_latency_seconds": HISTOGRAM, "epserve:e2e_request_latency_seconds": HISTOGRAM,
    "epserve:request_queue_time_seconds": HISTOGRAM, "epserve:request_prompt_tokens": HISTOGRAM,
    "epserve:request_generation_tokens": HISTOGRAM, "epserve:num_requests_running": GAUGE,
    "epserve:num_requests_waiting": GAUGE, "epserve:kv_cache_usage_perc": GAUGE,
    "epserve:num_preemptions_total": COUNTER, "epserve:engine_step_seconds": HISTOGRAM,
    "epserve:iteration_tokens_total": HISTOGRAM, "epserve:engine_errors_total": COUNTER,
    "epserve:prefix_cache_hits_total": COUNTER, "epserve:prefix_cache_queries_total": COUNTER,
    "epserve:expert_tokens_total": COUNTER, "epserve:shard_tokens_total": COUNTER,
    "epserve:shard_balancedness": GAUGE, "epserve:moe_dispatch_seconds": HISTOGRAM,
    "epserve:moe_combine_seconds": HISTOGRAM, "epserve:moe_dispatch_bytes_total": COUNTER,
    "epserve:shard_rows_served_total": COUNTER, "epserve:shard_steps_total": COUNTER,
    "epserve:shard_compute_seconds": HISTOGRAM, "epserve:frontend_up": GAUGE, "epserve:shard_up": GAUGE,
    "epserve:shard_restarts_total": COUNTER, "epserve:model_info": GAUGE,
    "epserve:layer_shard_tokens_total": COUNTER, "epserve:expert_replicas": GAUGE,
    "epserve:routed_requests_total": COUNTER, "epserve:prefix_affinity_routes_total": COUNTER,
    "epserve:request_migrations_total": COUNTER, "epserve:recoveries_total": COUNTER,
    "epserve:frontend_replacements_total": COUNTER, "epserve:degraded_recoveries_total": COUNTER,
    "epserve:shards_out_of_group": GAUGE, "epserve:rebalances_total": COUNTER,
    "epserve:expert_moved_bytes_total": COUNTER, "epserve:placement_epoch": GAUGE,
}
UNSHOWN = {"epserve:shard_start_time_seconds": GAUGE}  # exported for restart detection only
# The series without a ``frontend`` label: the shards' own and the ingress's cluster-wide counts; every other
# series is a front-end's (or the ingress's about one front-end)
NOT_PER_FRONTEND = {"epserve:shard_rows_served_total", "epserve:shard_steps_total", "epserve:shard_compute_seconds",
                    "epserve:shard_start_time_seconds", "epserve:shard_up", "epserve:shard_restarts_total",
                    "epserve:prefix_affinity_routes_total", "epserve:request_migrations_total",
                    "epserve:recoveries_total", "epserve:degraded_recoveries_total", "epserve:shards_out_of_group",
                    "epserve:rebalances_total", "epserve:expert_moved_bytes_total", "epserve:placement_epoch"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "5m", "$__interval": "5s"}


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, Grafana variables replaced."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for t in panel.get("targets", []):
            expr = t["expr"]
            for var, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(var, value)
            out.append((panel["title"], expr))
    return out


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def metric_names(text: str) -> set[str]:
    return set(re.findall(r"epserve:[a-z0-9_]+", text))


def base_name(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and METRICS.get(name[: -len(suffix)]) == HISTOGRAM:
            return name[: -len(suffix)]
    return name


# ------------------------------------------------------------------------------------------ static checks


@needs_promtool
def test_promtool_checks_rules_config_and_alert_unit_tests():
    for args in (["check", "rules", str(ALERTS)], ["test", "rules", str(ALERT_TESTS)],
                 ["check", "config", str(SCRAPE_CONFIG)]):
        run = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, f"promtool {' '.join(args)}:\n{run.stdout}\n{run.stderr}"
    fired = {t["alertname"] for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
             for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert fired == {r["alert"] for r in alert_rules()}, "every alert has a unit test that fires it"


def test_dashboard_uses_the_datasource_variable_and_shows_every_metric():
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"]), p["title"]
    shown = {base_name(n) for _, e in dashboard_exprs() for n in metric_names(e)}
    assert set(METRICS) - shown == set(), "metrics without a panel"
    assert shown - set(METRICS) == set(), "panels on metrics that do not exist"
    kinds = {(p["type"], n) for p in panels for t in p["targets"] for n in metric_names(t["expr"])}
    assert ("heatmap", "epserve:expert_tokens_total") in kinds
    assert ("heatmap", "epserve:layer_shard_tokens_total") in kinds
    assert any(n == "epserve:shard_balancedness" for _, n in kinds)
    per_frontend = {n for p in panels for t in p["targets"] if "by (frontend)" in t["expr"]
                    for n in metric_names(t["expr"])}
    assert per_frontend >= {"epserve:num_requests_running", "epserve:num_requests_waiting",
                            "epserve:generation_tokens_total", "epserve:kv_cache_usage_perc"}
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_a_restarted_shard_is_counted(ray_session, tiny_dir):
    """Ray restarts a shard actor (max_restarts): the ingress's collector sees a new incarnation."""
    from types import SimpleNamespace

    from epserve.actors.expert_shard import ExpertShard
    from epserve.actors.frontend import Frontend
    from epserve.cluster.serving.metrics import MetricsEndpoint

    frontend = ray.remote(Frontend).options(num_cpus=0.1).remote(str(tiny_dir), 0)
    shards = [ray.remote(ExpertShard).options(num_cpus=0.1, max_restarts=1, max_task_retries=0).remote(
        str(tiny_dir), i, 2) for i in range(2)]
    endpoint = MetricsEndpoint(timeout_s=30)
    endpoint.cluster = SimpleNamespace(frontends=[frontend], shards=shards)

    def scrape() -> dict[str, float]:
        return {f"{s.name}{s.labels}": s.value for fam in endpoint.collector.collect() for s in fam.samples
                if s.name in ("epserve:shard_up", "epserve:shard_restarts_total", "epserve:frontend_up")}

    try:
        first = scrape()
        assert first["epserve:shard_up{'shard': '1'}"] == 1.0
        assert first["epserve:shard_restarts_total{'shard': '1'}"] == 0.0
        assert first["epserve:frontend_up{'frontend': '0'}"] == 0.0  # its engine thread was never started
        ray.kill(shards[1], no_restart=False)
        deadline, now = time.monotonic() + 60, first
        while now["epserve:shard_restarts_total{'shard': '1'}"] == 0:
            assert time.monotonic() < deadline, now
            time.sleep(0.5)
            now = scrape()
        assert now["epserve:shard_up{'shard': '1'}"] == 1.0  # back, as a new incarnation
        assert now["epserve:shard_restarts_total{'shard': '1'}"] == 1.0
        assert now["epserve:shard_restarts_total{'shard': '0'}"] == 0.0
    finally:
        for actor in [frontend, *shards]:
            ray.kill(actor, no_restart=True)


# ------------------------------------------------------------------------------------------ live cluster

# (prompt, max_tokens): distinct first blocks, so the prefix cache never hits and counts are exact
LOAD = [([2, 17, 300, 42], 10), ([5, 6, 7, 8, 9] * 8, 8), ([100, 3], 12), (list(range(30, 66)), 6)]
STOP_PROMPT, STOP_MAX = [900, 12, 77, 13, 5], 12  # a request that ends on a stop token


class RecordingExperts(LocalExperts):
    """Local experts that remember every layer's routing (as tests/test_cluster.py's)."""

    def __init__(self, layers):
        super().__init__(layers)
        self.ids = []

    def dispatch(self, layer, x, ids, w):
        self.ids.append(ids.clone())
        return super().dispatch(layer, x, ids, w)


class Prometheus:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path):
        self.url, self.proc, self.log = url, proc, log

    def api(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}" + (f"?{query}" if query else ""),
                                    timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        try:
            data = self.api("query", query=expr)
        except urllib.error.HTTPError as e:  # a bad expression: Prometheus says why
            raise AssertionError(f"{expr}: {e.read().decode()}") from None
        assert data["resultType"] == "vector", (expr, data["resultType"])
        return data["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def by_label(self, expr: str, label: str) -> dict[str, float]:
        return {r["metric"][label]: float(r["value"][1]) for r in self.query(expr)}

    def wait_for(self, expr: str, want: float | None = None, timeout_s: float = 30.0) -> float:
        """Poll until ``expr`` has a value (equal to ``want`` if given); bounded."""
        deadline, got = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            got = self.value(expr)
            if got is not None and (want is None or got == want):
                return got
            time.sleep(0.25)
        raise AssertionError(f"{expr} = {got} after {timeout_s:.0f}s, want {want}\n{self.log_tail()}")

    def targets(self) -> list:
        return [(t["scrapeUrl"], t["health"], t["lastError"]) for t in self.api("targets")["activeTargets"]]

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text().splitlines()[-15:]) if self.log.exists() else ""


# A small engine: 4 requests run at once and the full-attention cache holds 32 blocks of 16 tokens (one
# request of max_model_len), so a burst of 8 long requests makes requests wait and preempts some
ENGINE = {"max_model_len": 512, "max_num_seqs": 4, "num_blocks": {FULL: 32, SLIDING: 64}}


@pytest.fixture(scope="module")
def server(ray_session, tiny_dir):
    settings = {"cluster": {"checkpoint": str(tiny_dir), "shards": 2, "collective_timeout_s": 10, "dtype": "float32",
                            "heartbeat_s": 0.5, "max_failures": 0,  # a killed shard stays down
                            "engine": ENGINE},
                "grpc_port": free_port(), "metrics_port": free_port()}
    srv = LocalServer(settings, "127.0.0.1", free_port()).start(timeout_s=300)
    yield srv
    srv.shutdown()


@contextlib.contextmanager
def scraping(target: str, work: Path):
    """Debian's prometheus scraping ``target`` (and evaluating the alert rules) every second, from when it has
    scraped every front-end up until the block ends."""
    config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(ALERTS)],
              "scrape_configs": [{"job_name": "epserve", "static_configs": [{"targets": [target]}]}]}
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port, log = free_port(), work / "prometheus.log"
    with log.open("w") as out:
        proc = subprocess.Popen([PROMETHEUS, f"--config.file={work / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=out, stderr=subprocess.STDOUT)
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + 30
        while True:  # ready and scraping our target
            try:
                if prom.value('up{job="epserve"}') == 1.0 and prom.value("min(epserve:frontend_up)") == 1.0:
                    break
            except (OSError, AssertionError):
                pass
            assert proc.poll() is None, f"prometheus exited:\n{prom.log_tail()}"
            assert time.monotonic() < deadline, f"prometheus did not scrape {target}: {prom.targets()}"
            time.sleep(0.25)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    if PROMETHEUS is None:
        pytest.skip(NO_PROMETHEUS)
    with scraping(f"127.0.0.1:{server.config.metrics_port}", tmp_path_factory.mktemp("prometheus")) as prom:
        yield prom


@pytest.fixture(scope="module")
def load(server, prometheus, tiny_model):
    """A few gRPC requests, one at a time (each engine step holds one request, as in the reference run),
    and the independent reference: the same requests through the in-process engine, recording the router."""
    cfg = tiny_model.cfg
    probe = LLMEngine(tiny_model, EngineConfig(max_model_len=512)).generate(
        [STOP_PROMPT], SamplingParams(max_tokens=STOP_MAX, ignore_eos=True))[0].token_ids
    stop_token = next((t for i, t in enumerate(probe) if i and t not in probe[:i]), probe[0])
    requests = [(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p, n in LOAD]
    requests.append((STOP_PROMPT, SamplingParams(max_tokens=STOP_MAX, ignore_eos=True,
                                                 stop_token_ids=[stop_token])))
    recorder = RecordingExperts(tiny_model.layers)
    engine = LLMEngine(tiny_model, EngineConfig(max_model_len=512), experts=recorder)
    want = [engine.generate([p], sp)[0] for p, sp in requests]
    assert want[-1].finish_reason == "stop"

    got = []
    t0 = time.monotonic()
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        for prompt, sp in requests:
            req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingParams(
                max_tokens=sp.max_tokens, ignore_eos=True, stop_token_ids=list(sp.stop_token_ids)))
            pieces = list(stub.Generate(req, timeout=60))
            got.append(([t for piece in pieces for t in piece.token_ids], pieces[-1].finish_reason))
    load_s = time.monotonic() - t0
    assert [g[0] for g in got] == [w.token_ids for w in want]
    assert [g[1] for g in got] == [pb.FINISH_REASON_LENGTH] * len(LOAD) + [pb.FINISH_REASON_STOP]

    generated = sum(len(g[0]) for g in got)
    prometheus.wait_for("epserve:generation_tokens_total", generated)  # the last scrape saw the whole load
    prometheus.wait_for("epserve:num_requests_running", 0.0)
    L, N = cfg.num_layers, 2
    shard_of = torch.tensor([s for s, (_, c) in enumerate(expert_ranges(cfg.num_experts, N)) for _ in range(c)])
    rows = torch.zeros(L, N, dtype=torch.long)  # [layer, shard]: tokens that need the shard
    for i, ids in enumerate(recorder.ids):  # recorded in step order, layer by layer
        hits = torch.zeros(ids.shape[0], N, dtype=torch.bool).scatter_(1, shard_of[ids], True)
        rows[i % L] += hits.sum(0)
    balance = [max(r) / (sum(r) / N) for r in rows.tolist()]
    return {"requests": requests, "got": got, "generated": generated, "load_s": load_s, "cfg": cfg,
            "exchanges": len(recorder.ids), "rows": rows, "balancedness": sum(balance) / len(balance),
            "experts": torch.bincount(torch.cat([i.reshape(-1) for i in recorder.ids]),
                                      minlength=cfg.num_experts).tolist()}


def assert_dashboard_and_alerts_work(prometheus: Prometheus) -> None:
    """Right after a load: every dashboard expression returns finite data; every alert expression evaluates and
    judges series; Prometheus evaluates every rule without error and none fires; every documented metric, and
    no other, is scraped."""
    empty, nan = [], []
    for title, expr in dashboard_exprs():
        result = prometheus.query(expr)
        if not result:
            empty.append((title, expr))
        elif not all(math.isfinite(float(r["value"][1])) for r in result):
            nan.append((title, expr))
    assert not empty, f"dashboard expressions without data: {empty}"
    assert not nan, f"dashboard expressions with NaN/Inf under load: {nan}"
    for rule in alert_rules():
        prometheus.query(rule["expr"])  # valid and evaluates (empty: not firing)
        # the same expression with every threshold comparison as a `bool` one returns the series it judges
        judged = re.sub(r"(>|<|==)\s*(\d+(\.\d+)?)", r"\1 bool \2", rule["expr"])
        if rule["expr"].lstrip().startswith("absent("):
            assert prometheus.query(judged) == [], "the metrics are present: absent() is empty"
        else:
            assert prometheus.query(judged), f"{rule['alert']}: no series to judge in {judged}"
    deadline = time.monotonic() + 20
    while True:  # Prometheus itself evaluates the rule file every second
        rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        if len(rules) == len(alert_rules()) and all(r["health"] == "ok" for r in rules):
            break
        health = [(r["name"], r["health"], r.get("lastError")) for r in rules]
        assert time.monotonic() < deadline, f"rules not healthy: {health}"
        time.sleep(0.5)
    firing = [a for a in prometheus.api("alerts")["alerts"] if a["state"] == "firing"]
    assert firing == [], f"alerts firing on a healthy cluster: {firing}"
    for name, kind in {**METRICS, **UNSHOWN}.items():
        selector = name + "_count" if kind == HISTOGRAM else name
        assert prometheus.query(selector), f"{name} is not scraped"
    scraped = {n for n in prometheus.api("label/__name__/values") if n.startswith("epserve:")}
    assert {base_name(n) for n in scraped} == set(METRICS) | set(UNSHOWN), "the documented list is complete"


# ------------------------------------------------------------------------------------------ two front-ends
# Before the tests below start the module's cluster (``server``): a cluster's actors have fixed names, so only
# one runs at a time.


@needs_prometheus
def test_two_frontends_label_their_series_and_fill_the_per_frontend_panels(ray_session, tiny_dir, tmp_path):
    from epserve.cluster.config import ClusterConfig
    from epserve.cluster.launcher import Cluster
    from epserve.cluster.serving.frontend_client import FrontendClient
    from epserve.cluster.serving.metrics import MetricsEndpoint

    async def send(client: FrontendClient) -> list[int]:  # the LOAD at once: both front-ends get some
        async def one(i: int, prompt: list[int], n: int) -> int:
            params = SamplingParams(max_tokens=n, ignore_eos=True)
            return sum([len(out.new_token_ids) async for out in client.stream(prompt, params, f"fe-{i}")])

        return await asyncio.gather(*(one(i, p, n) for i, (p, n) in enumerate(LOAD)))

    with contextlib.ExitStack() as stack:
        cluster = Cluster(ClusterConfig(checkpoint=str(tiny_dir), frontends=2, shards=1, dtype="float32")).start()
        stack.callback(cluster.shutdown)
        client = FrontendClient(cluster.frontends, block_size=cluster.config.engine.block_size)
        endpoint = MetricsEndpoint(port=free_port(), timeout_s=30).start()
        stack.callback(endpoint.stop)
        endpoint.cluster, endpoint.client = cluster, client  # as the ingress does
        P = stack.enter_context(scraping(f"127.0.0.1:{endpoint.port}", tmp_path))
        assert asyncio.run(send(client)) == [n for _, n in LOAD]
        P.wait_for("sum(epserve:generation_tokens_total)", sum(n for _, n in LOAD))
        P.wait_for("sum(epserve:num_requests_running)", 0.0)

        labels: dict[str, set[str]] = {}
        for r in P.query('group by (__name__, frontend) ({__name__=~"epserve:.+"})'):
            labels.setdefault(base_name(r["metric"]["__name__"]), set()).add(r["metric"].get("frontend"))
        assert labels == {n: {None} if n in NOT_PER_FRONTEND else {"0", "1"} for n in {**METRICS, **UNSHOWN}}
        assert P.by_label("epserve:frontend_up", "frontend") == {"0": 1.0, "1": 1.0}
        routed = P.by_label("epserve:routed_requests_total", "frontend")
        assert routed == {str(j): float(n) for j, n in enumerate(client.router.stats.routed)}
        assert sum(routed.values()) == len(LOAD) and min(routed.values()) >= 1
        assert P.value("epserve:prefix_affinity_routes_total") == client.router.stats.affinity_hits
        assert P.by_label("epserve:request_success_total{finished_reason='length'}", "frontend") == routed
        for name in ("request_migrations_total", "recoveries_total"):
            assert P.value(f"epserve:{name}") == 0, name
        assert P.by_label("epserve:frontend_replacements_total", "frontend") == {"0": 0.0, "1": 0.0}
        for title, expr in dashboard_exprs():  # the per-front-end panels: a series for each
            if "by (frontend)" in expr:
                assert {r["metric"]["frontend"] for r in P.query(expr)} == {"0", "1"}, (title, expr)
        assert_dashboard_and_alerts_work(P)


# ------------------------------------------------------------------------------------------ the module's cluster


@needs_prometheus
def test_every_dashboard_and_alert_expression_evaluates(prometheus, load):
    assert load["load_s"] < 50, "the balancedness window (60 s) must still hold the whole load"
    assert_dashboard_and_alerts_work(prometheus)


@needs_prometheus
def test_token_and_request_counters_equal_what_was_served(prometheus, load):
    P = prometheus
    requests = load["requests"]
    n = len(requests)
    prompt_tokens = sum(len(p) for p, _ in requests)
    generated = load["generated"]
    assert P.value("epserve:prompt_tokens_total") == prompt_tokens
    assert P.value("epserve:generation_tokens_total") == generated
    assert P.by_label("epserve:request_success_total", "finished_reason") == {
        "length": len(LOAD), "stop": 1.0, "abort": 0.0, "error": 0.0}
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "request_prompt_tokens", "request_generation_tokens"):
        assert P.value(f"epserve:{name}_count") == n, name
    assert P.value("epserve:request_prompt_tokens_sum") == prompt_tokens
    assert P.value("epserve:request_generation_tokens_sum") == generated
    assert P.value("epserve:inter_token_latency_seconds_count") == generated - n
    # one request at a time: a prefill step that makes the first token, then one decode step per token
    steps = generated
    assert P.value("epserve:engine_step_seconds_count") == steps
    assert P.value("epserve:iteration_tokens_total_count") == steps
    assert P.value("epserve:iteration_tokens_total_sum") == prompt_tokens + generated - n
    assert P.by_label("epserve:shard_steps_total", "shard") == {"0": steps, "1": steps}
    ttft_sum, e2e_sum = P.value("epserve:time_to_first_token_seconds_sum"), P.value(
        "epserve:e2e_request_latency_seconds_sum")
    assert 0 < ttft_sum < e2e_sum < load["load_s"]
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "num_preemptions_total",
                  "engine_errors_total", "prefix_cache_hits_total"):
        assert P.value(f"epserve:{gauge}") == 0, gauge
    assert P.by_label("epserve:frontend_up", "frontend") == {"0": 1.0}
    assert P.by_label("epserve:shard_up", "shard") == {"0": 1.0, "1": 1.0}
    assert P.by_label("epserve:shard_restarts_total", "shard") == {"0": 0.0, "1": 0.0}
    # the ingress's own counts: every request through its client, to the one front-end; nothing failed
    assert P.by_label("epserve:routed_requests_total", "frontend") == {"0": n}
    assert P.by_label("epserve:frontend_replacements_total", "frontend") == {"0": 0.0}
    for name in ("prefix_affinity_routes_total", "request_migrations_total", "recoveries_total"):
        assert P.value(f"epserve:{name}") == 0, name


@needs_prometheus
def test_expert_and_shard_counts_equal_the_routers_choices(prometheus, load):
    P, cfg, rows = prometheus, load["cfg"], load["rows"]
    per_expert = P.by_label("epserve:expert_tokens_total", "expert")
    assert per_expert == {str(e): float(c) for e, c in enumerate(load["experts"])}
    assert sum(per_expert.values()) == (sum(len(p) for p, _ in load["requests"]) + load["generated"]
                                        - len(load["requests"])) * cfg.top_k * cfg.num_layers
    want_shards = {str(s): float(c) for s, c in enumerate(rows.sum(0).tolist())}
    assert P.by_label("epserve:shard_tokens_total", "shard") == want_shards  # sent by the front-end
    assert P.by_label("epserve:shard_rows_served_total", "shard") == want_shards  # computed by the shards
    per_layer = {(r["metric"]["layer"], r["metric"]["shard"]): float(r["value"][1])
                 for r in P.query("epserve:layer_shard_tokens_total")}
    assert per_layer == {(str(layer), str(s)): float(n) for layer, row in enumerate(rows.tolist())
                         for s, n in enumerate(row)}
    assert P.by_label("epserve:expert_replicas", "expert") == {str(e): 1.0 for e in range(cfg.num_experts)}
    # fp32 rows and their local slots (int32); the routing weights stay on the front-end
    assert P.value("epserve:moe_dispatch_bytes_total") == rows.sum().item() * (cfg.hidden_size * 4 + cfg.top_k * 4)
    for name in ("moe_dispatch_seconds", "moe_combine_seconds"):
        assert P.value(f"epserve:{name}_count") == load["exchanges"], name
    assert P.by_label("epserve:shard_compute_seconds_count", "shard") == {
        "0": load["exchanges"], "1": load["exchanges"]}
    assert P.value("epserve:shard_balancedness") == pytest.approx(load["balancedness"], rel=1e-12)


@needs_prometheus
def test_a_cancelled_request_is_counted_as_aborted(server, prometheus, load):
    with grpc.insecure_channel(server.grpc_target) as channel:
        call = pb_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=[7, 8, 9]), sampling=pb.SamplingParams(max_tokens=400, ignore_eos=True)),
            timeout=60)
        received = 0
        for piece in call:
            received += len(piece.token_ids)
            if received >= 2:
                call.cancel()
                break
    prometheus.wait_for('epserve:request_success_total{finished_reason="abort"}', 1.0)
    prometheus.wait_for("epserve:num_requests_running", 0.0)
    assert prometheus.value("epserve:e2e_request_latency_seconds_count") == len(load["requests"]) + 1
    assert prometheus.value("epserve:generation_tokens_total") >= load["generated"] + received


def test_metric_types_are_the_documented_ones(server):
    """What the target says of each family (``# TYPE``) is the type documented (and shown) for it."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(server.metrics_url, timeout=30) as r:
        families = [f for f in text_string_to_metric_families(r.read().decode()) if f.name.startswith("epserve:")]
    types = {f.name + ("_total" if f.type == COUNTER else ""): f.type for f in families}
    assert types == {**METRICS, **UNSHOWN}
    # how the model runs, as the info metric's labels: the dtype asked for, this machine's instruction set
    (info,) = next(f for f in families if f.name == "epserve:model_info").samples
    assert info.value == 1
    assert info.labels == {"frontend": "0", "dtype": "float32", "device": "cpu", "cpu_isa": precision.cpu_isa()}


@needs_prometheus
def test_queue_kv_and_preemption_gauges_move_under_a_burst(server, prometheus, load):
    """8 long requests at once against 4 running slots and a KV cache too small for 4 of them: requests wait,
    the cache fills, requests are preempted; every request still gets all its tokens, and afterwards the
    gauges are back at zero."""
    burst = [([11 + i, 40 + i, 7] * 3, 140) for i in range(8)]
    done = []

    def one(prompt, n):
        with grpc.insecure_channel(server.grpc_target) as channel:
            pieces = list(pb_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(
                token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingParams(max_tokens=n, ignore_eos=True)),
                timeout=240))
            done.append(sum(len(p.token_ids) for p in pieces))

    import threading

    threads = [threading.Thread(target=one, args=r) for r in burst]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(done) == [n for _, n in burst]
    prometheus.wait_for("epserve:num_requests_running", 0.0)
    seen = {g: prometheus.value(f"max_over_time(epserve:{g}[5m])") for g in (
        "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")}
    assert seen["num_requests_running"] == ENGINE["max_num_seqs"], seen
    # preemption happens when the full-attention pool (a third of all blocks) has no block left
    assert seen["num_requests_waiting"] >= 1 and 1 / 3 <= seen["kv_cache_usage_perc"] <= 1.0, seen
    assert prometheus.value("epserve:num_preemptions_total") >= 1
    for gauge in ("num_requests_waiting", "kv_cache_usage_perc"):
        assert prometheus.value(f"epserve:{gauge}") == 0, gauge


@needs_prometheus
def test_a_killed_shard_is_down_the_engine_error_counted_and_the_alert_pending(server, prometheus, load):
    ray.kill(ray.get_actor("epserve-shard-1", namespace="epserve"), no_restart=True)
    prometheus.wait_for('epserve:shard_up{shard="1"}', 0.0)
    # the idle heartbeat's collective fails within collective_timeout_s: the engine stops, and says so
    prometheus.wait_for("epserve:engine_errors_total", 1.0, timeout_s=45)
    prometheus.wait_for("epserve:frontend_up", 0.0)
    assert prometheus.value('epserve:request_success_total{finished_reason="error"}') == 0  # none in flight
    deadline = time.monotonic() + 20
    while True:
        alerts = {(a["labels"]["alertname"], a["labels"].get("shard"), a["state"])
                  for a in prometheus.api("alerts")["alerts"]}
        if ("EpserveShardDown", "1", "pending") in alerts and ("EpserveEngineErrors", None, "firing") in alerts:
            break
        assert time.monotonic() < deadline, f"alerts: {alerts}"
        time.sleep(0.5)

