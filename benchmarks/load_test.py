"""Sustained load over gRPC on loopback: many streaming requests (tiny preset by default; fixed prompt and
output lengths, ignore eos) at a fixed concurrency, against a server this script starts (`epserve serve`'s
LocalServer: a front-end and 2 expert shards) or, with --target, one already running on 127.0.0.1.

    python benchmarks/load_test.py [--requests 1000] [--concurrency 64] [--prompt 16] [--new 16]
                                   [--target 127.0.0.1:50051] [--no-write]

Every request must come back complete: no error, no request lost (sent but never answered, or answered with
fewer tokens than asked). Reports p50/p99 of the end-to-end latency and of the time to the first token, and
records them in docs/reliability.md ("## Load"). Exits 1 when anything was lost or failed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

from common import RELIABILITY_MD, free_port, git_revision, machine, write_section  # noqa: E402

from epserve.cluster.tools.bench import Workload, run_load  # noqa: E402
from epserve.cluster.tools.bench_targets import GrpcTarget  # noqa: E402


async def load(target: str, workload: Workload, concurrency: int) -> dict:
    grpc_target = GrpcTarget(target)
    await grpc_target.start()
    try:
        return await run_load(grpc_target, workload.requests(), concurrency, label="load")
    finally:
        await grpc_target.close()


def verdict(result: dict, workload: Workload) -> dict:
    """errors; lost: requests never answered; missing: tokens that the complete answers lack (each asked for
    ``output_len`` and may not get more)."""
    return {"errors": result["errors"], "lost": workload.num_requests - result["completed"] - result["errors"],
            "missing": result["completed"] * workload.output_len - result["output_tokens"]}


def ms(value) -> str:
    return "-" if value is None else f"{1000 * value:.0f} ms"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens per request")
    ap.add_argument("--new", type=int, default=16, help="new tokens per request")
    ap.add_argument("--shards", type=int, default=2, help="expert shards of the server started here")
    ap.add_argument("--target", help="host:port of a running server on loopback (default: start one here)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    from epserve.actors.model.config import ModelConfig
    from epserve.cluster.fixtures.builtin import builtin_checkpoint

    checkpoint = builtin_checkpoint("tiny")
    workload = Workload(args.requests, args.prompt, args.new, vocab_size=ModelConfig.from_json(checkpoint).vocab_size)
    server = None
    if args.target is None:
        from epserve.cluster.serving.local import LocalServer

        settings = {"cluster": {"checkpoint": str(checkpoint), "shards": args.shards,
                                "engine": {"max_num_seqs": args.concurrency}}, "grpc_port": free_port()}
        server = LocalServer(settings, "127.0.0.1", free_port()).start()
    try:
        result = asyncio.run(load(args.target or server.grpc_target, workload, args.concurrency))
    finally:
        if server is not None:
            server.shutdown()
    outcome = verdict(result, workload)
    lat, ttft = result["latency_s"], result["ttft_s"]
    print(f"{result['completed']}/{args.requests} complete, {outcome['errors']} errors, {outcome['lost']} lost, "
          f"{outcome['missing']} tokens missing; "
          f"latency p50 {ms(lat['p50'])} p99 {ms(lat['p99'])}; TTFT p50 {ms(ttft['p50'])} p99 {ms(ttft['p99'])}")
    if result["first_errors"]:
        print("first errors:", *result["first_errors"], sep="\n  ")
    command = "python benchmarks/load_test.py " + shlex.join(sys.argv[1:]) if sys.argv[1:] else \
        "python benchmarks/load_test.py"
    where = f"`--target {args.target}`" if args.target else f"a server started by the script ({args.shards} expert " \
                                                            "shards and a front-end, gloo on one machine)"
    body = f"""Command: `{command}` (revision {git_revision()}; {machine()}).
Workload: {args.requests} streaming gRPC requests (`epserve.v1.Inference/Generate`) on 127.0.0.1, `tiny`
preset, {args.prompt} prompt tokens and {args.new} new tokens each (greedy, ignore eos), {args.concurrency} in
flight at a time (closed loop), against {where}.

| requests | completed | errors | lost | tokens missing | wall time | requests/s | output tok/s | latency p50 / p99 | TTFT p50 / p99 |
|---|---|---|---|---|---|---|---|---|---|
| {args.requests} | {result['completed']} | {outcome['errors']} | {outcome['lost']} | {outcome['missing']} | {result['elapsed_s']:.1f} s | {result['requests_s']:.1f} | {result['output_tok_s']:.0f} | {ms(lat['p50'])} / {ms(lat['p99'])} | {ms(ttft['p50'])} / {ms(ttft['p99'])} |

"Lost": sent but never answered; "tokens missing": what the completed answers lack of {args.new} tokens each.
The script exits non-zero unless all three are zero.
"""
    if not args.no_write:
        write_section("Load", body, RELIABILITY_MD)
        print(f"wrote the Load section of {RELIABILITY_MD}")
    return 0 if not any(outcome.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
