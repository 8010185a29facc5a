"""The single-GPU check, in one invocation: bf16 parity against transformers layer by layer (model spec §5
item 12), fp32 end-to-end parity (asserted), and the bench preset's bf16 throughput against transformers.

    python benchmarks/gpu_check.py [--device cuda] [--presets tiny,bench] [--skip-throughput] [--no-write]
        [--threads N] [--step-timeout 240]

Records the results in docs/gpu.md. `--device cpu --presets tiny --skip-throughput --no-write` tests the
script itself on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import gc
import signal
import sys
import time
import traceback

from common import ROOT, checkpoint, fixed_prompts, git_revision, write_section  # common first: allocator setup
import torch

from epserve.actors.engine.config import EngineConfig
from epserve.actors.engine.engine import LLMEngine
from epserve.actors.engine.sampling import SamplingParams
from epserve.actors.model.attention import WholeSequence
from epserve.actors.model.config import FULL, SLIDING, ModelConfig
from epserve.actors.model.layers import rope_tables
from epserve.actors.model.loader import load_model

GPU_MD = ROOT / "docs" / "gpu.md"
REL_TOL = 1e-5  # the project's fp32 rule: max|Δlogit| <= 1e-5 * max|reference logit|
PROMPT, GREEDY = 256, 32
START = time.perf_counter()


def log(msg):
    print(f"[{time.perf_counter() - START:6.1f} s] {msg}", flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def run_step(name, seconds, failed, device, fn, *args):
    """fn(*args) with progress lines and a time limit; a failure is recorded and the next checks still run."""
    def expire(*_):
        raise TimeoutError(f"no result after {seconds} s")
    log(f"{name} ...")
    signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        result = fn(*args)
        log(f"{name}: done")
        return result
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        failed.append(f"{name}: {type(e).__name__}: {e}")
        release(device)
    finally:
        signal.alarm(0)


def hf_model(path, dtype, device, **kwargs):
    from transformers import AutoModelForCausalLM  # the released layout resolves to Gemma4ForConditionalGeneration
    from transformers.utils import logging

    logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kwargs).to(device).eval()


def hf_forward(ref, ids):
    """transformers' forward with hidden states and router probabilities. grouped_mm experts as in §1.6;
    a torch without that kernel for this dtype/device gets transformers' eager experts loop instead."""
    kwargs = dict(input_ids=ids[None], use_cache=False, output_hidden_states=True, output_router_logits=True)
    try:
        return ref(**kwargs), "grouped_mm"
    except (RuntimeError, NotImplementedError) as e:
        log(f"grouped_mm experts failed ({str(e).splitlines()[0][:100]}): using transformers' eager experts")
        ref.set_experts_implementation("eager")
        return ref(**kwargs), "eager"


