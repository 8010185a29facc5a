"""Expert parallelism: M front-ends and N expert shards in one group, talking over a transport
(actors/transport.py: ``torch.distributed``, or shared memory on one host).

Ranks: front-ends 0 .. M-1, shards M .. M+N-1 (``Ranks``); where each expert lives is a ``Placement``. Each step
begins with a header every rank joins (``exchange_header``): the op (step, idle heartbeat, stop) and every
front-end's token count. A step then runs, per MoE layer, two all-to-all collectives, and every rank joins
both, with zero rows if it has none (a front-end without work joins a step of the others with ``idle``):

  dispatch  each front-end sends each shard the rows of its tokens that need it, once per distinct shard (not
            once per expert), each with the token's local expert slots there (-1: another shard's). Front-end
            j sends every shard a block of 1 + T_j rows (the header told every rank T_j), the first holding the
            count: no separate exchange of counts.
  combine   each shard returns, per front-end, the output of every (row, slot) it computed, in the model dtype,
            in row-major slot order; the front-end sums each token's K outputs, weighted, in fp32 in top-k order
            (``ops.moe_combine``), exactly as the in-process model does: the result does not depend on how many
            shards there are or on where an expert lives (with batch-invariant expert kernels, the CPU ones).

The two sides speak the same words: on a front-end ``handle = ep.dispatch(layer, x_TH, ids_TK, weights_TK)``
then ``y_TH = ep.combine(handle)``; on a shard ``handle = ep.dispatch(layer)`` (the rows it received) then
``ep.combine(handle, ys)``. Between the two a front-end computes the dense MLP (``overlap``, decided here and
only here: on with GPUs, where the shards compute elsewhere, off on CPUs, where they share the cores).

With several front-ends the headers keep them in lockstep: each front-end's engine loop joins every header,
stepping when it has work and ``idle`` when not, with no wait between headers while any front-end steps. While
all of them are idle they wait for work and meet at the heartbeat; a front-end that begins a step after an
idle header first wakes the others (``wake_peers``), so that a request's first step waits for no heartbeat.

The header also changes the group between two steps. Placement: each rank says which placement epoch it is
ready for (a front-end: the placement it was given with ``stage``; a shard: the one whose experts it has
loaded); at the first header where every rank is ready for a new epoch, all of them switch to it before that
step's first layer (online rebalancing, cluster/rebalancer.py). Membership: a front-end asked to (``regroup_
requested``) raises the header's regroup flag; every rank finishes that step and leaves the group, and the
cluster joins them into a new one (a shard taken back after degraded mode, cluster/supervisor.py), with no
request recomputed.

Micro-batches (``micro_batches`` 2, the same on every rank): each front-end's step is two halves, and every
layer has one exchange per half, in order (actors/model/micro_batches.py); the header then carries each
front-end's token count per half.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .dispatch_rows import pack_rows, row_bytes
from .model import ops
from .model.moe import expert_outputs
from .placement import Placement
from .transport import Transport

# a warm-up step runs like a step but counts nowhere (LLMEngine.warm_up); in the header's max a real step wins
OP_IDLE, OP_WARM_UP, OP_STEP, OP_STOP = 0, 1, 2, 3
STEPS = (OP_WARM_UP, OP_STEP)


class GroupStopped(RuntimeError):
    """Another front-end stopped the group (the cluster is shutting down): no step can run in it any more."""


@dataclass(frozen=True)
class Ranks:
    """Who is who in the process group: front-ends first, then shards; and the exchanges per layer."""

    frontends: int
    shards: int
    micro_batches: int = 1

    @property
    def world(self) -> int:
        return self.frontends + self.shards

    def shard_rank(self, shard: int) -> int:
        return self.frontends + shard


@dataclass(frozen=True)
class Header:
    """Every rank's header combined: the largest op (a step if any front-end steps, a stop if any stops), per
    micro-batch every front-end's token count, the placement epoch every rank is ready for (the smallest), and
    whether any rank asked the group to leave after this step (``regroup``)."""

    op: int
    tokens: list[list[int]]
    epoch: int = 0
    regroup: bool = False


HEADER_FIELDS = 3  # op, -epoch, regroup; then the token counts


def exchange_header(op: int, tokens: list[int], ranks: Ranks, transport: Transport, device, epoch: int = 0,
                    regroup: bool = False) -> Header:
    """Every rank's (op, tokens per micro-batch, ready epoch, regroup) combined in one max all-reduce (the
    epoch as its negative: the max of those is the smallest). Shards pass OP_IDLE and zeros. Every rank waits
    for every other, the idle heartbeat too, so a stalled peer is noticed within the collective deadline even
    without work."""
    M, B, F = ranks.frontends, ranks.micro_batches, HEADER_FIELDS
    header = torch.zeros(F + B * M, dtype=torch.int64, device=device)
    header[0], header[1], header[2] = op, -epoch, int(regroup)
    if transport.rank < M:
        header[F + transport.rank : F + B * M : M] = torch.tensor(tokens, dtype=torch.int64)
    values = transport.header(header).tolist()
    return Header(values[0], [values[F + b * M : F + (b + 1) * M] for b in range(B)], -values[1], bool(values[2]))


def max_message_bytes(tokens: int, ranks: Ranks, hidden: int, top_k: int, dtype) -> int:
    """The largest message between two ranks in a step of at most ``tokens`` tokens per front-end: a dispatch
    block, a shard's answer to one front-end (every slot of its tokens, at worst), or the header."""
    return max((1 + tokens) * row_bytes(hidden, top_k, dtype), tokens * top_k * hidden * dtype.itemsize,
               8 * (HEADER_FIELDS + ranks.frontends * ranks.micro_batches))


