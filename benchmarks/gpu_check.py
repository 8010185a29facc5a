"""The single-GPU check, in one invocation: the bf16 path (torch's grouped GEMM for the routed experts) layer by
layer against fp32 (model spec §5 item 12), bf16 and fp32 end to end against transformers, and the `bench`
preset's decode throughput at batch 1, 8 and 64, beside the GPU's measured GEMM rate and copy bandwidth.

    python benchmarks/gpu_check.py [--device cuda] [--presets tiny,bench] [--batches 1,8,64] [--skip-throughput]
        [--no-write] [--json FILE] [--step-timeout 240]

Records docs/gpu.md. `--device cpu --presets tiny --batches 1,4 --no-write` tests the script on a machine
without a GPU. The reference is transformers (eager attention, its grouped_mm experts) where it is installed
and knows Gemma 4; otherwise our own fp32 model, which the CPU tests hold to transformers within 1e-5.
"""

from __future__ import annotations

import argparse
import gc
from functools import partial
import json
import signal
import statistics
import sys
import time
import traceback

from common import ROOT, checkpoint, fixed_prompts, git_revision, write_section  # common first: allocator setup
import torch

from epserve.actors.engine.config import EngineConfig
from epserve.actors.engine.engine import LLMEngine
from epserve.actors.engine.sampling import SamplingParams
from epserve.actors.model.attention import WholeSequence
from epserve.actors.model.config import FULL, SLIDING
from epserve.actors.model.layers import rope_tables
from epserve.actors.model.loader import load_model

GPU_MD = ROOT / "docs" / "gpu.md"
REL_TOL = 1e-5  # the project's fp32 rule: max|Δlogit| <= 1e-5 * max|reference logit|
BF16_BUDGET = 1.5  # our bf16 error at most this multiple of transformers' own (tests/test_precision.py)
PROMPT, GREEDY = 128, 32
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


# ---------------------------------------------------------------------------------------------- references


class Reference:
    """fp32 and bf16 logits, hidden states and router probabilities of the reference implementation."""

    def __init__(self, path, dtype, device):
        self.device = device
        try:
            from transformers import AutoModelForCausalLM
            from transformers.utils import logging

            logging.disable_progress_bar()
            self.model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=dtype, attn_implementation="eager").to(device).eval()
            self.name = f"transformers {__import__('transformers').__version__}"
        except Exception as e:  # noqa: BLE001 - no transformers, or one without Gemma 4
            log(f"transformers unavailable ({type(e).__name__}: {str(e)[:120]}): our own model is the reference")
            self.model, self.ours = None, load_model(path, dtype=dtype, device=device)
            self.name = "epserve (fp32-checked on CPU)"

    @torch.no_grad()
    def forward(self, ids):
        """(logits fp32 [T, V], hidden states [L + 1] of [T, H])."""
        if self.model is not None:
            out = self.model(input_ids=ids[None], use_cache=False, output_hidden_states=True)
            return out.logits[0].float(), [h[0] for h in out.hidden_states]
        hidden = []
        hooks = [layer.register_forward_hook(lambda m, i, o: hidden.append(o)) for layer in self.ours.layers]
        pos = torch.arange(len(ids), device=ids.device)
        embedded = self.ours.embed_tokens(ids) * torch.tensor(self.ours.cfg.embed_scale).to(self.ours.dtype)
        final = self.ours(ids, pos, WholeSequence(pos))
        for h in hooks:
            h.remove()
        return self.ours.logits(final).float(), [embedded, *hidden[:-1], final]

    @torch.no_grad()
    def greedy(self, ids, n):
        if self.model is None:
            engine = LLMEngine(self.ours, EngineConfig(max_num_seqs=1, kv_cache_bytes=1 << 28))
            return engine.generate([ids.tolist()], SamplingParams(max_tokens=n, ignore_eos=True))[0].token_ids
        return self.model.generate(ids[None], max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()


@torch.no_grad()
def layer_by_layer(model, hidden, ctx):
    """Each of the model's layers l on the reference's hidden_states[l] (in the model's dtype): its outputs
    (the last one final-normed, §1.5) and its router's expert ids."""
    pos = ctx.positions
    ropes = {k: rope_tables(model.inv_freq(k), pos, model.dtype) for k in (SLIDING, FULL)}
    chosen, outputs = [], []
    hooks = [layer.router.register_forward_hook(lambda m, i, o: chosen.append(o[1])) for layer in model.layers]
    for l, layer in enumerate(model.layers):
        y = layer(hidden[l].to(model.dtype), ropes[layer.kind], ctx, model.local_experts)
        outputs.append(model.norm(y) if l == len(model.layers) - 1 else y)
    for h in hooks:
        h.remove()
    return outputs, chosen


def our_greedy(model, ids, n):
    engine = LLMEngine(model, EngineConfig(max_num_seqs=1, kv_cache_bytes=1 << 28))
    return engine.generate([ids.tolist()], SamplingParams(max_tokens=n, ignore_eos=True))[0].token_ids


def agree(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))


