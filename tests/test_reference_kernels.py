"""The PyTorch twins: quantizer bounds, packing, top-k semantics, error-feedback conservation."""

import math

import pytest
import torch

from hf_compressed_optim.kernels import error_feedback as EF, quant4 as Q, topk as TK
from hf_compressed_optim.kernels import window_adam as WA
from hf_compressed_optim.kernels.layout import TopKLayout, entries_per_block

from _numerics import bf16_half_ulp


def _buffers(n, bucket):
    nbq = -(-n // bucket)
    return (torch.empty((n + 1) // 2, dtype=torch.uint8), torch.empty(nbq, dtype=torch.bfloat16),
            torch.empty(nbq, dtype=torch.bfloat16))


@pytest.mark.parametrize("n,bucket", [(1, 2), (7, 4), (64, 64), (1000, 64), (1001, 64),
                                      (4097, 128), (70001, 64)])
def test_quantizer_error_at_most_half_a_step(n, bucket):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.logspace(-3, 1, n)[torch.randperm(n, generator=g)]
    codes, lo, hi = _buffers(n, bucket)
    Q.quantize4(x, bucket, codes, lo, hi)
    xh = Q.dequantize4(codes, lo, hi, n, bucket)
    step = Q.quant_scale(lo, hi).repeat_interleave(bucket)[:n]
    # min/max are the bucket's exact min/max rounded to the nearest bf16
    xb = torch.nn.functional.pad(x, (0, lo.numel() * bucket - n), value=float(x[-1])).view(-1, bucket)
    assert torch.equal(lo, xb.amin(1).bfloat16()) and torch.equal(hi, xb.amax(1).bfloat16())
    # half a step, plus half a bf16 ulp where the rounded range cuts off the extremes
    slack = torch.maximum(bf16_half_ulp(lo.float()), bf16_half_ulp(hi.float()))
    slack = slack.repeat_interleave(bucket)[:n]
    err = (xh - x).abs()
    assert torch.all(err <= (step / 2 + slack) * (1 + 1e-5)), float((err - step / 2).max())
    # the error is genuinely bounded by the step (not trivially zero)
    assert err.max() > 0


def test_requantizing_dequantized_values_does_not_drift():
    """Q(Q^-1(e)) must give back the same codes and range: the error buffer is re-quantized every
    step, and outward-rounded ranges grew a little each round (0.1% over 300 rounds)."""
    n, bucket = 4099, 64
    x = torch.randn(n, generator=torch.Generator().manual_seed(3)) * 3
    nbq = -(-n // bucket)
    codes = torch.empty((n + 1) // 2, dtype=torch.uint8)
    lo, hi = torch.empty(nbq, dtype=torch.bfloat16), torch.empty(nbq, dtype=torch.bfloat16)
    Q.quantize4(x, bucket, codes, lo, hi)
    first = Q.dequantize4(codes, lo, hi, n, bucket)
    xh = first
    for _ in range(300):
        Q.quantize4(xh, bucket, codes, lo, hi)
        xh = Q.dequantize4(codes, lo, hi, n, bucket)
    assert torch.equal(xh, first), float((xh - first).abs().max())


def test_quantizer_constant_bucket_exact_and_no_nan():
    x = torch.cat([torch.full((64,), 0.375), torch.zeros(64), torch.randn(64)])
    codes, lo, hi = _buffers(x.numel(), 64)
    Q.quantize4(x, 64, codes, lo, hi)
    xh = Q.dequantize4(codes, lo, hi, x.numel(), 64)
    assert torch.isfinite(xh).all()
    assert torch.equal(xh[:128], x[:128])
    assert torch.all(codes[:64] == 0)


def test_nibble_order_high_first():
    x = torch.tensor([0.0, 15.0, 15.0, 0.0, 15.0])  # codes 0, 15, 15, 0, 15 with lo=0 hi=15
    codes, lo, hi = _buffers(5, 6)
    Q.quantize4(x, 6, codes, lo, hi)
    assert codes.tolist() == [0x0F, 0xF0, 0xF0]


def _brute_topk(row, k):
    order = sorted(range(row.numel()), key=lambda i: (-abs(float(row[i])), i))
    return sorted(order[:k])


@pytest.mark.parametrize("n,block,density", [(1, 16, 0.5), (50, 16, 0.1), (64, 64, 0.05),
                                             (333, 64, 0.2), (1000, 128, 1.0)])
def test_block_topk_matches_brute_force_with_ties(n, block, density):
    g = torch.Generator().manual_seed(n)
    x = torch.randint(-6, 7, (n,), generator=g).float() * 0.25  # many ties, signs
    layout = TopKLayout.create(n, block, density)
    idx = TK.block_topk(x, layout)
    assert idx.dtype == torch.int16 and idx.numel() == layout.k
    pos = TK.absolute_indices(idx, layout)
    expected = []
    for b in range(layout.num_full):
        expected += [b * layout.block + i for i in
                     _brute_topk(x[b * layout.block:(b + 1) * layout.block], layout.k_full)]
    if layout.tail:
        start = layout.num_full * layout.block
        expected += [start + i for i in _brute_topk(x[start:], layout.k_tail)]
    assert pos.tolist() == expected
    assert torch.equal(TK.gather_block_values(x, idx, layout), x[pos])


def test_layout_geometry_and_int16_limit():
    assert entries_per_block(16384, 0.01) == 164
    assert entries_per_block(100, 0.01) == 1
    assert entries_per_block(100, 1.0) == 100
    n = 3 * 32768 + 1234  # > 65535 elements, full int16 range used
    layout = TopKLayout.create(n, 32768, 0.001)
    assert (layout.num_full, layout.tail) == (3, 1234)
    assert layout.k == 3 * 33 + 2
    x = torch.randn(n)
    x[32767] = 1e6  # the largest block-relative index must survive int16
    idx = TK.block_topk(x, layout)
    assert int(idx[:33].max()) == 32767
    pos = TK.absolute_indices(idx, layout)
    assert 32767 in pos.tolist() and pos.max() < n
    assert torch.equal(x[pos].abs() >= 0, torch.ones(layout.k, dtype=torch.bool))


def test_error_feedback_conserves_the_signal():
    """sum(selected) + dequantized residual == sum(gradients) up to the quantizer's bound."""
    n, bucket, steps = 777, 16, 12
    layout = TopKLayout.create(n, 128, 0.05)
    codes, lo, hi = _buffers(n, bucket)
    codes.zero_(), lo.zero_(), hi.zero_()
    g = torch.Generator().manual_seed(0)
    applied = torch.zeros(n, dtype=torch.float64)
    grads = torch.zeros(n, dtype=torch.float64)
    bound = torch.zeros(n, dtype=torch.float64)
    idx = torch.empty(layout.k, dtype=torch.int16)
    val = torch.empty(layout.k, dtype=torch.float32)  # fp32 row: isolates the quantizer error
    for _ in range(steps):
        grad = torch.randn(n, generator=g)
        EF.error_feedback_compress(grad, codes, lo, hi, bucket, layout, idx, val)
        applied.index_add_(0, TK.absolute_indices(idx, layout), val.double())
        grads += grad.double()
        bound += (Q.quant_scale(lo, hi).repeat_interleave(bucket)[:n] / 2).double()
    residual = Q.dequantize4(codes, lo, hi, n, bucket).double()
    gap = (applied + residual - grads).abs()
    assert torch.all(gap <= bound * (1 + 1e-4) + 1e-5)
    assert residual.abs().max() > 0.1  # the residual really carries signal


def test_stochastic_rounding_unbiased_and_seeded():
    x = torch.full((200000,), 1.0 + 2 ** -10)  # between two bf16 values
    r = WA.stochastic_round_bf16(x, 123).float()
    assert set(r.unique().tolist()) == {1.0, 1.0078125}
    assert math.isclose(r.double().mean().item(), 1.0 + 2 ** -10, rel_tol=0, abs_tol=3e-5)
    assert torch.equal(r, WA.stochastic_round_bf16(x, 123).float())
    assert not torch.equal(r, WA.stochastic_round_bf16(x, 124).float())
