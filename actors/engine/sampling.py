"""Per-request sampling parameters, validated where they enter the engine."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Temperatures below this sample greedily (as vLLM does): dividing the logits by less can overflow to inf
SAMPLING_EPS = 1e-5


class RequestError(ValueError):
    """A request the engine refuses; ``field`` names the offending field (for INVALID_ARGUMENT / HTTP 400)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field, self.message = field_name, message

    def __reduce__(self):  # crosses process boundaries (Ray) with its field intact
        return type(self), (self.field, self.message)


class Overloaded(RuntimeError):
    """The engine's waiting queue is full: the request is refused now, to be retried later (gRPC
    RESOURCE_EXHAUSTED, HTTP 429), rather than queued without bound."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the checkpoint's eos ids
    ignore_eos: bool = False
    min_tokens: int = 0  # stop ids are masked until this many tokens are out
    logprobs: bool = False  # return log-probabilities of the chosen tokens

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def validate(self, vocab_size: int) -> None:
        def check(ok, name, message):
            if not ok:
                raise RequestError(name, message)

        check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", "must be an integer >= 1")
        check(math.isfinite(self.temperature) and self.temperature >= 0.0, "temperature",
              "must be a finite number >= 0")
        check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "must be an integer >= 0 (0 = off)")
        check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        check(isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens",
              "must be an integer in [0, max_tokens]")
        check(self.seed is None or isinstance(self.seed, int), "seed", "must be an integer")
        bad = [t for t in self.stop_token_ids if not (isinstance(t, int) and 0 <= t < vocab_size)]
        check(not bad, "stop_token_ids", f"ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
