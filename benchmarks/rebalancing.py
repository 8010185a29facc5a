"""Online rebalancing on a live cluster: a skewed workload before and after the cluster moved its experts.

    python benchmarks/rebalancing.py [--preset bench] [--router-skew 3] [--shards 4] [--redundant 16]
        [--requests 64] [--prompt 128] [--new 16] [--dtype auto]

A cluster (1 front-end, N shards with R redundant slots per layer, placed contiguously at start-up) over a
checkpoint of the preset made with ``--router-skew``. Phase 1 serves a batch of requests (all at once, greedy);
then the rebalancer computes, from phase 1's measured load, the balanced placement and moves the experts
while the cluster is up (``Rebalancer.rebalance``: stage on every shard, switch at the next header; timed,
bytes moved counted); phase 2 serves a batch of other prompts of the same shape. Per phase:

* balancedness, (token, shard) rows: the rows the front-end dispatched to each shard, per layer, max / mean over
  the shards, mean over the layers (over the whole phase: the dashboard's ``epserve:shard_balancedness``);
* balancedness, (token, expert) rows: each expert's routed tokens split evenly over its copies, summed per shard
  (``Placement.balancedness``), which is what a shard computes;
* the slowest shard's expert compute per step: each shard's compute seconds over its steps in the phase, the
  largest over the shards (every step waits for the slowest); and the output tokens per second.

Writes the table to docs/performance.md under "Online rebalancing" (``--no-write``: print only).
"""

from __future__ import annotations

import argparse
import time

import ray
from common import checkpoint, fixed_prompts, git_revision, machine, write_section

from epserve.actors.model.config import ModelConfig
from epserve.cluster.config import ClusterConfig
from epserve.cluster.launcher import Cluster
from epserve.cluster.rebalancer import Rebalancer


def snapshot(cluster: Cluster) -> dict:
    reply = ray.get(cluster.frontend.experts.remote())
    shards = ray.get([s.stats.remote() for s in cluster.shards])
    return {"layer_shard": reply["tokens_per_layer_shard"], "layer_expert": reply["tokens_per_layer_expert"],
            "compute": [s["compute_seconds"] for s in shards], "steps": [s["steps"] for s in shards]}


def minus(a, b):
    return [minus(x, y) for x, y in zip(a, b)] if isinstance(a, list) else a - b


def phase(cluster: Cluster, prompts: list[list[int]], new: int) -> dict:
    before = snapshot(cluster)
    t0 = time.perf_counter()
    outs = cluster.generate(prompts, {"max_tokens": new, "ignore_eos": True})
    seconds = time.perf_counter() - t0
    after = snapshot(cluster)
    rows = minus(after["layer_shard"], before["layer_shard"] or [[0] * len(after["layer_shard"][0])] *
                 len(after["layer_shard"]))
    load = minus(after["layer_expert"], before["layer_expert"] or [[0] * len(after["layer_expert"][0])] *
                 len(after["layer_expert"]))
    per_step = [c / max(s, 1) for c, s in zip(minus(after["compute"], before["compute"]),
                                              minus(after["steps"], before["steps"]))]
    by_shard = [max(layer) * len(layer) / sum(layer) for layer in rows if sum(layer)]
    return {"by_shard": sum(by_shard) / len(by_shard), "by_expert": cluster.layout.balancedness(load),
            "slowest_ms": 1e3 * max(per_step), "mean_ms": 1e3 * sum(per_step) / len(per_step), "load": load,
            "tok_s": sum(len(o["token_ids"]) for o in outs) / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--router-skew", type=float, default=3.0)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--redundant", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    model_dir = checkpoint(args.preset, router_skew=args.router_skew)
    cfg = ModelConfig.from_json(model_dir)
    first, second = (fixed_prompts(args.requests, args.prompt, cfg.vocab_size, seed=s) for s in (1, 2))
    config = ClusterConfig(checkpoint=str(model_dir), shards=args.shards, redundant_experts=args.redundant,
                           dtype=args.dtype, engine={"max_num_seqs": args.requests})
    with Cluster(config) as cluster:
        cluster.generate(first[:2], {"max_tokens": 2, "ignore_eos": True})  # warm-up
        print("[rebalancing] phase 1: the start-up placement", flush=True)
        start = phase(cluster, first, args.new)
        rebalancer = Rebalancer(cluster, interval_s=1.0)  # its thread is not started: one move, here
        t0 = time.perf_counter()
        moved = rebalancer.rebalance(start["load"])
        move_s = time.perf_counter() - t0
        print(f"[rebalancing] moved: {moved} ({rebalancer.last}); phase 2", flush=True)
        balanced = phase(cluster, second, args.new)
        infos = cluster.shard_info()
    dtype = infos[0]["dtype"]
    rows = [f"| {name} | {r['by_shard']:.3f} | {r['by_expert']:.3f} | {r['slowest_ms']:.1f} | {r['mean_ms']:.1f} | "
            f"{r['tok_s']:.1f} |" for name, r in ((f"contiguous, R = {args.redundant} (start-up)", start),
                                                  ("after rebalancing on phase 1's load", balanced))]
    last = rebalancer.last or {}
    command = (f"python benchmarks/rebalancing.py --preset {args.preset} --router-skew {args.router_skew} --shards "
               f"{args.shards} --redundant {args.redundant} --requests {args.requests} --prompt {args.prompt} "
               f"--new {args.new} --dtype {args.dtype}")
    body = f"""
Command: `{command}` (revision {git_revision()}; {machine()}; compute dtype {dtype}).
A live cluster, 1 front-end + {args.shards} shards with {args.redundant} redundant slots per layer, over the
`{args.preset}` preset with router skew {args.router_skew}; each phase is {args.requests} requests x
{args.prompt} prompt tokens x {args.new} new tokens at once (greedy), phase 2 with other prompts. Between the
phases the cluster rebalanced from phase 1's load while up: {'moved' if moved else 'no move'}, placement
{last.get('epoch', 0)}, {last.get('moved_bytes', 0) / 1e6:.0f} MB of experts loaded onto the shards, staged and
switched in {move_s:.1f} s (no step waits for it: the shards load beside the experts they serve). Balancedness:
max / mean rows per shard and layer over the phase (1.0 is even), mean over the layers; shard compute: each
shard's grouped expert compute per step over the phase (prefill and decode steps), the slowest shard and the
mean.

| placement | balancedness, (token, shard) rows | balancedness, (token, expert) rows | slowest shard's experts per step (ms) | mean shard (ms) | output tok/s |
|---|---|---|---|---|---|
""" + "\n".join(rows)
    print(body)
    if not args.no_write:
        write_section("Online rebalancing", body)


if __name__ == "__main__":
    main()