# ---------------------------------------------------------------------------------------------- parity


@torch.no_grad()
def parity(path, device):
    """bf16 layer by layer on the fp32 reference's hidden states; bf16 and fp32 end to end; greedy."""
    ids = torch.tensor(fixed_prompts(1, PROMPT, load_model(path, expert_range=None).cfg.vocab_size)[0],
                       device=device)
    ref32 = Reference(path, torch.float32, device)
    logits32, hs32 = ref32.forward(ids)
    greedy32 = ref32.greedy(ids, GREEDY)
    del ref32
    release(device)

    pos = torch.arange(len(ids), device=device)
    ctx = WholeSequence(pos)
    fp32_choice = layer_by_layer(load_model(path, dtype=torch.float32, device=device), hs32, ctx)[1]
    release(device)
    ours = load_model(path, dtype=torch.bfloat16, device=device)
    outputs, chosen = layer_by_layer(ours, hs32, ctx)
    layers = []
    for l, layer in enumerate(ours.layers):
        y, want = outputs[l], hs32[l + 1].float()
        same = (chosen[l].sort(-1).values == fp32_choice[l].sort(-1).values).all(-1)
        diff, scale = (y.float() - want).abs(), want.abs().max().item()
        layers.append(dict(kind=layer.kind, rel=diff.max().item() / scale, agree=same.float().mean().item(),
                           rel_same=diff[same].max().item() / scale if same.any() else float("nan"),
                           path=layer.experts.path))
        log(f"  bf16 layer {l} ({layer.kind}, experts {layer.experts.path}): max|Δ|/max|ref| {layers[-1]['rel']:.2e} "
            f"(same expert set: {layers[-1]['rel_same']:.2e}), expert-set agreement {layers[-1]['agree']:.4f}")
    ours16 = (ours.logits(ours(ids, pos, ctx)).float() - logits32).abs().max().item()
    greedy16 = our_greedy(ours, ids, GREEDY)
    del ours
    release(device)

    ref16 = Reference(path, torch.bfloat16, device)
    theirs16 = (ref16.forward(ids)[0] - logits32).abs().max().item()
    ref_greedy16 = ref16.greedy(ids, GREEDY)
    ref_name = ref16.name
    del ref16
    release(device)

    ours32_model = load_model(path, dtype=torch.float32, device=device)
    ours32 = (ours32_model.logits(ours32_model(ids, pos, ctx)).float() - logits32).abs().max().item()
    mine32 = our_greedy(ours32_model, ids, GREEDY)
    del ours32_model
    release(device)
    scale = logits32.abs().max().item()
    result = dict(reference=ref_name, layers=layers, scale=scale, ours16=ours16, theirs16=theirs16, ours32=ours32,
                  fp32_ok=ours32 <= REL_TOL * scale, greedy32=agree(greedy32, mine32),
                  greedy16=agree(ref_greedy16, greedy16))
    log(f"  end to end: bf16 ours {ours16:.3f}, reference bf16 {theirs16:.3f} (max|logit| {scale:.2f}); fp32 ours "
        f"{ours32:.2e}; greedy fp32 {result['greedy32']}/{GREEDY}, bf16 {result['greedy16']}/{GREEDY}")
    return result


