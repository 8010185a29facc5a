"""Where a step's time goes: the in-process engine at batch ``--requests``, each part of the model timed in
place (wall time around the call; everything runs synchronously on the CPU), beside the part's arithmetic and
the FLOP/s it reached; then the step split into the GEMMs, attention over the KV cache, and everything else,
of which the small native steps are timed too (norms, q/k norms with RoPE, routing, the experts' sort and
combine); what none of them covers is the experts' gelu x up, embedding, the step plan, scheduler, sampler.

``--phase decode`` (default) times decode steps at batch ``--requests``; ``--phase prefill`` times the
prefill chunks of the same requests (``--chunk`` tokens each, after a warm-up chunk).

    python benchmarks/decode_profile.py [--preset bench] [--dtype auto] [--requests 64] [--prompt 128]
        [--steps 8] [--phase decode|prefill] [--chunk 2048] [--no-write]

Records docs/performance.md ("Decode step, by part: <preset>, <dtype>", or "Prefill chunk, by part: ...").
"""

from __future__ import annotations

import argparse
import collections
import time

from common import checkpoint, git_revision, machine, write_section
import torch

from epserve.actors.engine.config import EngineConfig
from epserve.actors.engine.engine import LLMEngine
from epserve.actors.engine.sampling import SamplingParams
from epserve.actors.model import precision
from epserve.actors.model.config import FULL
from epserve.actors.model.loader import load_model
from epserve.actors.model.moe import Experts
from epserve.cluster.tools.bench import Workload

GEMMS = ("attention projections", "dense MLP", "routed experts' grouped GEMMs", "router projection",
         "tied head")
# the small steps of a layer (actors/model/ops.py), timed inside "everything else"
SMALL_OPS = {"norms": ("rms_norm", "add_rms_norm", "ffn_inputs", "ffn_output"), "q/k/v norms and RoPE": ("qkv",),
             "routing (softmax, top-k)": ("route",), "experts' sort and gather": ("moe_align",),
             "experts' weighted sum": ("moe_combine",)}


def timed(owner, name: str, label: str, totals: dict) -> None:
    """Replace owner.name by a wrapper that adds its wall time to totals[label] (nested calls: outermost)."""
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - t0

    setattr(owner, name, wrapper)


