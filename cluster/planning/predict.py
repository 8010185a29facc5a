"""A workload through the engine's scheduler, step by step, timed by the step model: what ``epserve bench``
would measure.

The closed loop of ``epserve bench``: ``concurrency`` requests in flight (each front-end holding its share),
a new one as soon as one ends, until ``requests`` are done. Each step is scheduled as
``actors/engine/scheduler.py`` does: running requests first (a decode token, or their prompt's next chunk),
then waiting ones, under the token budget (``max_num_batched_tokens``). A request's first output token comes
with its prompt's last chunk; it then makes one token per step. Front-ends step together (every rank joins
every layer's collectives), so one front-end's schedule, with its share of the load, times them all."""

from __future__ import annotations

from dataclasses import dataclass

from epserve.actors.engine.config import EngineConfig

from .stepmodel import Row, StepModel, StepTime


@dataclass(frozen=True)
class Workload:
    prompt_len: int = 128
    output_len: int = 128
    concurrency: int = 64
    requests: int | None = None  # None: one request per concurrency slot

    @property
    def total_requests(self) -> int:
        return self.requests or self.concurrency


@dataclass
class Prediction:
    output_tokens_per_s: float
    ttft_s: float  # mean
    itl_s: float  # mean gap between a request's tokens
    elapsed_s: float
    decode_step: StepTime  # a decode step of a full batch, mid-way through the outputs
    per_output_token_s: float = 0.0

    @property
    def bottleneck(self) -> str:
        return self.decode_step.bottleneck


@dataclass
class _Req:
    prompt: int
    computed: int = 0
    outputs: int = 0
    started: float = 0.0
    last: float | None = None


def predict(model: StepModel, work: Workload, engine: EngineConfig | None = None,
            per_output_token_s: float = 0.0) -> Prediction:
    """``per_output_token_s``: the host's cost of streaming one token to its client (actor calls, queues)."""
    engine = engine or EngineConfig(max_num_seqs=work.concurrency, enable_prefix_caching=False)
    M = model.layout.frontends
    slots = -(-work.concurrency // M)  # this front-end's share
    to_send = -(-work.total_requests // M)
    budget_max = engine.max_num_batched_tokens
    running: list[_Req] = []
    waiting: list[_Req] = []
    t, done, out_tokens = 0.0, 0, 0
    ttfts, gaps = [], []
    while to_send and len(waiting) + len(running) < slots:
        waiting.append(_Req(work.prompt_len, started=t))
        to_send -= 1
    while running or waiting:
        rows, budget, picked = [], budget_max, []
        for r in running:
            if budget == 0:
                break
            n = min(r.prompt + r.outputs - r.computed, budget)
            rows.append(Row(r.computed, n, r.computed + n == r.prompt + r.outputs))
            picked.append((r, n))
            budget -= n
        while waiting and budget and len(running) < engine.max_num_seqs:
            r = waiting.pop(0)
            n = min(r.prompt, budget)
            running.append(r)
            rows.append(Row(0, n, n == r.prompt))
            picked.append((r, n))
            budget -= n
        sampled = sum(row.samples for row in rows)
        t += model.step(rows).seconds + per_output_token_s * sampled
        for r, n in picked:
            r.computed += n
            if r.computed < r.prompt + r.outputs:
                continue
            r.outputs += 1
            out_tokens += 1
            if r.last is None:
                ttfts.append(t - r.started)
            else:
                gaps.append(t - r.last)
            r.last = t
            if r.outputs >= work.output_len:
                running.remove(r)
                done += 1
                if to_send:
                    waiting.append(_Req(work.prompt_len, started=t))
                    to_send -= 1
    batch = min(slots, work.total_requests)
    decode = model.step([Row(work.prompt_len + work.output_len // 2, 1)] * batch)
    decode.phases["host overhead"] += per_output_token_s * batch
    decode.seconds += per_output_token_s * batch
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return Prediction(M * out_tokens / t if t else 0.0, mean(ttfts), mean(gaps), t, decode, per_output_token_s)
