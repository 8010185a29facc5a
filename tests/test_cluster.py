"""The expert-parallel cluster on a real local Ray cluster: a Frontend actor and N ExpertShard actors exchanging
rows over shared memory (one host) or a gloo process group, checked against the in-process engine and
transformers."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil

import pytest
import ray
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from epserve.actors.placement import expert_ranges
from epserve.actors.engine.engine import LLMEngine
from epserve.actors.engine.sampling import SamplingParams
from epserve.actors.model.attention import WholeSequence
from epserve.actors.model.gemma4 import LocalExperts
from epserve.actors.model.loader import load_model
from epserve.actors.model.moe import expert_dtype
from epserve.cluster.config import ClusterConfig
from epserve.actors.frontend import EngineFailure
from epserve.actors.model.host_memory import actor_env
from epserve.cluster.launcher import Cluster, bundles, frontend_name, openmp_env, shard_name
from epserve.cluster.serving.frontend_client import FrontendClient

from helpers import engine_greedy

PROMPTS = [[2, 17, 300, 42], [5, 6, 7, 8, 9] * 12, [100], list(range(3, 90))]
PARAMS = {"max_tokens": 12, "ignore_eos": True}
ROLES = {"frontend_resources": {"frontend": 1}, "shard_resources": {"expert": 1}}  # what the Helm chart asks
FP32 = {"dtype": "float32"}  # compared with fp32 references (bf16: tests/test_precision.py)


@pytest.fixture(scope="module")
def reference(tiny_model, tiny_dir):
    """In-process engine outputs and transformers' greedy outputs for PROMPTS."""
    ours = LLMEngine(tiny_model).generate(PROMPTS, SamplingParams(**PARAMS))
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32,
                                              attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = [hf.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                              eos_token_id=None)[0, len(p):].tolist() for p in PROMPTS]
    return [o.token_ids for o in ours], theirs


@pytest.mark.parametrize("frontends, shards, micro_batches, transport, backend",
                         [(1, 1, 1, "auto", "shm"), (1, 2, 1, "auto", "shm"), (1, 3, 1, "auto", "shm"),
                          (1, 4, 1, "auto", "shm"), (1, 3, 1, "dist", "gloo"), (2, 1, 1, "auto", "shm"),
                          (2, 2, 1, "auto", "shm"), (2, 3, 1, "auto", "shm"), (3, 1, 1, "auto", "shm"),
                          (3, 2, 1, "dist", "gloo"), (3, 3, 1, "auto", "shm"),
                          (1, 2, 2, "auto", "shm"), (2, 3, 2, "dist", "gloo")])
def test_cluster_matches_engine_and_transformers(ray_session, tiny_dir, tiny_model, reference, frontends, shards,
                                                 micro_batches, transport, backend):
    """M front-ends x N shards, with and without ping-pong micro-batches: the same greedy tokens and the same
    logits as the in-process engine and transformers."""
    cluster = Cluster(ClusterConfig(checkpoint=str(tiny_dir), shards=shards, frontends=frontends,
                                    micro_batches=micro_batches, transport=transport, **FP32)).start()
    try:
        assert cluster.backend == backend  # one host: shared memory unless torch.distributed is asked for
        outs = cluster.generate(PROMPTS, PARAMS)  # prompt i on front-end i mod M, all in lockstep
        ours, theirs = reference
        assert [o["token_ids"] for o in outs] == ours == theirs
        # steps where the last front-end has several requests and the others none (they join with zero rows)
        alone = ray.get(cluster.frontends[-1].generate.remote(PROMPTS, SamplingParams(**PARAMS)))
        assert [o["token_ids"] for o in alone] == ours
        prompt = PROMPTS[3]
        pos = torch.arange(len(prompt))
        with torch.no_grad():
            local = tiny_model.logits(tiny_model(torch.tensor(prompt), pos, WholeSequence(pos)))
        for frontend in cluster.frontends:
            remote = ray.get(frontend.score.remote(prompt))
            assert (remote - local).abs().max() <= 1e-5 * local.abs().max()
            # the shards return each slot's output and the front-end sums them as the in-process model does:
            # the same bits, whatever the number of shards and front-ends
            assert torch.equal(remote, local)
        assert [ray.get_actor(frontend_name(j), namespace="epserve") for j in range(frontends)]
        # actors sharing the host's cores spin briefly between parallel regions (launcher.openmp_env)
        waits = ray.get([a.__ray_call__.remote(lambda _: os.environ.get("GOMP_SPINCOUNT"))
                         for a in cluster.frontends + cluster.shards])
        spins = openmp_env(cluster.config, use_gpu=False).get("GOMP_SPINCOUNT", os.environ.get("GOMP_SPINCOUNT"))
        assert waits == [spins] * (frontends + shards)
        # and keep the memory they free for their next step (actors/model/host_memory.py)
        kept = ray.get([a.__ray_call__.remote(lambda _: os.environ.get("GLIBC_TUNABLES"))
                        for a in cluster.frontends + cluster.shards])
        tunables = actor_env(use_gpu=False).get("GLIBC_TUNABLES", os.environ.get("GLIBC_TUNABLES"))
        assert kept == [tunables] * (frontends + shards)
        # each shard holds its slice only, read from the checkpoint as just that slice
        cfg = tiny_model.cfg
        per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size  # gate, up and down
        for info, (first, count) in zip(cluster.shard_info(), expert_ranges(cfg.num_experts, shards)):
            assert info["experts"] == [list(range(first, first + count))] * cfg.num_layers
            # bf16 on disk: held as bf16 where the native CPU kernel serves fp32 compute, else widened to fp32
            held = expert_dtype(torch.bfloat16, torch.float32, "cpu", cfg)
            assert info["expert_dtype"] == str(held).replace("torch.", "")
            assert info["resident_expert_bytes"] == count * per_expert * cfg.num_layers * held.itemsize
            assert info["loaded_bytes"] == count * per_expert * cfg.num_layers * 2  # bf16 on disk
            assert ray.get_actor(shard_name(info["shard"]), namespace="epserve") is not None
        assert cluster.stats()["kv_blocks_used"] == 0
    finally:
        cluster.shutdown()
    with pytest.raises(ValueError):
        ray.get_actor(shard_name(0), namespace="epserve")


