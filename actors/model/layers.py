"""Building blocks shared by every part of the model: RMSNorm (torch), linear layers, tanh-GELU, rotary
embedding.

Shape legend used across the model package: T tokens of the step, H hidden size, D head dim, N heads.
"""

from __future__ import annotations


import torch
from torch import nn

from . import cpu_kernels


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Gemma 4 RMSNorm: fp32 inside, eps inside the root, ``x̂ · w`` (not ``1 + w``), cast back."""
    x32 = x.float()
    y = x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def _onednn_serves(w: torch.Tensor) -> bool:
    return w.dtype in (torch.float32, torch.bfloat16) and w.is_contiguous() and torch.backends.mkldnn.is_available()


def derived(w: torch.Tensor, name: str, make):
    """``make(w)``, computed once per weight and kept on the weight itself (it lives and dies with it), made
    again when the weight changes: a reordered or widened copy of a long-lived weight."""
    key = (w._version, w.data_ptr())
    hit = getattr(w, name, None)
    if hit is None or hit[0] != key:
        with torch.inference_mode(False):
            hit = (key, make(w.detach()))
        setattr(w, name, hit)
    return hit[1]


def _onednn_weight(w: torch.Tensor):
    """A weight reordered once into oneDNN's blocked layout, or None where oneDNN does not serve it."""
    if not _onednn_serves(w):
        return None
    return derived(w, "_onednn", lambda t: torch.ops.mkldnn._reorder_linear_weight(t, 64))


ONEDNN_ROWS = 32  # above this many rows, a weight without a reordered copy also goes through oneDNN
# At most this many rows (a decode step), a long-lived bf16 weight goes through the AMX kernel
# (kernels/bf16_amx.c, the weight as the checkpoint stores it): on the `bench` preset's projections and head it
# took 0.46-0.96x oneDNN's time from 1 to 128 rows on a 2-core Xeon (weights streamed from memory; at 1-2 rows
# the AVX512-BF16 dot kernel, 0.52-0.62x). Above it oneDNN, which reached 1.9-2.0 TFLOP/s on a prefill chunk
# where that kernel made 1.3 on another Xeon (docs/performance.md, "CPU kernels").
AMX_ROWS = 128


def _amx_serves(rows: torch.Tensor, w: torch.Tensor) -> bool:
    return (rows.shape[0] <= AMX_ROWS and rows.dtype == torch.bfloat16 and rows.stride(-1) == 1
            and rows.stride(0) % 2 == 0 and derived(w, "_amx", _amx_weight))


def _amx_weight(w: torch.Tensor) -> bool:
    """Whether the AMX kernel takes this weight (checked once per weight: ``derived``)."""
    return (w.dtype == torch.bfloat16 and w.dim() == 2 and w.is_contiguous() and cpu_kernels.amx_shapes(*w.shape)
            and cpu_kernels.amx_available())


def linear(x: torch.Tensor, w: torch.Tensor, pack: bool = False) -> torch.Tensor:
    """x @ w.T over the last dim of x, in x's dtype, by the fastest path measured on this CPU
    (docs/performance.md, "CPU kernels"):

    * ``pack`` (a long-lived weight: the model's projections and the tied head) on CPU: in bf16 at up to
      ``AMX_ROWS`` rows on a CPU with AMX, the native AMX kernel; else oneDNN with the weight reordered once
      into its blocked layout, 1.1-1.7x faster than BLAS from 16 to 2048 rows in fp32, up to 1.2x
      ``F.linear`` at decode in bf16;
    * a transient weight (an expert's matrix, widened from bf16 for a prefill): oneDNN on the plain weight
      above ``ONEDNN_ROWS`` rows (1.15-1.4x BLAS at 64-256 rows), else (w @ x.T).T, which with this torch's
      MKL streams the weight and packs the small activation side, 1.2-2.5x faster than x @ w.T;
    * GPUs: the plain form."""
    if x.device.type != "cpu":
        return nn.functional.linear(x, w)
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if pack and _amx_serves(rows, w):
        out = cpu_kernels.linear_amx(rows, w)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], w.shape[0])
    onednn = _onednn_weight(w) if pack else (w if rows.shape[0] > ONEDNN_ROWS and _onednn_serves(w) else None)
    if onednn is not None:
        out = torch.ops.mkldnn._linear_pointwise(rows.contiguous(), onednn, None, "none", [], "")
    else:
        out = (w @ rows.T).T.contiguous()
    return out.view(*x.shape[:-1], w.shape[0])


