"""Weights from safetensors checkpoints: one file or sharded (``model.safetensors.index.json``), in the released
layout (``model.language_model.*``) or the text-only one (``model.*``).

A shard's experts (any set, read run by run of consecutive ids with ``get_slice``) are read so that a process
holding some of the experts never reads the other experts' bytes; every load reports the tensors and bytes it
materialised.
Routed-expert weights stored as bf16 stay bf16 under fp32 compute on CPU (``moe.expert_dtype``); each layer's
experts then choose how their grouped projections run (``Experts.prepare_``), and linears that read the same
input are joined into one weight (``layers.JointLinears``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from . import host_memory
from .config import ModelConfig
from .gemma4 import ALL_EXPERTS, Gemma4Model
from .layers import JointLinears
from .moe import Experts, expert_dtype

PREFIXES = {"released": "model.language_model.", "text-only": "model."}
EXPERT_TENSORS = ("experts.gate_up_proj", "experts.down_proj")


class CheckpointError(ValueError):
    """A checkpoint that does not match its config or this model."""


@dataclass
class LoadReport:
    tensors: int = 0
    bytes: int = 0  # bytes materialised from the files (before any dtype conversion)


class Checkpoint:
    """A checkpoint directory: its config and a key -> file map, read lazily."""

    def __init__(self, path: str | Path):
        self.dir = Path(path)
        if not self.dir.is_dir():
            raise CheckpointError(f"checkpoint directory {self.dir} does not exist")
        self.config = ModelConfig.from_json(self.dir)
        self.files = self._weight_map()
        self.prefix = self._detect_prefix()
        self._handles: dict[Path, object] = {}
        self.report = LoadReport()

    def _weight_map(self) -> dict[str, Path]:
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {k: self.dir / f for k, f in weight_map.items()}
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.dir}: no *.safetensors files and no model.safetensors.index.json")
        keys = {}
        for f in files:
            with safe_open(f, framework="pt") as h:
                keys.update({k: f for k in h.keys()})
        return keys

    def _detect_prefix(self) -> str:
        for prefix in PREFIXES.values():  # the released prefix first: it is the more specific one
            if f"{prefix}embed_tokens.weight" in self.files:
                return prefix
        raise CheckpointError(
            f"{self.dir}: missing tensor 'model.language_model.embed_tokens.weight' (or 'model.embed_tokens.weight')"
        )

    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def _slice(self, name: str):
        key = self.prefix + name
        if key not in self.files:
            raise CheckpointError(f"{self.dir}: missing tensor '{key}'")
        return self._handle(self.files[key]).get_slice(key)

    def read(self, name: str, expected: tuple[int, ...], rows: list[int] | None = None) -> torch.Tensor:
        """The tensor ``name`` (only the given rows of dim 0, in that order, if given), checked against the
        expected shape."""
        sl = self._slice(name)
        full = tuple(sl.get_shape())
        want = expected if rows is None else (self.config.num_experts, *expected[1:])
        if full != want:
            raise CheckpointError(
                f"{self.dir}: tensor '{self.prefix + name}' has shape {list(full)}, expected {list(want)}"
            )
        if rows is None:
            t = sl[:]
        else:
            runs = [sl[a:b] for a, b in _runs(rows)]
            t = runs[0] if len(runs) == 1 else torch.cat(runs) if runs else torch.empty(0, *full[1:])
        self.report.tensors += 1
        self.report.bytes += t.numel() * t.element_size()
        return t

    def close(self):
        self._handles.clear()


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """[a, b) runs of consecutive ids, in order: [3, 4, 5, 0, 1] -> [(3, 6), (0, 2)]."""
    runs = []
    for r in rows:
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs


def _materialise(module: torch.nn.Module, ckpt: Checkpoint, prefix: str, dtype, device, rows=None) -> None:
    """Fill every tensor of a meta-device module from the checkpoint (expert tensors sliced by ``rows``); the
    process that holds them will compute with them: its freed activations are kept for reuse."""
    if torch.device(device).type == "cpu":
        host_memory.keep_freed_memory()
    joints, into = _joint_blocks(module, dtype, device)
    state = {}
    for name, meta in module.state_dict().items():
        expert = (prefix + name).endswith(EXPERT_TENSORS)
        t = ckpt.read(prefix + name, tuple(meta.shape), rows if expert else None)
        held = expert_dtype(t.dtype, dtype, device, ckpt.config) if expert else dtype
        state[name] = into[name].copy_(t) if name in into else host_memory.resident(t, held, device)
    module.load_state_dict(state, assign=True, strict=True)
    for joint, tensor in joints:
        joint.adopt(tensor)
    for m in module.modules():
        if isinstance(m, Experts):
            m.prepare_(dtype)


def _joint_blocks(module: torch.nn.Module, dtype, device) -> tuple[list, dict[str, torch.Tensor]]:
    """The module's ``JointLinears`` with a joint weight each, and where each of their weights is read into (a
    row block of it): read there directly, not copied in later, so that no weight is held twice."""
    names = {id(m): name for name, m in module.named_modules()}
    joints, into = [], {}
    for m in module.modules():
        for joint in [v for v in vars(m).values() if isinstance(v, JointLinears)]:
            tensor, blocks = joint.blocks(dtype, device)
            joints.append((joint, tensor))
            into.update({f"{names[id(linear)]}.weight": block for linear, block in zip(joint.linears, blocks)})
    return joints, into


def load_model(path, dtype=torch.float32, device="cpu", expert_range=ALL_EXPERTS) -> Gemma4Model:
    """The text decoder from a checkpoint; expert_range as in ``Gemma4Model`` (None: no routed experts)."""
    ckpt = Checkpoint(path)
    cfg = ckpt.config
    with torch.device("meta"):
        model = Gemma4Model(cfg, expert_range)
    held = model.expert_range
    _materialise(model, ckpt, "", dtype, device, rows=held and list(range(held[0], held[0] + held[1])))
    known = {ckpt.prefix + name for name in model.state_dict()}
    extra = sorted(k for k in ckpt.files if k.startswith(ckpt.prefix) and k not in known
                   and not k.endswith(EXPERT_TENSORS)  # present but deliberately not loaded here
                   and not k.startswith(("model.vision_tower.", "model.embed_vision.", "model.audio_tower.")))
    if extra:
        raise CheckpointError(f"{ckpt.dir}: unexpected tensor '{extra[0]}' (and {len(extra) - 1} more): the "
                              "config does not describe these weights")
    model.load_report = ckpt.report
    ckpt.close()
    return model.eval().requires_grad_(False)


def load_experts(path, first: int, count: int, dtype=torch.float32, device="cpu"):
    """Only the routed experts [first, first + count) of every layer: (list of Experts, config, LoadReport)."""
    ckpt = Checkpoint(path)
    cfg = ckpt.config
    if not (0 <= first and count >= 0 and first + count <= cfg.num_experts):
        raise CheckpointError(f"expert range [{first}, {first + count}) is outside [0, {cfg.num_experts})")
    return _load_experts(ckpt, [list(range(first, first + count))] * cfg.num_layers, first, dtype, device)


def load_expert_slots(path, experts: list[list[int]], dtype=torch.float32, device="cpu"):
    """A shard's slots (``experts[layer]``: the expert in each slot of the layer, any set in any order): the
    Experts of each layer, indexed by slot (their ``first`` is 0), the config and the LoadReport."""
    ckpt = Checkpoint(path)
    cfg = ckpt.config
    if len(experts) != cfg.num_layers:
        raise CheckpointError(f"experts given for {len(experts)} layers; the checkpoint has {cfg.num_layers}")
    bad = [(i, e) for i, ids in enumerate(experts) for e in ids if not 0 <= e < cfg.num_experts]
    if bad:
        raise CheckpointError(f"layer {bad[0][0]}: expert {bad[0][1]} is outside [0, {cfg.num_experts})")
    return _load_experts(ckpt, experts, 0, dtype, device)


def _load_experts(ckpt: Checkpoint, experts: list[list[int]], first: int, dtype=torch.float32, device="cpu"):
    layers = []
    for i, ids in enumerate(experts):
        with torch.device("meta"):
            held = Experts(ckpt.config, first, len(ids))
        _materialise(held, ckpt, f"layers.{i}.experts.", dtype, device, rows=list(ids))
        layers.append(held.eval().requires_grad_(False))
    ckpt.close()
    return layers, ckpt.config, ckpt.report


def load_layer_experts(path, layer: int, ids: list[int], dtype=torch.float32, device="cpu"):
    """Some routed experts of one layer (``ids``, in that order; rebalancing): (Experts, bytes read)."""
    ckpt = Checkpoint(path)
    with torch.device("meta"):
        held = Experts(ckpt.config, 0, len(ids))
    _materialise(held, ckpt, f"layers.{layer}.experts.", dtype, device, rows=list(ids))
    ckpt.close()
    return held.eval().requires_grad_(False), ckpt.report.bytes
