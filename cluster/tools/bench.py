"""``epserve bench``: a load generator and its report.

A *workload* is a list of requests (prompt token ids, output length), fixed or random lengths, made from a
seed so that every server gets the very same requests. ``run_load`` sends them to a target
(``bench_targets.py``) either in a *closed loop* (``concurrency`` requests in flight, a new one as soon as
one ends) or an *open loop* (Poisson arrivals at ``rate`` requests/s, at most ``concurrency`` in flight),
bounded by the number of requests and by ``duration_s``. Per request it records the time to the first token
(TTFT), the gaps between later pieces divided by their tokens (inter-token latency, ITL) and the end-to-end
latency; ``summarize`` turns them into output and total tokens/s, requests/s and p50/p90/p99.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace

from ..config import cluster_settings
from .bench_targets import make_target


@dataclass
class Workload:
    num_requests: int = 64
    prompt_len: int = 128
    output_len: int = 128
    random_lengths: bool = False  # lengths uniform in [len/2, len*3/2] instead of fixed
    vocab_size: int | None = None  # prompt ids are drawn below it; None: the served model's (``sweep``)
    seed: int = 0

    def requests(self) -> list[tuple[list[int], int]]:
        if self.vocab_size is None:
            raise ValueError("the workload has no vocabulary size")
        rng = random.Random(self.seed)

        def length(n):
            return rng.randint(max(1, n // 2), max(1, n * 3 // 2)) if self.random_lengths else n

        out = []
        for _ in range(self.num_requests):
            p = length(self.prompt_len)
            out.append(([rng.randrange(3, self.vocab_size) for _ in range(p)], length(self.output_len)))
        return out


@dataclass
class RequestRecord:
    prompt_tokens: int
    output_tokens: int = 0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    latency_s: float | None = None
    error: str | None = None


class Progress:
    """One line on stderr, rewritten in place: done/total, errors, output tokens/s so far."""

    def __init__(self, total: int, label: str, out=sys.stderr):
        self.total, self.label, self.out = total, label, out
        self.done = self.errors = self.tokens = 0
        self.t0 = time.perf_counter()
        self._last = 0.0

    def update(self, record: RequestRecord) -> None:
        self.done += 1
        self.errors += record.error is not None
        self.tokens += record.output_tokens
        now = time.perf_counter()
        if now - self._last > 0.5 or self.done == self.total:
            self._last = now
            width = 30
            filled = width * self.done // max(self.total, 1)
            rate = self.tokens / max(now - self.t0, 1e-9)
            self.out.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                           f"requests, {self.errors} errors, {rate:.1f} output tok/s")
            if self.done == self.total:
                self.out.write("\n")
            self.out.flush()


async def _one(target, prompt: list[int], output_len: int) -> RequestRecord:
    rec = RequestRecord(prompt_tokens=len(prompt))
    t0 = last = time.perf_counter()
    try:
        async for n in target.stream(prompt, output_len):
            now = time.perf_counter()
            if rec.ttft_s is None:
                rec.ttft_s = now - t0
            else:
                rec.itl_s.extend([(now - last) / n] * n)
            last = now
            rec.output_tokens += n
    except Exception as e:  # noqa: BLE001 - counted and reported, the run goes on
        rec.error = f"{type(e).__name__}: {e}"[:300]
    rec.latency_s = time.perf_counter() - t0
    return rec


async def run_load(target, requests: list[tuple[list[int], int]], concurrency: int, rate: float | None = None,
                   duration_s: float | None = None, seed: int = 0, label: str = "bench") -> dict:
    """Send ``requests`` (closed loop, or open loop at ``rate``/s) and summarize what came back."""
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    progress = Progress(len(requests), label)
    limit = asyncio.Semaphore(concurrency)
    deadline = None if duration_s is None else time.perf_counter() + duration_s
    rng = random.Random(seed)
    records: list[RequestRecord] = []

    async def send(prompt, n):
        async with limit:
            if deadline is not None and time.perf_counter() > deadline:
                return
            rec = await _one(target, prompt, n)
            records.append(rec)
            progress.update(rec)

    t0 = time.perf_counter()
    tasks = []
    for prompt, n in requests:
        if rate:
            await asyncio.sleep(rng.expovariate(rate))
        if deadline is not None and time.perf_counter() > deadline:
            break
        tasks.append(asyncio.create_task(send(prompt, n)))
    remaining = None if deadline is None else max(deadline - time.perf_counter(), 0) + 60.0
    done, pending = await asyncio.wait(tasks, timeout=remaining) if tasks else (set(), set())
    for t in pending:  # past the time bound: cancel what is still running
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    elapsed = time.perf_counter() - t0
    summary = summarize(records, elapsed)
    summary.update(concurrency=concurrency, rate=rate, sent=len(tasks), cancelled=len(pending))
    return summary


def percentiles(values: list[float], ps=(50, 90, 99)) -> dict:
    if not values:
        return {f"p{p}": None for p in ps} | {"mean": None}
    s = sorted(values)
    out = {f"p{p}": s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))] for p in ps}
    out["mean"] = sum(s) / len(s)
    return out


def summarize(records: list[RequestRecord], elapsed_s: float) -> dict:
    ok = [r for r in records if r.error is None]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    errors = [r.error for r in records if r.error is not None]
    return {
        "completed": len(ok), "errors": len(errors), "first_errors": errors[:3], "elapsed_s": elapsed_s,
        "output_tokens": out_tokens, "prompt_tokens": in_tokens,
        "output_tok_s": out_tokens / elapsed_s if elapsed_s else 0.0,
        "total_tok_s": (out_tokens + in_tokens) / elapsed_s if elapsed_s else 0.0,
        "requests_s": len(ok) / elapsed_s if elapsed_s else 0.0,
        "ttft_s": percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_s": percentiles([x for r in ok for x in r.itl_s]),
        "latency_s": percentiles([r.latency_s for r in ok]),
    }


async def sweep(target, workload: Workload, concurrencies: list[int], rate: float | None = None,
                duration_s: float | None = None, warmup: int = 2) -> dict:
    """Start the target, warm it up, run the workload once per concurrency, close it. A workload without a
    vocabulary size takes the served model's."""
    await target.start()
    try:
        if workload.vocab_size is None:
            if target.vocab_size is None:
                raise ValueError("the server does not say its vocabulary size: give --vocab-size")
            workload = replace(workload, vocab_size=target.vocab_size)
        reqs = workload.requests()
        if warmup:
            await run_load(target, [(p, 2) for p, _ in reqs[:warmup]], warmup, label="warm-up")
        runs = [await run_load(target, reqs, c, rate, duration_s, workload.seed, label=f"concurrency {c}")
                for c in concurrencies]
    finally:
        await target.close()
    return {"workload": asdict(workload), "runs": runs}