class Linear(nn.Linear):
    """A bias-free ``nn.Linear`` (same parameter name, ``weight``) computed with ``linear``."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, pack=True)


class JointLinears:
    """Linears that read the same input (q/k/v, the dense MLP's gate and up) run as one GEMM over a joint
    weight whose row blocks are their weights (the same values and names, no second copy): the loader reads
    each weight into its block of one tensor (``blocks``, then ``adopt``); ``join`` does the same for weights
    already in place. One call instead of two or three: at decode on a CPU each call has a fixed cost (~20 us)
    near the GEMM's own. Until joined (a model built in place), or if a weight is replaced later, each linear
    runs alone."""

    def __init__(self, *linears: Linear | None):
        self.linears = [m for m in linears if m is not None]
        self.sizes = [m.out_features for m in self.linears]
        self.joint, self.views = None, []

    def blocks(self, dtype, device) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """A joint weight, uninitialised, and its row block for each linear's weight (in order)."""
        joint = torch.empty(sum(self.sizes), self.linears[0].in_features, dtype=dtype, device=device)
        return joint, joint.split(self.sizes)

    def adopt(self, joint: torch.Tensor) -> None:
        """Run as one GEMM over ``joint``, whose row blocks the linears' weights now are."""
        self.joint, self.views = joint, [m.weight.data_ptr() for m in self.linears]

    def join(self) -> None:
        """Copy the weights into one joint tensor and re-point each at its block."""
        with torch.no_grad():
            joint, blocks = self.blocks(self.linears[0].weight.dtype, self.linears[0].weight.device)
            for m, block in zip(self.linears, blocks):
                m.weight.data = block.copy_(m.weight.detach())
        self.adopt(joint)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each linear's output, as views of the joint output where joined."""
        if self.joint is None or [m.weight.data_ptr() for m in self.linears] != self.views:
            return [m(x) for m in self.linears]
        return list(linear(x, self.joint, pack=True).split(self.sizes, dim=-1))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.gelu(x, approximate="tanh")


def rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin [T, D] for rotate-half RoPE, computed in fp32 then cast to the model dtype (as transformers)."""
    angles = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class RopeTable:
    """``rope_tables`` of one attention kind, on a CPU gathered from a table of every position up to the
    furthest seen (grown in powers of two up to ``MAX_POSITIONS``, per dtype): one ``index_select`` each for cos
    and sin, 8 us a decode step against 92 us to compute them (the full layers' 512 dims at batch 64). Each
    entry is an elementwise function of its position alone, and the table's entries equal those computed for
    the step's positions bit for bit (checked for both kinds of the released model, fp32 and bf16, over 70k
    positions). On a GPU, and beyond the table, they are computed: no host sync for a position's maximum."""

    MAX_POSITIONS = 8192  # at most 8192 x 512 x 2 numbers a kind and dtype (32 MB in fp32)

    def __init__(self, inv_freq: torch.Tensor):
        self.inv_freq, self.tables = inv_freq, {}

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype):
        if positions.device.type != "cpu" or not len(positions):
            return rope_tables(self.inv_freq, positions, dtype)
        furthest = int(positions.max())
        if furthest >= self.MAX_POSITIONS:
            return rope_tables(self.inv_freq, positions, dtype)
        table = self.tables.get(dtype)
        if table is None or len(table[0]) <= furthest:
            size = min(max(1024, 1 << furthest.bit_length()), self.MAX_POSITIONS)
            table = self.tables[dtype] = rope_tables(self.inv_freq, torch.arange(size), dtype)
        return table[0].index_select(0, positions), table[1].index_select(0, positions)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, N, D]; pairs (i, i + D/2) rotate; zero frequencies leave their dims unchanged."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