@dataclass
class DispatchStats:
    """Counters of a front-end's exchange (read by metrics and benchmarks)."""

    layers: int = 0
    rows: int = 0  # (token, shard) pairs sent
    token_slots: int = 0  # (token, expert) pairs routed
    bytes_dispatched: int = 0  # the rows' bytes (hidden state and slots), padding not counted
    dispatch_seconds: float = 0.0  # routing the rows and posting them
    wait_seconds: float = 0.0  # waiting for the experts' outputs (after the dense FFN when overlapped)
    tokens_per_shard: list[int] = field(default_factory=list)
    tokens_per_expert: list[int] = field(default_factory=list)
    tokens_per_layer_shard: list[list[int]] = field(default_factory=list)  # [layer][shard] rows (balancedness)


@dataclass
class FrontendHandle:
    """A layer in flight: what was sent where, and how to read the answer."""

    weights_TK: torch.Tensor
    row_of_slot: torch.Tensor  # [T * K]: the row of the combine buffer that holds each (token, slot)'s output
    slots_per_shard: list[int]
    sent: Callable[[], None]  # waits until the dispatch collective is done
    ys: torch.Tensor | None = None  # the outputs, once received (at once, without the overlap)


class FrontendExchange:
    """A front-end's side: the expert executor of its model (see ``ExpertExecutor`` in model/gemma4.py)."""

    def __init__(self, ranks: Ranks, placement: Placement, hidden: int, top_k: int, dtype, device,
                 overlap: bool | None = None):
        self.transport: Transport | None = None  # the group's, once joined (``Frontend.join``)
        self.ranks, self.placement, self.hidden, self.top_k = ranks, placement, hidden, top_k
        self.dtype, self.device = dtype, device
        # micro-batches: the halves take turns between a dispatch and its combine, which must not wait
        self.overlap = ranks.micro_batches > 1 or (torch.device(device).type == "cuda" if overlap is None
                                                   else overlap)
        self.row_bytes = row_bytes(hidden, top_k, dtype)
        self.tokens = 0  # this step's, from begin_step
        N, E = ranks.shards, placement.num_experts
        self.stats = DispatchStats(tokens_per_shard=[0] * N, tokens_per_expert=[0] * E)  # see ``counters``
        self.on_dispatch = self.on_combine = None  # metrics hooks: called with each layer's seconds
        self.headers = 0  # headers joined (a step that sent none still owes its peers one)
        self.group_idle = True  # the last header had no step in it
        self.wake_peers: Callable[[], None] | None = None  # the other front-ends' wake-up (several front-ends)
        self.members = list(range(N))  # the shard in each of the group's shard positions
        self.epoch = 0  # the placement's (see ``stage``)
        self.staged: tuple[int, Placement] | None = None  # the next placement, once every rank is ready for it
        self.load_LE: torch.Tensor | None = None  # tokens routed to each (layer, expert) so far (rebalancing)
        self.regroup_requested = False  # ask the group to leave after the next step (a planned new group)
        self.leaving = False  # the last header said so: leave the group now
        self.counting = True  # False during a warm-up: no stats, no load, no metrics (``uncounted``)

    @property
    def micro_batches(self) -> int:
        return self.ranks.micro_batches

    def counters(self) -> DispatchStats:
        """``stats`` with each expert's tokens summed from ``load_LE`` now: kept per layer as one tensor, not
        added up expert by expert in every layer of every step."""
        if self.load_LE is not None:
            self.stats.tokens_per_expert = self.load_LE.sum(0).tolist()
        return self.stats

    @contextlib.contextmanager
    def uncounted(self):
        """Steps that count nowhere, here or on the shards (their header says OP_WARM_UP)."""
        self.counting = False
        try:
            yield
        finally:
            self.counting = True

    def regroup(self, ranks: Ranks, placement: Placement, members: list[int], epoch: int) -> None:
        """The shape of a new group (before joining it): its ranks, its shards' placement (in group order:
        ``members[i]`` is the shard at position i) and that placement's epoch. Anything staged is dropped."""
        self.ranks, self.placement, self.members, self.epoch = ranks, placement, list(members), epoch
        self.staged, self.regroup_requested, self.leaving, self.group_idle = None, False, False, True

    def slots_by_shard(self) -> list[list[list[int]]]:
        """The placement by shard index, [layer][shard] (a shard out of the group holds no slot in it)."""
        position = {s: i for i, s in enumerate(self.members)}
        return [[layer[position[s]] if s in position else [] for s in range(len(self.stats.tokens_per_shard))]
                for layer in self.placement.slots]

    def stage(self, epoch: int, placement: Placement) -> None:
        """The placement to route by from the first header at which every rank is ready for ``epoch`` (the
        shards have its experts loaded): every rank switches at that same header, between two steps."""
        if placement.num_shards != self.ranks.shards:
            raise ValueError(f"a placement over {placement.num_shards} shards for a group of {self.ranks.shards}")
        self.staged = (epoch, placement)

    def _header(self, op: int, tokens: list[int]) -> int:
        ready = self.staged[0] if self.staged else self.epoch
        header = exchange_header(op, tokens, self.ranks, self.transport, self.device, ready, self.regroup_requested)
        self.headers += 1
        self.group_idle = header.op == OP_IDLE
        if self.staged and header.epoch == self.staged[0]:
            self.epoch, self.placement = self.staged
            self.staged = None
        self.leaving = header.regroup
        return header.op

    def begin_step(self, tokens: int | list[int]) -> None:
        """The step's header: this front-end computes ``tokens`` tokens in every layer (a count per
        micro-batch with several)."""
        tokens = tokens if isinstance(tokens, list) else [tokens]
        if len(tokens) != self.ranks.micro_batches:
            raise ValueError(f"{len(tokens)} micro-batch token counts for {self.ranks.micro_batches} micro-batches")
        if self.group_idle and self.wake_peers is not None:
            self.wake_peers()  # they wait for work, not for this header
        if self._header(OP_STEP if self.counting else OP_WARM_UP, tokens) == OP_STOP:
            raise GroupStopped("the cluster is stopping")
        self.tokens = sum(tokens)

    def idle(self) -> int:
        """The header of a front-end without work (the heartbeat when every rank is idle); when another
        front-end steps, this one joins every layer's exchanges with zero rows. Returns the header's op."""
        op = self._header(OP_IDLE, [0] * self.ranks.micro_batches)
        if op in STEPS:
            for _ in range(self.placement.num_layers * self.ranks.micro_batches):
                self.dispatch_nothing()
                self.receive_nothing()
        return op

    def stop(self) -> None:
        self._header(OP_STOP, [0] * self.ranks.micro_batches)

    def dispatch_nothing(self) -> None:
        """A layer's dispatch with zero rows: a block of one row per shard, its count 0."""
        N, M = self.ranks.shards, self.ranks.frontends
        no_rows = torch.zeros(N, self.row_bytes, dtype=torch.uint8, device=self.device)
        self.transport.all_to_all(no_rows, [0] * M + [1] * N, [0] * self.ranks.world)

    def receive_nothing(self) -> None:
        """A layer's combine for zero rows."""
        nothing = torch.empty(0, self.hidden, dtype=self.dtype, device=self.device)
        self.transport.all_to_all(nothing, [0] * self.ranks.world, [0] * self.ranks.world)

    def dispatch(self, layer: int, x_TH, ids_TK, weights_TK) -> FrontendHandle:
        t0 = time.perf_counter()
        T, K = ids_TK.shape
        N = self.ranks.shards
        shard_TK, slot_TK = self.placement.route(layer, ids_TK)
        send, row_of_slot, per_shard, slots_per_shard = pack_rows(x_TH, shard_TK, slot_TK, N, self.row_bytes)
        _, sent = self.transport.all_to_all(send, [0] * self.ranks.frontends + [1 + T] * N, [0] * self.ranks.world,
                                            async_op=True)
        handle = FrontendHandle(weights_TK, row_of_slot, slots_per_shard, sent)
        if self.counting:
            self._count(layer, T, K, sum(per_shard), per_shard, ids_TK)
            elapsed = time.perf_counter() - t0
            self.stats.dispatch_seconds += elapsed
            if self.on_dispatch is not None:
                self.on_dispatch(elapsed)
        if not self.overlap:
            self._receive(handle)
        return handle

    def combine(self, handle: FrontendHandle) -> torch.Tensor:
        """fp32 [T, H]: Σ_k w·expert(x) over every expert, summed as the in-process model sums."""
        if handle.ys is None:
            self._receive(handle)
        return ops.moe_combine(handle.ys, handle.weights_TK, handle.row_of_slot, handle.ys.shape[0])

    def _receive(self, handle: FrontendHandle) -> None:
        t0 = time.perf_counter()
        handle.sent()
        handle.ys, _ = self.transport.all_to_all(torch.empty(0, self.hidden, dtype=self.dtype, device=self.device),
                                                 [0] * self.ranks.world,
                                                 [0] * self.ranks.frontends + handle.slots_per_shard)
        elapsed = time.perf_counter() - t0
        if self.counting:
            self.stats.wait_seconds += elapsed
            if self.on_combine is not None:
                self.on_combine(elapsed)

    def _count(self, layer, T, K, rows, per_shard, ids_TK) -> None:
        s = self.stats
        s.layers += 1
        s.rows += rows
        s.token_slots += T * K
        s.bytes_dispatched += rows * (self.hidden * self.dtype.itemsize + 4 * K)
        while len(s.tokens_per_layer_shard) <= layer:
            s.tokens_per_layer_shard.append([0] * len(s.tokens_per_shard))
        for i, n in zip(self.members, per_shard):
            s.tokens_per_shard[i] += n
            s.tokens_per_layer_shard[layer][i] += n
        per_expert = torch.bincount(ids_TK.reshape(-1), minlength=len(s.tokens_per_expert))
        if self.load_LE is None:
            self.load_LE = torch.zeros(self.placement.num_layers, len(per_expert), dtype=torch.int64)
        self.load_LE[layer] += per_expert.cpu()


