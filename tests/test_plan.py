"""``epserve plan``: parameter counts, memory per rank, the step-time model, the layout search, the report and
its errors. Exact numbers for the released architecture come from docs/gemma4-26b-a4b.md (section 2)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from epserve.actors.engine.config import EngineConfig
from epserve.actors.engine.kv_cache import plan_blocks
from epserve.actors.model.config import FULL
from epserve.actors.model.gemma4 import count_text_parameters
from epserve.cluster.fixtures.checkpoint import preset, write_checkpoint
from epserve.cluster.planning.memory import plan_memory
from epserve.cluster.planning.params import count_params

RELEASED = preset("gemma-4-26b-a4b")


def test_the_released_architecture_counts_exactly():
    p = count_params(RELEASED)
    assert p.total == 25_233_141_790
    assert p.active == 3_822_530_590
    assert p.experts * 2 == 45_675_970_560  # bf16 bytes of every routed expert
    assert p.frontend * 2 == 4_790_313_020  # everything else (doc section 2.3)
    assert (p.attention, p.dense_mlp, p.router, p.embedding) == (1_110_197_760, 535_265_280, 10_901_760,
                                                                 738_197_504)


@pytest.mark.parametrize("name", ["tiny", "bench", "gemma-4-26b-a4b"])
def test_the_count_is_the_models_own(name):
    assert count_params(preset(name)).total == count_text_parameters(preset(name))


def test_the_count_is_what_a_written_checkpoint_holds(tmp_path):
    cfg = preset("tiny")
    out = write_checkpoint(cfg, tmp_path / "tiny", seed=1)
    total = 0
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            total += sum(math.prod(st.get_slice(key).get_shape()) for key in st.keys())
    assert total == count_params(cfg).total


@pytest.mark.parametrize("frontends, shards, redundant", [(1, 1, 0), (1, 3, 0), (2, 4, 0), (1, 6, 0), (1, 4, 8)])
def test_memory_per_rank_sums_to_the_whole(frontends, shards, redundant):
    p = count_params(RELEASED)
    ranks = plan_memory(RELEASED, frontends, shards, redundant, int(141e9), torch.bfloat16, EngineConfig())
    fe = [r for r in ranks if r.role == "frontend"]
    sh = [r for r in ranks if r.role == "shard"]
    assert (len(fe), len(sh)) == (frontends, shards)
    assert all(r.weight_bytes == 2 * p.frontend for r in fe)
    assert sum(r.by_role["experts"] for r in sh) == 45_675_970_560
    per_expert = 2 * p.per_expert * RELEASED.num_layers
    assert sum(r.by_role["replicas"] for r in sh) == redundant * per_expert
    assert sum(r.weight_bytes for r in ranks) == 2 * (p.total + (frontends - 1) * p.frontend) + redundant * per_expert
    assert sum(r.experts_per_layer for r in sh) == 128 + redundant


def test_kv_capacity_is_the_engines_split():
    engine = EngineConfig(max_num_seqs=32)
    [fe, _] = plan_memory(RELEASED, 1, 1, 0, int(141e9), torch.bfloat16, engine)
    budget = int(141e9 * 0.92) - fe.weight_bytes - fe.activation_bytes
    blocks = plan_blocks(RELEASED, budget, engine.block_size, 32, engine.max_num_batched_tokens, torch.bfloat16)
    assert fe.kv_blocks == blocks
    assert fe.kv_tokens == blocks[FULL] * engine.block_size
    assert 0 < fe.kv_bytes <= budget and fe.free_bytes >= 0
    # the sliding pool is bounded by the windows of a full batch, not by the memory
    window_blocks = -(-(RELEASED.sliding.window - 1) // engine.block_size) + 2
    assert blocks["sliding_attention"] == 32 * window_blocks + engine.max_num_batched_tokens // engine.block_size
    # a fixed budget (the CPU engine's setting) is split the same way
    [fe, _] = plan_memory(RELEASED, 1, 1, 0, int(24e9), torch.bfloat16, engine, kv_budget=1 << 30)
    assert fe.kv_bytes <= 1 << 30 and fe.kv_tokens > 0
