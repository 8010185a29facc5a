"""fp32 parity of our Gemma 4 text decoder against transformers 5.23 on random checkpoints that transformers'
own ``save_pretrained`` wrote, and the parameter counts of the released architecture.

Acceptance rule (never loosened): at every position, ``max|Δlogits| <= 1e-5 * max|reference logit|``, the
reference being transformers with ``attn_implementation="eager"`` in fp32.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from transformers import (
    Gemma4Config,
    Gemma4ForCausalLM,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
)

from epserve.actors.engine.config import EngineConfig
from epserve.actors.engine.engine import LLMEngine
from epserve.actors.engine.sampling import SamplingParams
from epserve.cluster.fixtures.checkpoint import preset
from epserve.actors.model.config import FULL, SLIDING
from epserve.actors.model.gemma4 import count_active_parameters, count_text_parameters
from epserve.actors.model.loader import load_model

S, F = SLIDING, FULL
PROMPT = 80  # longer than every sliding window below
GREEDY_TOKENS = 32

# Each config: the transformers class, the text_config kwargs (hub form: global_head_dim /
# num_global_key_value_heads; transformers turns them into per_layer_config and save_pretrained writes that).
CONFIGS = {
    # window 16 < prompt 80; k_eq_v full layers; uneven head groups: sliding 2 kv heads x 32, full 1 kv head x 64
    "causal-window16-keqv-16experts": (Gemma4ForCausalLM, dict(
        vocab_size=512, hidden_size=128, intermediate_size=192, num_hidden_layers=5, layer_types=[S, S, F, S, F],
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, global_head_dim=64, num_global_key_value_heads=1,
        attention_k_eq_v=True, sliding_window=16, num_experts=16, top_k_experts=4, moe_intermediate_size=64,
        final_logit_softcapping=30.0)),
    # k_eq_v off: full layers keep v_proj and num_key_value_heads (the global kv count 2 must be IGNORED);
    # default 5:1 layer pattern, window 8, 32 experts top-2, head dims 24/48, no final soft-cap
    "causal-window8-no-keqv-32experts": (Gemma4ForCausalLM, dict(
        vocab_size=384, hidden_size=96, intermediate_size=160, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=4, head_dim=24, global_head_dim=48, num_global_key_value_heads=2,
        attention_k_eq_v=False, sliding_window=8, num_experts=32, top_k_experts=2, moe_intermediate_size=48,
        final_logit_softcapping=None)),
    # the released class (text under model.language_model.), no vision tower; non-default RoPE thetas and
    # rotary fraction; 20 experts top-3; sliding 2 kv heads x 16, full 1 kv head x 32
    "multimodal-window16-keqv-20experts": (Gemma4ForConditionalGeneration, dict(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4, layer_types=[S, F, S, F],
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
        attention_k_eq_v=True, sliding_window=16, num_experts=20, top_k_experts=3, moe_intermediate_size=32,
        final_logit_softcapping=30.0, rope_parameters={
            S: {"rope_type": "default", "rope_theta": 5_000.0},
            F: {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 100_000.0}})),
}
COMMON = dict(enable_moe_block=True, hidden_size_per_layer_input=0, hidden_activation="gelu_pytorch_tanh",
              rms_norm_eps=1e-6, tie_word_embeddings=True)


def _build_hf(cls, text_kwargs, seed):
    torch.manual_seed(seed)
    text = Gemma4TextConfig(**COMMON, **text_kwargs)
    if cls is Gemma4ForConditionalGeneration:
        config = Gemma4Config(text_config=text.to_dict(), vision_config=None, audio_config=None)
    else:
        config = text
    return cls(config)


@dataclasses.dataclass
class HFCase:
    name: str
    cls: type
    path: object
    ref: object  # the transformers model reloaded from ``path`` (eager, fp32)
    ids: torch.Tensor
    ref_logits: torch.Tensor
    vocab: int


@pytest.fixture(scope="session", params=list(CONFIGS))
def hf_case(request, tmp_path_factory, tools):
    name = request.param
    cls, text_kwargs = CONFIGS[name]
    model = _build_hf(cls, text_kwargs, seed=list(CONFIGS).index(name))
    tools.randomize_hf_(model, seed=100 + list(CONFIGS).index(name))
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    ref = tools.hf_load(cls, path)
    ids = tools.random_ids(text_kwargs["vocab_size"], PROMPT, seed=7)
    return HFCase(name, cls, path, ref, ids, tools.hf_logits(ref, ids), text_kwargs["vocab_size"])


def _text_config(cfg_json: dict) -> dict:
    return cfg_json["text_config"] if "text_config" in cfg_json else cfg_json


@pytest.fixture(scope="session")
def hub_form_dir(hf_case, tmp_path_factory):
    """A copy of the case's checkpoint whose config.json uses the hub form (global_head_dim /
    num_global_key_value_heads, no per_layer_config), as the released config.json files do."""
    dst = tmp_path_factory.mktemp(hf_case.name + "-hub-form")
    shutil.copytree(hf_case.path, dst, dirs_exist_ok=True)
    data = json.loads((dst / "config.json").read_text())
    text = _text_config(data)
    kwargs = CONFIGS[hf_case.name][1]
    assert "per_layer_config" in text, "transformers 5.23 save_pretrained is expected to write per_layer_config"
    del text["per_layer_config"]
    text["global_head_dim"] = kwargs["global_head_dim"]
    text["num_global_key_value_heads"] = kwargs["num_global_key_value_heads"]
    (dst / "config.json").write_text(json.dumps(data, indent=2))
    return dst


# --------------------------------------------------------------------------------------------- parity


def test_saved_checkpoint_is_what_the_case_claims(hf_case):
    """Guards the parity tests: the checkpoint really has the layout, perturbations and shapes we rely on."""
    data = json.loads((hf_case.path / "config.json").read_text())
    text = _text_config(data)
    kwargs = CONFIGS[hf_case.name][1]
    assert data["architectures"] == [hf_case.cls.__name__]
    assert PROMPT > text["sliding_window"]
    assert text["num_experts"] >= 16
    model = load_model(hf_case.path)
    cfg = model.cfg
    assert cfg.layout == ("released" if hf_case.cls is Gemma4ForConditionalGeneration else "text-only")
    assert SLIDING in cfg.layer_types and FULL in cfg.layer_types and cfg.layer_types[-1] == FULL
    assert cfg.sliding.head_dim == kwargs["head_dim"] and cfg.full.head_dim == kwargs["global_head_dim"]
    assert cfg.sliding.head_dim != cfg.full.head_dim
    want_full_kv = kwargs["num_global_key_value_heads"] if kwargs["attention_k_eq_v"] else kwargs["num_key_value_heads"]
    assert cfg.full.num_kv_heads == want_full_kv and cfg.full.k_eq_v == kwargs["attention_k_eq_v"]
    full = cfg.layer_types.index(FULL)
    assert (model.layers[full].self_attn.v_proj is None) == kwargs["attention_k_eq_v"]
    # non-trivial norms / scales / layer_scalar, so convention errors cannot hide
    layer = model.layers[0]
    for t in (layer.input_layernorm.weight, layer.router.scale, layer.router.per_expert_scale,
              layer.post_feedforward_layernorm_2.weight, layer.self_attn.q_norm.weight):
        assert not torch.allclose(t, torch.ones_like(t))
    assert all(float(l.layer_scalar) != 1.0 for l in model.layers)


def test_logits_match_transformers(hf_case, tools):
    """Every position of an 80-token prompt (longer than the window) within 1e-5 * max|logit|."""
    ours = tools.our_logits(hf_case.path, hf_case.ids)
    assert hf_case.ref_logits.abs().max() > 1.0  # the comparison is not between near-zero logits
    tools.assert_parity(hf_case.ref_logits, ours, hf_case.name)


def test_logits_match_transformers_on_short_prompts(hf_case, tools):
    """Prompts shorter than the window and a single token (no masking at all) too."""
    model = load_model(hf_case.path)
    for T in (1, 5):
        ids = hf_case.ids[:T]
        tools.assert_parity(tools.hf_logits(hf_case.ref, ids), tools.our_logits(model, ids), f"{hf_case.name} T={T}")


def test_hub_config_form_loads_to_the_same_model(hf_case, hub_form_dir, tools):
    """config.json with global_head_dim / num_global_key_value_heads and no per_layer_config: the same logits as
    the per_layer_config form (ours, bit for bit), within tolerance of transformers; and transformers itself reads
    the rewritten file to the same model, so the rewrite is a faithful hub-form config."""
    text = _text_config(json.loads((hub_form_dir / "config.json").read_text()))
    assert "per_layer_config" not in text and "global_head_dim" in text
    ours_hub = tools.our_logits(hub_form_dir, hf_case.ids)
    ours_plc = tools.our_logits(hf_case.path, hf_case.ids)
    assert torch.equal(ours_hub, ours_plc)
    tools.assert_parity(hf_case.ref_logits, ours_hub, hf_case.name + " (hub form)")
    ref_hub = tools.hf_logits(tools.hf_load(hf_case.cls, hub_form_dir), hf_case.ids)
    assert torch.equal(ref_hub, hf_case.ref_logits)


def test_parity_check_is_sensitive_to_convention_errors(hf_case, tools):
    """The checkpoints and tolerance are strict enough to catch the spec's classic mistakes: a dropped
    layer_scalar, a sliding-window off-by-one, an ignored per_expert_scale, the Gemma-2 ``1 + w`` norm."""
    ids = hf_case.ids

    def broken(mutate):
        model = load_model(hf_case.path)
        mutate(model)
        diff, allowed = tools.parity_error(hf_case.ref_logits, tools.our_logits(model, ids))
        return diff > allowed

    def no_layer_scalar(m):
        for layer in m.layers:
            layer.layer_scalar.fill_(1.0)

    def window_plus_one(m):
        for layer in m.layers:
            attn = layer.self_attn
            if attn.shape.window is not None:
                attn.shape = dataclasses.replace(attn.shape, window=attn.shape.window + 1)

    def no_per_expert_scale(m):
        for layer in m.layers:
            layer.router.per_expert_scale.fill_(1.0)

    def one_plus_w(m):
        m.norm.weight.add_(1.0)

    for name, mutate in [("layer_scalar", no_layer_scalar), ("window+1", window_plus_one),
                         ("per_expert_scale", no_per_expert_scale), ("1+w norm", one_plus_w)]:
        assert broken(mutate), f"{hf_case.name}: the parity check did not notice a wrong {name}"


def test_greedy_generation_matches_transformers(hf_case, tools):
    """32 greedy tokens through our engine (paged KV cache, chunked prefill, windows slid far past) equal
    transformers' greedy generate on the 80-token prompt."""
    prompt = hf_case.ids.tolist()
    engine = LLMEngine(load_model(hf_case.path), EngineConfig(max_num_batched_tokens=48))  # the prompt: 2 chunks
    out = engine.generate([prompt], SamplingParams(max_tokens=GREEDY_TOKENS, ignore_eos=True))[0]
    assert out.token_ids == tools.hf_greedy(hf_case.ref, prompt, GREEDY_TOKENS)


