"""Online rebalancing of the routed experts (``rebalance_interval_s``): every interval, from the load the
front-ends measured over a sliding window (tokens routed to each (layer, expert) in the last ``WINDOW``
intervals), a new placement that balances the shards (``Placement.balanced``: the redundant slots go to the
hottest experts, and every copy to the least-loaded shard with a free slot, so that both the tokens and the
experts they activate spread over the shards; as close to the current placement as that allows, so that few
experts move); the cluster moves to it while serving (``Cluster.move_experts``):
each shard loads the experts that move to it beside the ones it serves (from the checkpoint; an expert it
already holds is copied), and every rank switches at the same header, between two steps. No step waits for
weights, no request is touched.

A new placement is only worth its moves when it is clearly better: the current placement's balancedness on
the window's load must exceed ``MIN_BALANCEDNESS`` and the new one must cut it by ``MIN_GAIN``. Nothing moves
while the cluster recovers, while a shard is out of the group (degraded), or before the window holds
``MIN_TOKENS`` routed tokens.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import ray

from epserve.actors.placement import Placement

log = logging.getLogger("epserve.cluster")
WINDOW = 4  # intervals of load the placement is computed from
MIN_TOKENS = 256  # (token, expert) pairs in the window before any move
MIN_BALANCEDNESS = 1.05
MIN_GAIN = 0.03  # the new placement's balancedness at most (1 - MIN_GAIN) x the current one's


class Rebalancer:
    def __init__(self, cluster, interval_s: float):
        self.cluster, self.interval_s = cluster, interval_s
        self.rebalances = 0  # placements switched to
        self.moved_bytes = 0
        self.last: dict | None = None  # the last rebalance: balancedness before and after, on its window
        self._window: deque = deque(maxlen=WINDOW)
        self._seen = None  # the front-ends' cumulative load at the last look
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Rebalancer":
        self._thread = threading.Thread(target=self._run, name="epserve-rebalancer", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception as e:  # noqa: BLE001 - a failed look is retried at the next interval
                log.warning("rebalancing skipped: %s: %s", type(e).__name__, e)

    def check(self) -> bool:
        """One look at the load; moves the experts when it pays. Returns whether it did."""
        cluster = self.cluster
        supervisor = cluster.supervisor
        if (supervisor is not None and not supervisor.serving) or cluster.degraded:
            self._window.clear()  # the load since a recovery starts a new window
            self._seen = None
            return False
        load = self._window_load()
        if load is None or sum(map(sum, load)) < MIN_TOKENS:
            return False
        if self.rebalance(load):
            self._window.clear()  # the next placement is computed from load seen under this one
            return True
        return False

    def rebalance(self, load: list[list[float]]) -> bool:
        """Move to the balanced placement for ``load`` [layer][expert] when it is clearly better; returns
        once every front-end routes by it. Returns whether it moved."""
        cluster = self.cluster
        current = cluster.layout
        candidate = Placement.balanced(load, cluster.config.shards, cluster.config.redundant_experts, current)
        before, after = current.balancedness(load), candidate.balancedness(load)
        if before <= MIN_BALANCEDNESS or after > before * (1 - MIN_GAIN):
            return False
        t0 = time.monotonic()
        timeout = cluster.config.recovery_timeout_s
        epoch, moved = cluster.move_experts(candidate, timeout)
        self._await_switch(epoch, timeout)
        self.rebalances += 1
        self.moved_bytes += moved
        self.last = {"epoch": epoch, "balancedness_before": before, "balancedness_after": after,
                     "moved_bytes": moved, "seconds": time.monotonic() - t0}
        log.info("rebalanced the experts (placement %d): balancedness %.3f -> %.3f on the last window, %.1f MB "
                 "moved in %.1f s", epoch, before, after, moved / 1e6, self.last["seconds"])
        return True

    def _window_load(self) -> list[list[float]] | None:
        """Tokens per (layer, expert) over the window: the front-ends' counts since WINDOW looks ago."""
        replies = ray.get([f.experts.remote() for f in self.cluster.frontends], timeout=self.interval_s + 30)
        loads = [r["tokens_per_layer_expert"] for r in replies if r["tokens_per_layer_expert"] is not None]
        if not loads:
            return None
        total = [[sum(v) for v in zip(*layers)] for layers in zip(*loads)]
        seen, self._seen = self._seen, total
        if seen is None or len(seen) != len(total):
            return None
        self._window.append([[now - was for now, was in zip(a, b)] for a, b in zip(total, seen)])
        return [[sum(v) for v in zip(*layers)] for layers in zip(*self._window)]

    def _await_switch(self, epoch: int, timeout_s: float) -> None:
        """Until every front-end routes by the placement ``epoch`` (the group switches at its next header)."""
        deadline = time.monotonic() + timeout_s
        while not self._stop.is_set():
            epochs = [r["epoch"] for r in ray.get([f.experts.remote() for f in self.cluster.frontends],
                                                   timeout=timeout_s)]
            if min(epochs) >= epoch or time.monotonic() > deadline:
                return
            time.sleep(0.05)