def parity_body(r, header):
    rows = "\n".join(f"| {l} | {x['kind']} | {x['path']} | {x['rel']:.2e} | {x['rel_same']:.2e} | {x['agree']:.4f} |"
                     for l, x in enumerate(r["layers"]))
    ratio = r["ours16"] / r["theirs16"] if r["theirs16"] else float("inf")
    return f"""
{header}
Prompt {PROMPT} random tokens; reference: {r['reference']}, eager attention, fp32. Each of our bf16 layers l is
fed the fp32 reference's `hidden_states[l]` (rounded to bf16) and compared with its `hidden_states[l + 1]`
(last row: with the final norm), beside the share of tokens whose expert set our bf16 router picks as our fp32
router does on the same input (our fp32 model is held to transformers' within 1e-5 by the CPU tests).

| layer | kind | experts path | max\\|Δ\\| / max\\|ref\\| | the same, tokens with the reference's expert set | expert-set agreement |
|---|---|---|---|---|---|
{rows}

End to end against the fp32 reference's logits (max|logit| {r['scale']:.2f}): our bf16 max|Δ| {r['ours16']:.3f},
the reference's own bf16 {r['theirs16']:.3f} ({ratio:.2f}x; the CPU tests' budget is {BF16_BUDGET}x). Our fp32:
max|Δlogit| {r['ours32']:.2e} {'<=' if r['fp32_ok'] else '> (FAILED)'} 1e-5 x max|logit| = {REL_TOL * r['scale']:.2e}.
Greedy ({GREEDY} tokens, our engine against the reference's generate): fp32 the first {r['greedy32']} equal,
bf16 the first {r['greedy16']} equal (bf16 runs part ways at the first near-tie, §5 item 12).
"""


# ---------------------------------------------------------------------------------------------- speed


def timed(device, fn, *args, **kwargs):
    sync(device)
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    sync(device)
    return result, time.perf_counter() - t0


def rate(device, fn, repeat: int) -> float:
    """Seconds per call of fn (after one warm-up call), synchronised."""
    fn()
    _, seconds = timed(device, lambda: [fn() for _ in range(repeat)])
    return seconds / repeat


@torch.no_grad()
def hardware(device):
    """bf16 GEMM rate at the model's decode and prefill shapes, and copy bandwidth (read + written)."""
    out = {}
    w = torch.randn(4096, 2816, device=device, dtype=torch.bfloat16)
    for rows in (64, 2048):
        x = torch.randn(rows, 2816, device=device, dtype=torch.bfloat16)
        out[f"gemm_{rows}_tflops"] = 2 * rows * 2816 * 4096 / rate(device, partial(torch.nn.functional.linear, x, w),
                                                                  20) / 1e12
    src = torch.empty(1 << 28, device=device)
    dst = torch.empty_like(src)
    out["copy_gbps"] = 2 * src.numel() * 4 / rate(device, partial(dst.copy_, src), 10) / 1e9
    release(device)
    return out


@torch.no_grad()
def throughput(path, device, batches):
    """Decode tok/s at each batch (the median decode step after the prompts are in), and the 64 x 128 x 128
    workload end to end."""
    model = load_model(path, torch.bfloat16, device)
    vocab = model.cfg.vocab_size
    decode = {}
    for B in batches:
        engine = LLMEngine(model, EngineConfig(max_num_seqs=B, max_num_batched_tokens=4096, enable_prefix_caching=False,
                                               kv_cache_bytes=8 << 30))
        for p in fixed_prompts(B, PROMPT, vocab, seed=B):
            engine.add_request(p, SamplingParams(max_tokens=48, ignore_eos=True))
        while any(s.num_computed < s.num_prompt for s in engine.requests.values()):
            engine.step()
        for _ in range(4):
            engine.step()
        steps = [timed(device, engine.step)[1] for _ in range(32)]
        decode[B] = statistics.median(steps)
        log(f"  decode at batch {B}: {1000 * decode[B]:.2f} ms per step, {B / decode[B]:.0f} tok/s")
        del engine
        release(device)
    prompts = fixed_prompts(64, PROMPT, vocab)
    engine = LLMEngine(model, EngineConfig(max_num_seqs=64, max_num_batched_tokens=4096, enable_prefix_caching=False,
                                           kv_cache_bytes=8 << 30))
    engine.generate(prompts[:2], SamplingParams(max_tokens=2, ignore_eos=True))
    outs, wall = timed(device, engine.generate, prompts, SamplingParams(max_tokens=128, ignore_eos=True))
    tokens = sum(len(o.token_ids) for o in outs)
    del engine, model
    release(device)
    return dict(decode_step_s=decode, e2e_tokens=tokens, e2e_s=wall)


