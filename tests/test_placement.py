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
from epserve.actors.model.loader import load_model
from epserve.actors.dispatch_rows import pack_rows, row_bytes, torch_pack_rows
from epserve.actors.placement import Placement, PlacementError, build, expert_ranges
from epserve.cluster.config import ClusterConfig
from epserve.cluster.fixtures.checkpoint import preset, write_checkpoint
from epserve.cluster.launcher import Cluster

from helpers import engine_greedy, tiny_server

PROMPTS = [[2, 17, 300, 42], [5, 6, 7, 8, 9] * 12, [100], list(range(3, 90))]
NEW = 12


# --------------------------------------------------------------------------------------------- as data


@pytest.mark.parametrize("experts, shards, redundant", [(16, 3, 7), (16, 3, 32), (16, 4, 5), (128, 4, 16)])
def test_redundant_slots_spread_over_experts_and_shards(experts, shards, redundant):
    p = Placement.contiguous(num_layers=2, num_experts=experts, num_shards=shards, redundant=redundant)
    for layer in p.slots:
        held = [e for shard in layer for e in shard]
        assert sorted(set(held)) == list(range(experts)) and len(held) == experts + redundant
        assert max(map(len, layer)) - min(map(len, layer)) <= 1  # slots balanced over the shards
        assert all(len(set(shard)) == len(shard) for shard in layer)  # a replica is on another shard
        for shard, (first, count) in zip(layer, expert_ranges(experts, shards)):
            assert shard[:count] == list(range(first, first + count))  # each shard keeps its range
    assert int(p.num_replicas[0].sum()) == experts + redundant


def test_a_replicated_experts_tokens_take_its_replicas_in_turn():
    p = Placement.from_json({"shards": [[0, 1, 2], [3, 0]]}, num_layers=1, num_experts=4, num_shards=2)
    ids = torch.tensor([[0, 1], [0, 3], [2, 0], [0, 1], [0, 2]])
    shard, slot = p.route(0, ids)
    # expert 0's five tokens alternate between shard 0 slot 0 and shard 1 slot 1, in token order
    assert shard[ids == 0].tolist() == [0, 1, 0, 1, 0] and slot[ids == 0].tolist() == [0, 1, 0, 1, 0]
    assert shard[ids == 3].tolist() == [1] and slot[ids == 3].tolist() == [0]
    assert (shard[ids == 2].tolist(), slot[ids == 2].tolist()) == ([0, 0], [2, 2])
    assert all(torch.equal(a, b) for a, b in zip(p.route(0, ids), (shard, slot)))  # deterministic


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_layers_rows_pack_the_same_natively_and_in_tensor_ops(dtype):
    """The front-end's dispatch blocks (count, then each token's hidden state and its slots on the shard) and
    where each slot's answer lands: the native pass equals the tensor ops, byte for byte in every row a shard
    reads; tokens with no slot on a shard, replicas and strided hidden states included."""
    g = torch.Generator().manual_seed(3)
    E, N, T, K, H = 16, 3, 9, 4, 24
    p = build(1, E, N, redundant=5)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    ids[0] = torch.tensor([0, 1, 2, 3])  # the first tokens of experts on shard 0: no row for the others
    x = torch.randn(T, 2 * H, generator=g).to(dtype)[:, :H]
    shard, slot = p.route(0, ids)
    size = row_bytes(H, K, dtype)
    native, reference = pack_rows(x, shard, slot, N, size), torch_pack_rows(x, shard, slot, N, size)
    assert torch.equal(native[1], reference[1]) and native[2:] == reference[2:]
    per_shard = native[2]
    assert sum(native[3]) == T * K and min(per_shard) < T  # every slot answered once; not every token everywhere
    for s, rows in enumerate(per_shard):  # the count row and each token's row (room past them is never read)
        lo, used = s * (1 + T), slice(0, H * x.element_size() + 4 * K)
        assert torch.equal(native[0][lo : lo + 1 + rows, used][1:], reference[0][lo : lo + 1 + rows, used][1:])
        assert torch.equal(native[0][lo, :8], reference[0][lo, :8])


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


def _shard_loads(p: Placement, load) -> list[list[float]]:
    """[layer][shard]: the rows each shard gets, a replicated expert's split evenly over its copies."""
    return [[sum(load[layer][e] / int(p.num_replicas[layer][e]) for e in shard) for shard in shards]
            for layer, shards in enumerate(p.slots)]


