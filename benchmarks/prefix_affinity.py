"""Routing with and without prefix affinity over several front-ends: a shared-prefix workload (groups of
requests whose prompts share a long prefix, the groups interleaved in arrival order), the prefix-cache hit
rate summed over the front-ends, and TTFT.

    python benchmarks/prefix_affinity.py [--preset bench] [--frontends 2] [--shards 2] [--groups 4]
                                         [--per-group 8] [--prefix 512] [--suffix 32] [--new 16]
                                         [--concurrency 8] [--rounds 2] [--no-write]

Without affinity the router sends each request to the least-loaded front-end, so each group's prefix is
computed on every front-end; with it, a prompt goes where its prefix is held (unless that front-end is
overloaded). Records docs/performance.md ("Prefix affinity").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # one machine: every Ray port on 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

import ray  # noqa: E402

from common import checkpoint, git_revision, machine, write_section  # noqa: E402


def workload(args, vocab: int) -> list[tuple[list[int], int]]:
    """Group g's requests share a prefix; arrivals go round the groups (g0, g1, ..., g0, g1, ...)."""
    rng = random.Random(0)
    prefixes = [[rng.randrange(3, vocab) for _ in range(args.prefix)] for _ in range(args.groups)]
    return [(prefixes[g] + [rng.randrange(3, vocab) for _ in range(args.suffix)], args.new)
            for _ in range(args.per_group) for g in range(args.groups)]


def run(path, args, affinity: bool) -> dict:
    from epserve.actors.model.config import ModelConfig
    from epserve.cluster.tools.bench import run_load
    from epserve.cluster.tools.bench_targets import EngineTarget

    engine = {"max_num_seqs": args.concurrency, "enable_prefix_caching": True}
    cluster = {"frontends": args.frontends, "collective_timeout_s": 300.0, "heartbeat_s": 5.0}
    target = EngineTarget(str(path), args.shards, engine, cluster, dtype=args.dtype, affinity=affinity)
    requests = workload(args, ModelConfig.from_json(path).vocab_size)

    async def go():
        await target.start()
        try:
            before = await target.client.stats()
            result = await run_load(target, requests, args.concurrency, label=f"affinity {'on' if affinity else 'off'}")
            after = await target.client.stats()
        finally:
            await target.close()
        return result, before, after

    result, before, after = asyncio.run(go())
    if result["errors"]:
        raise RuntimeError(f"{result['errors']} request(s) failed: {result['first_errors']}")
    hit = after["prefix_hit_tokens"] - before["prefix_hit_tokens"]
    queried = after["prefix_queried_tokens"] - before["prefix_queried_tokens"]
    routed = [a - b for a, b in zip(after["router"]["routed"], before["router"]["routed"])]
    return {"hit_rate": hit / queried if queried else 0.0, "ttft_ms": 1000 * result["ttft_s"]["p50"],
            "ttft_p90_ms": 1000 * result["ttft_s"]["p90"], "tok_s": result["output_tok_s"], "routed": routed}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--frontends", type=int, default=2)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--per-group", type=int, default=8)
    ap.add_argument("--prefix", type=int, default=512)
    ap.add_argument("--suffix", type=int, default=32)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.frontends < 2:
        ap.error("--frontends must be >= 2: with one front-end there is nothing to route")
    path = checkpoint(args.preset)
    ray.init(namespace="epserve", include_dashboard=False, log_to_driver=False)
    runs = {True: [], False: []}
    for r in range(args.rounds):
        for affinity in (False, True):
            print(f"round {r + 1}/{args.rounds}: affinity {'on' if affinity else 'off'} ...", flush=True)
            runs[affinity].append(run(path, args, affinity))
            print(runs[affinity][-1], flush=True)
    ray.shutdown()
    rows = []
    for affinity in (False, True):
        x = {k: statistics.median(run[k] for run in runs[affinity]) for k in ("hit_rate", "ttft_ms", "ttft_p90_ms",
                                                                            "tok_s")}
        rows.append(f"| {'on' if affinity else 'off'} | {100 * x['hit_rate']:.0f} % | {x['ttft_ms']:.0f} / "
                    f"{x['ttft_p90_ms']:.0f} | {x['tok_s']:.1f} | {runs[affinity][-1]['routed']} |")
    rows = "\n".join(rows)
    command = (f"python benchmarks/prefix_affinity.py --preset {args.preset} --dtype {args.dtype} --frontends "
               f"{args.frontends} --shards {args.shards} --groups {args.groups} --per-group {args.per_group} "
               f"--prefix {args.prefix} --suffix {args.suffix} --new {args.new} --concurrency {args.concurrency} "
               f"--rounds {args.rounds}")
    body = f"""
Command: `{command}` (revision {git_revision()}; {machine()}).
Workload: {args.groups} groups x {args.per_group} requests, each prompt a group's {args.prefix}-token prefix + {args.suffix}
tokens of its own, {args.new} new tokens, arrivals round the groups, {args.concurrency} at a time (closed loop), through
the ingress's client; `{args.preset}` preset, {args.frontends} front-ends + {args.shards} shards, prefix caching on.
Hit rate: prompt tokens found in a front-end's prefix cache over prompt tokens looked up, summed over the
front-ends. Medians of {args.rounds} rounds, each from a fresh start.

| prefix affinity | prefix-cache hit rate | TTFT p50 / p90 (ms) | output tok/s | requests per front-end (last round) |
|---|---|---|---|---|
{rows}
"""
    print(body)
    if not args.no_write:
        write_section("Prefix affinity", body)


if __name__ == "__main__":
    main()