class RecordingExperts(LocalExperts):
    """Local experts that remember every layer's routing, for an independent count of the dispatch."""

    def __init__(self, layers):
        super().__init__(layers)
        self.ids = []

    def dispatch(self, layer, x, ids, w):
        self.ids.append(ids.clone())
        return super().dispatch(layer, x, ids, w)


def test_a_servers_requests_share_one_output_stream(ray_session, tiny_dir, reference):
    """submit + outputs (what the servers use): every step's outputs of one subscriber's requests cross as one
    Ray item, and each request gets the engine's tokens."""
    with Cluster(ClusterConfig(checkpoint=str(tiny_dir), shards=1, **FP32)) as cluster:
        fe = cluster.frontend
        ids = ray.get([fe.submit.remote(p, SamplingParams(**PARAMS), f"r{i}", "server-1")
                       for i, p in enumerate(PROMPTS)])
        tokens, batches = {rid: [] for rid in ids}, []
        outputs = fe.outputs.options(num_returns="streaming").remote("server-1")
        for ref in outputs:
            batches.append(ray.get(ref))
            for out in batches[-1]:
                tokens[out.request_id] += out.new_token_ids
            if all(len(t) == PARAMS["max_tokens"] for t in tokens.values()):
                break
        ray.cancel(outputs)
    assert [tokens[rid] for rid in ids] == reference[0]
    assert max(len(b) for b in batches) == len(PROMPTS)  # the decode steps: every request in one item
    assert len(batches) < sum(len(b) for b in batches)


def test_dispatch_sends_one_row_per_token_and_distinct_shard(ray_session, tiny_dir, tiny_model):
    shards, prompt = 4, PROMPTS[3]
    recorder = RecordingExperts(tiny_model.layers)
    pos = torch.arange(len(prompt))
    with torch.no_grad():
        tiny_model(torch.tensor(prompt), pos, WholeSequence(pos), recorder)
    cfg = tiny_model.cfg
    shard_of = torch.tensor([s for s, (f, c) in enumerate(expert_ranges(cfg.num_experts, shards)) for _ in range(c)])
    want_rows = sum(len(set(row)) for ids in recorder.ids for row in shard_of[ids].tolist())
    with Cluster(ClusterConfig(checkpoint=str(tiny_dir), shards=shards, **FP32)) as cluster:
        ray.get(cluster.frontend.score.remote(prompt))
        d = cluster.stats()["dispatch"]
    assert d["rows"] == want_rows < d["token_slots"] == len(prompt) * cfg.top_k * cfg.num_layers
    assert d["bytes_dispatched"] == want_rows * (cfg.hidden_size * 4 + cfg.top_k * 4)  # fp32 rows and their slots
    assert sum(d["tokens_per_shard"]) == want_rows
    assert d["tokens_per_expert"] == torch.bincount(torch.cat([i.reshape(-1) for i in recorder.ids]),
                                                    minlength=cfg.num_experts).tolist()


