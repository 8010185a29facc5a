"""Prefill and decode apart, for the in-process engine or the cluster (1 front-end + ``--shards`` shards): after
the start's warm-up, ``--requests`` prompts of ``--prompt`` tokens with 2 new tokens each (the prefill, all in
flight at once), then with ``--new`` + 2 (the decode steps are the difference), repeated ``--repeats`` times.
The first prefill is reported too: what a first full-size step still costs after the warm-up. For the cluster,
each shard's expert compute and the front-end's wait and dispatch per step (the exchange's counters).

    python benchmarks/step_phases.py [--preset bench] [--dtype auto] [--cluster] [--shards 2]
        [--frontend-threads 2] [--shard-threads 1] [--requests 64] [--prompt 128] [--new 64] [--repeats 2]

The actors' OpenMP waiting follows the environment where it is set (cluster/launcher.py ``openmp_env``): e.g.
``OMP_WAIT_POLICY=passive`` in front of the command measures the passive waiting the launcher used before its
short spin. Prints only (the figures it gave are quoted in docs/performance.md with this command).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # one machine: every Ray port on 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

from common import checkpoint, fixed_prompts, git_revision, machine  # noqa: E402

CHUNK = 2048  # prefill tokens per step


def engine_runner(path, dtype):
    """generate(prompts, n) -> counters {seconds, steps} of the in-process engine (warmed up as a server is)."""
    import torch

    from epserve.actors.engine.config import EngineConfig
    from epserve.actors.engine.engine import LLMEngine
    from epserve.actors.engine.sampling import SamplingParams
    from epserve.actors.model.loader import load_model
    from epserve.actors.model.precision import resolve_dtype

    torch.set_grad_enabled(False)
    engine = LLMEngine(load_model(path, resolve_dtype(dtype, "cpu")),
                       EngineConfig(max_num_batched_tokens=CHUNK, enable_prefix_caching=False))
    engine.warm_up()

    def run(prompts, n):
        steps, t0 = engine.num_steps, time.perf_counter()
        engine.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True))
        return {"seconds": time.perf_counter() - t0, "steps": engine.num_steps - steps}

    return run, lambda: None


def cluster_runner(path, dtype, shards, frontend_threads, shard_threads):
    """The same for a cluster, with its shards' compute and the front-end's wait and dispatch."""
    import ray

    from epserve.actors.engine.config import EngineConfig
    from epserve.cluster.config import ClusterConfig
    from epserve.cluster.launcher import Cluster

    ray.init(namespace="epserve", include_dashboard=False, log_to_driver=False)
    # a bench-preset prefill chunk takes seconds per layer on 2 cores: a collective deadline well above that
    cluster = Cluster(ClusterConfig(checkpoint=str(path), shards=shards, frontend_threads=frontend_threads,
                                    shard_threads=shard_threads, dtype=dtype, collective_timeout_s=300.0,
                                    heartbeat_s=5.0, engine=EngineConfig(max_num_batched_tokens=CHUNK,
                                                                         enable_prefix_caching=False))).start()

    def counters():
        stats = cluster.stats()
        compute = [s["compute_seconds"] for s in ray.get([a.stats.remote() for a in cluster.shards])]
        return {"steps": stats["steps"], "wait": stats["dispatch"]["wait_seconds"],
                "dispatch": stats["dispatch"]["dispatch_seconds"], **{f"shard {i}": c for i, c in enumerate(compute)}}

    def run(prompts, n):
        before, t0 = counters(), time.perf_counter()
        cluster.generate(prompts, {"max_tokens": n, "ignore_eos": True})
        seconds, after = time.perf_counter() - t0, counters()
        return {"seconds": seconds, **{k: after[k] - before[k] for k in after}}

    def stop():
        cluster.shutdown()
        ray.shutdown()

    return run, stop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--cluster", action="store_true", help="1 front-end + --shards shards (else the engine)")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--frontend-threads", type=int, default=2)
    ap.add_argument("--shard-threads", type=int, default=1)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    path = checkpoint(args.preset)
    from epserve.actors.model.config import ModelConfig

    prompts = fixed_prompts(args.requests, args.prompt, ModelConfig.from_json(path).vocab_size)
    run, stop = (cluster_runner(path, args.dtype, args.shards, args.frontend_threads, args.shard_threads)
                 if args.cluster else engine_runner(path, args.dtype))
    print(f"revision {git_revision()}; {machine()}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '-')}, "
          f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', '-')}")
    what = f"cluster (1 front-end + {args.shards} shards)" if args.cluster else "in-process engine"
    print(f"{what}, `{args.preset}`, {args.requests} x {args.prompt} prompt tokens, {args.dtype}")
    try:
        run(prompts[:2], 2)
        for r in range(args.repeats):
            prefill, whole = run(prompts, 2), run(prompts, args.new + 2)
            steps = whole["steps"] - prefill["steps"]
            per_step = {k: 1000 * (whole[k] - prefill[k]) / steps for k in whole if k not in ("steps", "seconds")}
            first = " (the first after the start)" if r == 0 else ""
            print(f"prefill{first}: {prefill['seconds']:.2f} s in {prefill['steps']} steps"
                  + "".join(f", {k} {v:.2f} s" for k, v in prefill.items() if k not in ("steps", "seconds")))
            print(f"decode: {1000 * (whole['seconds'] - prefill['seconds']) / steps:.1f} ms a step ({steps} steps)"
                  + "".join(f", {k} {v:.1f} ms" for k, v in per_step.items()), flush=True)
    finally:
        stop()


if __name__ == "__main__":
    main()
