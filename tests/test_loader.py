"""Loading: expert ranges read only their slice (LoadReport), a front-end without experts, shard partial sums,
sharded checkpoints, and one-line errors for bad checkpoints."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from epserve.actors.model import host_memory, layers, ops
from epserve.actors.model.attention import WholeSequence
from epserve.actors.model.config import ConfigError
from epserve.actors.model.loader import CheckpointError, load_experts, load_model
from epserve.actors.model.moe import expert_dtype

PREFIX = "model.language_model."
BF16 = 2  # bytes per stored value


def _expert_bytes(cfg) -> int:
    """Bytes of one expert of one layer as stored (bf16): gate_up [2I, H] + down [H, I]."""
    H, I = cfg.hidden_size, cfg.moe_intermediate_size
    return (2 * I * H + H * I) * BF16


def _file_bytes(path, select) -> tuple[int, int]:
    """(tensors, bytes) of the stored tensors whose key satisfies ``select``, read from the safetensors header."""
    n = size = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for k in f.keys():
                if select(k):
                    sl = f.get_slice(k)
                    assert sl.get_dtype() == "BF16", k
                    n += 1
                    size += BF16 * int(torch.tensor(sl.get_shape()).prod())
    return n, size


def _is_expert(key: str) -> bool:
    return key.endswith(("experts.gate_up_proj", "experts.down_proj"))


# --------------------------------------------------------------------------------------------- expert ranges


@pytest.mark.parametrize("first, count", [(0, 4), (4, 4), (12, 4), (5, 6), (15, 1), (0, 16)])
def test_load_experts_reads_exactly_its_slice(tiny_dir, tiny_cfg, tiny_model, first, count):
    layers, cfg, report = load_experts(tiny_dir, first, count)
    assert cfg == tiny_cfg and len(layers) == cfg.num_layers
    # what was materialised: the slice and nothing else
    assert report.tensors == 2 * cfg.num_layers
    assert report.bytes == count * _expert_bytes(cfg) * cfg.num_layers
    _, all_expert_bytes = _file_bytes(tiny_dir, _is_expert)
    assert all_expert_bytes == cfg.num_experts * _expert_bytes(cfg) * cfg.num_layers
    assert report.bytes * cfg.num_experts == all_expert_bytes * count
    if count <= cfg.num_experts // 4:
        assert report.bytes <= all_expert_bytes / 4
    # and it is the right slice, with the module's shapes and ids
    for i, experts in enumerate(layers):
        assert (experts.first, experts.count) == (first, count)
        assert experts.gate_up_proj.shape == (count, 2 * cfg.moe_intermediate_size, cfg.hidden_size)
        assert experts.down_proj.shape == (count, cfg.hidden_size, cfg.moe_intermediate_size)
        # bf16 on disk: held as bf16 under fp32 compute when the native CPU kernel is there, else widened
        held = expert_dtype(torch.bfloat16, torch.float32, "cpu", cfg)
        assert experts.gate_up_proj.dtype == experts.down_proj.dtype == held
        full = tiny_model.layers[i].experts
        assert torch.equal(experts.gate_up_proj, full.gate_up_proj[first : first + count])
        assert torch.equal(experts.down_proj, full.down_proj[first : first + count])


def test_full_load_report_counts_every_text_tensor_once(tiny_dir, tiny_model):
    n, size = _file_bytes(tiny_dir, lambda k: True)
    assert (tiny_model.load_report.tensors, tiny_model.load_report.bytes) == (n, size)


def test_front_end_without_experts_holds_no_expert_tensors(tiny_dir, tiny_cfg):
    model = load_model(tiny_dir, expert_range=None)
    assert model.expert_range is None and model.local_experts is None
    assert all(layer.experts is None for layer in model.layers)
    assert not [k for k in model.state_dict() if "experts." in k]
    # the router and both FFN-2 norms stay on the front-end
    assert {"layers.0.router.per_expert_scale", "layers.0.pre_feedforward_layernorm_2.weight",
            "layers.0.post_feedforward_layernorm_2.weight"} <= set(model.state_dict())
    n, size = _file_bytes(tiny_dir, lambda k: not _is_expert(k))
    assert (model.load_report.tensors, model.load_report.bytes) == (n, size)
    assert model.load_report.bytes < _file_bytes(tiny_dir, _is_expert)[1]  # the experts dominate the file
    ids, pos = torch.arange(4), torch.arange(4)
    with pytest.raises(RuntimeError, match="without experts"):
        model(ids, pos, WholeSequence(pos))


def test_model_with_an_expert_range_reads_only_that_range(tiny_dir, tiny_cfg):
    first, count = 8, 4
    model = load_model(tiny_dir, expert_range=(first, count))
    _, front = _file_bytes(tiny_dir, lambda k: not _is_expert(k))
    assert model.load_report.bytes == front + count * _expert_bytes(tiny_cfg) * tiny_cfg.num_layers
    assert model.layers[0].experts.gate_up_proj.shape[0] == count


@pytest.mark.parametrize("ranges", [
    [(0, 4), (4, 4), (8, 4), (12, 4)],  # 4 even shards of 16 experts
    [(0, 5), (5, 6), (11, 5)],  # 3 uneven shards
    [(0, 1), (1, 15)],
])
def test_shard_partials_sum_to_the_full_experts_output(tiny_dir, tiny_model, tiny_cfg, ranges):
    """Each shard returns Σ over its own (token, slot) pairs of w·expert(x), in fp32, from global ids; summed
    over the shards BEFORE post_feedforward_layernorm_2 they equal the full layer's routed-experts output."""
    assert sum(c for _, c in ranges) == tiny_cfg.num_experts
    shards = [load_experts(tiny_dir, first, count)[0] for first, count in ranges]
    gen = torch.Generator().manual_seed(5)
    T = 48  # 48 tokens x top-4 over 16 experts: every shard gets work
    for i, layer in enumerate(tiny_model.layers):
        r = torch.randn(T, tiny_cfg.hidden_size, generator=gen) * 4.0  # some residual stream
        with torch.no_grad():
            weights, ids = layer.router(r)
            xe = layer.pre_feedforward_layernorm_2(r)
            full = layer.experts(xe, ids, weights)
            partials = [shard[i](xe, ids, weights) for shard in shards]
        assert weights.dtype == torch.float32 and ids.shape == (T, tiny_cfg.top_k)
        assert full.dtype == torch.float32 and all(p.dtype == torch.float32 for p in partials)
        for (first, count), p in zip(ranges, partials):
            hit = ((ids >= first) & (ids < first + count)).any(dim=1)
            assert hit.any(), "the test should give every shard some tokens"
            assert (p[~hit] == 0).all(), "a token routed to no expert of this shard must get 0 from it"
            assert (p[hit] != 0).any(dim=1).all()
        total = torch.stack(partials).sum(dim=0)
        scale = full.abs().max().item()
        assert (total - full).abs().max().item() <= 1e-6 * scale
        # the norm goes after the sum (per-shard normalisation would be wrong, and is visibly so)
        normed = layer.post_feedforward_layernorm_2(total)
        assert (normed - layer.post_feedforward_layernorm_2(full)).abs().max() <= 1e-5
        per_shard = sum(layer.post_feedforward_layernorm_2(p) for p in partials)
        assert (per_shard - layer.post_feedforward_layernorm_2(full)).abs().max() > 1e-2