def test_balanced_placement_evens_a_skewed_load_with_replicas_of_the_hottest():
    g = torch.Generator().manual_seed(0)
    load = (torch.rand(3, 128, generator=g) ** 12 * 1000).tolist()  # a few experts take most rows
    default = _shard_loads(Placement.contiguous(3, 128, 4), load)
    p = Placement.balanced(load, num_shards=4, redundant=16)
    assert p.slots_per_shard() == Placement.contiguous(3, 128, 4, 16).slots_per_shard()  # the same memory
    for layer, shards in enumerate(p.slots):
        held = [e for shard in shards for e in shard]
        assert sorted(set(held)) == list(range(128)) and len(held) == 144
        assert all(len(set(shard)) == len(shard) for shard in shards)
        hottest = max(range(128), key=lambda e: load[layer][e])
        assert int(p.num_replicas[layer][hottest]) > 1  # the replicas go to the hot experts
    spread = [max(s) / (sum(s) / 4) for s in _shard_loads(p, load)]
    assert max(spread) < 1.02 < min(max(s) / (sum(s) / 4) for s in default)


def test_balanced_packing_never_puts_two_copies_on_one_shard():
    for redundant in (1, 5, 30):  # with 30, 14 of 16 experts sit on all 3 shards: the packer must move one
        p = Placement.balanced([[1.0] * 16, list(range(16))], num_shards=3, redundant=redundant)
        assert all(len(set(shard)) == len(shard) for shards in p.slots for shard in shards)
        assert sum(map(len, p.slots[0])) == 16 + redundant


def test_a_skewed_router_sends_a_few_experts_most_of_the_traffic(tmp_path):
    """make-checkpoint --router-skew: the same weights but the embedding's and routers' dimension 0 and the
    norms that close the blocks; the hottest experts take several times their even share."""
    cfg = preset("tiny")
    plain, skewed = (load_model(write_checkpoint(cfg, tmp_path / str(s), router_skew=s)) for s in (0, 3))
    changed = {n for n, t in plain.state_dict().items() if not torch.equal(t, skewed.state_dict()[n])}
    assert changed and all(n == "embed_tokens.weight" or n.endswith(("router.proj.weight", "post_attention_layernorm"
                           ".weight", "post_feedforward_layernorm.weight")) for n in changed)
    ids = torch.randint(3, cfg.vocab_size, (256,), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(len(ids))

    def hottest_share(model) -> list[float]:
        """Per layer: the share of routed rows the top_k busiest experts take (even: top_k / experts = 0.25)."""
        routed: list[torch.Tensor] = []
        for layer in model.layers:
            layer.router.register_forward_hook(lambda mod, inp, out: routed.append(out[1]))
        with torch.no_grad():
            model(ids, pos, WholeSequence(pos))
        counts = [torch.bincount(r.reshape(-1), minlength=cfg.num_experts).sort(descending=True).values
                  for r in routed]
        return [(c[:cfg.top_k].sum() / c.sum()).item() for c in counts]

    even, skew = hottest_share(plain), hottest_share(skewed)
    assert max(even) < 0.45 and skew[0] > 0.6 and sum(skew) > 1.5 * sum(even), (even, skew)


def test_impossible_redundancy_is_refused():
    with pytest.raises(PlacementError, match="at least 2 shards"):
        build(4, 16, 1, redundant=1)
    with pytest.raises(PlacementError, match="at most 16 fit on 2 shards"):
        build(4, 16, 2, redundant=17)
    with pytest.raises(PlacementError, match="at most 32 fit on 3 shards"):
        Placement.balanced([[1.0] * 16], num_shards=3, redundant=33)
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


def test_experts_command_shows_the_served_placement_and_load(ray_session, tiny_dir, tiny_model, tmp_path, capsys):
    """A pinned placement served end to end (the Serve app, gRPC): `epserve experts` prints it and the load,
    and saves it in the form --placement takes."""
    from epserve.cluster.cli import main
    from epserve.cluster.tools import client

    cfg = tiny_model.cfg
    with tiny_server(tiny_dir, shards=3, expert_placement=OUT_OF_ORDER) as server:
        client.stream(server.grpc_target, client.request(prompt_ids=PROMPTS[1], max_tokens=NEW, ignore_eos=True))
        capsys.readouterr()
        saved = tmp_path / "placement.json"
        assert main(["experts", "--address", server.grpc_target, "--json", "--save-placement", str(saved)]) == 0
        reply = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert main(["experts", "--address", server.grpc_target]) == 0
        table = capsys.readouterr().out
    assert reply["num_shards"] == 3 and reply["layers"] == [OUT_OF_ORDER["shards"]] * cfg.num_layers
    assert Placement.from_json(json.loads(saved.read_text()), cfg.num_layers, cfg.num_experts, 3).slots == \
        reply["layers"]
    # every token of every layer routed top_k pairs; the rows per shard add up layer by layer
    routed = sum(reply["tokens_per_expert"])
    assert routed > 0 and routed % (cfg.num_layers * cfg.top_k) == 0
    assert sum(reply["tokens_per_shard"]) == sum(map(sum, reply["tokens_per_layer_shard"]))
    assert all(t > 0 for t in reply["tokens_per_shard"]) and reply["balancedness"] >= 1.0
    assert f"3 shards, 16 experts in each of {cfg.num_layers} layers, {2 * cfg.num_layers} replica slots" in table
    assert "balancedness" in table and "busiest experts" in table
