"""Which front-end a new request goes to: the least loaded one, unless one holds the prompt's prefix.

* Load is the KV a front-end's requests in flight will hold: the sum of their expected tokens (prompt plus
  max new tokens). It is counted here, on ``choose`` and ``release``, not polled from the front-ends: every
  request passes through this ingress, so this view is exact and immediate, where polled stats lag behind a
  burst and would send all of it to whichever front-end looked idle last.
* Ties on load go to the fewest requests in flight, then to the next front-end after the last one chosen,
  so equal requests alternate even when each ends before the next arrives.
* Prefix affinity: each front-end's prefix cache keeps full blocks of ``block_size`` tokens by a hash chained
  over the parent block's hash, so a prompt only gains there from a run of leading blocks. The router keeps,
  per front-end, the block hashes of the prompts it sent there, and sends a prompt to the front-end holding
  the longest such run (one block at least). The front-end evicts blocks too, so the memory is bounded (LRU)
  and only approximates its cache; a wrong guess costs a recompute, never a wrong answer.
* Affinity yields to balance: a holder whose load exceeds ``overload`` times the least load plus
  ``slack_tokens`` is passed over for the least loaded front-end, which then holds the prefix as well, so a
  hot prefix spreads over front-ends as its load grows.

Everything is deterministic: the same calls give the same choices (the hashes are over ints only).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass

# The first block's parent; not None, whose hash varies between processes before Python 3.12.
_ROOT = 0


@dataclass
class RoutingStats:
    routed: list[int]  # requests sent to each front-end
    affinity_hits: int = 0  # sent to a front-end for the prefix it holds
    diverted: int = 0  # a holder was passed over as overloaded


class RequestRouter:
    def __init__(self, frontends: int, block_size: int = 16, affinity: bool = True,
                 overload: float = 1.5, slack_tokens: int = 256, remembered_blocks: int = 100_000):
        if frontends < 1 or block_size < 1 or remembered_blocks < 1:
            raise ValueError("frontends, block_size and remembered_blocks must be at least 1")
        if overload < 0 or slack_tokens < 0:
            raise ValueError("overload and slack_tokens must not be negative")
        self.frontends = frontends
        self.block_size = block_size
        self.affinity = affinity
        self.overload = overload
        self.slack_tokens = slack_tokens
        self.remembered_blocks = remembered_blocks
        self.stats = RoutingStats(routed=[0] * frontends)
        self._load = [0] * frontends
        self._in_flight = [0] * frontends
        self._held: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(frontends)]  # oldest first
        self._next = 0  # where tie-breaking starts

    def choose(self, prompt_ids: list[int], expected_tokens: int, exclude: Collection[int] = frozenset()) -> int:
        """The front-end for a new request (never one in ``exclude``); its load is counted there until
        ``release``."""
        if expected_tokens < 0:
            raise ValueError("expected_tokens must not be negative")
        candidates = [i for i in range(self.frontends) if i not in exclude]
        if not candidates:
            raise ValueError("every front-end is excluded")
        hashes = self.block_hashes(prompt_ids) if self.affinity else []
        chosen = self._pick(candidates, lambda i: (self._load[i], self._in_flight[i]))
        runs = {i: self._run(i, hashes) for i in candidates}
        longest = max(runs.values())
        if longest > 0:
            holder = self._pick([i for i in candidates if runs[i] == longest],
                                lambda i: (self._load[i], self._in_flight[i]))
            if self._load[holder] > self.overload * self._load[chosen] + self.slack_tokens:
                self.stats.diverted += 1
            else:
                chosen = holder
                self.stats.affinity_hits += 1
        self._next = (chosen + 1) % self.frontends
        self._load[chosen] += expected_tokens
        self._in_flight[chosen] += 1
        self.stats.routed[chosen] += 1
        self._remember(chosen, hashes)
        return chosen

    def release(self, frontend: int, expected_tokens: int) -> None:
        """A request sent to ``frontend`` ended (finished, failed or aborted)."""
        if self._in_flight[frontend] == 0 or self._load[frontend] < expected_tokens:
            raise ValueError(f"front-end {frontend} has no request of {expected_tokens} tokens in flight")
        self._load[frontend] -= expected_tokens
        self._in_flight[frontend] -= 1

    def forget(self, frontend: int) -> None:
        """``frontend`` was lost or restarted: its prefix cache is empty. Its requests in flight are still
        released one by one as they fail."""
        self._held[frontend].clear()

    def load(self) -> list[int]:
        """Tokens in flight per front-end."""
        return list(self._load)

    def in_flight(self) -> list[int]:
        """Requests in flight per front-end."""
        return list(self._in_flight)

    def held_prefix(self, frontend: int, prompt_ids: list[int]) -> int:
        """Leading full blocks of the prompt that ``frontend`` is believed to hold."""
        return self._run(frontend, self.block_hashes(prompt_ids))

    def block_hashes(self, prompt_ids: list[int]) -> list[int]:
        """Chained hashes of the prompt's full blocks, the keys of a front-end's prefix cache."""
        bs, parent, hashes = self.block_size, _ROOT, []
        for start in range(0, len(prompt_ids) - bs + 1, bs):
            parent = hash((parent, tuple(prompt_ids[start:start + bs])))
            hashes.append(parent)
        return hashes

    def _pick(self, candidates: list[int], key: Callable[[int], tuple]) -> int:
        """The candidate with the least key; ties go to the first at or after ``_next``, cyclically."""
        return min(candidates, key=lambda i: (key(i), (i - self._next) % self.frontends))

    def _run(self, frontend: int, hashes: list[int]) -> int:
        held = self._held[frontend]
        run = 0
        while run < len(hashes) and hashes[run] in held:
            run += 1
        return run

    def _remember(self, frontend: int, hashes: list[int]) -> None:
        held = self._held[frontend]
        # Tail first, so the leading blocks are the most recent: they are evicted last, as without them the
        # later blocks of the chain can never be a hit.
        for h in reversed(hashes):
            held[h] = None
            held.move_to_end(h)
        while len(held) > self.remembered_blocks:
            held.popitem(last=False)
