"""In-process engine against transformers' batched greedy generate, on the same checkpoint and workload.

    python benchmarks/engine_vs_transformers.py [--preset bench] [--requests 64] [--prompt 128] [--new 64]

Reports output tokens/s and the engine's mean step time, and records them in docs/performance.md.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from common import checkpoint, fixed_prompts, git_revision, machine, write_section


def run_engine(path, prompts, new_tokens):
    from epserve.actors.engine.config import EngineConfig
    from epserve.actors.engine.engine import LLMEngine
    from epserve.actors.engine.sampling import SamplingParams
    from epserve.actors.model.loader import load_model

    model = load_model(path)
    engine = LLMEngine(model, EngineConfig(max_num_seqs=len(prompts), max_num_batched_tokens=2048,
                                           enable_prefix_caching=False))
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    engine.generate(prompts[:2], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    steps0 = engine.num_steps
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    steps = engine.num_steps - steps0
    return {"tok_s": tokens / elapsed, "elapsed": elapsed, "steps": steps, "step_ms": 1000 * elapsed / steps}


def run_transformers(path, prompts, new_tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = torch.tensor(prompts)
    with torch.no_grad():
        model.generate(ids[:2], max_new_tokens=2, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=None)
        elapsed = time.perf_counter() - t0
    tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"tok_s": tokens / elapsed, "elapsed": elapsed}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/performance.md alone")
    args = ap.parse_args()
    path = checkpoint(args.preset)
    from epserve.actors.model.config import ModelConfig

    prompts = fixed_prompts(args.requests, args.prompt, ModelConfig.from_json(path).vocab_size)
    print(f"engine: {args.requests} requests x {args.prompt} prompt x {args.new} new tokens ...", flush=True)
    ours = run_engine(path, prompts, args.new)
    print(ours, flush=True)
    gc.collect()
    print("transformers generate ...", flush=True)
    ref = run_transformers(path, prompts, args.new)
    print(ref, flush=True)
    command = (f"python benchmarks/engine_vs_transformers.py --preset {args.preset} --requests {args.requests} "
               f"--prompt {args.prompt} --new {args.new}")
    body = f"""
Command: `{command}` (revision {git_revision()}; {machine()}).
Workload: {args.requests} requests x {args.prompt} prompt tokens x {args.new} new tokens, greedy, ignore eos,
fp32, `{args.preset}` preset, all submitted at once; one run each, in one invocation.

| engine | output tok/s | wall time | mean step |
|---|---|---|---|
| epserve in-process engine | {ours['tok_s']:.1f} | {ours['elapsed']:.1f} s | {ours['step_ms']:.1f} ms ({ours['steps']} steps) |
| transformers `generate` (batch {args.requests}) | {ref['tok_s']:.1f} | {ref['elapsed']:.1f} s | |

epserve / transformers: {ours['tok_s'] / ref['tok_s']:.2f}x.
"""
    print(body)
    if not args.no_write:
        write_section("In-process engine vs transformers generate", body)


if __name__ == "__main__":
    main()