def flops_per_token(cfg, context: int) -> dict[str, float]:
    """Multiply-adds x 2 per decoded token, by part."""
    H = cfg.hidden_size
    shapes = [cfg.full if k == FULL else cfg.sliding for k in cfg.layer_types]
    proj = sum(H * (2 * s.head_dim * cfg.num_heads + s.head_dim * s.num_kv_heads * (1 if s.k_eq_v else 2))
               for s in shapes)
    attention = sum(2 * cfg.num_heads * s.head_dim * min(context, s.window or context) for s in shapes)
    return {k: 2 * v for k, v in {
        "attention projections": proj, "dense MLP": cfg.num_layers * 3 * H * cfg.intermediate_size,
        "routed experts' grouped GEMMs": cfg.num_layers * cfg.top_k * 3 * H * cfg.moe_intermediate_size,
        "router projection": cfg.num_layers * H * cfg.num_experts, "tied head": cfg.vocab_size * H,
        "attention (with KV writes)": attention}.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--dtype", default="auto", choices=list(precision.DTYPES))
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8, help="decode steps timed")
    ap.add_argument("--phase", default="decode", choices=("decode", "prefill"))
    ap.add_argument("--chunk", type=int, default=2048, help="tokens per step (max_num_batched_tokens)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    dtype = precision.resolve_dtype(args.dtype, "cpu")
    model = load_model(checkpoint(args.preset, layout="text-only"), dtype)
    cfg, B, prefill = model.cfg, args.requests, args.phase == "prefill"
    engine = LLMEngine(model, EngineConfig(max_num_seqs=B, max_num_batched_tokens=args.chunk,
                                           enable_prefix_caching=False))
    engine.warm_up()  # a full chunk: oneDNN's first calls at its shapes, the activations' memory faulted in
    for p, _ in Workload(B, args.prompt, 1, vocab_size=cfg.vocab_size).requests():
        engine.add_request(p, SamplingParams(max_tokens=2 * args.steps + 4, ignore_eos=True))
    prefilling = lambda: any(s.num_computed < s.num_prompt for s in engine.requests.values())  # noqa: E731
    if not prefill:
        while prefilling():
            engine.step()
        for _ in range(args.steps // 2 + 1):  # warm-up (oneDNN's first calls at each shape)
            engine.step()

    totals: dict[str, float] = collections.defaultdict(float)
    for layer in model.layers:
        attn = layer.self_attn
        timed(attn, "qkv_proj", "attention projections", totals)  # q, k, v: one GEMM (layers.JointLinears)
        timed(attn.o_proj, "forward", "attention projections", totals)
        timed(layer.mlp, "forward", "dense MLP", totals)
        timed(layer.router.proj, "forward", "router projection", totals)
    timed(Experts, "project", "routed experts' grouped GEMMs", totals)
    import epserve.actors.engine.kv_cache as kv_cache
    import epserve.actors.model.gemma4 as gemma4
    import epserve.actors.model.ops as ops

    timed(gemma4, "linear", "tied head", totals)  # the head is the one call of ``linear`` in gemma4.py
    timed(kv_cache.PagedAttention, "attend", "attention (with KV writes)", totals)
    for label, names in SMALL_OPS.items():
        for name in names:
            timed(ops, name, label, totals)
    totals.clear()
    steps, tokens = 0, 0
    t0 = time.perf_counter()
    while prefilling() if prefill else steps < args.steps:
        engine.step()
        steps, tokens = steps + 1, tokens + engine.last_step_tokens
    step = (time.perf_counter() - t0) / steps

    flops = flops_per_token(cfg, args.prompt // 2 if prefill else args.prompt + args.steps)
    per_step = tokens / steps
    ms = {k: 1000 * v / steps for k, v in totals.items()}
    step_ms = 1000 * step
    gemm_ms = sum(ms.get(k, 0.0) for k in GEMMS)
    attention_ms = ms.get("attention (with KV writes)", 0.0)
    rest_ms = step_ms - gemm_ms - attention_ms
    lines = ["| part | ms per step | share | GFLOP/s |", "|---|---|---|---|"]
    for k in [*GEMMS, "attention (with KV writes)"]:
        # the head computes the logits of one token per request, prefill or decode
        flop = flops[k] * (B / per_step if k == "tied head" else 1)
        rate = f"{flop * per_step / (ms[k] / 1000) / 1e9:.0f}" if ms.get(k) else ""
        lines.append(f"| {k} | {ms.get(k, 0.0):.1f} | {ms.get(k, 0.0) / step_ms:.0%} | {rate} |")
    lines.append(f"| everything else | {rest_ms:.1f} | {rest_ms / step_ms:.0%} | |")
    small_ms = sum(ms.get(k, 0.0) for k in SMALL_OPS)
    for k in SMALL_OPS:
        lines.append(f"| of which {k} | {ms.get(k, 0.0):.1f} | {ms.get(k, 0.0) / step_ms:.0%} | |")
    lines.append(f"| of which the experts' gelu x up, embedding, step plan, scheduler, sampler | "
                 f"{rest_ms - small_ms:.1f} | {(rest_ms - small_ms) / step_ms:.0%} | |")
    what = (f"prefill chunk ({per_step:.0f} tokens of {B} requests x {args.prompt} prompt tokens)" if prefill
            else f"decode step at batch {B} (context ~{args.prompt + args.steps})")
    heading = f"{'Prefill chunk' if prefill else 'Decode step'}, by part: `{args.preset}` preset, {precision.dtype_name(dtype)}"
    phase = f" --phase prefill --chunk {args.chunk}" if prefill else f" --steps {args.steps}"
    body = f"""
Command: `python benchmarks/decode_profile.py --preset {args.preset} --dtype {args.dtype} --requests {B} --prompt {args.prompt}{phase}`
(revision {git_revision()}; {machine()}).
The in-process engine's {what} on the `{args.preset}` preset, computing in
{precision.dtype_name(dtype)}: {step_ms:.1f} ms, by part (mean of {steps} steps). GEMMs {gemm_ms / step_ms:.0%},
attention over the KV cache (with its writes) {attention_ms / step_ms:.0%}, everything else {rest_ms / step_ms:.0%}.

""" + "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section(heading, body)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