@pytest.fixture(scope="module")
def half_routed_dir(tmp_path_factory, tiny_dir):
    """The tiny checkpoint with routers that never choose the experts of shards 2 and 3 (of 4): the router
    rows of shards 0 and 1 are +a and -a alternately, so whatever the sign of z·a, top_k of them have logits
    above the zeros of every other expert."""
    out = tmp_path_factory.mktemp("half-routed")
    for f in tiny_dir.iterdir():
        shutil.copy(f, out / f.name)
    cfg = json.loads((tiny_dir / "config.json").read_text())["text_config"]
    (_, c0), (_, c1) = expert_ranges(cfg["num_experts"], 4)[:2]
    assert c0 + c1 >= 2 * cfg["top_k_experts"]
    tensors = load_file(out / "model.safetensors")
    for name, t in tensors.items():
        if name.endswith("router.proj.weight"):
            a = torch.nn.functional.normalize(torch.randn(t.shape[1]), dim=0) * 50
            t = torch.zeros_like(t)
            for e in range(c0 + c1):
                t[e] = a if e % 2 == 0 else -a
            tensors[name] = t
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_step_with_idle_shards_completes(ray_session, half_routed_dir):
    model = load_model(half_routed_dir)
    want = LLMEngine(model).generate(PROMPTS, SamplingParams(**PARAMS))
    with Cluster(ClusterConfig(checkpoint=str(half_routed_dir), shards=4, **FP32)) as cluster:
        outs = cluster.generate(PROMPTS, PARAMS)
        per_shard = cluster.stats()["dispatch"]["tokens_per_shard"]
    assert min(per_shard[:2]) > 0 and per_shard[2:] == [0, 0]  # shards 2, 3 joined every step with 0 rows
    assert [o["token_ids"] for o in outs] == [w.token_ids for w in want]


def test_dead_shard_without_recovery_is_an_error_not_a_hang(ray_session, tiny_dir):
    cluster = Cluster(ClusterConfig(checkpoint=str(tiny_dir), shards=2, collective_timeout_s=10,
                                    heartbeat_s=0.5, max_failures=0)).start()
    try:
        assert cluster.generate([[5, 6, 7]], PARAMS)[0]["finish_reason"] == "length"
        ray.kill(cluster.shards[1], no_restart=True)
        with pytest.raises(ray.exceptions.RayTaskError, match="EngineFailure.*more than the 0 allowed"):
            ray.get(cluster.frontend.generate.remote([[5, 6, 7]], SamplingParams(max_tokens=200, ignore_eos=True)),
                    timeout=60)
        assert not ray.get(cluster.frontend.ready.remote())
        assert not cluster.supervisor.serving and "shard 1" in cluster.supervisor.failed
    finally:
        cluster.shutdown()


def test_bundles_add_each_roles_resources():
    cfg = ClusterConfig(shards=3, **ROLES)
    gpu = {"CPU": 1.0, "GPU": 1}
    assert bundles(cfg, 1.0, True) == [gpu | {"frontend": 1}] + [gpu | {"expert": 1}] * 3
    assert bundles(ClusterConfig(shards=3), 0.2, False) == [{"CPU": 0.2}] * 4  # any node (deploy/serve.yaml)
    # a bundle per front-end, first: rank r of the group is bundle r
    assert bundles(ClusterConfig(shards=2, frontends=3, **ROLES), 1.0, True) == \
        [gpu | {"frontend": 1}] * 3 + [gpu | {"expert": 1}] * 2


