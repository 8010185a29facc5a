"""Gemma 4 text-decoder configuration, read from a Hugging Face ``config.json``.

Accepts the released multimodal file (``text_config`` nested under ``Gemma4ForConditionalGeneration``) and a
text-only file (``Gemma4ForCausalLM``), and both ways of describing the full-attention layers: the hub form
(``global_head_dim`` / ``num_global_key_value_heads``) and transformers' ``per_layer_config`` form. Defaults for
absent fields are transformers' own, so a file read here means what it means there.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

SLIDING, FULL = "sliding_attention", "full_attention"
SUPPORTED_ARCHITECTURES = ("Gemma4ForConditionalGeneration", "Gemma4ForCausalLM")


class ConfigError(ValueError):
    """A config.json this model cannot run."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rotary_fraction: float = 1.0  # proportional RoPE: share of head_dim/2 frequencies that rotate
    factor: float = 1.0

    def inv_freq(self, head_dim: int):
        """Inverse frequencies [head_dim/2], exactly as transformers builds them (zeros = no rotation)."""
        import torch

        n_rot = int(self.rotary_fraction * head_dim // 2)
        rotated = 1.0 / (self.theta ** (torch.arange(0, 2 * n_rot, 2, dtype=torch.int64).float() / head_dim))
        return torch.cat([rotated, torch.zeros(head_dim // 2 - n_rot)]) / self.factor


@dataclass(frozen=True)
class AttentionShape:
    """Shape of one attention layer: sliding layers and full layers differ."""

    kind: str  # SLIDING or FULL
    head_dim: int
    num_kv_heads: int
    k_eq_v: bool  # V reuses the raw k_proj output (no v_proj)
    rope: RopeConfig
    window: int | None  # keys visible to a query, itself included; None = global causal


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    layer_types: tuple[str, ...]
    sliding: AttentionShape
    full: AttentionShape
    intermediate_size: int  # dense GeGLU MLP width
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int = 0  # 0: no separate shared expert (the released model)
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = 30.0
    max_position_embeddings: int = 131072  # positions the model was trained for (transformers' default)
    eos_token_ids: tuple[int, ...] = (1,)
    bos_token_id: int = 2
    pad_token_id: int = 0
    layout: str = "released"  # key prefix of the checkpoint: "released" (model.language_model.) or "text-only"
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    def attention(self, layer: int) -> AttentionShape:
        return self.full if self.layer_types[layer] == FULL else self.sliding

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"no config.json at {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        archs = data.get("architectures") or []
        model_type = data.get("model_type")
        if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise ConfigError(f"unknown architecture {archs}: expected one of {list(SUPPORTED_ARCHITECTURES)}")
        if model_type not in (None, "gemma4", "gemma4_text"):
            raise ConfigError(f"unknown model_type {model_type!r}: expected 'gemma4' or 'gemma4_text'")
        nested = "text_config" in data
        text = dict(data["text_config"]) if nested else dict(data)
        layout = "released" if nested or "Gemma4ForConditionalGeneration" in archs else "text-only"
        # eos ids: the top level of the released file carries the chat eos list
        eos = data.get("eos_token_id", text.get("eos_token_id", 1))
        eos = tuple(eos) if isinstance(eos, list) else (int(eos),) if eos is not None else ()
        return _parse_text_config(text, eos, layout)

    def to_hf_text_config(self) -> dict:
        """The text_config dict in transformers' vocabulary, with both forms of the full-layer settings."""
        rope = lambda r, kind: (  # noqa: E731
            {"rope_type": "default", "rope_theta": r.theta}
            if kind == SLIDING
            else {"rope_type": "proportional", "partial_rotary_factor": r.rotary_fraction, "rope_theta": r.theta}
        )
        full_override = {"head_dim": self.full.head_dim, "num_key_value_heads": self.full.num_kv_heads}
        cfg = {
            "model_type": "gemma4_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.sliding.num_kv_heads,
            "head_dim": self.sliding.head_dim,
            "global_head_dim": self.full.head_dim,
            "num_global_key_value_heads": self.full.num_kv_heads,
            "per_layer_config": {str(i): full_override for i, t in enumerate(self.layer_types) if t == FULL},
            "attention_k_eq_v": self.full.k_eq_v,
            "layer_types": list(self.layer_types),
            "sliding_window": self.sliding.window,
            "rope_parameters": {SLIDING: rope(self.sliding.rope, SLIDING), FULL: rope(self.full.rope, FULL)},
            "intermediate_size": self.intermediate_size,
            "enable_moe_block": True,
            "num_experts": self.num_experts,
            "top_k_experts": self.top_k,
            "moe_intermediate_size": self.moe_intermediate_size,
            "hidden_activation": "gelu_pytorch_tanh",
            "rms_norm_eps": self.rms_norm_eps,
            "final_logit_softcapping": self.final_logit_softcapping,
            "hidden_size_per_layer_input": 0,
            "num_kv_shared_layers": 0,
            "use_double_wide_mlp": False,
            "attention_bias": False,
            "tie_word_embeddings": True,
            "use_bidirectional_attention": "vision",
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if self.eos_token_ids else None,
            "pad_token_id": self.pad_token_id,
            "dtype": "bfloat16",
        }
        if self.shared_expert_intermediate_size:
            cfg["shared_expert_intermediate_size"] = self.shared_expert_intermediate_size
        return cfg

    def to_hf_config(self, layout: str | None = None) -> dict:
        """A whole config.json for the released (multimodal) or the text-only layout."""
        layout = layout or self.layout
        text = self.to_hf_text_config()
        if layout == "text-only":
            return {"architectures": ["Gemma4ForCausalLM"], **text, "eos_token_id": list(self.eos_token_ids)}
        return {
            "architectures": ["Gemma4ForConditionalGeneration"],
            "model_type": "gemma4",
            "text_config": text,
            "vision_config": None,
            "audio_config": None,
            "eos_token_id": list(self.eos_token_ids),
            "bos_token_id": self.bos_token_id,
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": True,
            "dtype": "bfloat16",
        }


def _require(text: dict, key: str):
    if key not in text or text[key] is None:
        raise ConfigError(f"config.json: missing required field '{key}'")
    return text[key]


def _parse_text_config(text: dict, eos: tuple[int, ...], layout: str) -> ModelConfig:
    unsupported = {
        "hidden_size_per_layer_input": "per-layer inputs (PLE)",
        "num_kv_shared_layers": "KV sharing across layers",
        "use_double_wide_mlp": "double-wide MLP",
        "attention_bias": "attention bias",
    }
    hf_defaults = {"hidden_size_per_layer_input": 256}  # transformers' default: an absent field means PLE on
    for key, what in unsupported.items():
        value = text.get(key, hf_defaults.get(key))
        if value:
            given = f"{key}={value!r}" if key in text else f"{key} is absent (transformers' default {value!r})"
            raise ConfigError(f"config.json: {given}: {what} is not supported by this server")
    if text.get("tie_word_embeddings", True) is False:
        raise ConfigError("config.json: tie_word_embeddings=false (a separate lm_head) is not supported")
    if not text.get("enable_moe_block", False):
        raise ConfigError("config.json: enable_moe_block is false; this server runs the Mixture-of-Experts model")
    if text.get("use_bidirectional_attention") == "all":
        raise ConfigError("config.json: use_bidirectional_attention='all' is not supported (text is causal)")
    if text.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ConfigError(f"config.json: hidden_activation {text['hidden_activation']!r} is not gelu_pytorch_tanh")

    num_layers = int(_require(text, "num_hidden_layers"))
    layer_types = text.get("layer_types") or [
        SLIDING if (i + 1) % 6 else FULL for i in range(num_layers)
    ]
    layer_types = list(layer_types)
    if len(layer_types) != num_layers or set(layer_types) - {SLIDING, FULL}:
        raise ConfigError(f"config.json: layer_types must list {num_layers} of {SLIDING!r}/{FULL!r}")
    layer_types[-1] = FULL  # transformers forces the last layer to be global

    k_eq_v = bool(text.get("attention_k_eq_v", False))
    head_dim = int(text.get("head_dim", 256))
    kv_heads = int(text.get("num_key_value_heads", 4))
    full_head_dim, full_kv_heads = _full_layer_overrides(text, layer_types, k_eq_v, head_dim, kv_heads)

    rope = text.get("rope_parameters") or {}
    sliding_rope = rope.get(SLIDING) or {"rope_type": "default", "rope_theta": 10_000.0}
    full_rope = rope.get(FULL) or {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}

    def rope_of(params: dict) -> RopeConfig:
        kind = params.get("rope_type", "default")
        if kind not in ("default", "proportional"):
            raise ConfigError(f"config.json: rope_type {kind!r} is not supported")
        fraction = float(params.get("partial_rotary_factor", 1.0)) if kind == "proportional" else 1.0
        return RopeConfig(float(params["rope_theta"]), fraction, float(params.get("factor", 1.0)))

    num_heads = int(_require(text, "num_attention_heads"))
    for name, nkv in (("sliding", kv_heads), ("full", full_kv_heads)):
        if nkv <= 0 or num_heads % nkv:
            raise ConfigError(f"config.json: {num_heads} attention heads are not a multiple of {nkv} {name} KV heads")
    num_experts = int(_require(text, "num_experts"))
    top_k = int(_require(text, "top_k_experts"))
    if not 0 < top_k <= num_experts:
        raise ConfigError(f"config.json: top_k_experts={top_k} must be in [1, num_experts={num_experts}]")
    softcap = text.get("final_logit_softcapping")
    return ModelConfig(
        vocab_size=int(_require(text, "vocab_size")),
        hidden_size=int(_require(text, "hidden_size")),
        num_layers=num_layers,
        num_heads=num_heads,
        layer_types=tuple(layer_types),
        sliding=AttentionShape(SLIDING, head_dim, kv_heads, False, rope_of(sliding_rope),
                               int(text.get("sliding_window", 512))),
        full=AttentionShape(FULL, full_head_dim, full_kv_heads, k_eq_v, rope_of(full_rope), None),
        intermediate_size=int(_require(text, "intermediate_size")),
        num_experts=num_experts,
        top_k=top_k,
        moe_intermediate_size=int(_require(text, "moe_intermediate_size")),
        shared_expert_intermediate_size=int(text.get("shared_expert_intermediate_size") or 0),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        final_logit_softcapping=float(softcap) if softcap else None,
        max_position_embeddings=int(text.get("max_position_embeddings") or 131072),
        eos_token_ids=eos,
        bos_token_id=int(text.get("bos_token_id", 2) or 2),
        pad_token_id=int(text.get("pad_token_id", 0) or 0),
        layout=layout,
        raw=text,
    )


def _full_layer_overrides(text, layer_types, k_eq_v, head_dim, kv_heads) -> tuple[int, int]:
    """(head_dim, kv_heads) of the full layers, from per_layer_config or the hub's global_* fields."""
    per_layer = text.get("per_layer_config")
    if per_layer:
        full_layers = [i for i, t in enumerate(layer_types) if t == FULL]
        shapes = set()
        for i in full_layers:
            o = per_layer.get(str(i), per_layer.get(i, {})) or {}
            shapes.add((int(o.get("head_dim", head_dim)), int(o.get("num_key_value_heads", kv_heads))))
        if len(shapes) > 1:
            raise ConfigError(f"config.json: full-attention layers disagree in per_layer_config: {sorted(shapes)}")
        return shapes.pop() if shapes else (head_dim, kv_heads)
    full_head_dim = int(text.get("global_head_dim", 512))
    global_kv = text.get("num_global_key_value_heads")
    full_kv = int(global_kv) if (k_eq_v and global_kv is not None) else kv_heads
    return full_head_dim, full_kv
