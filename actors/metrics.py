"""Prometheus metrics of the actors: what each actor measures, in a ``CollectorRegistry`` of its own.

Design (docs/observability.md has the whole picture):

* Every actor keeps its own prometheus_client ``CollectorRegistry`` and measures where the facts are:
  the Frontend in its engine thread (request timings, tokens, steps, scheduler gauges; the dispatcher's
  per-layer dispatch/combine times through two callbacks), each ExpertShard in its collective loop (rows
  served, expert compute time). Nothing here opens a port: an actor answers ``metrics()`` with
  ``report(registry)``, a dict whose ``families`` are the registry's collected ``Metric`` objects
  (plain, picklable data), so one Ray actor call per actor fetches everything it knows.
* The Serve ingress replica turns those into ONE scrape target (``epserve.cluster.serving.metrics``): a custom
  collector that, on each scrape, asks every actor of the cluster, merges the families by name and adds
  what only the ingress knows (shard up/down, shard restarts).
* Names follow vLLM's (``vllm:`` becomes ``epserve:``) where the meaning is the same; the expert-parallel
  metrics are our own. Labels are bounded: ``frontend`` (on every series of a Frontend: its index, so that
  several front-ends' families merge without clashing), ``finished_reason`` (stop, length, abort, error),
  ``expert`` (one per routed expert, summed over layers), ``shard``. No per-request labels.

Threading: every mutation of the Frontend's metrics happens in its engine thread (hooks called from the
engine loop, the dispatcher and the commands it runs); scrapes only read, either prometheus_client objects
(thread-safe) or cumulative integer counters of the dispatcher and block manager (``CounterMetricFamily``
built at scrape time, so the hot path never pays for a per-expert ``inc``).
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "epserve:"
BALANCE_WINDOW_S = 60.0  # the balancedness gauge looks at the last minute of routed tokens
SNAPSHOT_EVERY_S = 1.0  # resolution of that window
FINISH_REASONS = ("stop", "length", "abort", "error")

# vLLM's buckets (v1 metrics) where vLLM has the metric; the MoE exchange buckets are ours.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)
QUEUE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1) + REQUEST_BUCKETS
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
                10.0)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
LENGTH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 131072)
EXCHANGE_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                    0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def new_registry(labels: dict[str, str] | None = None) -> CollectorRegistry:
    """A registry of its own; ``labels`` are added to every series it collects."""
    prometheus_client.disable_created_metrics()  # no *_created series: they double every counter's output
    return LabelledRegistry(labels) if labels else CollectorRegistry(auto_describe=True)


class LabelledRegistry(CollectorRegistry):
    """Constant labels on every sample collected. prometheus_client has no constant labels; adding them here
    covers the registered metrics and the families built at scrape time alike, and no metric can miss them."""

    def __init__(self, labels: dict[str, str]):
        super().__init__(auto_describe=True)
        self.labels = dict(labels)

    def collect(self):
        for fam in super().collect():
            labelled = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            labelled.samples = [s._replace(labels={**self.labels, **s.labels}) for s in fam.samples]
            yield labelled


def report(registry: CollectorRegistry, **health) -> dict:
    """What an actor's ``metrics()`` returns: its metric families (picklable) and a few health facts."""
    return {"families": list(registry.collect()), **health}


# ------------------------------------------------------------------------------------------ the Frontend


@dataclass
class _Live:
    """Timing state of one request in flight (the engine's Sequence holds arrival and first-scheduled time)."""

    seq: object
    first_token: float | None = None
    last_token: float | None = None


