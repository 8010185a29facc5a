"""Ping-pong micro-batches: a front-end's step split in two halves that take turns, so that one half's
attention (and dense FFN, router, norms) runs while the expert shards compute the other half's experts.

Each half runs as a generator of layer stages (``Gemma4Model.stages``), which yields before each dispatch,
before each combine and after it. Resuming the halves A and B in the order A, then A, B, A, B, ... gives, per
layer l (collectives in capitals):

    A: DISPATCH A(l), dense A(l)          | shards: experts of A(l)
    B: post B(l-1), attention B(l)        |   ...while the front-end computes B
    A: COMBINE A(l)
    B: DISPATCH B(l), dense B(l)          | shards: experts of B(l)
    A: post A(l), attention A(l+1)        |   ...while the front-end computes A
    B: COMBINE B(l)

Every rank meets the collectives in one order (dispatch A, combine A, dispatch B, combine B, per layer),
which is what the shards' loop serves (one exchange per micro-batch per layer) and what a front-end without
one half joins with zero rows (``idle_stages``). Each token's arithmetic is the one it has in a single
batch, so the tokens are the same with micro-batches on and off. The overlap is real only where the
front-end and the shards do not share cores (GPUs; CPU actors bound to disjoint cores: docs/performance.md).
"""

from __future__ import annotations

import itertools
from typing import Generator

MICRO_BATCHES = (1, 2)


def idle_stages(num_layers: int, exchange) -> Generator[None, None, None]:
    """The stages of an empty half: every layer's exchange joined with zero rows, at the points where a
    half with tokens dispatches and combines (``DecoderLayer.stages``: one turn to the dispatch, one to the
    combine, one from there to the next layer's dispatch)."""
    yield
    for layer in range(num_layers):
        exchange.dispatch_nothing()
        yield
        exchange.receive_nothing()
        yield
        if layer < num_layers - 1:
            yield


def take_turns(first, second) -> list:
    """Run two generators of stages in the order first, first, second, first, second, ...; their return
    values. One that ends first leaves the other to run alone."""
    halves, results = [first, second], [None, None]
    alive = [True, True]

    def resume(i: int) -> None:
        try:
            next(halves[i])
        except StopIteration as done:
            results[i], alive[i] = done.value, False

    resume(0)
    turn = 0
    while any(alive):
        if alive[turn]:
            resume(turn)
        turn = 1 - turn
    return results


def split(num_new: list[int]) -> int:
    """Where to cut a batch's requests (in order) into two halves of about equal tokens: the first half is
    requests [0, cut). A batch of one request gets an empty second half."""
    if len(num_new) < 2:
        return len(num_new)
    prefix = list(itertools.accumulate(num_new))
    return min(range(1, len(num_new)), key=lambda cut: abs(2 * prefix[cut - 1] - prefix[-1]))


def forward_parts(model, parts: list, experts) -> list:
    """The model over a step's parts, each (input_ids, positions, attention context): one part in one
    forward pass, or, where the executor runs two micro-batches, the two halves taking turns (a missing or
    empty half joins with zero rows). Tells the executor the step's size first. Returns each part's hidden
    states (None for an empty one)."""
    halves = getattr(experts, "micro_batches", 1)
    parts = parts + [None] * (halves - len(parts))
    if experts is not None:
        experts.begin_step([len(p[0]) if p is not None else 0 for p in parts])
    if halves == 1:
        return [model(*parts[0], experts)]
    turns = [model.stages(*p, experts) if p is not None and len(p[0]) else idle_stages(model.cfg.num_layers, experts)
             for p in parts]
    hidden = take_turns(*turns)
    return [h if p is not None and len(p[0]) else None for h, p in zip(hidden, parts)]
