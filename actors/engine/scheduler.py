"""Iteration-level scheduling: every step, running requests first (oldest first: a decode token or the next
prefill chunk), then waiting requests, under a token budget and a cap on running requests. When blocks run
out, the most recently admitted request is preempted (its blocks freed, to be recomputed later: usually a
prefix-cache hit), so the oldest requests always make progress and the engine never deadlocks."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .config import EngineConfig
from .sequence import Sequence, Status


@dataclass
class Batch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)  # tokens each sequence computes this step

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_new.append(n)

    def __len__(self):
        return len(self.seqs)


class Scheduler:
    def __init__(self, cfg: EngineConfig, blocks: BlockManager):
        self.cfg = cfg
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        batch, budget = Batch(), self.cfg.max_num_batched_tokens
        preempted = False
        for seq in list(self.running):
            if budget == 0 or seq.status is not Status.RUNNING:
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self.blocks.can_append(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self.blocks.append(seq, n)
                batch.add(seq, n)
                budget -= n
        while self.waiting and budget and not preempted and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            n = self.blocks.admit(seq, budget)
            if not n:  # it does not fit yet: it keeps the head of the queue, and nothing was touched
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            batch.add(seq, n)
            budget -= n
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def preempt_all(self) -> None:
        """Preempt every running request, to be recomputed from the tokens it has (after a failed step, whose
        KV is incomplete). Newest first, so that the waiting queue keeps admission order."""
        for seq in reversed(list(self.running)):
            self._preempt(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a request (done, stopped or aborted) and free its blocks at once."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
