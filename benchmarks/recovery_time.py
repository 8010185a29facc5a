"""How long the cluster takes to recover from a lost actor: a shard killed, a shard stalled (SIGSTOP) and the
front-end killed, each injected mid-run under a load of concurrent streaming gRPC requests (cluster/tools/drill.py)
on the tiny preset, timed from the fault to the health service's SERVING again.

    python benchmarks/recovery_time.py [--repeats 3] [--streams 32] [--max-tokens 48] [--no-write]

Checks what the clients saw (every request completes with the same greedy tokens as the in-process engine:
after a front-end kill, its requests move to the restarted front-end) and records docs/reliability.md
("## Recovery time").
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

import grpc  # noqa: E402
import ray  # noqa: E402

from common import ROOT, fixed_prompts, free_port, git_revision, machine, write_section  # noqa: E402

from epserve.actors.engine.config import EngineConfig  # noqa: E402
from epserve.actors.engine.engine import LLMEngine  # noqa: E402
from epserve.actors.engine.sampling import SamplingParams  # noqa: E402
from epserve.actors.model.loader import load_model  # noqa: E402
from epserve.cluster.tools import drill  # noqa: E402
from epserve.cluster.fixtures.builtin import builtin_checkpoint  # noqa: E402
from epserve.cluster.config import ClusterConfig  # noqa: E402

RELIABILITY_MD = ROOT / "docs" / "reliability.md"
SEEN = {"shard-kill": "a pause; every request completes, tokens identical",
        "shard-stall": "a pause; every request completes, tokens identical",
        "frontend-kill": "a pause; every request moves to the restarted front-end and completes, tokens identical"}


def check(d: drill.Drill, want: list[list[int]]) -> None:
    codes = {o.code for o in d.outcomes}
    assert codes == {grpc.StatusCode.OK}, [(o.code, o.details) for o in d.outcomes]
    assert [o.tokens for o in d.outcomes] == want, "outputs differ from the run without a fault"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    from epserve.cluster.serving.local import LocalServer

    checkpoint = builtin_checkpoint()
    model = load_model(checkpoint)
    prompts = fixed_prompts(args.streams, 12, model.cfg.vocab_size)
    want = [c.token_ids for c in LLMEngine(model, EngineConfig(max_num_seqs=64)).generate(
        prompts, SamplingParams(max_tokens=args.max_tokens, ignore_eos=True))]
    defaults = ClusterConfig()
    ray.init(namespace="epserve", include_dashboard=False, log_to_driver=False)
    settings = {"cluster": {"checkpoint": str(checkpoint), "shards": 2, "max_failures": 3 * args.repeats + 1},
                "grpc_port": free_port()}
    server = LocalServer(settings, "127.0.0.1", free_port()).start()
    results: dict[str, list[drill.Drill]] = {fault: [] for fault in drill.FAULTS}
    try:
        for _ in range(args.repeats):
            for fault in drill.FAULTS:
                d = drill.run(server.grpc_target, prompts, args.max_tokens, fault)
                check(d, want)
                results[fault].append(d)
                print(f"{fault}: detected after {d.detection_s:.1f} s, serving after {d.recovery_s:.1f} s",
                      flush=True)
    finally:
        server.shutdown()
        ray.shutdown()

    def spread(values: list[float]) -> str:
        return f"{statistics.median(values):.1f} s (max {max(values):.1f} s)"

    rows = "\n".join(f"| {fault} | {spread([d.detection_s for d in ds])} | {spread([d.recovery_s for d in ds])} "
                     f"| {SEEN[fault]} |" for fault, ds in results.items())
    command = (f"python benchmarks/recovery_time.py --repeats {args.repeats} --streams {args.streams} "
               f"--max-tokens {args.max_tokens}")
    body = f"""Command: `{command}` (revision {git_revision()}; {machine()}).

* The tiny preset; a front-end and 2 shards on a local Ray cluster, gloo; the Serve app's gRPC endpoint.
* At every fault, {args.streams} concurrent streaming requests of {args.max_tokens} tokens are in flight.
* Default settings: `collective_timeout_s` = {defaults.collective_timeout_s:g} s, `probe_timeout_s` = {defaults.probe_timeout_s:g} s.
* The machine's load average (1 min) at the end: {os.getloadavg()[0]:.1f} (timings stretch with it).
* Detection: the fault to the health service's NOT_SERVING; recovery: the fault to SERVING again. Medians
  (and maxima) of {args.repeats} faults each.

| fault | detection | recovery (fault to SERVING) | what clients saw |
|---|---|---|---|
{rows}

A killed shard is noticed at once (its collectives fail and Ray reports its death), so its time is the new
actor's start (a process, torch, the experts) and the rejoin. A stalled shard costs the collective deadline
first, then the unanswered ping, then `ray.kill` of a stopped process (Ray asks for a graceful exit before it
forces one), then the restart. A killed front-end restarts with the model less its experts, and the shards
only rejoin.
"""
    print(body)
    if not args.no_write:
        write_section("Recovery time", body, RELIABILITY_MD)


if __name__ == "__main__":
    main()
