"""The ``epserve`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None


def builtin_checkpoint(preset: str = "tiny", seed: int = 0) -> Path:
    """A small random-weight checkpoint made on first use and kept in the user's cache directory."""
    from epserve.actors.model.checkpoint import preset as make_preset
    from epserve.actors.model.checkpoint import write_checkpoint

    root = Path(os.environ.get("EPSERVE_CACHE", Path.home() / ".cache" / "epserve"))
    path = root / f"{preset}-seed{seed}"
    if not (path / "config.json").exists():
        print(f"making the built-in '{preset}' checkpoint in {path} ...", file=sys.stderr, flush=True)
        tmp = Path(tempfile.mkdtemp(dir=root.mkdir(parents=True, exist_ok=True) or root))
        write_checkpoint(make_preset(preset), tmp, seed=seed)
        tmp.rename(path)  # atomic: a half-written checkpoint is never picked up
    return path


def cmd_make_checkpoint(args) -> int:
    from epserve.actors.model.checkpoint import preset, write_checkpoint

    cfg = preset(args.preset)
    weights = args.preset != "gemma-4-26b-a4b" or args.weights
    t0 = time.monotonic()
    out = write_checkpoint(cfg, args.out, seed=args.seed, layout=args.layout, weights=weights, progress=True)
    what = "config and weights" if weights else "config only (add --weights for ~50 GB of random weights)"
    print(f"wrote {args.preset} ({args.layout} layout, {what}) to {out} in {time.monotonic() - t0:.1f}s")
    return 0


def cmd_generate(args) -> int:
    import torch

    from epserve.actors.engine.engine import LLMEngine
    from epserve.actors.engine.sampling import SamplingParams
    from epserve.actors.model.loader import load_model

    checkpoint = str(args.checkpoint or builtin_checkpoint())
    prompts = args.prompt_ids or [[2, 17, 300, 42]]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                            ignore_eos=args.ignore_eos)
    if args.shards:  # through the cluster: a Frontend actor and N ExpertShard actors
        from .config import ClusterConfig
        from .launcher import Cluster

        with Cluster(ClusterConfig(checkpoint=checkpoint, shards=args.shards, address=args.address)) as cluster:
            results = [(o["token_ids"], o["finish_reason"]) for o in cluster.generate(prompts, vars(params))]
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_model(checkpoint, dtype=torch.bfloat16 if device == "cuda" else torch.float32, device=device)
        results = [(o.token_ids, o.finish_reason) for o in LLMEngine(model).generate(prompts, params)]
    for token_ids, reason in results:
        if args.json:
            print(json.dumps({"token_ids": token_ids, "finish_reason": reason}))
        else:
            print(",".join(map(str, token_ids)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epserve", description="Expert-parallel serving for Gemma 4 26B-A4B")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint in the real layout")
    p.add_argument("--preset", required=True, choices=["tiny", "bench", "gemma-4-26b-a4b"])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=["released", "text-only"], default="released")
    p.add_argument("--weights", action="store_true", help="also write weights for the gemma-4-26b-a4b preset")
    p.set_defaults(func=cmd_make_checkpoint)

    p = sub.add_parser("generate", help="generate from token ids in this process")
    p.add_argument("--checkpoint", help="checkpoint directory (default: a built-in tiny model)")
    p.add_argument("--prompt-ids", type=_ids, action="append", help="comma-separated ids; repeat for more prompts")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    p.add_argument("--shards", type=int, default=0,
                   help="run through a cluster of N expert-shard actors (default 0: in this process)")
    p.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from epserve.actors.engine.sampling import RequestError
    from epserve.actors.model.config import ConfigError
    from epserve.actors.model.loader import CheckpointError

    try:
        return args.func(args)
    except (RequestError, ConfigError, CheckpointError, ValueError) as e:
        print(f"epserve {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
