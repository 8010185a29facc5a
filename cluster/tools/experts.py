"""``epserve experts``: the live expert placement and load of a server, over its gRPC API."""

from __future__ import annotations

import json

from ..api import inference_pb2 as pb
from ..api import inference_pb2_grpc as pb_grpc
from .client import auth_metadata, channel

BUSIEST = 10  # experts listed by load


def fetch(target: str, timeout_s: float = 30.0, ca_file: str | None = None, token: str | None = None):
    with channel(target, ca_file) as ch:
        return pb_grpc.InferenceStub(ch).Experts(pb.ExpertsRequest(), timeout=timeout_s,
                                                 metadata=auth_metadata(token))


def placement_json(reply: pb.ExpertsResponse) -> dict:
    """The placement as ``--placement FILE`` takes it."""
    return {"layers": [[list(s.experts) for s in layer.shards] for layer in reply.layers]}


def balancedness(reply: pb.ExpertsResponse) -> float | None:
    """Mean over the layers of max / mean (token, shard) rows per shard, as the dashboard's gauge (over the
    whole run here); None before any token was routed."""
    ratios = [max(t) * len(t) / sum(t) for t in (list(layer.tokens_per_shard) for layer in reply.load) if sum(t)]
    return sum(ratios) / len(ratios) if ratios else None


def report(reply: pb.ExpertsResponse) -> str:
    if reply.num_shards == 0:
        return f"no expert shards: the front-end runs all {reply.num_experts} experts of every layer itself"
    layers = [[list(s.experts) for s in layer.shards] for layer in reply.layers]
    N, E = reply.num_shards, reply.num_experts
    copies = [sum(e in shard for layer in layers for shard in layer) for e in range(E)]
    replicas = sum(copies) - E * len(layers)
    out = sorted(set(range(N)) - set(reply.shards_in_group))
    lines = [f"{N} shards, {E} experts in each of {len(layers)} layers, {replicas} replica slots in all"
             f"{' (none: every expert once)' if not replicas else ''}",
             f"placement {reply.placement_epoch}" + (" (the start-up one)" if not reply.placement_epoch else
                                                     " (after rebalancing)") +
             (f"; shard(s) {out} out of the group, their experts served by replicas" if out else ""), "",
             "shard  slots per layer  tokens routed  share"]
    total = sum(reply.tokens_per_shard) or 1
    for s in range(N):
        slots = sorted({len(layer[s]) for layer in layers})
        lines.append(f"{s:>5}  {'-'.join(map(str, (slots[0], slots[-1])) if len(slots) > 1 else str(slots[0])):>15}"
                     f"  {reply.tokens_per_shard[s]:>13}  {100 * reply.tokens_per_shard[s] / total:4.1f}%")
    b = balancedness(reply)
    lines += ["", "balancedness (mean over layers of max / mean tokens per shard): " +
              (f"{b:.3f}" if b is not None else "no tokens routed yet")]
    routed = sum(reply.tokens_per_expert)
    if routed:
        lines += ["", f"busiest experts (tokens over all layers; copies over all layers, {len(layers)} = one each):"]
        busiest = sorted(range(E), key=lambda e: -reply.tokens_per_expert[e])[:BUSIEST]
        lines += [f"  expert {e:>4}: {reply.tokens_per_expert[e]:>10} tokens "
                  f"({100 * reply.tokens_per_expert[e] / routed:4.1f}%), {copies[e]} copies" for e in busiest]
    return "\n".join(lines)


def as_json(reply: pb.ExpertsResponse) -> str:
    return json.dumps({"num_experts": reply.num_experts, "num_shards": reply.num_shards,
                       **placement_json(reply), "tokens_per_shard": list(reply.tokens_per_shard),
                       "tokens_per_expert": list(reply.tokens_per_expert),
                       "tokens_per_layer_shard": [list(t.tokens_per_shard) for t in reply.load],
                       "balancedness": balancedness(reply), "placement_epoch": reply.placement_epoch,
                       "shards_in_group": list(reply.shards_in_group)})
