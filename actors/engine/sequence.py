"""A request's state inside the engine: its tokens, how many have KV in the cache, and its block tables."""

from __future__ import annotations

import enum
import time

import torch

from .sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, stop_ids: frozenset[int]):
        self.request_id = request_id
        self.token_ids = list(prompt_ids)  # prompt, then the generated tokens
        self.num_prompt = len(prompt_ids)
        self.params = params
        self.stop_ids = stop_ids
        self.status = Status.WAITING
        self.num_computed = 0  # tokens whose KV is in the cache
        self.block_tables: dict[str, list[int]] = {}  # per attention kind; -1 = block dropped (out of window)
        self.block_arrays: dict = {}  # the model runner's int64 copies of them (kv_cache.table_arrays)
        self.num_cached_prefix = 0  # tokens served from the prefix cache at the last admission
        self.finish_reason: str | None = None
        self.logprobs: list[float] = []
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.arrival_time = time.monotonic()
        self.first_scheduled_time: float | None = None  # set by the scheduler (queue-time metric)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    def __repr__(self):
        return f"Sequence({self.request_id}, {self.status.value}, {self.num_computed}/{self.num_tokens})"