def test_openmp_spins_briefly_only_where_actors_share_cores(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    short = {"OMP_WAIT_POLICY": "active", "GOMP_SPINCOUNT": "3000"}
    assert openmp_env(ClusterConfig(), use_gpu=False) == short
    assert openmp_env(ClusterConfig(frontend_cpus=[0], shard_cpus=[0, 1]), use_gpu=False) == short
    assert openmp_env(ClusterConfig(frontend_cpus=[0], shard_cpus=[1]), use_gpu=False) == {}  # cores apart
    assert openmp_env(ClusterConfig(), use_gpu=True) == {}
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")  # the operator's word stands
    assert openmp_env(ClusterConfig(), use_gpu=False) == {}
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("GOMP_SPINCOUNT", "0")
    assert openmp_env(ClusterConfig(), use_gpu=False) == {}


@pytest.mark.parametrize("resources, words", [
    ({"GPU": 1}, "'GPU' is not a custom Ray resource"), ({"": 1}, "'' is not a custom"),
    ({"expert": 0}, "must be a positive number"), ({"expert": float("nan")}, "positive number"),
    ({"expert": "1"}, "positive number"), (["expert"], "must be a mapping")])
def test_role_resources_are_checked(resources, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        ClusterConfig(shard_resources=resources)


def test_placement_group_reserves_the_role_resources(ray_session, tiny_dir, reference):
    """The session's head advertises the chart's role resources, one cluster's worth: the placement group
    reserves all of them, bundle 0 the front-end's and each shard bundle one expert, and the actors in those
    bundles serve."""
    with Cluster(ClusterConfig(checkpoint=str(tiny_dir), shards=2, **ROLES, **FP32)) as cluster:
        table = ray.util.placement_group_table(cluster.pg)
        free = ray.available_resources()
        outs = cluster.generate(PROMPTS[:2], PARAMS)
    assert table["state"] == "CREATED"
    assert list(table["bundles"].values()) == [{"CPU": 0.2, "frontend": 1.0}] + [{"CPU": 0.2, "expert": 1.0}] * 2
    assert free.get("frontend", 0) == free.get("expert", 0) == 0
    assert [o["token_ids"] for o in outs] == reference[0][:2]


def test_bf16_cluster_computes_what_the_bf16_engine_does(ray_session, tiny_dir):
    """dtype bfloat16 on every rank (the default on GPUs and on CPUs with native bf16): the rows cross in bf16,
    the experts run in bf16 on the shards, and the tokens and logits are the in-process bf16 engine's."""
    model = load_model(tiny_dir, dtype=torch.bfloat16)
    want = LLMEngine(model).generate(PROMPTS, SamplingParams(**PARAMS))
    with Cluster(ClusterConfig(checkpoint=str(tiny_dir), shards=2, dtype="bfloat16")) as cluster:
        infos = [ray.get(cluster.frontend.model_info.remote()).to_dict(), *cluster.shard_info()]
        outs = cluster.generate(PROMPTS, PARAMS)
        remote = ray.get(cluster.frontend.score.remote(PROMPTS[3]))
    assert {i["dtype"] for i in infos} == {"bfloat16"} and {i["expert_dtype"] for i in infos[1:]} == {"bfloat16"}
    assert [o["token_ids"] for o in outs] == [w.token_ids for w in want]
    pos = torch.arange(len(PROMPTS[3]))
    with torch.no_grad():
        local = model.logits(model(torch.tensor(PROMPTS[3]), pos, WholeSequence(pos))).float()
    assert (remote - local).abs().max() <= 2**-7 * local.abs().max()  # the shards' sums round to bf16 alike


def test_moved_requests_continue_and_a_limit_ends_them_cleanly(ray_session, tiny_dir, tiny_model):
    """The ingress's client over 2 front-ends, front-end 0 killed while streams run: a client that may move a
    request continues every one with the tokens it would have had; one allowed no move ends the lost
    front-end's requests with EngineFailure (UNAVAILABLE) and finishes the others."""
    prompts = [[3 + i, 7, 11 + 13 * i] for i in range(8)]
    want = engine_greedy(tiny_model, prompts, 60)
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    cluster = Cluster(ClusterConfig(checkpoint=str(tiny_dir), shards=1, frontends=2, max_failures=10,
                                    **FP32)).start()
    try:
        async def load():
            moving, limited = FrontendClient(cluster.frontends), FrontendClient(cluster.frontends, max_migrations=0)
            got = [[] for _ in prompts]
            started = asyncio.Event()

            async def one(i, client):
                try:
                    async for out in client.stream(prompts[i], params, f"r{i}"):
                        got[i] += out.new_token_ids
                        if min(map(len, got)) >= 3:
                            started.set()
                except EngineFailure as e:
                    started.set()
                    return str(e)
                return None

            tasks = [asyncio.ensure_future(one(i, moving if i % 2 else limited)) for i in range(len(prompts))]
            await started.wait()
            where = {i: (moving if i % 2 else limited)._engine_id[f"r{i}"][0] for i in range(len(prompts))}
            ray.kill(cluster.frontends[0], no_restart=False)
            return await asyncio.gather(*tasks), got, where, moving.migrations

        errors, got, where, moved = asyncio.run(asyncio.wait_for(load(), 240))
    finally:
        cluster.shutdown()
    for i, (error, tokens) in enumerate(zip(errors, got)):
        if i % 2 == 1 or where[i] == 1:  # moved, or never lost
            assert error is None and tokens == want[i], (i, error)
        else:
            assert "lost" in error and "at most 0 moves" in error, error
    assert moved == sum(1 for i in range(1, len(prompts), 2) if where[i] == 0) > 0