@torch.no_grad()
def parity(path, dtype, device):
    """Layer by layer on transformers' hidden states, then end to end and greedy; logs as it goes."""
    name = str(dtype).removeprefix("torch.")
    ref = hf_model(path, dtype, device, attn_implementation="eager", experts_implementation="grouped_mm")
    ours = load_model(path, dtype=dtype, device=device)
    ids = torch.tensor(fixed_prompts(1, PROMPT, ours.cfg.vocab_size)[0], device=device)
    out, experts_impl = hf_forward(ref, ids)
    hs = [h[0] for h in out.hidden_states]  # hs[0] embeddings, hs[l+1] output of layer l, hs[L] final-normed
    probs = out.router_logits  # probabilities, [T, E] per layer (spec §5 item 7)
    pos = torch.arange(len(ids), device=device)
    ctx = WholeSequence(pos)
    ropes = {k: rope_tables(ours.inv_freq(k), pos, dtype) for k in (SLIDING, FULL)}
    chosen = []  # our routers' expert ids, captured as the layer runs
    hooks = [layer.router.register_forward_hook(lambda m, i, o: chosen.append(o[1])) for layer in ours.layers]
    layers = []
    for l, layer in enumerate(ours.layers):
        y = layer(hs[l], ropes[layer.kind], ctx, ours.local_experts)  # transformers' input to layer l
        if l == len(ours.layers) - 1:
            y = ours.norm(y)  # hs[L] is the final-normed last layer (§1.5)
        ref_y = hs[l + 1].float()
        k = chosen[-1].shape[-1]
        same = (chosen[-1].sort(-1).values == probs[l].topk(k, dim=-1).indices.sort(-1).values).all(-1)
        diff, scale = (y.float() - ref_y).abs(), ref_y.abs().max().item()
        layers.append(dict(kind=layer.kind, rel=diff.max().item() / scale, agree=same.float().mean().item(),
                           rel_same=diff[same].max().item() / scale if same.any() else float("nan")))
        log(f"  {name} layer {l} ({layer.kind}): max|Δ|/max|ref| {layers[-1]['rel']:.2e} (tokens with the same "
            f"expert set: {layers[-1]['rel_same']:.2e}), expert-set agreement {layers[-1]['agree']:.4f}")
    for h in hooks:
        h.remove()
    ref_logits = out.logits[0].float()
    logits = ours.logits(ours(ids, pos, ctx)).float()
    e2e_diff, e2e_max = (logits - ref_logits).abs().max().item(), ref_logits.abs().max().item()
    log(f"  {name} end to end: max|Δlogit| {e2e_diff:.3e} of max|logit| {e2e_max:.3f} ({e2e_diff / e2e_max:.2e})")
    gen = ref.generate(ids[None], max_new_tokens=GREEDY, min_new_tokens=GREEDY, do_sample=False, eos_token_id=None,
                       pad_token_id=ours.cfg.pad_token_id)[0, len(ids):].tolist()
    engine = LLMEngine(ours, EngineConfig(max_num_seqs=1, kv_cache_bytes=1 << 28))
    mine = engine.generate([ids.tolist()], SamplingParams(max_tokens=GREEDY, ignore_eos=True))[0].token_ids
    prefix = next((i for i, (a, b) in enumerate(zip(gen, mine)) if a != b), GREEDY)
    log(f"  {name} greedy: the first {prefix} of {GREEDY} tokens equal")
    del ref, ours, engine, out, hs
    release(device)
    return dict(layers=layers, e2e_diff=e2e_diff, e2e_max=e2e_max, prefix=prefix, experts=experts_impl,
                equal=sum(a == b for a, b in zip(gen, mine)), ok=e2e_diff <= REL_TOL * e2e_max)


def parity_body(bf16, fp32, header):
    rows = "\n".join(f"| {l} | {r['kind']} | {r['rel']:.2e} | {r['rel_same']:.2e} | {r['agree']:.4f} |"
                     for l, r in enumerate(bf16["layers"]))
    return f"""
{header}
Prompt {PROMPT} random tokens; reference: transformers, eager attention, `{bf16['experts']}` experts, bf16. Each
of our layers l is fed transformers' `hidden_states[l]` (last row: with the final norm, as `hidden_states[L]`).

| layer | kind | max\\|Δ\\| / max\\|ref\\| | the same, tokens with the reference's expert set | expert-set agreement |
|---|---|---|---|---|
{rows}

End to end (bf16): max|Δlogit| / max|logit| = {bf16['e2e_diff'] / bf16['e2e_max']:.2e}; greedy: the first
{bf16['prefix']} of {GREEDY} tokens equal ({bf16['equal']}/{GREEDY} positions), our engine against `generate`.
fp32 (asserted): max|Δlogit| = {fp32['e2e_diff']:.2e} {'<=' if fp32['ok'] else '> (FAILED)'} 1e-5 *
max|logit| = {REL_TOL * fp32['e2e_max']:.2e}; greedy: the first {fp32['prefix']} of {GREEDY} tokens equal.
"""


def timed(device, fn, *args, **kwargs):
    sync(device)
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    sync(device)  # generate returns before the GPU is done
    return result, time.perf_counter() - t0