def test_experts_output_matches_a_naive_per_token_loop(tiny_model, tiny_cfg):
    """The grouped compute against the spec's definition: gate = first I rows of gate_up, up = last I rows,
    y = down @ (gelu_tanh(gate) * up), weighted by the router weight and summed over the K slots."""
    layer = tiny_model.layers[1]
    I = tiny_cfg.moe_intermediate_size
    r = torch.randn(10, tiny_cfg.hidden_size, generator=torch.Generator().manual_seed(9)) * 3.0
    with torch.no_grad():
        weights, ids = layer.router(r)
        xe = layer.pre_feedforward_layernorm_2(r)
        got = layer.experts(xe, ids, weights)
        want = torch.zeros_like(got)
        gu, dn = (t.float() for t in layer.experts.unpacked())
        for t in range(r.shape[0]):
            for k in range(tiny_cfg.top_k):
                e = int(ids[t, k])
                h = gu[e] @ xe[t]
                y = dn[e] @ (torch.nn.functional.gelu(h[:I], approximate="tanh") * h[I:])
                want[t] += weights[t, k] * y
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_router_matches_the_spec(tiny_model, tiny_cfg):
    """softmax over all experts in fp32, top-k, renormalised, times per_expert_scale; reads the raw residual."""
    layer = tiny_model.layers[2]
    router = layer.router
    r = torch.randn(12, tiny_cfg.hidden_size, generator=torch.Generator().manual_seed(11)) * 2.0
    with torch.no_grad():  # the router's input as the layer makes it from r (with the experts' and the MLP's)
        _, _, router_input = ops.ffn_inputs(r, layer.pre_feedforward_layernorm.weight,
                                            layer.pre_feedforward_layernorm_2.weight, router.scale, router.root,
                                            tiny_cfg.rms_norm_eps)
        weights, ids = router(router_input)
        z = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + tiny_cfg.rms_norm_eps)
        z = z * router.scale * tiny_cfg.hidden_size**-0.5
        probs = torch.softmax(z @ router.proj.weight.T, dim=-1)
    top, want_ids = probs.topk(tiny_cfg.top_k, dim=-1)
    assert torch.equal(ids, want_ids)
    want = top / top.sum(-1, keepdim=True) * router.per_expert_scale[want_ids]
    assert torch.allclose(weights, want, rtol=1e-5, atol=0)
    assert not torch.allclose(weights.sum(-1), torch.ones(12))  # per_expert_scale is really applied


