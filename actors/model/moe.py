"""The feed-forward parts of a Gemma 4 layer: the dense GeGLU MLP, the router and the routed experts.

Legend: T tokens, H hidden, E experts (local to this process), K top-k slots, I expert width.
The experts compute is one function, ``grouped_experts``, used both by the in-process model and by the
expert-shard actors: tokens are sorted by expert once, each projection runs as one grouped GEMM over every
expert's tokens (a native CPU kernel or torch's grouped GEMM: never a loop over experts), and each token's K
contributions are summed in fp32 (weights applied before the sum), so a shard can return one partial sum per
token.
"""

from __future__ import annotations

import torch
from torch import nn

from . import cpu_kernels, ops
from .config import ModelConfig
from .layers import JointLinears, Linear


class DenseMLP(nn.Module):
    """GeGLU MLP: down(gelu_tanh(gate x) * up x). The always-on dense FFN, and the optional shared expert."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = Linear(hidden, width)
        self.up_proj = Linear(hidden, width)
        self.down_proj = Linear(width, hidden)
        self.gate_up = JointLinears(self.gate_proj, self.up_proj)

    def forward(self, x):
        return self.down_proj(ops.gelu_mul(*self.gate_up(x)))


class Router(nn.Module):
    """From its input z (the raw residual, normed without weight, times ``scale`` and hidden^-1/2:
    ``ops.ffn_inputs``), fp32 routing weights [T, K] and expert ids [T, K] (sorted by prob)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj = Linear(cfg.hidden_size, cfg.num_experts)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))
        self.top_k, self.eps, self.root = cfg.top_k, cfg.rms_norm_eps, cfg.hidden_size**-0.5

    def forward(self, z):
        return ops.route(self.proj(z), self.top_k, self.per_expert_scale)


def expert_dtype(stored: torch.dtype, compute: torch.dtype, device, cfg: ModelConfig) -> torch.dtype:
    """How routed-expert weights are held: bf16 checkpoint weights under fp32 compute on CPU stay bf16 when
    the native kernel is available and takes their widths (exact: widening bf16 to fp32 is lossless; a
    decode step reads half the bytes); everything else is held in the compute dtype."""
    keep = (stored == torch.bfloat16 and compute == torch.float32 and torch.device(device).type == "cpu"
            and cpu_kernels.packable(2 * cfg.moe_intermediate_size, cfg.hidden_size) and cpu_kernels.available())
    return torch.bfloat16 if keep else compute


# How an ``Experts`` module runs its two grouped projections (``Experts.prepare_``), each one call per layer:
PANELS = "panels"  # fp32 activations, bf16 weights packed in panels: the native kernel (fp32 compute; AVX-512 or AVX2)
BF16_DOT = "bf16-dot"  # bf16 activations and weights: the native AVX512-BF16 kernel (bf16 compute on CPU)
AMX = "amx"  # bf16 on AMX tiles, experts with few rows on the AVX512-BF16 kernel, in one native call
GROUPED_MM = "grouped-mm"  # torch's grouped GEMM: CUDA, and every other dtype or CPU

# With AMX, the tile kernel is 1.5-6x the dot kernel from 8 rows per expert on the real model's shapes, and
# as fast at 4 (docs/performance.md "CPU kernels"); at 1-2 rows the dot kernel streams the weights a little
# faster. The choice is per expert by its row count, so an expert's rows take the same kernel in process and
# on a shard.
AMX_MIN_ROWS = 3


def grouped_mm(x_SK, w_GNK, offsets_G1) -> torch.Tensor:
    """torch's grouped GEMM, y = x[rows of g] @ w[g].T, in x's dtype (offsets: int64 [G + 1] from 0). Where
    torch has no grouped kernel for the dtype (fp32 on CUDA in some versions), one batched GEMM over the
    groups' rows padded to the longest group: still one call per projection."""
    mm = getattr(nn.functional, "grouped_mm", None) or torch._grouped_mm  # public from torch 2.10
    key = (x_SK.device.type, x_SK.dtype)
    if key not in _NO_GROUPED_MM:
        try:
            return mm(x_SK, w_GNK.transpose(1, 2), offs=offsets_G1[1:].to(torch.int32))
        except (RuntimeError, NotImplementedError):
            _NO_GROUPED_MM.add(key)
    counts = offsets_G1.diff()
    group = torch.repeat_interleave(torch.arange(len(counts), device=x_SK.device), counts)
    row = torch.arange(x_SK.shape[0], device=x_SK.device) - offsets_G1[group]
    padded = x_SK.new_zeros(len(counts), int(counts.max()), x_SK.shape[1])
    padded[group, row] = x_SK
    return torch.bmm(padded, w_GNK.transpose(1, 2))[group, row]


_NO_GROUPED_MM: set = set()  # (device type, dtype) pairs torch's grouped GEMM refused


