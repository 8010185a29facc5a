"""The feed-forward parts of a Gemma 4 layer: the dense GeGLU MLP, the router and the routed experts.

Legend: T tokens, H hidden, E experts (local to this process), K top-k slots, I expert width.
The experts compute is one function, ``grouped_experts``, used both by the in-process model and by the
expert-shard actors: tokens are sorted by expert once, each expert runs one GEMM over all of its tokens, and
each token's K contributions are summed in fp32 (weights applied before the sum), so a shard can return one
partial sum per token.
"""

from __future__ import annotations

import torch
from torch import nn

from . import cpu_kernels
from .config import ModelConfig
from .layers import Linear, gelu_tanh, linear, rms_norm


class DenseMLP(nn.Module):
    """GeGLU MLP: down(gelu_tanh(gate x) * up x). The always-on dense FFN, and the optional shared expert."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = Linear(hidden, width)
        self.up_proj = Linear(hidden, width)
        self.down_proj = Linear(width, hidden)

    def forward(self, x):
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Reads the raw residual; returns fp32 routing weights [T, K] and expert ids [T, K] (sorted by prob)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj = Linear(cfg.hidden_size, cfg.num_experts)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))
        self.top_k, self.eps, self.root = cfg.top_k, cfg.rms_norm_eps, cfg.hidden_size**-0.5

    def forward(self, r):
        z = rms_norm(r, None, self.eps) * self.scale * self.root
        probs = torch.softmax(self.proj(z), dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[ids], ids


def expert_dtype(stored: torch.dtype, compute: torch.dtype, device, cfg: ModelConfig) -> torch.dtype:
    """How routed-expert weights are held: bf16 checkpoint weights under fp32 compute on CPU stay bf16 when
    the native kernel is available and takes their widths (exact: widening bf16 to fp32 is lossless; a
    decode step reads half the bytes); everything else is held in the compute dtype."""
    keep = (stored == torch.bfloat16 and compute == torch.float32 and torch.device(device).type == "cpu"
            and cpu_kernels.packable(2 * cfg.moe_intermediate_size, cfg.hidden_size) and cpu_kernels.available())
    return torch.bfloat16 if keep else compute


def grouped_experts(x_TH, ids_TK, weights_TK, experts: "Experts") -> torch.Tensor:
    """Σ_k w[t,k] · expert_{ids[t,k]}(x[t]) in fp32 [T, H]. ids are local expert ids; -1 marks a slot that
    belongs to another process and is skipped."""
    gate_up_EIH, down_EHI = experts.gate_up_proj, experts.down_proj
    T, H = x_TH.shape
    K = ids_TK.shape[1]
    flat_ids = ids_TK.reshape(-1)
    mine = (flat_ids >= 0).nonzero().squeeze(1)
    if mine.numel() == 0:
        return torch.zeros(T, H, dtype=torch.float32, device=x_TH.device)
    # torch.sort as transformers' grouped_mm path: the same row order inside each expert's GEMM
    order = torch.sort(flat_ids[mine]).indices
    slots = mine[order]  # (token, slot) pairs sorted by expert
    S = slots.numel()
    counts = torch.bincount(flat_ids[slots], minlength=gate_up_EIH.shape[0]).tolist()
    xs = x_TH[slots // K]
    ys = torch.empty(S + 1, H, dtype=x_TH.dtype, device=x_TH.device)  # the last row: zeros, for others' slots
    ys[S] = 0
    if experts.packed:  # bf16 experts under fp32 compute (``expert_dtype``): the layer in two kernel calls
        offsets = torch.tensor([0, *counts]).cumsum(0)
        gate, up = cpu_kernels.grouped_linear(xs, offsets, gate_up_EIH).chunk(2, dim=-1)
        cpu_kernels.grouped_linear(gelu_tanh(gate) * up, offsets, down_EHI, out=ys[:S])
    else:
        start = 0
        for e, n in enumerate(counts):  # one GEMM per expert that has tokens: never a loop over tokens
            if n:
                gate, up = linear(xs[start : start + n], gate_up_EIH[e]).chunk(2, dim=-1)
                ys[start : start + n] = linear(gelu_tanh(gate) * up, down_EHI[e])
                start += n
    weighted = ys.float()  # in place when the model computes in fp32
    weighted[:S] *= weights_TK.reshape(-1)[slots, None]
    # w·y per (token, slot) back in token order, then summed over the K slots in top-k order, in fp32
    # (transformers' grouped_mm reduction; an index_add_ in expert order is a different fp32 association)
    row_of_slot = torch.full((T * K,), S, dtype=torch.long, device=x_TH.device)
    row_of_slot[slots] = torch.arange(S, device=x_TH.device)
    return weighted[row_of_slot].view(T, K, H).sum(dim=1)


class Experts(nn.Module):
    """The routed experts ``[first, first + count)`` of one layer, with the checkpoint's shapes. Held as bf16
    on CPU (``expert_dtype``), each expert's matrices are repacked once after loading into the native kernel's
    panel order (``pack_``: same shapes and bytes, so slices by expert and byte counts keep their meaning);
    ``unpacked`` gives them back in the checkpoint's order."""

    def __init__(self, cfg: ModelConfig, first: int = 0, count: int | None = None):
        super().__init__()
        count = cfg.num_experts - first if count is None else count
        H, I = cfg.hidden_size, cfg.moe_intermediate_size
        self.first, self.count = first, count
        self.gate_up_proj = nn.Parameter(torch.empty(count, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(count, H, I))
        self.packed = False

    def pack_(self) -> "Experts":
        """Repack bf16 CPU weights for the native kernel (a no-op for any other weights)."""
        w = self.gate_up_proj
        if not self.packed and w.dtype == torch.bfloat16 and w.device.type == "cpu" and cpu_kernels.available():
            with torch.no_grad():
                self.gate_up_proj.data = cpu_kernels.pack_panels(self.gate_up_proj.data)
                self.down_proj.data = cpu_kernels.pack_panels(self.down_proj.data)
            self.packed = True
        return self

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up_proj, down_proj) in the checkpoint's order."""
        if not self.packed:
            return self.gate_up_proj, self.down_proj
        return tuple(cpu_kernels.unpack_panels(t) for t in (self.gate_up_proj, self.down_proj))

    def forward(self, x_TH, ids_TK, weights_TK):
        """ids are global expert ids; slots outside this range contribute nothing."""
        local = ids_TK - self.first
        local = torch.where((local >= 0) & (local < self.count), local, -1)
        return grouped_experts(x_TH, local, weights_TK, self)
