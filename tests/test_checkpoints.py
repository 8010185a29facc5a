"""Checkpoint formats: what ``write_checkpoint`` produces (and that transformers reads it as the same model), and
how config.json is parsed (multimodal nesting / text-only, both full-layer forms, the k_eq_v gate)."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    Gemma4Config,
    Gemma4ForCausalLM,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
)

from epserve.actors.model import ops
from epserve.actors.model.config import FULL, SLIDING, ConfigError, ModelConfig
from epserve.actors.model.gemma4 import Gemma4Model, count_text_parameters
from epserve.actors.model.loader import load_model
from epserve.cluster.fixtures.checkpoint import preset, write_checkpoint

PROMPT = 80  # > the tiny preset's window (32)


def _with_layout(cfg: ModelConfig, layout: str) -> ModelConfig:
    return dataclasses.replace(cfg, layout=layout)


def _keys(path) -> dict[str, tuple]:
    with safe_open(path / "model.safetensors", framework="pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


# --------------------------------------------------------------------------------------------- write_checkpoint


def test_tiny_preset_exercises_the_interesting_paths(tiny_cfg):
    assert tiny_cfg.layout == "released"
    assert tiny_cfg.num_experts >= 16 and tiny_cfg.full.k_eq_v
    assert PROMPT > tiny_cfg.sliding.window
    sliding, full = tiny_cfg.sliding, tiny_cfg.full
    assert sliding.head_dim != full.head_dim and sliding.num_kv_heads != full.num_kv_heads
    assert SLIDING in tiny_cfg.layer_types and tiny_cfg.layer_types[-1] == FULL


@pytest.mark.parametrize("layout, cls", [("released", Gemma4ForConditionalGeneration),
                                         ("text-only", Gemma4ForCausalLM)])
def test_written_keys_are_exactly_the_transformers_layout(layout, cls, tiny_dir, tiny_text_only_dir, tools):
    """Same key names and shapes as transformers' own state dict (minus the tied lm_head), stored in bf16,
    with non-trivial norms and layer_scalars."""
    path = tiny_dir if layout == "released" else tiny_text_only_dir
    written = _keys(path)
    ref = tools.hf_load(cls, path)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    assert {k: s for k, (s, _) in written.items()} == expected
    assert {d for _, d in written.values()} == {"BF16"}
    prefix = "model.language_model." if layout == "released" else "model."
    assert all(k.startswith(prefix) for k in written)
    with safe_open(path / "model.safetensors", framework="pt") as f:
        for k in written:
            if k.endswith(("layernorm.weight", "layer_scalar", "router.scale", "per_expert_scale")):
                t = f.get_tensor(k).float()
                assert not torch.equal(t, torch.ones_like(t)), k


@pytest.mark.parametrize("cls", [AutoModelForCausalLM, Gemma4ForConditionalGeneration])
def test_released_layout_loads_in_transformers_with_the_same_logits(cls, tiny_dir, tiny_model, tiny_cfg, tools):
    ref, info = cls.from_pretrained(str(tiny_dir), attn_implementation="eager", dtype=torch.float32,
                                    output_loading_info=True)
    ref.eval()
    assert isinstance(ref, Gemma4ForConditionalGeneration)  # AutoModelForCausalLM resolves to the released class
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = tools.random_ids(tiny_cfg.vocab_size, PROMPT, seed=3)
    ref_logits = tools.hf_logits(ref, ids)
    assert ref_logits.abs().max() > 1.0
    tools.assert_parity(ref_logits, tools.our_logits(tiny_model, ids), f"write_checkpoint(tiny) via {cls.__name__}")


def test_text_only_layout_loads_in_transformers_with_the_same_logits(tiny_text_only_dir, tiny_model, tiny_cfg, tools):
    ref, info = Gemma4ForCausalLM.from_pretrained(str(tiny_text_only_dir), attn_implementation="eager",
                                                  dtype=torch.float32, output_loading_info=True)
    ref.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = tools.random_ids(tiny_cfg.vocab_size, PROMPT, seed=4)
    ours = load_model(tiny_text_only_dir)
    assert ours.cfg.layout == "text-only"
    ours_logits = tools.our_logits(ours, ids)
    tools.assert_parity(tools.hf_logits(ref, ids), ours_logits, "write_checkpoint(tiny, layout='text-only')")
    # same seed, same weights: the two layouts are the same model
    assert torch.equal(ours_logits, tools.our_logits(tiny_model, ids))


def test_same_seed_same_weights_different_seed_different(tmp_path, tiny_cfg, tiny_dir):
    again = write_checkpoint(tiny_cfg, tmp_path / "again", seed=1234)
    other = write_checkpoint(tiny_cfg, tmp_path / "other", seed=99)
    key = "model.language_model.layers.0.experts.gate_up_proj"
    with safe_open(tiny_dir / "model.safetensors", "pt") as a, safe_open(again / "model.safetensors", "pt") as b, \
            safe_open(other / "model.safetensors", "pt") as c:
        assert torch.equal(a.get_tensor(key), b.get_tensor(key))
        assert not torch.equal(a.get_tensor(key), c.get_tensor(key))


def test_config_only_checkpoint(tmp_path):
    """weights=False writes config.json (and generation_config.json) only, e.g. for the real architecture."""
    out = write_checkpoint(preset("gemma-4-26b-a4b"), tmp_path / "cfg", weights=False)
    assert not list(out.glob("*.safetensors"))
    assert ModelConfig.from_json(out) == preset("gemma-4-26b-a4b")
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["do_sample"] is False and gen["eos_token_id"] == [1, 106]


def test_bench_preset_is_the_released_layer_shapes_on_two_layers(tmp_path):
    """The benchmark preset: every layer's shapes are the released model's, with one sliding and one full layer,
    a 32768-id vocabulary, stored in bf16 (config only here: its weights are 3.5 GB)."""
    cfg = preset("bench")
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.vocab_size) == (2816, 2, 16, 32768)
    assert cfg.layer_types == (SLIDING, FULL)
    assert (cfg.sliding.head_dim, cfg.sliding.num_kv_heads, cfg.sliding.window) == (256, 8, 1024)
    assert (cfg.full.head_dim, cfg.full.num_kv_heads, cfg.full.k_eq_v) == (512, 2, True)
    assert (cfg.num_experts, cfg.top_k, cfg.moe_intermediate_size, cfg.intermediate_size) == (128, 8, 704, 2112)
    assert cfg.shared_expert_intermediate_size == 0
    released = preset("gemma-4-26b-a4b")
    with torch.device("meta"):
        bench_layers, released_layers = Gemma4Model(cfg).layers, Gemma4Model(released).layers
    shapes = lambda layer: {k: t.shape for k, t in layer.state_dict().items()}  # noqa: E731
    assert shapes(bench_layers[0]) == shapes(released_layers[0])  # sliding
    assert shapes(bench_layers[1]) == shapes(released_layers[5])  # full
    # stored bf16 (the command writes with the default dtype), computed in fp32: about 6.5 GiB in memory
    assert inspect.signature(write_checkpoint).parameters["dtype"].default is torch.bfloat16
    text = json.loads((write_checkpoint(cfg, tmp_path, weights=False) / "config.json").read_text())["text_config"]
    assert text["dtype"] == "bfloat16"
    assert round(count_text_parameters(cfg) * 4 / 2**30, 1) == 6.5


def test_shared_expert_variant(shared_expert_dir, tiny_dir, tiny_cfg, tools, monkeypatch):
    """A config with shared_expert_intermediate_size > 0: exactly three more tensors per layer, loaded, wired
    as DecoderLayer's docstring says (reads what the routed experts read, pre_feedforward_layernorm_2's output,
    and is summed with them before post_feedforward_layernorm_2), and it changes the output."""
    H, I = tiny_cfg.hidden_size, 192
    extra = set(_keys(shared_expert_dir).items()) - set(_keys(tiny_dir).items())
    assert {(k, s) for k, (s, _) in extra} == {
        (f"model.language_model.layers.{L}.shared_expert.{name}.weight", shape)
        for L in range(tiny_cfg.num_layers) for name, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)),
                                                                 ("down_proj", (H, I)))}
    assert json.loads((shared_expert_dir / "config.json").read_text())["text_config"][
        "shared_expert_intermediate_size"] == I
    model = load_model(shared_expert_dir)
    layer = model.layers[1]
    seen = {}
    for name in ("shared_expert", "experts"):
        getattr(layer, name).register_forward_hook(
            lambda m, args, out, name=name: seen.update({name: (args[0], out)}))
    ys, ffn_output = [], ops.ffn_output  # the layers' ends, in order, see the sum they normalise

    def capture(r, m, y, *rest):
        ys.append(y)
        return ffn_output(r, m, y, *rest)

    monkeypatch.setattr(ops, "ffn_output", capture)
    ids = tools.random_ids(tiny_cfg.vocab_size, 40, seed=5)
    logits = tools.our_logits(model, ids)
    # the routed experts' input (pre_feedforward_layernorm_2's output: the parity tests hold it to the spec)
    assert torch.equal(seen["shared_expert"][0], seen["experts"][0])
    # summed with the routed experts, in fp32, before post_feedforward_layernorm_2 normalises the sum
    assert torch.equal(ys[1], seen["experts"][1] + seen["shared_expert"][1].float())
    for layer in model.layers:
        layer.shared_expert.down_proj.weight.zero_()
    diff, allowed = tools.parity_error(logits, tools.our_logits(model, ids))
    assert diff > 100 * allowed, "the shared expert hardly changes the logits: the check would not see it missing"


def test_unknown_preset_and_layout_are_rejected(tmp_path, tiny_cfg):
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        preset("nope")
    with pytest.raises(ValueError, match="unknown layout 'sideways'"):
        write_checkpoint(tiny_cfg, tmp_path / "x", layout="sideways")


# --------------------------------------------------------------------------------------------- config.json parsing

# A Gemma 4 MoE text_config in the hub form (global_head_dim / num_global_key_value_heads).
HUB_TEXT = {
    "model_type": "gemma4_text", "vocab_size": 1000, "hidden_size": 128, "num_hidden_layers": 6,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32, "global_head_dim": 64,
    "num_global_key_value_heads": 2, "attention_k_eq_v": True, "sliding_window": 24, "intermediate_size": 192,
    "enable_moe_block": True, "num_experts": 16, "top_k_experts": 4, "moe_intermediate_size": 64,
    "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "final_logit_softcapping": 30.0,
    "hidden_size_per_layer_input": 0, "num_kv_shared_layers": 0, "use_double_wide_mlp": False,
    "attention_bias": False, "tie_word_embeddings": True, "eos_token_id": 1, "bos_token_id": 2, "pad_token_id": 0,
    "rope_parameters": {SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}},
}


def _multimodal(text: dict, eos=(1, 106)) -> dict:
    return {"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4", "text_config": dict(text),
            "vision_config": None, "audio_config": None, "eos_token_id": list(eos)}


def _text_only(text: dict) -> dict:
    return {"architectures": ["Gemma4ForCausalLM"], **text}


def test_multimodal_nesting():
    cfg = ModelConfig.from_dict(_multimodal(HUB_TEXT))
    assert cfg.layout == "released"
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads) == (1000, 128, 6, 8)
    assert cfg.layer_types == (SLIDING,) * 5 + (FULL,)  # transformers' default 5:1 pattern when layer_types is absent
    assert (cfg.sliding.head_dim, cfg.sliding.num_kv_heads, cfg.sliding.window) == (32, 4, 24)
    assert (cfg.full.head_dim, cfg.full.num_kv_heads, cfg.full.window, cfg.full.k_eq_v) == (64, 2, None, True)
    assert not cfg.sliding.k_eq_v
    assert cfg.full.rope.theta == 1e6 and cfg.full.rope.rotary_fraction == 0.25
    assert cfg.sliding.rope.theta == 1e4 and cfg.sliding.rope.rotary_fraction == 1.0
    assert (cfg.num_experts, cfg.top_k, cfg.moe_intermediate_size, cfg.intermediate_size) == (16, 4, 64, 192)
    assert cfg.eos_token_ids == (1, 106)  # the top level's chat eos list wins over text_config's
    assert cfg.final_logit_softcapping == 30.0


def test_text_only_form():
    cfg = ModelConfig.from_dict(_text_only(HUB_TEXT))
    assert cfg.layout == "text-only"
    assert cfg.eos_token_ids == (1,)
    nested = ModelConfig.from_dict(_multimodal(HUB_TEXT, eos=(1,)))
    assert cfg == _with_layout(nested, "text-only")


def test_released_architecture_preset():
    cfg = preset("gemma-4-26b-a4b")
    assert [i for i, t in enumerate(cfg.layer_types) if t == FULL] == [5, 11, 17, 23, 29]
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.vocab_size) == (2816, 30, 16, 262144)
    assert (cfg.sliding.head_dim, cfg.sliding.num_kv_heads, cfg.sliding.window) == (256, 8, 1024)
    assert (cfg.full.head_dim, cfg.full.num_kv_heads, cfg.full.k_eq_v) == (512, 2, True)
    assert (cfg.num_experts, cfg.top_k, cfg.moe_intermediate_size, cfg.intermediate_size) == (128, 8, 704, 2112)
    # proportional RoPE: 64 of the 256 frequencies rotate, with exponent 2i/512
    inv = cfg.full.rope.inv_freq(512)
    assert inv.shape == (256,) and (inv[:64] > 0).all() and (inv[64:] == 0).all()
    assert torch.allclose(inv[1], torch.tensor(1e6 ** (-2 / 512)))


@pytest.mark.parametrize("layout", ["released", "text-only"])
def test_to_hf_config_round_trips(layout):
    for name in ("tiny", "bench", "gemma-4-26b-a4b"):
        cfg = preset(name)
        back = ModelConfig.from_dict(cfg.to_hf_config(layout))
        assert back.layout == layout
        assert _with_layout(back, cfg.layout) == cfg


@pytest.mark.parametrize("k_eq_v", [True, False])
@pytest.mark.parametrize("global_kv", [2, 1, None])
def test_both_full_layer_forms_agree_with_transformers(k_eq_v, global_kv):
    """The hub form and the per_layer_config form that transformers' save_pretrained writes parse to the same
    config, and the full layers get the head dim / kv heads transformers gives them (the k_eq_v gate)."""
    hub = dict(HUB_TEXT, attention_k_eq_v=k_eq_v)
    if global_kv is None:
        del hub["num_global_key_value_heads"]
    else:
        hub["num_global_key_value_heads"] = global_kv
    hf = Gemma4TextConfig(**{k: v for k, v in hub.items() if k != "model_type"})
    hf_full = hf.per_layer_config[5]
    saved = hf.to_dict()  # what save_pretrained writes: per_layer_config, no global_* fields
    assert "per_layer_config" in saved and "global_head_dim" not in saved

    ours_hub = ModelConfig.from_dict(_text_only(hub))
    ours_saved = ModelConfig.from_dict(_text_only(saved))
    ours_nested = ModelConfig.from_dict(Gemma4Config(text_config=saved, vision_config=None).to_dict())
    assert ours_hub == ours_saved == _with_layout(ours_nested, "text-only")
    assert ours_hub.full.head_dim == hf_full.head_dim == 64
    assert ours_hub.full.num_kv_heads == hf_full.num_key_value_heads
    assert ours_hub.full.k_eq_v == k_eq_v
    # the gate itself: the global kv-head count applies only with attention_k_eq_v
    assert ours_hub.full.num_kv_heads == (global_kv if (k_eq_v and global_kv) else HUB_TEXT["num_key_value_heads"])
    assert (ours_hub.sliding.head_dim, ours_hub.sliding.num_kv_heads) == (32, 4)


def test_per_layer_config_wins_over_global_fields():
    """When both forms are present (as write_checkpoint writes), per_layer_config is authoritative, as in
    transformers."""
    text = dict(HUB_TEXT, per_layer_config={"5": {"head_dim": 48, "num_key_value_heads": 1}})
    cfg = ModelConfig.from_dict(_text_only(text))
    hf = Gemma4TextConfig(**{k: v for k, v in text.items() if k != "model_type"}).per_layer_config[5]
    assert (cfg.full.head_dim, cfg.full.num_kv_heads) == (hf.head_dim, hf.num_key_value_heads) == (48, 1)


def test_last_layer_is_forced_full_like_transformers():
    text = dict(HUB_TEXT, num_hidden_layers=3, layer_types=[SLIDING, FULL, SLIDING])
    cfg = ModelConfig.from_dict(_text_only(text))
    assert cfg.layer_types == (SLIDING, FULL, FULL)


@pytest.mark.parametrize("change, message", [
    ({"hidden_size_per_layer_input": 256}, "hidden_size_per_layer_input"),
    ({"hidden_size_per_layer_input": None}, "hidden_size_per_layer_input"),  # absent: transformers' default 256
    ({"num_kv_shared_layers": 4}, "num_kv_shared_layers"),
    ({"use_double_wide_mlp": True}, "use_double_wide_mlp"),
    ({"attention_bias": True}, "attention_bias"),
    ({"enable_moe_block": False}, "enable_moe_block"),
    ({"use_bidirectional_attention": "all"}, "use_bidirectional_attention"),
    ({"hidden_activation": "relu"}, "hidden_activation"),
    ({"num_key_value_heads": 3}, "not a multiple of 3"),
    ({"top_k_experts": 17}, "top_k_experts=17"),
    ({"num_experts": None}, "num_experts"),
    ({"layer_types": [SLIDING] * 4}, "layer_types"),
    ({"per_layer_config": {"2": {"head_dim": 64}, "5": {"head_dim": 32}}, "layer_types": [SLIDING, SLIDING, FULL] * 2},
     "disagree"),
    ({"rope_parameters": {SLIDING: {"rope_type": "yarn", "rope_theta": 1.0}}}, "rope_type 'yarn'"),
])
def test_unsupported_or_invalid_configs_raise_config_error(change, message):
    text = dict(HUB_TEXT)
    for k, v in change.items():
        if v is None:
            text.pop(k, None)
        else:
            text[k] = v
    with pytest.raises(ConfigError, match=message) as e:
        ModelConfig.from_dict(_multimodal(text))
    assert "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)


def test_unknown_architecture_and_model_type():
    with pytest.raises(ConfigError, match="LlamaForCausalLM"):
        ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], **HUB_TEXT})
    with pytest.raises(ConfigError, match="'llama'"):
        ModelConfig.from_dict({**HUB_TEXT, "model_type": "llama"})
