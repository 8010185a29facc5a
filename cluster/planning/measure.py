"""The measurements behind a calibration (calibrate.py): each times what the cluster runs, with one thread."""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import statistics
import time

import torch

from epserve.actors.dispatch import FrontendExchange, Ranks
from epserve.actors.engine.config import EngineConfig
from epserve.actors.engine.engine import LLMEngine
from epserve.actors.engine.sampling import SamplingParams
from epserve.actors.model.config import ModelConfig
from epserve.actors.model.gemma4 import Gemma4Model
from epserve.actors.model.layers import linear
from epserve.actors.model.moe import Experts, expert_dtype, expert_outputs
from epserve.actors.placement import Placement
from epserve.actors.transport import ShmTransport, new_segment_name

from .stepmodel import Row


def best(fn, budget_s: float = 0.05, max_reps: int = 10) -> float:
    """The fastest of repeated calls (after one to warm up), repeated until ``budget_s`` is spent."""
    fn()
    times, spent = [], 0.0
    while not times or (spent < budget_s and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        spent += times[-1]
    return min(times)


def projection_shapes(cfg: ModelConfig) -> set[tuple[int, int]]:
    """(out, in) of every front-end projection but the head."""
    H = cfg.hidden_size
    shapes = {(cfg.intermediate_size, H), (H, cfg.intermediate_size), (cfg.num_experts, H)}
    if cfg.shared_expert_intermediate_size:
        shapes |= {(cfg.shared_expert_intermediate_size, H), (H, cfg.shared_expert_intermediate_size)}
    for i in range(cfg.num_layers):
        shape = cfg.attention(i)
        q, kv = cfg.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
        shapes |= {(q, H), (kv, H), (H, q)}
    return shapes


def gemm_tables(cfg: ModelConfig, dtype, rows, head_rows, log) -> dict:
    """{"n,k": [[rows, seconds], ...]} for every projection and the head."""
    jobs = [(s, rows) for s in sorted(projection_shapes(cfg))] + [((cfg.vocab_size, cfg.hidden_size), head_rows)]
    tables = {}
    for i, ((n, k), grid) in enumerate(jobs):
        log(f"GEMM [{n} x {k}] at {grid[0]}..{grid[-1]} rows ({i + 1}/{len(jobs)})")
        # a step streams every layer's weights through the caches: time each call on a copy of the weight
        # that is not in them (copies in turn, together larger than the last-level cache)
        nbytes = n * k * torch.empty(0, dtype=dtype).element_size()
        weights = [(torch.randn(n, k) / math.sqrt(k)).to(dtype) for _ in range(min(8, -(-COLD_BYTES // nbytes)))]
        tables[f"{n},{k}"] = [[r, best(_rotating(torch.randn(r, k).to(dtype), weights))] for r in grid]
    return tables


COLD_BYTES = 96 << 20  # more than the last-level cache of the CPUs this runs on (32 MiB here)


def _rotating(x, weights):
    """A call of ``linear`` on the next weight of ``weights`` each time (each reordered once, on its first
    call: ``best`` warms up with a whole round)."""
    turn = iter(range(1 << 62))

    def call():
        return linear(x, weights[next(turn) % len(weights)], pack=True)

    for w in weights[1:]:
        linear(x, w, pack=True)
    return call


def _experts_module(cfg: ModelConfig, dtype) -> Experts:
    """Up to 32 experts of a layer with random weights, held and prepared as a shard holds a bf16
    checkpoint's."""
    H, I = cfg.hidden_size, cfg.moe_intermediate_size
    count = min(cfg.num_experts, 32)
    module = Experts(cfg, 0, count)
    held = expert_dtype(torch.bfloat16, dtype, "cpu", cfg)
    with torch.no_grad():
        module.gate_up_proj.data = (torch.randn(count, 2 * I, H) / math.sqrt(H)).to(held)
        module.down_proj.data = (torch.randn(count, H, I) / math.sqrt(I)).to(held)
    return module.prepare_(dtype)


def _decode_load(cfg: ModelConfig, dtype, count: int):
    """One row per expert: a decode step's load, bound by reading the weights."""
    x = torch.randn(count, cfg.hidden_size).to(dtype)
    ids = torch.full((count, cfg.top_k), -1, dtype=torch.long)
    ids[:, 0] = torch.arange(count)
    return x, ids


def experts(cfg: ModelConfig, dtype, quick: bool, log) -> list[float]:
    """[fixed, per expert with rows, per slot] seconds of one shard's layer, fitted to timed calls."""
    H, K = cfg.hidden_size, cfg.top_k
    module = _experts_module(cfg, dtype)
    count = module.count
    points = []
    grid = [(a, r) for a in ((1, count) if quick else (1, 4, count)) for r in ((1, 4) if quick else (1, 8))]
    for a, r in grid:
        log(f"grouped experts: {a} experts x {r} rows ({module.path})")
        slots = a * r
        x = torch.randn(slots, H).to(dtype)
        ids = torch.full((slots, K), -1, dtype=torch.long)
        ids[:, 0] = torch.arange(slots) % a
        points.append(([1.0, a, slots], best(lambda x=x, ids=ids: expert_outputs(x, ids, module))))
    return nonnegative_lstsq([p for p, _ in points], [t for _, t in points])


def _busy(cfg: ModelConfig, dtype, ready, stop) -> None:
    """The neighbour of ``contention``: a shard's decode load in a loop until told to stop."""
    torch.set_num_threads(1)
    module = _experts_module(cfg, dtype)
    x, ids = _decode_load(cfg, dtype, module.count)
    expert_outputs(x, ids, module)
    ready.set()
    while not stop.is_set():
        expert_outputs(x, ids, module)


def contention(cfg: ModelConfig, dtype, quick: bool, log) -> float:
    """How much slower a shard's decode load runs while another process runs the same (two shards on two
    cores share the memory bandwidth): the ratio of the median times, at least 1."""
    log("grouped experts while another process runs them too (shared memory bandwidth)")
    module = _experts_module(cfg, dtype)
    x, ids = _decode_load(cfg, dtype, module.count)
    reps = 5 if quick else 15

    def timed() -> float:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            expert_outputs(x, ids, module)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    expert_outputs(x, ids, module)
    alone = timed()
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    neighbour = ctx.Process(target=_busy, args=(cfg, dtype, ready, stop))
    neighbour.start()
    try:
        ready.wait(120)
        shared = timed()
    finally:
        stop.set()
        neighbour.join(60)
    return max(shared / alone, 1.0)


def nonnegative_lstsq(X: list[list[float]], y: list[float]) -> list[float]:
    """Least squares with every coefficient >= 0 (a negative one is dropped and the rest refitted)."""
    keep = list(range(len(X[0])))
    while True:
        A = torch.tensor([[x[j] for j in keep] for x in X], dtype=torch.float64)
        scale = A.abs().amax(0).clamp(min=1e-30)
        coef = torch.linalg.lstsq(A / scale, torch.tensor(y, dtype=torch.float64)[:, None]).solution[:, 0] / scale
        if (coef >= 0).all() or len(keep) == 1:
            break
        keep.pop(int(torch.argmin(coef)))
    out = [0.0] * len(X[0])
    for j, c in zip(keep, coef.tolist()):
        out[j] = max(c, 0.0)
    return out


def _echo(name: str, capacity: int, sizes: list[int], reps: int) -> None:
    """The peer of ``exchange``: returns every message it receives."""
    t = ShmTransport(name, 1, 2, capacity, 30.0, create=False)
    try:
        for size in sizes:
            for _ in range(reps):
                got, _ = t.all_to_all(torch.empty(0, size, dtype=torch.uint8), [0, 0], [1, 0])
                t.all_to_all(got, [1, 0], [0, 0])
    finally:
        t.close()


def exchange(quick: bool, log) -> dict:
    """Latency per message and bandwidth of the shared-memory transport between two processes (round trips)."""
    log("shared-memory transport between two processes")
    sizes, reps = [64, 1 << 20], (20 if quick else 200)
    capacity = max(sizes) + 64
    name = new_segment_name()
    t = ShmTransport(name, 0, 2, capacity, 30.0, create=True)
    peer = multiprocessing.get_context("spawn").Process(target=_echo, args=(name, capacity, sizes, reps))
    peer.start()
    rtt = {}
    try:
        for size in sizes:
            buf, times = torch.zeros(1, size, dtype=torch.uint8), []
            for _ in range(reps):
                t0 = time.perf_counter()
                t.all_to_all(buf, [0, 1], [0, 0])
                t.all_to_all(buf[:0], [0, 0], [0, 1])
                times.append(time.perf_counter() - t0)
            rtt[size] = statistics.median(times[reps // 4:])
    finally:
        peer.join(60)
        t.close()
        t.unlink()
    latency = rtt[sizes[0]] / 2
    return {"exchange_latency_s": latency, "exchange_bw": sizes[1] / max(rtt[sizes[1]] / 2 - latency, 1e-9)}


class _Loopback:
    """A transport whose shards answer at once with zeros: the front-end's own side of the exchange, timed."""

    rank = 0

    def __init__(self, world: int):
        self.world = world

    def header(self, values):
        return values

    def all_to_all(self, send, send_rows, recv_rows, async_op=False):
        return send.new_zeros(sum(recv_rows), *send.shape[1:]), (lambda: None)


def frontend_steps(cfg: ModelConfig, dtype, quick: bool, log) -> list[tuple[list[Row], float]]:
    """Timed steps of a front-end engine (random weights, no experts, its exchange with 2 shards answered
    in-process), each with the rows it computed."""
    torch.manual_seed(0)
    model = Gemma4Model(cfg, expert_range=None)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand_like(p) + 0.5 if p.dim() == 1 else torch.randn_like(p) / math.sqrt(p.shape[-1]))
    model = model.to(dtype).eval()
    exchange_side = FrontendExchange(Ranks(1, 2), Placement.contiguous(cfg.num_layers, cfg.num_experts, 2),
                                     cfg.hidden_size, cfg.top_k, dtype, "cpu", overlap=False)
    exchange_side.transport = _Loopback(3)
    engine = LLMEngine(model, EngineConfig(max_num_seqs=64, enable_prefix_caching=False, kv_cache_bytes=256 << 20),
                       experts=exchange_side)
    schedule, rows = engine.scheduler.schedule, []

    def recording():
        batch = schedule()
        rows.append([Row(s.num_computed, n, s.num_computed + n == s.num_tokens)
                     for s, n in zip(batch.seqs, batch.num_new)])
        return batch

    engine.scheduler.schedule = recording
    runs = [(2, 8, 2, False)] + ([(1, 8, 4, True), (4, 8, 4, True)] if quick else
                                 [(1, 16, 8, True), (8, 16, 8, True), (32, 48, 6, True), (4, 160, 4, True)])
    steps = []
    for batch, prompt, new, keep in runs:
        log(f"front-end steps: {batch} requests x {prompt} prompt tokens x {new} new tokens")
        gen = torch.Generator().manual_seed(batch)
        for _ in range(batch):
            ids = torch.randint(3, cfg.vocab_size, (prompt,), generator=gen).tolist()
            engine.add_request(ids, SamplingParams(max_tokens=new, ignore_eos=True))
        while engine.has_unfinished():
            t0 = time.perf_counter()
            engine.step()
            if keep:
                steps.append((rows[-1], time.perf_counter() - t0))
    return steps


def cluster_bench(work, shards: int, dtype: str) -> dict:
    """One closed-loop ``epserve bench`` run of the built-in tiny model through a cluster started here."""
    from epserve.cluster.fixtures.builtin import builtin_checkpoint
    from epserve.cluster.tools.bench import Workload, sweep
    from epserve.cluster.tools.bench_targets import EngineTarget

    target = EngineTarget(str(builtin_checkpoint("tiny")), shards,
                          {"max_num_seqs": work.concurrency, "enable_prefix_caching": False}, dtype=dtype)
    bench_work = Workload(work.total_requests, work.prompt_len, work.output_len)
    run = asyncio.run(sweep(target, bench_work, [work.concurrency]))["runs"][0]
    return {k: run[k] for k in ("elapsed_s", "output_tok_s", "completed", "errors")}
