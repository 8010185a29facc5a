"""Many front-ends and ping-pong micro-batches on one CPU machine: output tok/s, TTFT and ITL of the cluster
for (front-ends M, shards N) in {(1, 2), (2, 2)}, each with micro-batches off and on, the front-ends and the
shards bound to disjoint cores (where the overlap of one half's attention with the other's experts is real).

    python benchmarks/frontends.py [--preset bench] [--dtype auto] [--requests 64] [--prompt 128] [--new 64]
                                   [--rounds 2] [--frontend-cpus 0] [--shard-cpus 1] [--no-write]

Requests go through the ingress's client (cluster/serving/frontend_client.py: routing over the front-ends),
all at once (closed loop, concurrency = requests). Rounds of every layout, each from a fresh start; medians.
Records docs/performance.md ("Front-ends and micro-batches").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # one machine: every Ray port on 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

import ray  # noqa: E402

from common import checkpoint, git_revision, machine, write_section  # noqa: E402

CHUNK = 2048  # prefill tokens per step
LAYOUTS = [(1, 2, 1), (1, 2, 2), (2, 2, 1), (2, 2, 2)]  # (front-ends, shards, micro-batches)


def cpus(text: str) -> list[int]:
    return [int(c) for c in text.split(",")]


def run(path, args, frontends: int, shards: int, micro_batches: int) -> dict:
    from epserve.cluster.tools.bench import Workload, sweep
    from epserve.cluster.tools.bench_targets import EngineTarget

    engine = {"max_num_seqs": args.requests, "max_num_batched_tokens": CHUNK, "enable_prefix_caching": False}
    # a bench-preset prefill chunk takes seconds per layer on 2 cores: a collective deadline well above that
    cluster = {"frontends": frontends, "micro_batches": micro_batches, "frontend_cpus": args.frontend_cpus,
               "shard_cpus": args.shard_cpus, "frontend_threads": max(len(args.frontend_cpus) // frontends, 1),
               "shard_threads": max(len(args.shard_cpus) // shards, 1), "collective_timeout_s": 300.0,
               "heartbeat_s": 5.0}
    target = EngineTarget(str(path), shards, engine, cluster, dtype=args.dtype)
    workload = Workload(args.requests, args.prompt, args.new, seed=0)
    result = asyncio.run(sweep(target, workload, [args.requests]))["runs"][0]
    if result["errors"]:
        raise RuntimeError(f"{result['errors']} request(s) failed: {result['first_errors']}")
    return {"tok_s": result["output_tok_s"], "ttft_ms": 1000 * result["ttft_s"]["p50"],
            "itl_ms": 1000 * result["itl_s"]["p50"], "itl_p90_ms": 1000 * result["itl_s"]["p90"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    cores = sorted(os.sched_getaffinity(0))
    half = max(len(cores) // 2, 1)
    ap.add_argument("--frontend-cpus", type=cpus, default=cores[:half], help="cores of the front-ends (a,b,..)")
    ap.add_argument("--shard-cpus", type=cpus, default=cores[half:] or cores, help="cores of the shards")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    path = checkpoint(args.preset)
    ray.init(namespace="epserve", include_dashboard=False, log_to_driver=False)
    runs = {layout: [] for layout in LAYOUTS}
    for r in range(args.rounds):  # rounds of every layout: a slow spell of a shared machine falls on all
        for layout in LAYOUTS:
            print(f"round {r + 1}/{args.rounds}: front-ends, shards, micro-batches = {layout} ...", flush=True)
            runs[layout].append(run(path, args, *layout))
            print(runs[layout][-1], flush=True)
    ray.shutdown()
    med = {layout: {k: statistics.median(x[k] for x in runs[layout]) for k in runs[layout][0]} for layout in LAYOUTS}
    rows = []
    for m, n, b in LAYOUTS:
        x, listed = med[(m, n, b)], ", ".join(f"{run['tok_s']:.1f}" for run in runs[(m, n, b)])
        rows.append(f"| {m} + {n} | {'on' if b > 1 else 'off'} | {x['tok_s']:.1f} | {x['ttft_ms']:.0f} | "
                    f"{x['itl_ms']:.0f} / {x['itl_p90_ms']:.0f} | {listed} |")
    rows = "\n".join(rows)
    from epserve.actors.model.precision import dtype_name, resolve_dtype

    command = (f"python benchmarks/frontends.py --preset {args.preset} --dtype {args.dtype} --requests {args.requests} "
               f"--prompt {args.prompt} --new {args.new} --rounds {args.rounds} --frontend-cpus "
               f"{','.join(map(str, args.frontend_cpus))} --shard-cpus {','.join(map(str, args.shard_cpus))}")
    body = f"""
Command: `{command}` (revision {git_revision()}; {machine()}).
Workload: {args.requests} requests x {args.prompt} prompt tokens x {args.new} new tokens, all at once through the
ingress's client (routing over the front-ends), greedy, ignore eos, {dtype_name(resolve_dtype(args.dtype, "cpu"))},
`{args.preset}` preset, shared memory between the actors. CPU binding: front-ends on cores
{args.frontend_cpus}, shards on cores {args.shard_cpus} (sched_setaffinity; torch threads = cores / actors).
Medians of {args.rounds} rounds of every layout, each from a fresh start.

| front-ends + shards | micro-batches (ping-pong) | output tok/s | TTFT p50 (ms) | ITL p50 / p90 (ms) | runs (tok/s) |
|---|---|---|---|---|---|
{rows}
"""
    print(body)
    if not args.no_write:
        write_section("Front-ends and micro-batches", body)


if __name__ == "__main__":
    main()
