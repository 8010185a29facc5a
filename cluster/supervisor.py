"""Keeps a cluster serving through the loss of a rank: detects a dead or stalled actor, replaces it, rebuilds
the process group and resumes the engine.

Detection (bounded, never a hang) is a ``ray.wait`` on one call per rank that only ends when something is
wrong: each shard's ``serve`` (its collective loop: it ends when the shard's actor dies, a Ray death
notification, or when one of its collectives fails or runs past ``collective_timeout_s``) and each
front-end's ``watch`` (it ends when a step or heartbeat of its engine fails the same ways, or when the
front-end's actor dies). Every header is an all-reduce, so a stalled (SIGSTOPped) shard stops the next
heartbeat or step within the collective deadline.

Recovery, while the serving side reports NOT_SERVING (``on_change``):

1. every front-end suspends (it may have already): no step runs, every running request goes back to the
   waiting queue to be recomputed from the tokens it has, and it leaves the process group. A front-end that
   does not answer within the collective deadline is stalled and is killed; a dead one loses the requests
   it held (the ingress moves them to another front-end, see cluster/serving/frontend_client.py).
2. every shard gets out of the failed group: a shard still in a collective that does not answer a ping
   within ``probe_timeout_s`` is stalled and is killed (``ray.kill``, and Ray restarts it); the others leave
   their loop within a collective deadline of the front-end leaving.
3. every rank is alive again: Ray restarts actors that died (they are created with ``max_restarts=-1``:
   the constructor runs again and reloads the weights); one that is gone for good (killed with
   ``no_restart``) is recreated under the same name in its placement-group bundle.
4. a new process group (a new TCPStore on port 0 at front-end 0, every rank joins), the shards' loops,
   and the engines resume: the requests continue where they were, with the same greedy tokens.

Degraded mode: where the shards lost in step 2 (dead, or killed there) leave a copy of every expert on the
others (the cluster's ``layout`` restricted to the rest is a placement), step 3 waits only for the front-ends
and the remaining shards, and the new group is made of them (``Cluster.members``). The lost shards are pinged
(recreated when gone for good) until they answer; then they are taken back by a planned new group
(``_regroup``: the header's regroup flag, every rank leaves after that step, all join again), in which no
request is recomputed and the serving side stays SERVING.

More than ``max_failures`` failures within ``failure_window_s`` (a failed recovery attempt counts as one)
end recovery: the front-end fails every request in flight with the reason, later requests are refused, and
the serving side stays NOT_SERVING.

Rank r is the cluster's ``actor(r)``: front-ends first, then shards (cluster/launcher.py).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from epserve.actors.placement import PlacementError

log = logging.getLogger("epserve.cluster")
POLL_S = 0.5  # how often waits look at the stop flag


class _Stopped(Exception):
    """The cluster is shutting down: recovery stops where it is."""


@dataclass
class Recovery:
    trigger: str  # what was detected
    seconds: float  # detection to serving again
    frontends_lost: list[int]  # front-ends that were replaced (the requests they held had to move)
    shards_out: list[int] = field(default_factory=list)  # lost shards left out: served from replicas


class Supervisor:
    def __init__(self, cluster, on_change: Callable[[], None] | None = None):
        self.cluster = cluster
        self.config = cluster.config
        self.on_change = on_change  # called (from this thread) whenever ``serving`` or ``failed`` changes
        self.recovering: str | None = None  # what is being recovered from
        self.failed: str | None = None  # why recovery was given up
        self.recoveries: list[Recovery] = []
        self._failures: deque[float] = deque()
        self._stop = threading.Event()
        self._watches: list = []  # one per front-end
        self._returning: dict[int, object] = {}  # shard left out of the group -> its pending ping (or None)
        self._thread: threading.Thread | None = None

    @property
    def serving(self) -> bool:
        return self.recovering is None and self.failed is None

    def start(self) -> "Supervisor":
        self._watches = [f.watch.remote() for f in self.cluster.frontends]
        self._thread = threading.Thread(target=self._run, name="epserve-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    # ---- detection --------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set() and self.failed is None:
                ranks = [*range(len(self._watches)), *map(self.cluster.shard_rank, self.cluster.members)]
                refs = [*self._watches, *self.cluster.serve_refs]  # in group order
                if ray.wait(refs, num_returns=1, timeout=POLL_S)[0] and not self._stop.is_set():
                    done = ray.wait(refs, num_returns=len(refs), timeout=0)[0]  # all that ended by now
                    self._recover("; ".join(self._describe(ranks[refs.index(ref)], ref) for ref in done))
                elif self._returning:
                    self._take_back()
        except _Stopped:
            pass
        except Exception as e:  # noqa: BLE001 - without a supervisor nothing would end a suspension
            log.exception("the supervisor failed")
            self._give_up(f"the supervisor failed: {type(e).__name__}: {e}")

    def _describe(self, rank: int, ref) -> str:
        name = self.cluster.role(rank)
        try:
            result = ray.get(ref, timeout=0)
        except RayActorError as e:
            return f"{name} died ({type(e).__name__})"
        except RayTaskError as e:
            return f"{name}: {_last_line(e)}"
        if self.cluster.is_frontend(rank):
            return f"{name} suspended: {_short(result)}"
        return f"{name} left its loop ({result})"

    # ---- recovery ---------------------------------------------------------------------------------------
    def _recover(self, trigger: str) -> None:
        t0 = time.monotonic()
        log.warning("recovering: %s", trigger)
        self._set(recovering=trigger)
        reason = trigger
        while True:
            self._failures.append(time.monotonic())
            while self._failures[0] < time.monotonic() - self.config.failure_window_s:
                self._failures.popleft()
            if len(self._failures) > self.config.max_failures:
                self._give_up(f"{len(self._failures)} failure(s) within {self.config.failure_window_s:g} s, "
                              f"more than the {self.config.max_failures} allowed; the last: {reason}")
                return
            try:
                frontends_lost, shards_out = self._restore(reason)
                break
            except _Stopped:
                raise
            except Exception as e:  # noqa: BLE001 - a failed attempt counts as one more failure
                reason = f"recovery failed: {type(e).__name__}: {_last_line(e)}"
                log.warning("%s", reason)
        seconds = time.monotonic() - t0
        self.recoveries.append(Recovery(trigger, seconds, frontends_lost, shards_out))
        log.warning("recovered in %.1f s from: %s%s", seconds, trigger,
                    f" (degraded: shard(s) {shards_out} out, their experts served by replicas)" if shards_out else "")
        self._set(recovering=None)

    def _restore(self, reason: str) -> tuple[list[int], list[int]]:
        """Steps 1-4 of the module docstring; returns the front-ends that had to be replaced and the shards
        left out (degraded mode)."""
        cluster = self.cluster
        deadline = time.monotonic() + self.config.recovery_timeout_s
        lost = self._suspend_frontends(reason)
        out = self._release_shards() | {s for s in self._returning}
        members = [s for s in range(self.config.shards) if s not in out]
        if out and not self._covered(members):
            members = list(range(self.config.shards))  # without a replica of every expert: wait for them all
        for rank in [*range(self.config.frontends), *map(cluster.shard_rank, members)]:
            self._await_alive(rank, deadline)
        cluster.members = members
        cluster.connect(max(deadline - time.monotonic(), 1.0))
        for ref in cluster.start_frontends():
            self._get(ref, max(deadline - time.monotonic(), 1.0))
        self._watches = [f.watch.remote() for f in cluster.frontends]
        self._returning = {s: self._returning.get(s) for s in cluster.degraded}
        return lost, cluster.degraded

    def _covered(self, members: list[int]) -> bool:
        """Whether the shards ``members`` hold a copy of every expert of every layer."""
        try:
            self.cluster.layout.restricted(members)
            return bool(members)
        except PlacementError:
            return False

    def _take_back(self) -> None:
        """Degraded mode: a left-out shard that answers again (restarted by Ray, or recreated) rejoins, through
        a planned new group between two steps: nothing is recomputed and the health stays SERVING."""
        back = []
        for shard, ref in list(self._returning.items()):
            rank = self.cluster.shard_rank(shard)
            if ref is None:
                if not self.cluster.is_registered(rank):
                    log.warning("%s is gone for good: recreating it", self.cluster.role(rank))
                    self.cluster.recreate(rank)
                self._returning[shard] = self.cluster.actor(rank).ping.remote()
            elif ray.wait([ref], timeout=0)[0]:
                try:
                    ray.get(ref)
                    back.append(shard)
                except RayActorError:  # died again, or its restart failed: ask again
                    self._returning[shard] = None
        if not back:
            return
        t0 = time.monotonic()
        try:
            self._regroup(sorted([*self.cluster.members, *back]))
        except _Stopped:
            raise
        except Exception as e:  # noqa: BLE001 - a failure while regrouping is a failure like another
            self._recover(f"taking shard(s) {back} back failed: {type(e).__name__}: {_last_line(e)}")
            return
        for shard in back:
            self._returning.pop(shard, None)
        log.warning("shard(s) %s back in the group in %.1f s", back, time.monotonic() - t0)

    def _regroup(self, members: list[int]) -> None:
        """Every rank leaves the group after the step in progress; a new one over ``members`` starts."""
        cluster, cfg = self.cluster, self.config
        leaving = [f.regroup.remote() for f in cluster.frontends]
        self._wait(leaving, cfg.collective_timeout_s + cfg.probe_timeout_s)
        self._wait(list(cluster.serve_refs), cfg.collective_timeout_s + cfg.probe_timeout_s)
        results = [self._get(ref, 0) for ref in [*leaving, *cluster.serve_refs]]
        if not all(r is True or (isinstance(r, dict) and r.get("regroup")) for r in results):
            raise RuntimeError(f"the group did not end as planned: {results}")
        cluster.members = members
        cluster.connect(cfg.recovery_timeout_s)
        for ref in cluster.start_frontends():
            self._get(ref, cfg.recovery_timeout_s)
        self._watches = [f.watch.remote() for f in cluster.frontends]

    def _suspend_frontends(self, reason: str) -> list[int]:
        """Every front-end suspended; returns those that were lost (dead, restarted already, or stalled and
        killed): a new one starts empty."""
        # a suspension waits for the step in progress, which ends within one collective deadline
        refs = [f.suspend.remote(reason) for f in self.cluster.frontends]
        self._wait(refs, self.config.collective_timeout_s + self.config.probe_timeout_s)
        lost = []
        for j, ref in enumerate(refs):
            try:
                if not self._get(ref, 0):
                    lost.append(j)
            except RayActorError:
                lost.append(j)
            except GetTimeoutError:
                self._kill(j, "does not answer")
                lost.append(j)
        return lost

    def _release_shards(self) -> set[int]:
        """Every shard out of the failed group: stalled ones killed, live ones' loops ended. Returns the
        shards lost (dead, or killed here): Ray restarts them, and where replicas cover them the group goes
        on without them meanwhile."""
        cluster, cfg = self.cluster, self.config
        loops = dict(zip(cluster.members, cluster.serve_refs))  # none where the last connect failed
        in_loop = {i: ref for i, ref in loops.items() if not ray.wait([ref], timeout=0)[0]}
        lost = {i for i, ref in loops.items() if i not in in_loop and _died(ref)}
        pings = {i: cluster.shards[i].ping.remote() for i in in_loop}  # the others' loops are over already
        answered = self._wait(list(pings.values()), cfg.probe_timeout_s)  # a dead one answers with its error
        for i in list(in_loop):
            if pings[i] not in answered or _died(pings[i]):
                if pings[i] not in answered:
                    self._kill(cluster.shard_rank(i), "does not answer")
                lost.add(i)
                del in_loop[i]
        if in_loop:  # their collectives fail once the front-end has left, at the latest at their deadline
            self._wait(list(in_loop.values()), cfg.collective_timeout_s + cfg.probe_timeout_s)
        for i, ref in in_loop.items():
            if not ray.wait([ref], timeout=0)[0]:
                self._kill(cluster.shard_rank(i), "is stuck in a collective")
                lost.add(i)
        return lost

    def _kill(self, rank: int, why: str) -> None:
        log.warning("%s %s: killing it (Ray restarts it)", self.cluster.role(rank), why)
        ray.kill(self.cluster.actor(rank), no_restart=False)

    def _await_alive(self, rank: int, deadline: float) -> None:
        """Wait for the rank's actor to answer: restarted by Ray (reloading its weights), or recreated when
        it is gone for good (its name no longer resolves)."""
        while True:
            try:
                self._get(self.cluster.actor(rank).ping.remote(), deadline - time.monotonic())
                return
            except RayActorError:
                if not self.cluster.is_registered(rank):
                    log.warning("%s is gone for good: recreating it", self.cluster.role(rank))
                    self.cluster.recreate(rank)
                else:
                    time.sleep(0.2)  # restarting
            except GetTimeoutError:
                raise TimeoutError(f"{self.cluster.role(rank)} did not come back within "
                                   f"{self.config.recovery_timeout_s:g} s") from None

    def _give_up(self, message: str) -> None:
        log.error("giving up: %s", message)
        self.failed = message
        for j, frontend in enumerate(self.cluster.frontends):
            try:  # the requests in flight end with the reason (a dead front-end has ended them already)
                ray.get(frontend.fail.remote(message), timeout=self.config.probe_timeout_s)
            except Exception as e:  # noqa: BLE001 - nothing more to tell a front-end that is gone
                log.warning("could not fail front-end %d's requests: %s", j, e)
        self._set(recovering=None)

    # ---- helpers ----------------------------------------------------------------------------------------
    def _set(self, recovering: str | None) -> None:
        self.recovering = recovering
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:  # noqa: BLE001 - the serving side's trouble must not stop recovery
                log.exception("on_change failed")

    def _wait(self, refs: list, timeout_s: float) -> list:
        """ray.wait for all of ``refs`` within ``timeout_s``, looking at the stop flag; returns those done."""
        if not refs:
            return []
        deadline = time.monotonic() + timeout_s
        while True:
            if self._stop.is_set():
                raise _Stopped
            left = deadline - time.monotonic()
            done, pending = ray.wait(refs, num_returns=len(refs), timeout=max(min(POLL_S, left), 0))
            if not pending or left <= 0:
                return done

    def _get(self, ref, timeout_s: float):
        if not self._wait([ref], max(timeout_s, 0)):
            raise GetTimeoutError(f"no answer within {timeout_s:.1f} s")
        return ray.get(ref)


def _died(ref) -> bool:
    """Whether a finished call ended with its actor's death."""
    try:
        ray.get(ref, timeout=0)
    except RayActorError:
        return True
    except Exception:  # noqa: BLE001 - any other failure: the actor lives
        return False
    return False


def _last_line(e: BaseException) -> str:
    return _short(str(getattr(e, "cause", None) or e))


def _short(message: str) -> str:
    """An error message, short: its last line, without C++ source locations."""
    lines = message.strip().splitlines()
    return re.sub(r"\[[^\]\s]*:\d+\] ", "", lines[-1])[:160] if lines else message