def plot(result: dict, path: str, title: str = "epserve bench") -> None:
    """Output tokens/s and TTFT / ITL p50 against concurrency, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'epserve[bench]'") from None
    runs = result["runs"]
    xs = [r["concurrency"] for r in runs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(xs, [r["output_tok_s"] for r in runs], "o-")
    a.set(xlabel="concurrency", ylabel="output tokens/s", title="throughput")
    for key, name in (("ttft_s", "TTFT p50"), ("itl_s", "ITL p50")):
        b.plot(xs, [(r[key]["p50"] or 0) * 1000 for r in runs], "o-", label=name)
    b.set(xlabel="concurrency", ylabel="ms", title="latency")
    b.legend()
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report_table(result: dict) -> str:
    """A markdown table, one row per run; a run with errors shows the first one's message."""
    lines = ["| concurrency | requests | errors | output tok/s | total tok/s | req/s | TTFT p50 / p90 / p99 (ms) "
             "| ITL p50 / p90 / p99 (ms) | first error |", "|---|---|---|---|---|---|---|---|---|"]

    def ms(d):
        return " / ".join("-" if d[p] is None else f"{1000 * d[p]:.0f}" for p in ("p50", "p90", "p99"))

    for r in result["runs"]:
        first_error = " ".join(r["first_errors"][0].replace("|", "/").split()) if r["first_errors"] else ""
        lines.append(f"| {r['concurrency']} | {r['completed']} | {r['errors']} | {r['output_tok_s']:.1f} | "
                     f"{r['total_tok_s']:.1f} | {r['requests_s']:.2f} | {ms(r['ttft_s'])} | {ms(r['itl_s'])} | "
                     f"{first_error} |")
    return "\n".join(lines)


def main(args) -> int:
    workload = Workload(args.requests, args.prompt_len, args.output_len, args.random_lengths, args.vocab_size,
                        args.seed)
    engine = {"max_num_seqs": max(args.concurrency), "enable_prefix_caching": False}
    target = make_target(args.target, args.checkpoint, args.shards, args.model, engine, args.dtype,
                         cluster_settings(args) if args.target is None else None)
    result = asyncio.run(sweep(target, workload, args.concurrency, args.rate, args.duration_s, args.warmup))
    result["target"] = args.target or (f"cluster ({args.frontends} front-end(s), {args.shards} shards)" if args.shards
                                       else "in-process engine")
    print(report_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        plot(result, args.plot, f"epserve bench: {result['target']}")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 1 if any(r["errors"] for r in result["runs"]) else 0
