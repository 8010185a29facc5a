"""Where a decode step's time goes: the in-process engine at batch ``--requests`` on the ``bench`` preset, each
part of the model timed in place (wall time around the module's call; everything runs synchronously on the
CPU), beside the part's arithmetic and the FLOP/s it reached.

    python benchmarks/decode_profile.py [--requests 64] [--prompt 128] [--steps 8] [--no-write]

Records docs/performance.md ("Decode step, by part").
"""

from __future__ import annotations

import argparse
import collections
import time


from common import checkpoint, git_revision, machine, write_section
from epserve.cluster.tools.bench import Workload


def timed(owner, name: str, label: str, totals: dict) -> None:
    """Replace owner.name by a wrapper that adds its wall time to totals[label]."""
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - t0

    setattr(owner, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    from epserve.actors.engine.config import EngineConfig
    from epserve.actors.engine.engine import LLMEngine
    from epserve.actors.engine.sampling import SamplingParams
    from epserve.actors.model.config import FULL
    from epserve.actors.model.loader import load_model

    model = load_model(checkpoint("bench", layout="text-only"))
    cfg, B = model.cfg, args.requests
    engine = LLMEngine(model, EngineConfig(max_num_seqs=B, max_num_batched_tokens=2048,
                                           enable_prefix_caching=False))
    for p, _ in Workload(B, args.prompt, 1, vocab_size=cfg.vocab_size).requests():
        engine.add_request(p, SamplingParams(max_tokens=args.steps + 4, ignore_eos=True))
    while any(s.num_computed < s.num_prompt for s in engine.requests.values()):
        engine.step()
    engine.step()

    totals: dict[str, float] = collections.defaultdict(float)
    for layer in model.layers:
        attn = layer.self_attn
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
            if proj is not None:
                timed(proj, "forward", "attention projections", totals)
        timed(layer.mlp, "forward", "dense MLP", totals)
        timed(layer.experts, "forward", "routed experts", totals)
        timed(layer.router, "forward", "router", totals)
    timed(model, "logits", "tied head and soft-cap", totals)
    import epserve.actors.engine.kv_cache as kv_cache

    timed(kv_cache.PagedAttention, "attend", "attention over the KV cache", totals)
    timed(engine.runner, "run", "model step", totals)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    step = (time.perf_counter() - t0) / args.steps

    H, context = cfg.hidden_size, args.prompt + args.steps // 2
    proj = sum(H * (2 * s.head_dim * cfg.num_heads + s.head_dim * s.num_kv_heads * (1 if s.k_eq_v else 2))
               for s in (cfg.full if k == FULL else cfg.sliding for k in cfg.layer_types))
    flops = {"attention projections": proj, "dense MLP": cfg.num_layers * 3 * H * cfg.intermediate_size,
             "routed experts": cfg.num_layers * cfg.top_k * 3 * H * cfg.moe_intermediate_size,
             "router": cfg.num_layers * H * cfg.num_experts, "tied head and soft-cap": cfg.vocab_size * H,
             "attention over the KV cache": sum(2 * cfg.num_heads * s.head_dim * min(context, s.window or context)
                                                for s in (cfg.full if k == FULL else cfg.sliding
                                                          for k in cfg.layer_types))}
    parts = [k for k in totals if k != "model step"]
    rest = totals["model step"] - sum(totals[k] for k in parts)
    lines = ["| part | ms per step | share | GFLOP/s |", "|---|---|---|---|"]
    for k in sorted(parts, key=lambda k: -totals[k]):
        ms = 1000 * totals[k] / args.steps
        rate = 2 * flops[k] * B / (totals[k] / args.steps) / 1e9
        lines.append(f"| {k} | {ms:.1f} | {totals[k] / args.steps / step:.0%} | {rate:.0f} |")
    lines.append(f"| the rest of the model step (norms, RoPE, KV writes, gathers) | {1000 * rest / args.steps:.1f} | "
                 f"{rest / args.steps / step:.0%} | |")
    other = step - totals["model step"] / args.steps
    lines.append(f"| outside the model (scheduler, step plan, sampler) | {1000 * other:.1f} | {other / step:.0%} | |")
    body = f"""
Command: `python benchmarks/decode_profile.py --requests {B} --prompt {args.prompt} --steps {args.steps}`
(revision {git_revision()}; {machine()}).
The in-process engine's decode step at batch {B} on the `bench` preset (context ~{context}): {1000 * step:.0f} ms,
by part (mean of {args.steps} steps):

""" + "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("Decode step, by part", body)


if __name__ == "__main__":
    main()
