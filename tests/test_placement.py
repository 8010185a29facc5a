"""Experts' placement as data (actors/placement.py): replicas and their turns, pinned layouts and their errors,
and, on a real local Ray cluster, the same tokens as transformers and the same logits, to the bit, as the
in-process engine whatever the placement: redundant experts R in {1, 7} on 2 and 3 shards, and a pinned layout
that puts experts out of order."""

from __future__ import annotations

import json

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from epserve.actors.model.attention import WholeSequence
from epserve.actors.placement import Placement, PlacementError, build
from epserve.cluster.config import ClusterConfig
from epserve.cluster.launcher import Cluster

from helpers import engine_greedy

PROMPTS = [[2, 17, 300, 42], [5, 6, 7, 8, 9] * 12, [100], list(range(3, 90))]
NEW = 12


# --------------------------------------------------------------------------------------------- as data


def test_redundant_slots_spread_over_experts_and_shards():
    p = Placement.contiguous(num_layers=2, num_experts=16, num_shards=3, redundant=7)
    for layer in p.slots:
        held = [e for shard in layer for e in shard]
        assert sorted(set(held)) == list(range(16)) and len(held) == 16 + 7
        assert max(map(len, layer)) - min(map(len, layer)) <= 1  # slots balanced over the shards
        assert all(len(set(shard)) == len(shard) for shard in layer)  # a replica is on another shard
    assert p.max_replicas == 2 and int(p.num_replicas[0].sum()) == 23


def test_a_replicated_experts_tokens_take_its_replicas_in_turn():
    p = Placement.from_json({"shards": [[0, 1, 2], [3, 0]]}, num_layers=1, num_experts=4, num_shards=2)
    ids = torch.tensor([[0, 1], [0, 3], [2, 0], [0, 1], [0, 2]])
    shard, slot = p.route(0, ids)
    # expert 0's five tokens alternate between shard 0 slot 0 and shard 1 slot 1, in token order
    assert shard[ids == 0].tolist() == [0, 1, 0, 1, 0] and slot[ids == 0].tolist() == [0, 1, 0, 1, 0]
    assert shard[ids == 3].tolist() == [1] and slot[ids == 3].tolist() == [0]
    assert (shard[ids == 2].tolist(), slot[ids == 2].tolist()) == ([0, 0], [2, 2])
    assert all(torch.equal(a, b) for a, b in zip(p.route(0, ids), (shard, slot)))  # deterministic


@pytest.mark.parametrize("pinned, words", [
    ({"shards": [[0, 1]]}, "names 1 shards per layer; the cluster has 2"),
    ({"shards": [[0, 1], [1, 2]]}, "expert 3 (and 12 more) has no slot"),
    ({"shards": [list(range(16)), [5, 5]]}, "shard 1 holds an expert twice"),
    ({"shards": [list(range(16)), [16]]}, "expert 16 is not an expert id in [0, 16)"),
    ({"layers": [[list(range(16)), []]]}, "the placement has 1 layers; the model has 4"),
    ({"experts": []}, 'a placement is {"layers"'),
])
def test_a_bad_pinned_placement_is_named_in_one_line(pinned, words):
    with pytest.raises(PlacementError) as e:
        build(4, 16, 2, pinned=pinned)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_impossible_redundancy_is_refused():
    with pytest.raises(PlacementError, match="at least 2 shards"):
        build(4, 16, 1, redundant=1)
    with pytest.raises(PlacementError, match="at most 16 fit on 2 shards"):
        build(4, 16, 2, redundant=17)
    with pytest.raises(PlacementError, match="redundant experts must be 0"):
        build(4, 16, 2, redundant=1, pinned={"shards": [list(range(16)), []]})


# --------------------------------------------------------------------------------------------- in a cluster


@pytest.fixture(scope="module")
def reference(tiny_model, tiny_dir, tools):
    hf = tools.hf_load(AutoModelForCausalLM, tiny_dir)
    theirs = [tools.hf_greedy(hf, p, NEW) for p in PROMPTS]
    assert engine_greedy(tiny_model, PROMPTS, NEW) == theirs
    return theirs


OUT_OF_ORDER = {"shards": [[15, 3, 8, 0, 12, 6], [9, 1, 14, 4, 11], [2, 13, 7, 10, 5, 0, 9]]}  # 0 and 9 twice


@pytest.mark.parametrize("shards, settings", [
    (2, {"redundant_experts": 1}), (2, {"redundant_experts": 7}), (3, {"redundant_experts": 1}),
    (3, {"redundant_experts": 7}), (3, {"expert_placement": OUT_OF_ORDER}),
])
def test_any_placement_gives_the_engines_tokens_and_logits(ray_session, tiny_dir, tiny_model, reference, shards,
                                                           settings, tmp_path):
    if "expert_placement" in settings:  # a pinned placement comes as a file
        path = tmp_path / "placement.json"
        path.write_text(json.dumps(settings["expert_placement"]))
        settings = {"expert_placement": str(path)}
    cfg = ClusterConfig(checkpoint=str(tiny_dir), shards=shards, dtype="float32", **settings)
    with Cluster(cfg) as cluster:
        placement = cluster.placement()
        infos = cluster.shard_info()
        outs = cluster.generate(PROMPTS, {"max_tokens": NEW, "ignore_eos": True})
        remote = ray.get(cluster.frontend.score.remote(PROMPTS[3]))
        rows = [s["rows"] for s in ray.get([s.stats.remote() for s in cluster.shards])]
    assert [o["token_ids"] for o in outs] == reference
    pos = torch.arange(len(PROMPTS[3]))
    with torch.no_grad():
        local = tiny_model.logits(tiny_model(torch.tensor(PROMPTS[3]), pos, WholeSequence(pos)))
    assert torch.equal(remote, local)  # per-slot outputs summed in top-k order: the placement changes no bit
    # each shard loaded exactly the experts of its slots, in slot order
    assert [i["experts"] for i in infos] == [placement.experts_of(s) for s in range(shards)]
    if "redundant_experts" in settings:
        assert sum(len(e) for e in placement.slots[0]) == tiny_model.cfg.num_experts + settings["redundant_experts"]
    else:
        assert placement.slots[0] == OUT_OF_ORDER["shards"]
    assert all(r > 0 for r in rows)  # every shard served rows


def test_a_bad_placement_fails_before_any_actor_starts(ray_session, tiny_dir, tmp_path):
    path = tmp_path / "placement.json"
    path.write_text(json.dumps({"shards": [[0, 1], [2]]}))
    with pytest.raises(PlacementError, match="expert 3 .* has no slot"):
        Cluster(ClusterConfig(checkpoint=str(tiny_dir), shards=2, expert_placement=str(path))).start()
    with pytest.raises(PlacementError, match="cannot read the placement"):
        Cluster(ClusterConfig(checkpoint=str(tiny_dir), shards=2, expert_placement=str(tmp_path / "no.json"))).start()
