"""A GPU's costs: a roofline of the hardware table, derated by the rates measured on an H200, plus the host's
costs, fitted to the H200's measured decode steps (docs/gpu.md, ``bench`` preset, in-process engine).

What was fitted to which number (docs/planning.md compares the rest, held out):
* ``COMPUTE_EFFICIENCY``: the bf16 GEMM rate measured at 2048 rows (709 TFLOP/s) over the datasheet's 989;
* ``BANDWIDTH_EFFICIENCY``: the copy bandwidth measured (4251 GB/s, read + written) over the datasheet's 4.8 TB/s;
* ``host_layer_s`` and ``expert_group_s``, from the decode steps at batch 1 (7.37 ms) and batch 64 (13.60
  ms): the eager engine issues its kernels from Python, a fixed cost per layer, and the grouped GEMM costs
  more with each expert that has rows. Batch 8 (12.11 ms) and the end-to-end run (4723 tok/s) are held out.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from epserve.actors.model.config import FULL, ModelConfig

from .hardware import Gpu, Link, inter_node_link, intra_node_link

COMPUTE_EFFICIENCY = 709 / 989
BANDWIDTH_EFFICIENCY = 4251 / 4800
# docs/gpu.md: bench preset (2 layers), bf16, in-process engine, prompts of 128, median decode step
H200_DECODE_STEPS = {1: 7.37e-3, 8: 12.11e-3, 64: 13.60e-3}
H200_FIT_BATCHES = (1, 64)  # fitted; the others are held out
H200_END_TO_END = {"requests": 64, "prompt_len": 128, "output_len": 128, "output_tokens_per_s": 4723}


@dataclass
class HostCosts:
    host_layer_s: float = 0.0  # per layer per step, the front-end's Python issuing kernels
    expert_group_s: float = 0.0  # per expert with rows, per layer


class GpuDevice:
    kind = "gpu"
    cores = 1.0
    contention = 1.0

    def __init__(self, gpu: Gpu, cfg: ModelConfig, link: str = "ib400", host: HostCosts | None = None,
                 itemsize: int = 2):
        self.gpu, self.cfg, self.itemsize = gpu, cfg, itemsize
        self.flops = gpu.dense_bf16_flops * COMPUTE_EFFICIENCY
        self.bw = gpu.hbm_bw * BANDWIDTH_EFFICIENCY
        self.intra: Link = intra_node_link(gpu)
        self.inter: Link = inter_node_link(gpu, link)
        self.host = host if host is not None else fitted_host_costs()

    def _roof(self, flops: float, nbytes: float) -> float:
        return max(flops / self.flops, nbytes / self.bw)

    def gemm(self, rows, n, k):
        if rows == 0:
            return 0.0
        return self._roof(2 * rows * n * k, self.itemsize * (n * k + rows * (n + k)))

    def experts(self, slots, active, held):
        if slots == 0:
            return 0.0
        H, I = self.cfg.hidden_size, self.cfg.moe_intermediate_size
        weights = active * 3 * H * I
        return self._roof(2 * slots * 3 * H * I, self.itemsize * (weights + slots * (2 * H + 3 * I))) \
            + self.host.expert_group_s * active

    def attention(self, rows, keys, layer_kind):
        shape = self.cfg.full if layer_kind == FULL else self.cfg.sliding
        kv_bytes = 2 * shape.num_kv_heads * shape.head_dim * self.itemsize
        return self._roof(4 * keys * self.cfg.num_heads * shape.head_dim, keys * kv_bytes)

    def elementwise(self, tokens):
        return 20 * tokens * self.cfg.hidden_size * self.itemsize / self.bw  # norms, residuals, RoPE: ~20 passes

    def step_overhead(self, seqs, sampled):
        return self.host.host_layer_s * (self.cfg.num_layers + 1)  # the head and sampler count as one more

    def exchange(self, nbytes, messages, cross_node):
        if messages == 0:
            return 0.0
        latency = (1 - cross_node) * self.intra.latency_s + cross_node * self.inter.latency_s
        return latency + nbytes * ((1 - cross_node) / self.intra.bw + cross_node / self.inter.bw)


@cache
def fitted_host_costs() -> HostCosts:
    """Solve the two host costs so that the in-process engine's decode steps at the fitted batches match."""
    from epserve.cluster.fixtures.checkpoint import preset

    from .hardware import GPUS
    from .stepmodel import Layout, Row, StepModel

    cfg = preset("bench")

    def step(batch: int, host: HostCosts) -> float:
        device = GpuDevice(GPUS["H200"], cfg, host=host)
        return StepModel(cfg, Layout(shards=0), device).step([Row(128 + 16, 1)] * batch).seconds

    (b1, b2) = H200_FIT_BATCHES
    base = [step(b, HostCosts()) for b in (b1, b2)]
    per_layer = [step(b, HostCosts(1.0, 0.0)) - s for b, s in zip((b1, b2), base)]
    per_group = [step(b, HostCosts(0.0, 1.0)) - s for b, s in zip((b1, b2), base)]
    r1, r2 = (H200_DECODE_STEPS[b] - s for b, s in zip((b1, b2), base))
    det = per_layer[0] * per_group[1] - per_layer[1] * per_group[0]
    return HostCosts((r1 * per_group[1] - r2 * per_group[0]) / det, (per_layer[0] * r2 - per_layer[1] * r1) / det)
