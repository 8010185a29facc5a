"""The expert-parallel cluster (1 front-end + N shards, gloo on CPU) against the in-process engine, on the
same checkpoint and workload; and the cluster with the dense-FFN overlap on and off.

    python benchmarks/cluster_vs_engine.py [--preset bench] [--dtype auto] [--shards 2] [--requests 64] [--prompt 32]
                                           [--new 32] [--rounds 3]

Reports output tokens/s, mean step time, and the time per step spent dispatching (count exchange, posting
the rows) and waiting for the experts (payload and combine, after the dense FFN), and records them in
docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # one machine: every Ray port on 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

import ray  # noqa: E402

from common import checkpoint, fixed_prompts, git_revision, machine, write_section  # noqa: E402

CHUNK = 2048  # prefill tokens per step (the fastest chunk on the bench preset: docs/performance.md)


def run_engine(path, prompts, new, dtype):
    from epserve.actors.engine.config import EngineConfig
    from epserve.actors.engine.engine import LLMEngine
    from epserve.actors.engine.sampling import SamplingParams
    from epserve.actors.model.loader import load_model
    from epserve.actors.model.precision import resolve_dtype

    engine = LLMEngine(load_model(path, resolve_dtype(dtype, "cpu")), EngineConfig(max_num_seqs=len(prompts), max_num_batched_tokens=CHUNK,
                                                      enable_prefix_caching=False))
    engine.generate(prompts[:2], SamplingParams(max_tokens=2, ignore_eos=True))
    steps0, t0 = engine.num_steps, time.perf_counter()
    outs = engine.generate(prompts, SamplingParams(max_tokens=new, ignore_eos=True))
    elapsed = time.perf_counter() - t0
    steps = engine.num_steps - steps0
    return {"tok_s": sum(len(o.token_ids) for o in outs) / elapsed, "step_ms": 1000 * elapsed / steps}


def run_cluster(path, prompts, new, shards, overlap, dtype):
    from epserve.actors.engine.config import EngineConfig
    from epserve.cluster.config import ClusterConfig
    from epserve.cluster.launcher import Cluster

    # a bench-preset prefill chunk takes seconds per layer on 2 cores: a collective deadline well above that
    cfg = ClusterConfig(checkpoint=str(path), shards=shards, overlap_dense_ffn=overlap, frontend_threads=2,
                        dtype=dtype, collective_timeout_s=300.0, heartbeat_s=5.0,
                        engine=EngineConfig(max_num_seqs=len(prompts), max_num_batched_tokens=CHUNK,
                                            enable_prefix_caching=False))
    with Cluster(cfg) as cluster:
        cluster.generate(prompts[:2], {"max_tokens": 2, "ignore_eos": True})
        before, shards_before = cluster.stats(), shard_compute(cluster)
        t0 = time.perf_counter()
        outs = cluster.generate(prompts, {"max_tokens": new, "ignore_eos": True})
        elapsed = time.perf_counter() - t0
        after, shards_after = cluster.stats(), shard_compute(cluster)
    steps = after["steps"] - before["steps"]
    per_step = lambda key: 1000 * (after["dispatch"][key] - before["dispatch"][key]) / steps  # noqa: E731
    compute = max(a - b for a, b in zip(shards_after, shards_before))  # the slowest shard sets the pace
    return {"tok_s": sum(len(o["token_ids"]) for o in outs) / elapsed,
            "step_ms": 1000 * (after["step_seconds"] - before["step_seconds"]) / steps,
            "dispatch_ms": per_step("dispatch_seconds"), "wait_ms": per_step("wait_seconds"),
            "compute_ms": 1000 * compute / steps}


def shard_compute(cluster) -> list[float]:
    return [s["compute_seconds"] for s in ray.get([a.stats.remote() for a in cluster.shards])]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    path = checkpoint(args.preset)
    from epserve.actors.model.config import ModelConfig

    prompts = fixed_prompts(args.requests, args.prompt, ModelConfig.from_json(path).vocab_size)
    ray.init(namespace="epserve", include_dashboard=False, log_to_driver=False)
    runs = {"engine": [], "on": [], "off": []}
    # rounds of the three, each from a fresh start: a slow spell of a shared machine falls on all of them
    for r in range(args.rounds):
        for name, run in [("engine", lambda: run_engine(path, prompts, args.new, args.dtype)),
                          ("on", lambda: run_cluster(path, prompts, args.new, args.shards, True, args.dtype)),
                          ("off", lambda: run_cluster(path, prompts, args.new, args.shards, False, args.dtype))]:
            print(f"round {r + 1}/{args.rounds}: {name} ...", flush=True)
            runs[name].append(run())
            print(runs[name][-1], flush=True)
    ray.shutdown()
    e, c, off = ({k: statistics.median(x[k] for x in runs[name]) for k in runs[name][0]}
                 for name in ("engine", "on", "off"))
    listed = {name: ", ".join(f"{x['tok_s']:.1f}" for x in runs[name]) for name in runs}
    change = 100 * (c["step_ms"] / off["step_ms"] - 1)
    # a verdict only when every round agrees with the medians: one fast or slow spell can move a median
    faster = sum(a["step_ms"] < b["step_ms"] for a, b in zip(runs["on"], runs["off"]))
    verdict = ("the overlap pays here too (faster in every round)" if change < -5 and faster == args.rounds else
               "the overlap costs here (slower in every round)" if change > 5 and faster == 0 else
               f"within this machine's noise (the overlap was faster in {faster} of {args.rounds} rounds)")
    from epserve.actors.model.precision import dtype_name, resolve_dtype

    computed = dtype_name(resolve_dtype(args.dtype, "cpu"))
    command = (f"python benchmarks/cluster_vs_engine.py --preset {args.preset} --dtype {args.dtype} --shards {args.shards} "
               f"--requests {args.requests} --prompt {args.prompt} --new {args.new} --rounds {args.rounds}")
    body = f"""
