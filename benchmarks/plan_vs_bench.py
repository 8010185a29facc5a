"""The planner's predictions (``epserve plan --gpu cpu``, calibrated here just before) against measured
``epserve bench`` runs of the same workload through a cluster started in process, per preset and shard count.

    python benchmarks/plan_vs_bench.py [--presets tiny,bench] [--shards 1,2,4] [--write]

Each preset is calibrated first (``--calibrate``: the GEMM tables, the experts kernel, the front-end steps,
the transport; the tiny preset also runs the short cluster bench that fits the per-token host cost), then each
shard count is measured and predicted right after, so that the machine's drift stays small. ``--write`` puts
the table in docs/planning.md (section "Predicted against measured: the runs")."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from common import ROOT, checkpoint, git_revision, machine, write_section

EPSERVE = [sys.executable, "-m", "epserve.cluster.cli"]
WORKLOADS = {  # small enough for a run under 2 minutes on 2 cores
    "tiny": {"requests": 32, "prompt_len": 64, "output_len": 64, "concurrency": 16},
    "bench": {"requests": 16, "prompt_len": 32, "output_len": 32, "concurrency": 8},
}


def flags(work: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in work.items()]


def plan(ckpt, shards: int, work: dict, calibrate: bool) -> dict:
    cmd = [*EPSERVE, "plan", "--checkpoint", str(ckpt), "--gpu", "cpu", f"--shards={shards}", *flags(work),
           "--json"] + (["--calibrate"] if calibrate else [])
    out = subprocess.run(cmd, check=True, capture_output=False, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench(ckpt, shards: int, work: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        subprocess.run([*EPSERVE, "bench", "--checkpoint", str(ckpt), f"--shards={shards}", *flags(work),
                        "--json", out], check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            return json.load(f)["runs"][0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="tiny,bench")
    ap.add_argument("--shards", default="1,2,4")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    rows = []
    for name in args.presets.split(","):
        ckpt, work = checkpoint(name), WORKLOADS[name]
        for i, shards in enumerate(int(s) for s in args.shards.split(",")):
            predicted = plan(ckpt, shards, work, calibrate=i == 0)
            measured = bench(ckpt, shards, work)
            p = predicted["predicted"]
            row = (name, shards, work, p, measured)
            rows.append(row)
            print(f"{name} 1+{shards}: predicted {p['output_tokens_per_s']:.1f} tok/s, measured "
                  f"{measured['output_tok_s']:.1f} ({p['output_tokens_per_s'] / measured['output_tok_s']:.2f}x)",
                  file=sys.stderr, flush=True)
    lines = ["| preset | layout (M + N) | workload (requests x prompt + output, concurrency) | predicted tok/s | "
             "measured tok/s | predicted / measured | TTFT ms, predicted / measured (mean) | ITL ms, predicted / "
             "measured (mean) | predicted bottleneck |", "|---|---|---|---|---|---|---|---|---|"]
    for name, shards, w, p, m in rows:
        lines.append(f"| {name} | 1 + {shards} | {w['requests']} x {w['prompt_len']} + {w['output_len']}, "
                     f"{w['concurrency']} | {p['output_tokens_per_s']:.1f} | {m['output_tok_s']:.1f} | "
                     f"{p['output_tokens_per_s'] / m['output_tok_s']:.2f} | {p['ttft_ms']:.0f} / "
                     f"{1000 * m['ttft_s']['mean']:.0f} | {p['itl_ms']:.1f} / {1000 * m['itl_s']['mean']:.1f} | "
                     f"{max(p['phases_ms'], key=p['phases_ms'].get)} |")
    table = "\n".join(lines)
    body = (f"Command: `python benchmarks/plan_vs_bench.py --presets {args.presets} --shards {args.shards}` "
            f"(revision {git_revision()}; {machine()}; load average before the run "
            f"{os.getloadavg()[0]:.1f}).\n\n{table}\n")
    print(body)
    if args.write:
        write_section("Predicted against measured: the runs", body, ROOT / "docs" / "planning.md")


if __name__ == "__main__":
    main()
