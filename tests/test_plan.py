"""``epserve plan``: parameter counts, memory per rank, the step-time model, the layout search, the report and
its errors. Exact numbers for the released architecture come from docs/gemma4-26b-a4b.md (section 2)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors import safe_open

from epserve.actors.engine.config import EngineConfig
from epserve.actors.engine.kv_cache import plan_blocks
from epserve.actors.model.config import FULL
from epserve.actors.model.gemma4 import count_text_parameters
from epserve.cluster.cli import main
from epserve.cluster.fixtures.checkpoint import preset, write_checkpoint
from epserve.cluster.planning.gpu import H200_DECODE_STEPS, H200_FIT_BATCHES, GpuDevice
from epserve.cluster.planning.hardware import GPUS
from epserve.cluster.planning.memory import plan_memory
from epserve.cluster.planning.params import count_params
from epserve.cluster.planning.predict import Workload, predict
from epserve.cluster.planning.report import CHART
from epserve.cluster.planning.stepmodel import PHASES, Layout, Row, StepModel, visible_keys

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


# ---- the command ---------------------------------------------------------------------------------------------

def plan(capsys, *argv) -> tuple[int, str, str]:
    status = main(["plan", *map(str, argv)])
    out = capsys.readouterr()
    return status, out.out, out.err


def plan_json(capsys, *argv) -> dict:
    status, out, err = plan(capsys, *argv, "--json")
    assert status == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_json_is_the_last_line_with_the_plan(capsys):
    p = plan_json(capsys, "--preset", "gemma-4-26b-a4b", "--gpu", "H200", "--shards", 4, "--concurrency", 32)
    assert (p["params_total"], p["params_active"]) == (25_233_141_790, 3_822_530_590)
    assert [r["role"] for r in p["ranks"]] == ["frontend"] + ["shard"] * 4
    assert sum(r["weight_bytes"] for r in p["ranks"]) == 2 * 25_233_141_790
    assert p["ranks"][0]["kv_tokens"] > 1_000_000 and all(r["kv_tokens"] == 0 for r in p["ranks"][1:])
    pred = p["predicted"]
    assert pred["output_tokens_per_s"] > 0 and pred["ttft_ms"] > pred["itl_ms"] > 0
    assert p["bottleneck"] in PHASES and p["fits"]


def test_the_default_output_is_a_table(capsys):
    status, out, _ = plan(capsys, "--preset", "released", "--gpu", "h100", "--frontends", 2, "--shards", 6)
    assert status == 0
    assert "frontend 1" in out and "shard 5" in out and "bottleneck:" in out
    assert "what-if" not in out  # the cluster runs M front-ends (--frontends)


def test_the_budget_search_splits_every_gpu(capsys):
    p = plan_json(capsys, "--preset", "released", "--gpu", "H200", "--budget-gpus", 8, "--concurrency", 64)
    cands = p["budget"]["candidates"]
    assert [(c["frontends"], c["shards"]) for c in cands] == [(m, 8 - m) for m in range(1, 8)]
    fitting = [c for c in cands if c["fits"]]
    best = p["budget"]["best_throughput"]
    assert best["output_tokens_per_s"] == max(c["output_tokens_per_s"] for c in fitting)
    assert p["budget"]["best_itl"]["itl_ms"] == min(c["itl_ms"] for c in fitting)
    assert (p["layout"]["frontends"], p["layout"]["shards"]) == (best["frontends"], best["shards"])
    _, out, _ = plan(capsys, "--preset", "released", "--gpu", "H200", "--budget-gpus", 8)
    assert "best split of 8 GPUs" in out and "throughput" in out and "ITL" in out


def test_a_layout_that_does_not_fit_says_why(capsys):
    p = plan_json(capsys, "--preset", "released", "--gpu", "L40S", "--shards", 1)
    assert not p["fits"] and p["bottleneck"].startswith("memory: shard 0 needs 45.7 GB")


@pytest.mark.parametrize("gpu, extra", [("H200", ["--shards", 16]), ("H200", ["--budget-gpus", 16]),
                                        ("H100", ["--shards", 6, "--nodes", 2, "--gpus-per-node", 4]),
                                        ("H200", ["--shards", 8, "--redundant-experts", 16]),
                                        ("H200", ["--frontends", 3, "--shards", 5])])
def test_helm_values_validate_against_the_charts_schema(capsys, tmp_path, gpu, extra):
    jsonschema = pytest.importorskip("jsonschema")
    out = tmp_path / "values.yaml"
    plan_json(capsys, "--preset", "released", "--gpu", gpu, *extra, "--helm-values", out)
    values = yaml.safe_load(out.read_text())
    jsonschema.validate(values, json.loads((CHART / "values.schema.json").read_text()))
    p = plan_json(capsys, "--preset", "released", "--gpu", gpu, *extra)
    assert values["cluster"]["shards"] == p["layout"]["shards"]
    assert values["cluster"]["frontends"] == p["layout"]["frontends"]
    assert values["cluster"]["shards"] % values["expert"]["shardsPerPod"] == 0  # the chart's own check
    assert values["expert"]["shardsPerPod"] <= p["layout"]["gpus_per_node"]
    assert values["cluster"]["extra"]["engine"]["kv_cache_bytes"] == p["ranks"][0]["kv_bytes"]
    assert values["gpu"]["enabled"] and values["cluster"]["device"] == "cuda"
    assert values["cluster"]["extra"].get("redundant_experts", 0) == p["layout"]["redundant_experts"]


@pytest.mark.parametrize("argv, words", [
    (["--preset", "tiny", "--gpu", "TPU"], "unknown --gpu 'TPU'"),
    (["--preset", "tiny", "--gpu", "H200", "--shards", 0], "--shards must be >= 1"),
    (["--preset", "released", "--gpu", "H200", "--frontends", 2, "--shards", 8, "--budget-gpus", 8],
     "--frontends 2 + --shards 8 = 10 GPUs exceed --budget-gpus 8"),
    (["--checkpoint", "/nonexistent/ckpt", "--gpu", "H200"], "no config.json at /nonexistent/ckpt"),
    (["--preset", "huge", "--gpu", "H200"], "unknown preset 'huge'"),
    (["--preset", "tiny", "--gpu", "H200", "--link", "carrier-pigeon"], "unknown --link"),
    (["--preset", "tiny", "--gpu", "H200", "--calibrate"], "--calibrate measures this machine"),
    (["--preset", "tiny", "--gpu", "H200", "--shards", 17], "exceeds the model's 16 experts"),
])
def test_bad_input_is_one_line(capsys, argv, words):
    status, out, err = plan(capsys, *argv)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("epserve plan: error: ") and words in err, err


# ---- the model -------------------------------------------------------------------------------------------------

def h200_model(layout: Layout, cfg=RELEASED) -> StepModel:
    return StepModel(cfg, layout, GpuDevice(GPUS["H200"], cfg, layout.link))


def test_more_shards_shorten_the_experts_and_replicas_the_excess():
    step = [Row(1000, 1)] * 64
    experts = [h200_model(Layout(1, n)).step(step).phases["experts (slowest shard)"] for n in (1, 2, 4, 8, 16)]
    assert experts == sorted(experts, reverse=True) and experts[0] > 4 * experts[-1]
    # replicas shrink the slowest shard's excess of slots (under uniform routing they cost more weight reads
    # than they save: docs/planning.md)
    slots = [h200_model(Layout(1, 8, redundant=r)).shard_load(512)[0] for r in (0, 16, 64)]
    assert slots == sorted(slots, reverse=True) and slots[-1] > 512 * 8 / 8


def test_the_exchange_is_slower_across_nodes_and_the_overlap_hides_the_dense_ffn():
    step = [Row(1000, 1)] * 64
    same = h200_model(Layout(1, 7)).step(step).phases["all-to-all"]
    across = h200_model(Layout(1, 7, nodes=2, gpus_per_node=4, link="roce100")).step(step).phases["all-to-all"]
    assert across > same > 0
    gpu = h200_model(Layout(1, 4))
    assert gpu.overlap and gpu.step(step).phases["dense FFN"] == 0.0  # hidden behind the experts
    serial = StepModel(RELEASED, Layout(1, 4), GpuDevice(GPUS["H200"], RELEASED), overlap=False)
    assert serial.step(step).phases["dense FFN"] > 0


def test_the_gpu_host_costs_reproduce_the_fitted_steps_and_hold_out_the_rest():
    bench = preset("bench")
    model = h200_model(Layout(shards=0), bench)
    for batch, measured in H200_DECODE_STEPS.items():
        predicted = model.step([Row(128 + 16, 1)] * batch).seconds
        if batch in H200_FIT_BATCHES:
            assert predicted == pytest.approx(measured, rel=1e-6)
        else:  # held out (docs/planning.md reports the error)
            assert predicted == pytest.approx(measured, rel=0.25)


def test_the_closed_loop_makes_every_token():
    cfg = preset("bench")
    work = Workload(prompt_len=100, output_len=20, concurrency=8, requests=24)
    p = predict(h200_model(Layout(1, 2), cfg), work)
    assert p.output_tokens_per_s * p.elapsed_s == pytest.approx(24 * 20)
    assert 0 < p.itl_s < p.elapsed_s and 0 < p.ttft_s < p.elapsed_s


def test_visible_keys_are_bounded_by_the_window():
    assert visible_keys(Row(0, 4), None) == 1 + 2 + 3 + 4
    assert visible_keys(Row(10, 1), 4) == 4
    assert visible_keys(Row(0, 6), 4) == 1 + 2 + 3 + 4 + 4 + 4
    assert visible_keys(Row(2, 3), 4) == 3 + 4 + 4


def test_a_quick_calibration_is_measured_once_then_cached(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("EPSERVE_CACHE", str(tmp_path))
    argv = ["--preset", "tiny", "--gpu", "cpu", "--quick", "--shards", 2, "--concurrency", 4]
    status, out, err = plan(capsys, *argv, "--calibrate", "--json")
    assert status == 0 and "calibrating: GEMM" in err and "calibrating: saved" in err
    p = json.loads(out.strip().splitlines()[-1])
    assert p["predicted"]["output_tokens_per_s"] > 0 and "calibrated on this machine" in p["hardware"]
    assert len(list((tmp_path / "plan").glob("cpu-*.json"))) == 1
    status, out, err = plan(capsys, *argv, "--json")
    assert status == 0 and "calibrating" not in err
    assert json.loads(out.strip().splitlines()[-1])["predicted"] == p["predicted"]
    values = tmp_path / "values.yaml"
    plan(capsys, *argv, "--helm-values", values)
    written = yaml.safe_load(values.read_text())
    assert not written["gpu"]["enabled"] and written["cluster"]["device"] == "cpu"