Command: `{command}` (revision {git_revision()}; {machine()}).
Workload: {args.requests} requests x {args.prompt} prompt tokens x {args.new} new tokens, greedy, ignore eos, {computed},
`{args.preset}` preset; cluster = 1 front-end + {args.shards} expert shards (Ray actors, gloo all-to-all on one machine).
Medians of {args.rounds} rounds of the three runs, each from a fresh start (every run's tok/s listed).

| run | output tok/s | mean step | dispatch / step | wait for experts / step | of which shard compute | so combine and transfer | runs (tok/s) |
|---|---|---|---|---|---|---|---|
| in-process engine | {e['tok_s']:.1f} | {e['step_ms']:.0f} ms | | | | | {listed['engine']} |
| cluster, dense FFN overlapped | {c['tok_s']:.1f} | {c['step_ms']:.0f} ms | {c['dispatch_ms']:.1f} ms | {c['wait_ms']:.1f} ms | {c['compute_ms']:.1f} ms | {max(c['wait_ms'] - c['compute_ms'], 0):.1f} ms | {listed['on']} |
| cluster, overlap off | {off['tok_s']:.1f} | {off['step_ms']:.0f} ms | {off['dispatch_ms']:.1f} ms | {off['wait_ms']:.1f} ms | {off['compute_ms']:.1f} ms | {max(off['wait_ms'] - off['compute_ms'], 0):.1f} ms | {listed['off']} |

Cluster / in-process throughput: {c['tok_s'] / e['tok_s']:.2f} with the overlap, {off['tok_s'] / e['tok_s']:.2f} without
(target >= 0.8). Median step time with the overlap on against off: {change:+.0f}%: {verdict}. "Dispatch" is the count
exchange and posting of the rows; "wait" is the time the front-end waits for the experts' payload and the
combine after its dense FFN (with the overlap off, the dense FFN runs after the experts instead); "shard
compute" is the slowest shard's grouped expert GEMMs per step, and the rest of the wait is the transfers and
the combine (with the overlap on, the wait also shrinks by the dense FFN the front-end computed meanwhile).

Where the shards run on devices of their own (GPUs), the dense FFN runs while the rows travel and the experts
compute, and the overlap hides the all-to-all. On one CPU machine the front-end and the shards share the
cores: running the dense FFN meanwhile can only fill the moments a core would idle (the slower shard's
tail, the transfers), against the cost of more threads than cores.
"""
    print(body)
    if not args.no_write:
        write_section("Expert-parallel cluster vs in-process engine", body)


if __name__ == "__main__":
    main()
