"""Ping-pong micro-batches without a cluster: the order in which two halves' stages meet the exchange's
collectives (every rank must meet them in one order), and the split of a batch. On the cluster:
tests/test_cluster.py (tokens and logits with micro-batches on)."""

from __future__ import annotations

import torch

from epserve.actors.model.attention import WholeSequence
from epserve.actors.model.micro_batches import forward_parts, idle_stages, split, take_turns


class RecordingExchange:
    """An expert executor that runs the experts in this process and records each collective it would make."""

    micro_batches = 2

    def __init__(self, model):
        self.local, self.log, self.sizes = model.local_experts, [], None
        self._half = {}

    def begin_step(self, tokens):
        self.sizes = tokens

    def dispatch(self, layer, x, ids, w):
        self.log.append(("dispatch", layer, len(x)))
        return self.local.dispatch(layer, x, ids, w)

    def combine(self, handle):
        self.log.append(("combine", len(handle)))
        return handle

    def dispatch_nothing(self):
        self.log.append(("dispatch", None, 0))

    def receive_nothing(self):
        self.log.append(("combine", 0))


def part(prompt):
    ids, pos = torch.tensor(prompt), torch.arange(len(prompt))
    return ids, pos, WholeSequence(pos)


def test_halves_meet_the_collectives_in_order_and_compute_what_one_pass_does(tiny_model):
    a, b = [5, 6, 7, 8, 9] * 3, [2, 17, 300]
    ex = RecordingExchange(tiny_model)
    with torch.no_grad():
        ha, hb = forward_parts(tiny_model, [part(a), part(b)], ex)
        whole_a, whole_b = tiny_model(*part(a)), tiny_model(*part(b))
    assert ex.sizes == [len(a), len(b)]
    L = tiny_model.cfg.num_layers
    want = [e for layer in range(L) for e in (("dispatch", layer, len(a)), ("combine", len(a)),
                                              ("dispatch", layer, len(b)), ("combine", len(b)))]
    assert ex.log == want
    assert torch.equal(ha, whole_a) and torch.equal(hb, whole_b)


def test_an_empty_half_joins_every_exchange_with_zero_rows(tiny_model):
    ex = RecordingExchange(tiny_model)
    with torch.no_grad():
        h, none = forward_parts(tiny_model, [part([3, 4, 5])], ex)
    assert none is None and ex.sizes == [3, 0]
    L = tiny_model.cfg.num_layers
    assert ex.log == [e for layer in range(L) for e in (("dispatch", layer, 3), ("combine", 3),
                                                        ("dispatch", None, 0), ("combine", 0))]
    # an idle half takes as many turns as a half with tokens: the two stay in step to the end
    turns = [0, 0]

    def counted(i, gen):
        for _ in gen:
            turns[i] += 1
        return i

    quiet = RecordingExchange(tiny_model)
    with torch.no_grad():
        assert take_turns(counted(0, tiny_model.stages(*part([3]), quiet)) or iter(()), iter(())) == [None, None]
    assert sum(1 for _ in idle_stages(L, quiet)) == sum(1 for _ in tiny_model.stages(*part([3]), quiet))


def test_split_balances_tokens_and_keeps_order():
    assert split([1] * 8) == 4
    assert split([100, 1, 1, 1]) == 1
    assert split([1, 1, 1, 100]) == 3
    assert split([7]) == 1  # one request: the second half is empty
    assert split([]) == 0