class FrontendMetrics:
    """Engine, request and dispatch metrics of Frontend ``frontend`` (its index: the ``frontend`` label of
    every series). Hooks are called in the engine thread."""

    def __init__(self, dispatcher=None, num_shards: int = 0, window_s: float = BALANCE_WINDOW_S,
                 info: dict[str, str] | None = None, frontend: int = 0):
        self.registry = r = new_registry({"frontend": str(frontend)})
        p = PREFIX
        # ---- what runs: the compute dtype and the CPU's matrix instruction set, as labels (value 1)
        info = info or {}
        model_info = Gauge(p + "model_info", "1, labelled with how the model runs: compute dtype, device, the "
                           "front-end's CPU instruction set (ModelInfo).", list(info), registry=r)
        (model_info.labels(**info) if info else model_info).set(1)
        # ---- requests (vLLM names)
        self.success = Counter(p + "request_success", "Finished requests, by finish reason.",
                               ["finished_reason"], registry=r)
        for reason in FINISH_REASONS:
            self.success.labels(reason)  # every reason exported from the start, at 0
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prefill tokens processed (counted once per request, "
                                     "when its first token is generated).", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Generation tokens produced.", registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time from the request's arrival at the "
                              "engine to its first token.", buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Time between two consecutive tokens of a "
                             "request (time per output token).", buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Time from arrival to the end of a request "
                             "(any finish reason).", buckets=REQUEST_BUCKETS, registry=r)
        self.queue = Histogram(p + "request_queue_time_seconds", "Time a request waited before it was first "
                               "scheduled.", buckets=QUEUE_BUCKETS, registry=r)
        self.req_prompt = Histogram(p + "request_prompt_tokens", "Prompt length of finished requests.",
                                    buckets=LENGTH_BUCKETS, registry=r)
        self.req_generation = Histogram(p + "request_generation_tokens", "Generated tokens of finished "
                                        "requests.", buckets=LENGTH_BUCKETS, registry=r)
        # ---- engine (vLLM names, plus the step time)
        self.running = Gauge(p + "num_requests_running", "Requests in the running batch.", registry=r)
        self.waiting = Gauge(p + "num_requests_waiting", "Requests waiting to be scheduled.", registry=r)
        self.kv_usage = Gauge(p + "kv_cache_usage_perc", "KV-cache usage: fraction of KV blocks in use "
                              "(1 = full).", registry=r)
        self.preemptions = Counter(p + "num_preemptions", "Requests preempted (blocks freed, to be "
                                   "recomputed).", registry=r)
        self.step_time = Histogram(p + "engine_step_seconds", "Wall time of one engine step (schedule, "
                                   "forward through every layer and the shards, sample).", buckets=STEP_BUCKETS,
                                   registry=r)
        self.step_tokens = Histogram(p + "iteration_tokens_total", "Tokens computed per engine step (decode "
                                     "tokens + prefill chunks).", buckets=TOKEN_BUCKETS, registry=r)
        self.engine_errors = Counter(p + "engine_errors", "Times the engine thread stopped on an error (a "
                                     "collective failed or a peer died).", registry=r)
        # ---- expert parallelism, front-end side
        self.dispatch_time = Histogram(p + "moe_dispatch_seconds", "Per MoE layer: counts exchange and "
                                       "posting the token rows to the shards.", buckets=EXCHANGE_BUCKETS,
                                       registry=r)
        self.combine_time = Histogram(p + "moe_combine_seconds", "Per MoE layer: waiting for the rows to "
                                      "arrive, the experts and the combine after the dense FFN ran.",
                                      buckets=EXCHANGE_BUCKETS, registry=r)
        self.balancedness = Gauge(p + "shard_balancedness", f"Mean over MoE layers of max/mean tokens per "
                                  f"shard over the last {window_s:g} s (1 = balanced, N = one shard gets "
                                  f"all; NaN without traffic).", registry=r)
        self.balancedness.set(math.nan)
        self.dispatcher, self.num_shards, self.window_s = dispatcher, num_shards, window_s
        self.blocks = None  # the engine's block manager, for the prefix-cache counters
        if dispatcher is not None:
            dispatcher.on_dispatch = self.dispatch_time.observe
            dispatcher.on_combine = self.combine_time.observe
        r.register(_CumulativeCollector(self))
        self._live: dict[str, _Live] = {}
        self._preemptions_seen = 0
        self._snapshots: deque = deque([(-math.inf, [])])  # (monotonic time, tokens_per_layer_shard copy)

    # ---- hooks, engine thread --------------------------------------------------------------------------
    def on_add(self, seq) -> None:
        self._live[seq.request_id] = _Live(seq)

    def on_step(self, seconds: float, tokens: int, outputs) -> None:
        """After one engine step: its time and tokens, and each request's new tokens."""
        if tokens:
            self.step_time.observe(seconds)
            self.step_tokens.observe(tokens)
        now = time.monotonic()
        for out in outputs:
            live = self._live.get(out.request_id)
            if live is None:
                continue
            n = len(out.new_token_ids)
            self.generation_tokens.inc(n)
            if live.first_token is None:
                live.first_token = now
                self.ttft.observe(now - live.seq.arrival_time)
                self.queue.observe(max((live.seq.first_scheduled_time or now) - live.seq.arrival_time, 0.0))
                self.prompt_tokens.inc(out.num_prompt_tokens)
            else:
                self.itl.observe((now - live.last_token) / max(n, 1))
            live.last_token = now
            if out.finished:
                self._finish(out.request_id, out.finish_reason or "stop", now)

    def on_abort(self, request_id: str) -> None:
        self._finish(request_id, "abort", time.monotonic())

    def on_engine_error(self) -> None:
        """The engine stopped on an error (its requests may still resume: see ``on_requests_failed``)."""
        self.engine_errors.inc()

    def on_requests_failed(self) -> None:
        """Every live request ended with the engine's failure."""
        now = time.monotonic()
        for rid in list(self._live):
            self._finish(rid, "error", now)

    def _finish(self, request_id: str, reason: str, now: float) -> None:
        live = self._live.pop(request_id, None)
        if live is None:
            return
        self.success.labels(reason).inc()
        self.e2e.observe(now - live.seq.arrival_time)
        self.req_prompt.observe(live.seq.num_prompt)
        self.req_generation.observe(live.seq.num_output)

    def refresh(self, engine) -> None:
        """Gauges from the engine's state, and the balancedness window (every loop of the engine thread)."""
        s = engine.scheduler
        self.blocks = engine.blocks
        self.running.set(len(s.running))
        self.waiting.set(len(s.waiting))
        self.kv_usage.set(engine.kv_usage)
        if s.num_preemptions > self._preemptions_seen:
            self.preemptions.inc(s.num_preemptions - self._preemptions_seen)
            self._preemptions_seen = s.num_preemptions
        if self.dispatcher is not None:
            self.balancedness.set(self._balancedness(self.dispatcher.stats.tokens_per_layer_shard))

    def _balancedness(self, counts: list[list[int]]) -> float:
        """Mean over layers of max/mean tokens per shard in the group, over the counts of the last ``window_s``:
        the current cumulative counts minus the newest snapshot at least ``window_s`` old."""
        now = time.monotonic()
        snaps = self._snapshots
        if now - snaps[-1][0] >= SNAPSHOT_EVERY_S:
            snaps.append((now, [list(row) for row in counts]))
        while len(snaps) > 1 and snaps[1][0] <= now - self.window_s:
            snaps.popleft()
        base = snaps[0][1]
        ratios = []
        members = self.dispatcher.members  # a shard out of the group (degraded mode) is not an imbalance
        for layer, row in enumerate(counts):
            old = base[layer] if layer < len(base) else [0] * len(row)
            delta = [row[s] - (old[s] if s < len(old) else 0) for s in members]
            total = sum(delta)
            if total > 0:
                ratios.append(max(delta) / (total / len(delta)))
        return sum(ratios) / len(ratios) if ratios else math.nan