def test_expert_range_outside_the_model_is_rejected(tiny_dir):
    for first, count in [(12, 8), (-1, 2), (16, 1)]:
        with pytest.raises(CheckpointError, match=r"expert range .* outside \[0, 16\)"):
            load_experts(tiny_dir, first, count)


# --------------------------------------------------------------------------------------------- sharded files


def test_sharded_checkpoint_equals_single_file(tiny_sharded_dir, tiny_dir, tiny_model, tools, tiny_cfg):
    index = json.loads((tiny_sharded_dir / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in tiny_sharded_dir.glob("*.safetensors"))
    assert len(files) > 1 and not (tiny_sharded_dir / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == set(files)
    # one expert tensor and a layer's norm in different files: the map is really used
    wm = index["weight_map"]
    assert len({wm[PREFIX + f"layers.{i}.experts.gate_up_proj"] for i in range(tiny_cfg.num_layers)}) > 1
    sharded = load_model(tiny_sharded_dir)
    single = tiny_model.state_dict()
    got = sharded.state_dict()
    assert got.keys() == single.keys()
    assert all(torch.equal(got[k], single[k]) for k in single)
    assert sharded.load_report.bytes == tiny_model.load_report.bytes
    ids = tools.random_ids(tiny_cfg.vocab_size, 40, seed=2)
    assert torch.equal(tools.our_logits(sharded, ids), tools.our_logits(tiny_model, ids))
    layers, _, report = load_experts(tiny_sharded_dir, 4, 4)
    assert report.bytes == 4 * _expert_bytes(tiny_cfg) * tiny_cfg.num_layers
    assert torch.equal(layers[3].down_proj, tiny_model.layers[3].experts.down_proj[4:8])


# --------------------------------------------------------------------------------------------- bad checkpoints


def _rewrite(path, drop=(), replace=None):
    """Rewrite path/model.safetensors without the keys in ``drop`` and with ``replace`` {key: tensor}."""
    file = path / "model.safetensors"
    with safe_open(file, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
    tensors.update(replace or {})
    save_file(tensors, file, metadata={"format": "pt"})


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


@pytest.mark.parametrize("name", ["layers.1.self_attn.k_norm.weight", "layers.3.self_attn.k_proj.weight",
                                  "layers.2.layer_scalar", "layers.0.router.per_expert_scale", "norm.weight"])
def test_missing_tensor_names_it(broken_copy, name):
    path = broken_copy()
    _rewrite(path, drop={PREFIX + name})
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    msg = _one_line(e)
    assert f"missing tensor '{PREFIX + name}'" in msg and str(path) in msg


def test_missing_expert_tensor_names_it_in_every_loader(broken_copy):
    path = broken_copy()
    key = PREFIX + "layers.2.experts.down_proj"
    _rewrite(path, drop={key})
    for load in (lambda: load_model(path), lambda: load_experts(path, 0, 4)):
        with pytest.raises(CheckpointError) as e:
            load()
        assert f"missing tensor '{key}'" in _one_line(e)
    load_model(path, expert_range=None)  # the front-end does not need it


def test_missing_embedding_names_it(broken_copy):
    path = broken_copy()
    _rewrite(path, drop={PREFIX + "embed_tokens.weight"})
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    assert "missing tensor 'model.language_model.embed_tokens.weight'" in _one_line(e)


def test_wrong_shape_names_tensor_and_shapes(broken_copy, tiny_cfg):
    path = broken_copy()
    key = PREFIX + "layers.0.mlp.up_proj.weight"
    H, F = tiny_cfg.hidden_size, tiny_cfg.intermediate_size
    _rewrite(path, replace={key: torch.zeros(H, F, dtype=torch.bfloat16)})  # transposed
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    msg = _one_line(e)
    assert f"'{key}'" in msg and f"shape [{H}, {F}]" in msg and f"expected [{F}, {H}]" in msg


def test_wrong_expert_count_is_caught_even_when_slicing(broken_copy, tiny_cfg):
    """An experts tensor with fewer experts than the config: a slice inside it would still succeed, so the
    full stored shape must be checked."""
    path = broken_copy()
    key = PREFIX + "layers.1.experts.gate_up_proj"
    H, I = tiny_cfg.hidden_size, tiny_cfg.moe_intermediate_size
    _rewrite(path, replace={key: torch.zeros(8, 2 * I, H, dtype=torch.bfloat16)})
    for load in (lambda: load_experts(path, 0, 4), lambda: load_model(path)):
        with pytest.raises(CheckpointError) as e:
            load()
        msg = _one_line(e)
        assert f"'{key}'" in msg and f"[8, {2 * I}, {H}]" in msg and f"expected [16, {2 * I}, {H}]" in msg


def test_checkpoint_that_does_not_match_its_config(broken_copy):
    """A config.json claiming different full-layer kv heads than the weights: a shape error, not silent garbage."""
    path = broken_copy()
    data = json.loads((path / "config.json").read_text())
    data["text_config"]["per_layer_config"] = {"3": {"head_dim": 128, "num_key_value_heads": 2}}
    (path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    assert "layers.3.self_attn.k_proj.weight" in _one_line(e)


def test_unknown_architecture(broken_copy):
    path = broken_copy()
    data = json.loads((path / "config.json").read_text())
    data["architectures"] = ["MixtralForCausalLM"]
    (path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError) as e:
        load_model(path)
    msg = _one_line(e)
    assert "unknown architecture" in msg and "MixtralForCausalLM" in msg and "Gemma4ForConditionalGeneration" in msg
    with pytest.raises(ConfigError):
        load_experts(path, 0, 4)


def test_missing_config_json(broken_copy):
    path = broken_copy()
    (path / "config.json").unlink()
    with pytest.raises(ConfigError) as e:
        load_model(path)
    msg = _one_line(e)
    assert "config.json" in msg and str(path) in msg


def test_config_json_that_is_not_json(broken_copy):
    path = broken_copy()
    (path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError) as e:
        load_model(path)
    assert "not valid JSON" in _one_line(e)


def test_missing_directory_and_missing_weights(tmp_path, broken_copy):
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "nowhere")
    assert "does not exist" in _one_line(e)
    path = broken_copy()
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    assert "no *.safetensors" in _one_line(e)


def test_errors_are_value_errors():
    assert issubclass(CheckpointError, ValueError) and issubclass(ConfigError, ValueError)


def _vma_flags(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping that holds ``address``."""
    fields, inside = {}, False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"), reason="needs Linux's THP")
def test_weights_leave_the_readers_buffer_for_memory_in_huge_pages(tmp_path):
    """A weight read from a checkpoint is copied out of the reader's buffer (4 KB pages) into torch's memory,
    which Linux backs with 2 MB pages (read faster at decode: host_memory.py)."""
    save_file({"w": torch.arange(3 << 20, dtype=torch.bfloat16)}, tmp_path / "w.safetensors")  # 6 MB
    with safe_open(tmp_path / "w.safetensors", framework="pt") as f:
        read = f.get_slice("w")[:]
    held = host_memory.resident(read)
    assert torch.equal(held, read) and held.data_ptr() != read.data_ptr()
    huge = 2 << 20
    if "[never]" not in open("/sys/kernel/mm/transparent_hugepage/enabled").read():
        assert _vma_flags(-(-held.data_ptr() // huge) * huge).get("THPeligible") == "1"


def test_linears_that_read_one_input_run_as_one_gemm_over_a_joint_weight(tiny_model, monkeypatch):
    """q/k/v and the dense MLP's gate/up are row blocks of one tensor once loaded (no second copy), and a
    layer runs each group as one GEMM; a weight replaced afterwards runs on its own again."""
    layer = tiny_model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    for joint, parts in ((attn.qkv_proj, [attn.q_proj, attn.k_proj, attn.v_proj]),
                         (mlp.gate_up, [mlp.gate_proj, mlp.up_proj])):
        parts = [m for m in parts if m is not None]
        assert joint.joint is not None and sum(m.out_features for m in parts) == joint.joint.shape[0]
        assert all(m.weight.untyped_storage().data_ptr() == joint.joint.untyped_storage().data_ptr() for m in parts)
    calls = []
    inner = layers.linear
    monkeypatch.setattr(layers, "linear", lambda x, w, **k: calls.append(w.shape[0]) or inner(x, w, **k))
    x = torch.randn(3, tiny_model.cfg.hidden_size).to(tiny_model.dtype)
    gate, up = mlp.gate_up(x)
    assert calls == [2 * mlp.gate_proj.out_features]
    assert torch.equal(gate, mlp.gate_proj(x)) and torch.equal(up, mlp.up_proj(x))
    calls.clear()
    with torch.no_grad():
        mlp.up_proj.weight.data = mlp.up_proj.weight.detach().clone()
    assert [t.shape for t in mlp.gate_up(x)] == [gate.shape, up.shape] and len(calls) == 2
    mlp.gate_up.join()  # the shared model as it was