@dataclass
class ShardHandle:
    """A layer received: every front-end's rows (hidden states and local slots) and how many slots each sent."""

    x_RH: torch.Tensor
    slots_RK: torch.Tensor
    slots_per_frontend: list[int]


class ShardExchange:
    """A shard's side of every layer's exchange."""

    def __init__(self, ranks: Ranks, transport: Transport, hidden: int, top_k: int, dtype, device):
        self.ranks, self.transport = ranks, transport
        self.hidden, self.top_k, self.dtype, self.device = hidden, top_k, dtype, device
        self.row_bytes = row_bytes(hidden, top_k, dtype)
        self.tokens: list[list[int]] = [[0] * ranks.frontends] * ranks.micro_batches  # this step's
        self.header: Header | None = None  # the last one

    def next_op(self, ready_epoch: int = 0) -> int:
        """Join the next header, ready for the placement ``ready_epoch``: OP_STEP or OP_WARM_UP (then ``tokens``
        is every front-end's count per micro-batch), OP_IDLE or OP_STOP; the whole header is ``header``."""
        self.header = exchange_header(OP_IDLE, [0] * self.ranks.micro_batches, self.ranks, self.transport,
                                      self.device, ready_epoch)
        self.tokens = self.header.tokens
        return self.header.op

    def dispatch(self, layer: int, micro_batch: int = 0) -> ShardHandle:
        blocks = [1 + t for t in self.tokens[micro_batch]]
        recv, _ = self.transport.all_to_all(torch.empty(0, self.row_bytes, dtype=torch.uint8, device=self.device),
                                            [0] * self.ranks.world, blocks + [0] * self.ranks.shards)
        # each front-end's block: its count, then that many rows; sliced, not gathered by an index (a decode
        # layer's parsing was 60-80 us of index tensors on a CPU, on the critical path of every exchange)
        counts, parts, start = [], [], 0
        for block in blocks:
            n = int(recv[start].view(torch.int64)[0])
            counts.append(n)
            parts.append(recv[start + 1 : start + 1 + n])
            start += block
        rows = parts[0] if len(parts) == 1 else torch.cat(parts)
        first_slot = self.hidden * self.dtype.itemsize // 4
        x_RH = rows.view(self.dtype)[:, : self.hidden].contiguous()
        slots_RK = rows.view(torch.int32)[:, first_slot : first_slot + self.top_k].long()
        return ShardHandle(x_RH, slots_RK, [int(part.sum()) for part in torch.split(slots_RK >= 0, counts)])

    def combine(self, handle: ShardHandle, ys_SH: torch.Tensor) -> None:
        """Send each front-end the outputs of its rows' slots (row-major slot order)."""
        self.transport.all_to_all(ys_SH, handle.slots_per_frontend + [0] * self.ranks.shards, [0] * self.ranks.world)


def serve_layer(ep: ShardExchange, layer: int, experts, on_compute=None, micro_batch: int = 0) -> int:
    """One layer (one micro-batch of it) of a shard's loop: receive, compute every slot's output, send back;
    returns the rows."""
    handle = ep.dispatch(layer, micro_batch)
    t0 = time.perf_counter()
    ys = expert_outputs(handle.x_RH, handle.slots_RK, experts)
    if on_compute is not None:
        on_compute(time.perf_counter() - t0)
    ep.combine(handle, ys)
    return len(handle.x_RH)
