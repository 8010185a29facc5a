"""The native bf16-weight CPU kernel and the bf16 expert storage built on it (actors/model/cpu_kernels.py)."""

from __future__ import annotations

import pytest
import torch

from epserve.actors.model import cpu_kernels
from epserve.actors.model.loader import load_model
from epserve.actors.model.moe import KERNEL_ROWS, expert_dtype

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler or no AVX2 on this machine")


@pytest.mark.parametrize("M, N, K", [(1, 1408, 2816), (2, 64, 704), (3, 64, 704), (4, 13, 72), (5, 33, 96),
                                     (7, 100, 64), (16, 9, 130)])
def test_bf16_linear_equals_fp32_math(M, N, K):
    g = torch.Generator().manual_seed(M * N + K)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g).to(torch.bfloat16)
    ref = (x.double() @ w.double().T).float()
    y = cpu_kernels.bf16_linear(x, w)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    # fp32 accumulation over K terms of size ~1: a few ulps of sqrt(K)
    assert (y - ref).abs().max().item() <= 1e-5 * K**0.5


def test_bf16_linear_is_batch_invariant_and_takes_strided_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 2 * 256, generator=g)[:, :256]  # rows with a stride of 512
    w = torch.randn(96, 256, generator=g).to(torch.bfloat16)
    together = cpu_kernels.bf16_linear(x, w)
    for i in range(12):  # a row's result does not depend on the rows beside it (nor on the thread count)
        assert torch.equal(cpu_kernels.bf16_linear(x[i : i + 1], w)[0], together[i])
    torch.set_num_threads(1)
    try:
        assert torch.equal(cpu_kernels.bf16_linear(x, w), together)
    finally:
        torch.set_num_threads(2)


def test_bf16_linear_refuses_wrong_dtypes():
    with pytest.raises(ValueError, match="fp32 x"):
        cpu_kernels.bf16_linear(torch.zeros(2, 8, dtype=torch.bfloat16), torch.zeros(3, 8, dtype=torch.bfloat16))


def test_bf16_experts_give_the_fp32_experts_logits(tiny_dir, tiny_model, tools):
    """The tiny checkpoint is bf16 on disk: holding its experts as bf16 (kernel for few rows, widened GEMM for
    many) must give the logits of widened fp32 experts within the parity tolerance."""
    assert tiny_model.layers[0].experts.gate_up_proj.dtype == torch.bfloat16
    assert expert_dtype(torch.float32, torch.float32, "cpu") == torch.float32  # fp32 on disk stays fp32
    wide = load_model(tiny_dir)
    for layer in wide.layers:
        layer.experts.gate_up_proj.data = layer.experts.gate_up_proj.data.float()
        layer.experts.down_proj.data = layer.experts.down_proj.data.float()
    for T in (3, 5 * KERNEL_ROWS):  # few rows per expert (kernel) and many (widened GEMM)
        ids = tools.random_ids(tiny_model.cfg.vocab_size, T, seed=T)
        tools.assert_parity(tools.our_logits(wide, ids), tools.our_logits(tiny_model, ids), f"T={T}")