def _grouped(x_TH, ids_TK, experts: "Experts"):
    """Every (token, slot) with a local expert through its expert: (outputs in expert order [S, H] in the
    model dtype, the output row of each (token, slot) (S for another process's), S)."""
    xs_SH, offsets_G1, row_of_slot, S = ops.moe_align(ids_TK, experts.count, x_TH)
    if S == 0:
        return x_TH.new_empty(0, x_TH.shape[1]), row_of_slot, 0
    gate, up = experts.project(xs_SH, offsets_G1, experts.gate_up_proj).chunk(2, dim=-1)
    return experts.project(ops.gelu_mul(gate, up), offsets_G1, experts.down_proj), row_of_slot, S


def grouped_experts(x_TH, ids_TK, weights_TK, experts: "Experts") -> torch.Tensor:
    """Σ_k w[t,k] · expert_{ids[t,k]}(x[t]) in fp32 [T, H]. ids are local expert ids; -1 marks a slot that
    belongs to another process and is skipped."""
    ys_SH, row_of_slot, S = _grouped(x_TH, ids_TK, experts)
    return ops.moe_combine(ys_SH, weights_TK, row_of_slot, S)


def expert_outputs(x_TH, ids_TK, experts: "Experts") -> torch.Tensor:
    """What a shard returns: expert_{ids[t,k]}(x[t]) for every (token, slot) with a local expert (id >= 0), in
    the model dtype, in row-major (token, slot) order. The front-end sums them as ``grouped_experts`` does."""
    ys_SH, row_of_slot, S = _grouped(x_TH, ids_TK, experts)
    return ys_SH.index_select(0, row_of_slot[row_of_slot < S])  # an index_select: 1/3 of a ys[rows]'s time


class Experts(nn.Module):
    """The routed experts ``[first, first + count)`` of one layer, with the checkpoint's shapes.

    ``prepare_(compute dtype)`` picks, once the weights are loaded, how the two grouped projections run
    (``path``: ``PANELS``, ``BF16_DOT``, ``AMX`` or ``GROUPED_MM``); for ``PANELS`` it repacks each expert's matrices
    into the native kernel's panel order (same shapes and bytes, so slices by expert and byte counts keep
    their meaning), and ``unpacked`` gives them back in the checkpoint's order."""

    def __init__(self, cfg: ModelConfig, first: int = 0, count: int | None = None):
        super().__init__()
        count = cfg.num_experts - first if count is None else count
        H, I = cfg.hidden_size, cfg.moe_intermediate_size
        self.first, self.count = first, count
        self.holds_all = first == 0 and count == cfg.num_experts  # every id the router gives is local
        self.gate_up_proj = nn.Parameter(torch.empty(count, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(count, H, I))
        self.path = GROUPED_MM

    def prepare_(self, compute: torch.dtype) -> "Experts":
        """Choose the projections' path for a model computing in ``compute`` (and pack for it)."""
        w = self.gate_up_proj
        (I2, H), I = w.shape[1:], self.down_proj.shape[2]
        if self.path != GROUPED_MM or w.device.type != "cpu" or w.dtype != torch.bfloat16:
            return self
        if compute == torch.float32 and cpu_kernels.packable(I2, H) and cpu_kernels.available():
            with torch.no_grad():
                self.gate_up_proj.data = cpu_kernels.pack_panels(self.gate_up_proj.data)
                self.down_proj.data = cpu_kernels.pack_panels(self.down_proj.data)
            self.path = PANELS
        elif compute == torch.bfloat16 and cpu_kernels.dot_shapes(I2, H) and cpu_kernels.dot_shapes(H, I):
            if cpu_kernels.amx_shapes(I2, H) and cpu_kernels.amx_shapes(H, I) and cpu_kernels.amx_available():
                self.path = AMX
            elif cpu_kernels.bf16_dot_available():
                self.path = BF16_DOT
        return self

    def project(self, x_SK, offsets_G1, w_GNK) -> torch.Tensor:
        """x[rows of g] @ w[g].T for every expert g in one call (rows offsets[g] .. offsets[g + 1]), in the
        model dtype."""
        if self.path == PANELS:
            return cpu_kernels.grouped_linear(x_SK, offsets_G1, w_GNK, check=False)
        if self.path == BF16_DOT:
            return cpu_kernels.grouped_linear_bf16(x_SK, offsets_G1, w_GNK, check=False)
        if self.path == AMX:
            return cpu_kernels.grouped_linear_amx(x_SK, offsets_G1, w_GNK, AMX_MIN_ROWS, check=False)
        return grouped_mm(x_SK, w_GNK, offsets_G1)

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up_proj, down_proj) in the checkpoint's order."""
        if self.path != PANELS:
            return self.gate_up_proj, self.down_proj
        return tuple(cpu_kernels.unpack_panels(t) for t in (self.gate_up_proj, self.down_proj))

    def forward(self, x_TH, ids_TK, weights_TK):
        """ids are global expert ids; slots outside this range contribute nothing."""
        if self.holds_all:  # ids are local ids already: no remap (five tensor ops a layer at decode)
            return grouped_experts(x_TH, ids_TK, weights_TK, self)
        local = ids_TK - self.first
        local = torch.where((local >= 0) & (local < self.count), local, -1)
        return grouped_experts(x_TH, local, weights_TK, self)
