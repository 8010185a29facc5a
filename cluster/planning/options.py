"""The options of ``epserve plan`` (light: the command's --help imports no torch)."""

from __future__ import annotations

from .hardware import GPU_NAMES, LINKS


def add_options(p) -> None:
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="a checkpoint directory (its config.json is enough)")
    model.add_argument("--preset", help="tiny, bench or gemma-4-26b-a4b (alias: released)")
    p.add_argument("--gpu", required=True, help=f"{' | '.join(GPU_NAMES)} (cpu: this machine, calibrated)")
    p.add_argument("--frontends", type=int, default=None, help="M front-ends (default 1; M > 1 is a what-if: "
                                                               "the cluster runs one today)")
    p.add_argument("--shards", type=int, default=None, help="N expert shards (default 2, or the budget's best)")
    p.add_argument("--redundant-experts", type=int, default=0,
                   help="R extra replicas of experts per layer, over the shards (docs/experts.md)")
    p.add_argument("--nodes", type=int, default=None,
                   help="K nodes the ranks are spread over (default: as few as --gpus-per-node allows)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="G GPUs per node")
    p.add_argument("--link", default="ib400", help=f"between nodes: {' | '.join(LINKS)}")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight (closed loop, as epserve bench)")
    p.add_argument("--requests", type=int, default=None, help="requests in the run (default: --concurrency)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="auto: bf16 on GPUs and on CPUs with native bf16 arithmetic, else fp32")
    p.add_argument("--calibrate", action="store_true",
                   help="with --gpu cpu: measure this machine now (else a cached calibration, made on first use)")
    p.add_argument("--quick", action="store_true", help="a coarse calibration in seconds (no cluster run)")
    p.add_argument("--budget-gpus", type=int, help="also the best (M, N) for B GPUs, for throughput and for ITL")
    p.add_argument("--helm-values", metavar="FILE", help="write the layout as values for helm/epserve")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