class _CumulativeCollector(Collector):
    """Counters kept as plain integers by the dispatcher and the block manager, read at scrape time."""

    def __init__(self, metrics: FrontendMetrics):
        self.m = metrics

    def collect(self):
        m, p = self.m, PREFIX
        blocks = m.blocks
        hits = CounterMetricFamily(p + "prefix_cache_hits", "Prompt tokens served from the prefix cache.")
        queries = CounterMetricFamily(p + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        hits.add_metric([], blocks.stats.hit_tokens if blocks else 0)
        queries.add_metric([], blocks.stats.queried_tokens if blocks else 0)
        yield from (hits, queries)
        d = m.dispatcher
        if d is None:
            return
        s = d.counters()
        experts = CounterMetricFamily(p + "expert_tokens", "Tokens routed to each expert (token-expert pairs), "
                                      "summed over MoE layers.", labels=["expert"])
        for e, n in enumerate(list(s.tokens_per_expert)):
            experts.add_metric([str(e)], n)
        shards = CounterMetricFamily(p + "shard_tokens", "Tokens dispatched to each shard (one row per token "
                                     "and distinct shard it needs), summed over MoE layers.", labels=["shard"])
        for i, n in enumerate(list(s.tokens_per_shard)):
            shards.add_metric([str(i)], n)
        per_layer = CounterMetricFamily(p + "layer_shard_tokens", "Tokens dispatched to each shard in each MoE "
                                        "layer (summed over layers: shard_tokens).", labels=["layer", "shard"])
        counts = [list(r) for r in s.tokens_per_layer_shard]  # grows as layers first dispatch: zeros before
        for layer in range(d.placement.num_layers):
            for i, n in enumerate(counts[layer] if layer < len(counts) else [0] * d.placement.num_shards):
                per_layer.add_metric([str(layer), str(i)], n)
        sent = CounterMetricFamily(p + "moe_dispatch_bytes", "Bytes the front-end dispatched to the shards "
                                   "(rows and routing metadata).")
        sent.add_metric([], s.bytes_dispatched)
        replicas = GaugeMetricFamily(p + "expert_replicas", "Copies of each expert on the shards, mean over MoE "
                                     "layers (1: no replica).", labels=["expert"])
        for e, n in enumerate(d.placement.num_replicas.float().mean(0).tolist()):  # [layer, expert] copies
            replicas.add_metric([str(e)], n)
        yield from (experts, shards, per_layer, sent, replicas)


# ------------------------------------------------------------------------------------------ the shards


class ShardMetrics:
    """An ExpertShard's metrics: rows served and expert compute time, labelled with its shard index."""

    def __init__(self, shard: int):
        self.registry = r = new_registry()
        label = [str(shard)]
        self.start_time = time.time()
        self.rows = Counter(PREFIX + "shard_rows_served", "Token rows this shard computed (all its MoE layers).",
                            ["shard"], registry=r).labels(*label)
        self.steps = Counter(PREFIX + "shard_steps", "Engine steps this shard served.", ["shard"],
                             registry=r).labels(*label)
        self.compute = Histogram(PREFIX + "shard_compute_seconds", "Per MoE layer: the shard's grouped expert "
                                 "compute (host time; on GPUs, until the kernels are queued).", ["shard"],
                                 buckets=EXCHANGE_BUCKETS, registry=r).labels(*label)
        self.moved = Counter(PREFIX + "expert_moved_bytes", "Bytes of expert weights loaded onto this shard "
                             "for a new placement (rebalancing, or a restart after one).", ["shard"],
                             registry=r).labels(*label)
        self.epoch = Gauge(PREFIX + "placement_epoch", "The expert placement this shard serves (0: the start-up "
                           "one; each rebalance adds one).", ["shard"], registry=r).labels(*label)
        Gauge(PREFIX + "shard_start_time_seconds", "Unix time this shard's actor (incarnation) started.",
              ["shard"], registry=r).labels(*label).set(self.start_time)


def merge(family_lists) -> list:
    """Families of several actors merged by name (samples concatenated); the first HELP/type win."""
    merged: dict[str, object] = {}
    for families in family_lists:
        for fam in families:
            have = merged.get(fam.name)
            if have is None:
                merged[fam.name] = have = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            have.samples.extend(fam.samples)
    return list(merged.values())


def gauge(name: str, doc: str, values: dict[tuple, float], labels: list[str]) -> GaugeMetricFamily:
    fam = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
    for key, value in values.items():
        fam.add_metric(list(key), value)
    return fam


def counter(name: str, doc: str, values: dict[tuple, float], labels: list[str]) -> CounterMetricFamily:
    fam = CounterMetricFamily(PREFIX + name, doc, labels=labels)
    for key, value in values.items():
        fam.add_metric(list(key), value)
    return fam
