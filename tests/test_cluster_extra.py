"""More of the expert-parallel cluster against the in-process engine: the dense-FFN overlap path (off by default
on CPU), a model with a shared expert (which the front-end runs), and ``epserve generate --shards`` on the test
run's Ray cluster."""

from __future__ import annotations

import pytest
import ray
import torch

from epserve.actors.engine.engine import LLMEngine
from epserve.actors.engine.sampling import SamplingParams
from epserve.actors.model.loader import load_model
from epserve.cluster import cli
from epserve.cluster.config import ClusterConfig
from epserve.cluster.launcher import Cluster

from helpers import run

PROMPTS = [[2, 17, 300, 42], list(range(3, 90)), [100]]  # 87 tokens: past the tiny window (32)
PARAMS = SamplingParams(max_tokens=12, ignore_eos=True)


@pytest.mark.parametrize("checkpoint, overlap", [("tiny_dir", True), ("shared_expert_dir", None)])
def test_cluster_matches_the_in_process_engine(ray_session, request, tools, checkpoint, overlap):
    path = request.getfixturevalue(checkpoint)
    model = load_model(path)
    want = LLMEngine(model).generate(PROMPTS, PARAMS)
    with Cluster(ClusterConfig(checkpoint=str(path), shards=2, overlap_dense_ffn=overlap, dtype="float32")) as cluster:
        # the path under test is the one the actor really runs
        overlap_on, shared_on = ray.get(cluster.frontend.__ray_call__.remote(
            lambda fe: (fe.dispatcher.overlap, fe.model.layers[0].shared_expert is not None)))
        assert overlap_on is bool(overlap) and shared_on is bool(model.cfg.shared_expert_intermediate_size)
        outs = cluster.generate(PROMPTS, vars(PARAMS))
        remote = ray.get(cluster.frontend.score.remote(PROMPTS[1]))
    assert [o["token_ids"] for o in outs] == [w.token_ids for w in want]
    tools.assert_parity(tools.our_logits(model, torch.tensor(PROMPTS[1])), remote, f"{checkpoint} on 2 shards")


def test_generate_command_through_the_cluster_equals_in_process(ray_session, tiny_dir, capsys):
    prompt_args = [a for p in PROMPTS for a in ("--prompt-ids", ",".join(map(str, p)))]
    args = ["generate", "--checkpoint", str(tiny_dir), *prompt_args, "--max-tokens", "12", "--ignore-eos", "--json",
            "--dtype", "float32"]
    assert cli.main(args) == 0  # in this process, as `epserve generate` runs it
    want = capsys.readouterr().out
    assert want.count('"finish_reason": "length"') == len(PROMPTS)
    address = ray.get_runtime_context().gcs_address
    assert run(*args, "--shards", 2, "--address", address).stdout == want
