"""Random-weight checkpoints in the real layout, for tests and benchmarks (no weights can be downloaded).

Presets:
  tiny             seconds on CPU; widths that are multiples of 64 so that every peer's kernels accept it
  bench            the real per-layer shapes (hidden 2816, 128 experts x 704, top-8, dense 2112, heads 16/8/2,
                   head dims 256/512), 2 layers (one sliding, one full), vocabulary 32768, stored in bf16
  gemma-4-26b-a4b  the released architecture (config only unless weights are asked for: ~50 GB)
Every norm, scale and layer_scalar gets non-trivial values, so that a convention error shows in the logits.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import FULL, SLIDING, ModelConfig
from .gemma4 import Gemma4Model
from .loader import PREFIXES
from .tokenizer_files import MIN_VOCAB, write_tokenizer


def _config(vocab, hidden, layers, heads, kv, head_dim, full_kv, full_head_dim, window, dense, experts, top_k,
            expert_width, layer_types=None) -> ModelConfig:
    types = layer_types or [SLIDING if (i + 1) % 6 else FULL for i in range(layers)]
    text = {
        "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": head_dim, "global_head_dim": full_head_dim,
        "num_global_key_value_heads": full_kv, "attention_k_eq_v": True, "sliding_window": window,
        "layer_types": types, "intermediate_size": dense, "enable_moe_block": True, "num_experts": experts,
        "top_k_experts": top_k, "moe_intermediate_size": expert_width, "final_logit_softcapping": 30.0,
        "rms_norm_eps": 1e-6, "hidden_size_per_layer_input": 0, "rope_parameters": {
            SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
            FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0}},
    }
    return ModelConfig.from_dict({"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4",
                                  "text_config": text, "eos_token_id": [1, 106]})


PRESETS = {
    "tiny": lambda: _config(vocab=1024, hidden=256, layers=4, heads=4, kv=2, head_dim=64, full_kv=1,
                            full_head_dim=128, window=32, dense=384, experts=16, top_k=4, expert_width=128,
                            layer_types=[SLIDING, SLIDING, SLIDING, FULL]),
    "bench": lambda: _config(vocab=32768, hidden=2816, layers=2, heads=16, kv=8, head_dim=256, full_kv=2,
                             full_head_dim=512, window=1024, dense=2112, experts=128, top_k=8, expert_width=704,
                             layer_types=[SLIDING, FULL]),
    "gemma-4-26b-a4b": lambda: _config(vocab=262144, hidden=2816, layers=30, heads=16, kv=8, head_dim=256,
                                       full_kv=2, full_head_dim=512, window=1024, dense=2112, experts=128,
                                       top_k=8, expert_width=704),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def _random_tensor(name: str, shape, cfg: ModelConfig, gen: torch.Generator) -> torch.Tensor:
    if name.endswith("layer_scalar"):
        return torch.empty(shape).uniform_(0.5, 1.0, generator=gen)
    if len(shape) == 1:  # norms, router scales: around one, never all ones
        high = 1.5
        if "post_" in name and name.endswith("layernorm.weight"):
            # the norms that close a block are larger, so that the blocks (not the embedding of the last
            # token) decide the next token: random models then write varied text instead of repeating
            high = 4.5
        elif name.endswith(("q_norm.weight", "k_norm.weight")):
            # with attention scaling 1.0, q/k norms near one make the softmax so peaked that fp32 rounding
            # noise is amplified to the parity tolerance; smaller ones keep random models well conditioned
            high = 0.75
        return torch.empty(shape).uniform_(high / 3, high, generator=gen)
    return torch.randn(shape, generator=gen) / math.sqrt(shape[-1])


def write_checkpoint(cfg: ModelConfig, out: str | Path, seed: int = 0, layout: str | None = None,
                     dtype=torch.bfloat16, shard_bytes: int = 2 << 30, weights: bool = True,
                     progress: bool = False) -> Path:
    """Write config.json, random safetensors (sharded with an index above ``shard_bytes``) and, for vocabularies
    of 363..32768 ids, the built-in tokenizer (tokenizer_files.py)."""
    layout = layout or cfg.layout
    if layout not in PREFIXES:
        raise ValueError(f"unknown layout {layout!r}: choose released or text-only")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_hf_config(layout), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids),
         "pad_token_id": cfg.pad_token_id, "do_sample": False}, indent=2) + "\n")
    if MIN_VOCAB <= cfg.vocab_size <= 32768:
        write_tokenizer(out, cfg.vocab_size)
    if not weights:
        return out
    with torch.device("meta"):
        names = [(n, tuple(t.shape)) for n, t in Gemma4Model(cfg).state_dict().items()]
    gen = torch.Generator().manual_seed(seed)
    prefix = PREFIXES[layout]
    tensors = ((prefix + n, _random_tensor(n, s, cfg, gen).to(dtype)) for n, s in names)
    _save_sharded(tensors, out, shard_bytes, progress)
    return out


def _save_sharded(tensors, out: Path, shard_bytes: int, progress: bool) -> None:
    """Stream tensors into files of about ``shard_bytes``: one model.safetensors, or shards plus the index."""
    parts, current, size, total = [], {}, 0, 0

    def flush():
        part = out / f".part-{len(parts):05d}.safetensors"
        save_file(current, part, metadata={"format": "pt"})
        parts.append((part, list(current), size))
        if progress:
            print(f"  wrote {total / 2**30:.2f} GiB", file=sys.stderr, flush=True)

    for key, t in tensors:
        current[key] = t
        size += t.numel() * t.element_size()
        total += t.numel() * t.element_size()
        if size >= shard_bytes:
            flush()
            current, size = {}, 0
    if current:
        flush()
    if len(parts) == 1:
        parts[0][0].rename(out / "model.safetensors")
        return
    weight_map = {}
    for i, (part, keys, _) in enumerate(parts):
        name = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        part.rename(out / name)
        weight_map.update({k: name for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