def throughput_body(r, hw, header):
    rows = "\n".join(f"| {B} | {1000 * s:.2f} ms | {B / s:.0f} |" for B, s in r["decode_step_s"].items())
    return f"""
{header}
The in-process engine in bf16 (routed experts through torch's grouped GEMM), `bench` preset (the real layer
shapes, 2 layers, vocabulary 32768), prompts of {PROMPT} random tokens, no prefix caching. Decode: the median of
32 steps once every prompt is in (each step synchronised).

| batch | decode step | output tok/s |
|---|---|---|
{rows}

End to end, 64 requests x {PROMPT} prompt x 128 new tokens, all at once: {r['e2e_tokens'] / r['e2e_s']:.0f} output
tok/s ({r['e2e_s']:.2f} s). The same GPU, measured in the same run: bf16 GEMM {hw['gemm_64_tflops']:.0f} TFLOP/s at
64 x 2816 x 4096 and {hw['gemm_2048_tflops']:.0f} at 2048 rows; copy bandwidth {hw['copy_gbps']:.0f} GB/s (read +
written).
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
    text = GPU_MD.read_text() if GPU_MD.exists() else ""
    GPU_MD.write_text(PREAMBLE + (text[text.index("\n## "):] if "\n## " in text else ""))
    for heading, body in sections:
        write_section(heading, body, GPU_MD)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--presets", default="tiny,bench", help="comma-separated checkpoint presets for parity")
    ap.add_argument("--batches", default="1,8,64", help="decode batches of the throughput run")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/gpu.md alone")
    ap.add_argument("--json", help="also write every number here")
    ap.add_argument("--step-timeout", type=int, default=240, help="seconds per step")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"gpu_check: no CUDA GPU visible to torch {torch.__version__}; use --device cpu for a CPU test run")
    gpu = (f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})" if device.type == "cuda"
           else "no GPU (CPU run)")
    header = (f"Command: `python benchmarks/gpu_check.py {' '.join(sys.argv[1:])}` (revision {git_revision()}); "
              f"{gpu}, torch {torch.__version__}, device `{device}`.")
    log(header)
    sections, failed, numbers = [], [], {"header": header}
    for preset in args.presets.split(","):
        path = checkpoint(preset)  # outside the time limit: an interrupted write would leave a bad cache
        result = run_step(f"{preset}: parity", args.step_timeout, failed, device, parity, path, device)
        if result:
            numbers[f"parity_{preset}"] = result
            if not result["fp32_ok"]:
                failed.append(f"{preset}: fp32 max|Δlogit| {result['ours32']:.3e} > 1e-5 * max|logit|")
            sections.append((f"bf16 against fp32, `{preset}` preset", parity_body(result, header)))
    if not args.skip_throughput:
        hw = run_step("hardware", args.step_timeout, failed, device, hardware, device)
        path = checkpoint("bench")
        batches = [int(b) for b in args.batches.split(",")]
        result = run_step("bench: bf16 throughput", args.step_timeout, failed, device, throughput, path, device,
                          batches)
        if hw and result:
            numbers.update(hardware=hw, throughput=result)
            sections.append(("bf16 decode throughput, `bench` preset", throughput_body(result, hw, header)))
    for heading, body in sections:
        print(f"\n## {heading}\n{body}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(numbers, f, indent=1, default=str)
    if not args.no_write:
        write_docs(sections)
        log(f"wrote {GPU_MD}")
    if failed:
        sys.exit("gpu_check FAILED: " + "; ".join(failed))


if __name__ == "__main__":
    main()