@torch.no_grad()
def throughput(path, device, requests=64, prompt=128, new=128):
    vocab = ModelConfig.from_json(path).vocab_size
    prompts = fixed_prompts(requests, prompt, vocab)
    engine = LLMEngine(load_model(path, torch.bfloat16, device),
                       EngineConfig(max_num_seqs=requests, max_num_batched_tokens=2048, enable_prefix_caching=False))
    engine.generate(prompts[:2], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    outs, ours_s = timed(device, engine.generate, prompts, SamplingParams(max_tokens=new, ignore_eos=True))
    ours_tokens = sum(len(o.token_ids) for o in outs)
    del engine
    release(device)
    ref = hf_model(path, torch.bfloat16, device)  # transformers' defaults (sdpa, grouped_mm): its fast path
    ids = torch.tensor(prompts, device=device)
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    ref.generate(ids[:2], max_new_tokens=2, **kwargs)  # warm-up
    out, ref_s = timed(device, ref.generate, ids, max_new_tokens=new, min_new_tokens=new, **kwargs)
    ref_tokens = (out.shape[1] - prompt) * requests
    del ref
    release(device)
    return f"""
Workload: {requests} requests x {prompt} prompt tokens x {new} new tokens, greedy, ignore eos, bf16, all
submitted at once; one timed run each after a warm-up.

| engine | output tok/s | wall time |
|---|---|---|
| epserve in-process engine | {ours_tokens / ours_s:.1f} | {ours_s:.2f} s |
| transformers `generate` (batch {requests}, sdpa, grouped_mm) | {ref_tokens / ref_s:.1f} | {ref_s:.2f} s |

epserve / transformers: {(ours_tokens / ours_s) / (ref_tokens / ref_s):.2f}x.
"""


PREAMBLE = """# GPU runs

Recorded by `python benchmarks/gpu_check.py` on one CUDA GPU (flags in its docstring); each section names the
command, the GPU and the torch version it ran with.

Still to run, on two or more GPUs: the cluster's expert all-to-all over NCCL (`device: auto`, chosen when every
actor has a GPU). NCCL cannot put two ranks on one GPU, so one GPU cannot run it; to record there: the cluster's
greedy tokens against the in-process engine, and its throughput against the engine's.
"""


def write_docs(sections):
    """The preamble replaces the text above the first section; sections of earlier runs stay."""
    text = GPU_MD.read_text()
    GPU_MD.write_text(PREAMBLE + (text[text.index("\n## "):] if "\n## " in text else ""))
    for heading, body in sections:
        write_section(heading, body, GPU_MD)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--presets", default="tiny,bench", help="comma-separated checkpoint presets for parity")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/gpu.md alone")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--step-timeout", type=int, default=240, help="seconds per step")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"gpu_check: no CUDA GPU visible to torch {torch.__version__}; use --device cpu for a CPU test run")
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = (f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})" if device.type == "cuda"
           else "no GPU (CPU run)")
    header = (f"Command: `python benchmarks/gpu_check.py {' '.join(sys.argv[1:])}` (revision {git_revision()}); "
              f"{gpu}, torch {torch.__version__}, device `{device}`.")
    log(header)
    sections, failed = [], []
    for preset in args.presets.split(","):
        path = checkpoint(preset)  # outside the time limit: an interrupted write would leave a bad cache
        fp32, bf16 = (run_step(f"{preset}: {name} parity", args.step_timeout, failed, device, parity, path, dtype,
                               device) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)))
        if fp32 and not fp32["ok"]:
            failed.append(f"{preset}: fp32 max|Δlogit| {fp32['e2e_diff']:.3e} > 1e-5 * max|logit| "
                          f"{REL_TOL * fp32['e2e_max']:.3e}")
        if fp32 and bf16:
            sections.append((f"bf16 parity, `{preset}` preset", parity_body(bf16, fp32, header)))
    if not args.skip_throughput:
        path = checkpoint("bench")
        body = run_step("bench: bf16 throughput", args.step_timeout, failed, device, throughput, path, device)
        if body:
            sections.append(("bf16 throughput, `bench` preset", header + "\n" + body))
    for heading, body in sections:
        print(f"\n## {heading}\n{body}")
    if not args.no_write:
        write_docs(sections)
        log(f"wrote {GPU_MD}")
    if failed:
        sys.exit("gpu_check FAILED: " + "; ".join(failed))


if __name__ == "__main__":
    main()
