"""Expert balance on a skewed router: how evenly the shards share the routed rows, and the slowest shard's
expert compute per decode step, with the default placement and with redundant experts placed from the
measured load.

    python benchmarks/expert_balance.py [--preset bench] [--router-skew 3] [--shards 4] [--redundant 16]
        [--prompts 128] [--prompt 128] [--batch 64] [--timed-steps 8]

A checkpoint of the preset made with ``--router-skew`` (cluster/fixtures/checkpoint.py) runs the prefill of
``--prompts`` random prompts in the in-process model, recording every layer's expert ids per token. A decode
step at batch B is modelled as B tokens at one position of B prompts. The first half of the prompts is the load
window the balanced placement is built from (``Placement.balanced``); the steps measured come from the other
half (held out). For each placement:

* balancedness: max / mean over the shards of the (token, expert) rows each shard computes in a step and layer,
  averaged over steps and layers (the dashboard's ``epserve:shard_balancedness`` counts (token, shard) rows:
  also listed);
* the slowest shard's expert compute per step: each shard's experts (its slots, loaded from the checkpoint as a
  shard loads them, one thread) timed on its rows of ``--timed-steps`` steps, summed over the layers; the step
  waits for the slowest shard.

Writes the table to docs/performance.md under "Expert balance" (``--no-write``: print only).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import checkpoint, fixed_prompts, git_revision, machine, write_section

from epserve.actors.model.attention import WholeSequence
from epserve.actors.model.gemma4 import LocalExperts
from epserve.actors.model.loader import load_expert_slots, load_model
from epserve.actors.model.moe import expert_outputs
from epserve.actors.model.precision import dtype_name, resolve_dtype
from epserve.actors.placement import Placement


class RecordingExperts(LocalExperts):
    """The model's own experts, recording each layer's expert ids [T, K]."""

    def __init__(self, layers):
        super().__init__(layers)
        self.ids: list[torch.Tensor] = [None] * len(layers)

    def dispatch(self, layer, x_TH, ids_TK, weights_TK):
        self.ids[layer] = ids_TK.clone()
        return super().dispatch(layer, x_TH, ids_TK, weights_TK)


def routed_ids(model, prompts: list[list[int]]) -> torch.Tensor:
    """Expert ids [prompts, layers, positions, K] of every prompt token."""
    recorder = RecordingExperts(model.layers)
    out = []
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            ids = torch.tensor(prompt)
            pos = torch.arange(len(prompt))
            model(ids, pos, WholeSequence(pos), recorder)
            out.append(torch.stack(recorder.ids))
            print(f"\r[balance] routed {i + 1}/{len(prompts)} prompts", end="", flush=True)
    print()
    return torch.stack(out)


def balancedness(placement: Placement, steps: torch.Tensor) -> tuple[float, float]:
    """(expert rows, token rows): mean over steps and layers of max / mean per shard. steps: [S, L, B, K]."""
    N = placement.num_shards
    by_rows, by_tokens = [], []
    for step in steps:
        for layer, ids_BK in enumerate(step):
            shard_BK, _ = placement.route(layer, ids_BK)
            rows = torch.bincount(shard_BK.reshape(-1), minlength=N).float()
            hits = torch.zeros(ids_BK.shape[0], N, dtype=torch.bool).scatter_(1, shard_BK, True).sum(0).float()
            by_rows.append((rows.max() / rows.mean()).item())
            by_tokens.append((hits.max() / hits.mean()).item())
    return statistics.mean(by_rows), statistics.mean(by_tokens)


def shard_compute_ms(model_dir, placement: Placement, steps: torch.Tensor, hidden: int, dtype) -> list[float]:
    """The slowest shard's expert compute per step (ms, one per step), each shard on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    per_shard = []
    x = torch.randn(steps.shape[2], hidden).to(dtype)
    for s in range(placement.num_shards):
        experts, _, _ = load_expert_slots(model_dir, placement.experts_of(s), dtype=torch.bfloat16)
        for e in experts:
            e.prepare_(dtype)
        times = []
        for step in [steps[0], *steps]:  # the first once more, untimed: kernels compile and pack on first use
            t = 0.0
            for layer, ids_BK in enumerate(step):
                shard_BK, slot_BK = placement.route(layer, ids_BK)
                local = torch.where(shard_BK == s, slot_BK, -1)
                t0 = time.perf_counter()
                expert_outputs(x, local, experts[layer])
                t += time.perf_counter() - t0
            times.append(1000 * t)
        per_shard.append(times[1:])
        del experts
    torch.set_num_threads(threads)
    return [max(shard[i] for shard in per_shard) for i in range(len(steps))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--router-skew", type=float, default=3.0)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--redundant", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--timed-steps", type=int, default=8)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.prompts < 4 or args.batch > args.prompts // 2:
        raise SystemExit("--batch must be at most half of --prompts (the other half is the load window)")

    dtype = resolve_dtype(args.dtype, "cpu")
    model_dir = checkpoint(args.preset, router_skew=args.router_skew)
    model = load_model(model_dir, dtype)
    cfg = model.cfg
    prompts = fixed_prompts(args.prompts, args.prompt, cfg.vocab_size)
    ids = routed_ids(model, prompts)  # [P, L, T, K]
    del model
    half = args.prompts // 2
    window, held_out = ids[:half], ids[half:half + args.batch]
    load = torch.stack([torch.bincount(window[:, layer].reshape(-1), minlength=cfg.num_experts)
                        for layer in range(cfg.num_layers)])  # [L, E]
    steps = held_out.permute(2, 1, 0, 3)  # [positions, L, batch, K]: one decode-like step per position
    top = load.sort(dim=1, descending=True).values
    hottest = (top[:, :cfg.top_k].sum(1) / load.sum(1)).mean().item()

    placements = {
        "contiguous (default), R = 0": Placement.contiguous(cfg.num_layers, cfg.num_experts, args.shards),
        f"contiguous, R = {args.redundant} (spread before any load)":
            Placement.contiguous(cfg.num_layers, cfg.num_experts, args.shards, args.redundant),
        "balanced from the load window, R = 0": Placement.balanced(load.tolist(), args.shards),
        f"balanced from the load window, R = {args.redundant}":
            Placement.balanced(load.tolist(), args.shards, args.redundant),
    }
    timed = steps[torch.linspace(0, len(steps) - 1, args.timed_steps).long()]
    rows = []
    for name, placement in placements.items():
        print(f"[balance] {name} ...", flush=True)
        by_rows, by_tokens = balancedness(placement, steps)
        slowest = shard_compute_ms(model_dir, placement, timed, cfg.hidden_size, dtype)
        rows.append(f"| {name} | {by_rows:.3f} | {by_tokens:.3f} | {statistics.median(slowest):.1f} |")

    command = (f"python benchmarks/expert_balance.py --preset {args.preset} --router-skew {args.router_skew} "
               f"--shards {args.shards} --redundant {args.redundant} --prompts {args.prompts} --prompt {args.prompt} "
               f"--batch {args.batch} --timed-steps {args.timed_steps}")
    body = f"""
Command: `{command}` (revision {git_revision()}; {machine()}; compute dtype {dtype_name(dtype)}).
`{args.preset}` preset with router skew {args.router_skew}: the {cfg.top_k} hottest experts of a layer take
{100 * hottest:.0f}% of its routed rows (uniform: {100 * cfg.top_k / cfg.num_experts:.0f}%). {args.shards} shards;
decode steps of {args.batch} tokens from held-out prompts; the balanced placements come from the load of
{half} other prompts. Balancedness: max / mean rows per shard in a step and layer (1.0 is even), mean over
{len(steps)} steps x {cfg.num_layers} layers; the slowest shard's expert compute: median over
{args.timed_steps} steps, one thread per shard.

| placement | balancedness, (token, expert) rows | balancedness, (token, shard) rows | slowest shard's experts per step (ms) |
|---|---|---|---|
""" + "\n".join(rows)
    print(body)
    if not args.no_write:
        write_section("Expert balance", body)


if __name__ == "__main__":
    main()