# --------------------------------------------------------------------------------------------- sizes


def test_parameter_counts_of_the_released_architecture():
    cfg = preset("gemma-4-26b-a4b")
    assert count_text_parameters(cfg) == 25_233_141_790
    assert count_active_parameters(cfg) == 3_822_530_590


def test_parameter_count_matches_transformers_on_a_tiny_config(hf_case):
    """The meta-device count equals the number of values transformers saves for the text decoder."""
    cfg = load_model(hf_case.path, expert_range=None).cfg
    text_params = sum(t.numel() for n, t in hf_case.ref.state_dict().items() if n != "lm_head.weight")  # tied
    assert count_text_parameters(cfg) == text_params


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_table_gives_the_computed_tables_bit_for_bit(dtype):
    """The model's cos/sin come from a table of positions (``layers.RopeTable``): the same bits as computing
    them for the step's positions, for both kinds of the released model, as the table grows and past its end."""
    from epserve.actors.model.layers import RopeTable, rope_tables

    cfg = preset("gemma-4-26b-a4b")
    for shape in (cfg.sliding, cfg.full):
        inv = shape.rope.inv_freq(shape.head_dim)
        table = RopeTable(inv)
        for positions in ([0], list(range(128, 192)), [5, 3000, 17, 999], [RopeTable.MAX_POSITIONS - 1, 7],
                          [RopeTable.MAX_POSITIONS + 3, 2], []):
            pos = torch.tensor(positions, dtype=torch.long)
            for ours, ref in zip(table(pos, dtype), rope_tables(inv, pos, dtype)):
                assert ours.dtype == dtype and torch.equal(ours, ref)
        assert len(table.tables[dtype][0]) == RopeTable.MAX_POSITIONS  # grown to hold 8191, not past it
