"""MicroAdam's Triton kernels (``*_triton``) against their PyTorch twins beside them.

Without a GPU the kernels run under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so sizes stay small; the ``gpu`` tests repeat the comparisons on CUDA at
realistic sizes.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

import hf_compressed_optim as hco  # noqa: E402
from hf_compressed_optim.kernels import dispatch as K  # noqa: E402
from hf_compressed_optim.kernels import error_feedback as EF  # noqa: E402
from hf_compressed_optim.kernels import quant4 as Q, topk as TK, window_adam as WA  # noqa: E402
from hf_compressed_optim.kernels.layout import TopKLayout  # noqa: E402

from _numerics import bf16_ceil, bf16_floor  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [1, 7, 63, 65, 1037]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(n, dtype=torch.float32, seed=0, device="cpu", scale=1.0):
    x = torch.randn(n, generator=_gen(seed)) * scale
    return x.to(device=device, dtype=dtype)


def _qstate(n, bucket, device="cpu", seed=0, random=True):
    """(codes, mins, maxs) buffers; random but valid (min <= max) when ``random``."""
    nbq = -(-n // bucket)
    g = _gen(seed)
    if not random:
        return (torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device),
                torch.zeros(nbq, dtype=torch.bfloat16, device=device),
                torch.zeros(nbq, dtype=torch.bfloat16, device=device))
    codes = torch.randint(0, 256, ((n + 1) // 2,), generator=g, dtype=torch.uint8)
    lo = -torch.rand(nbq, generator=g)
    hi = torch.rand(nbq, generator=g)
    hi[::5] = lo[::5]  # some constant buckets
    return (codes.to(device), bf16_floor(lo).to(device), bf16_ceil(hi).to(device))


def _clone(ts):
    return [t.clone() for t in ts]


def _assert_equal_all(a, b):
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y), (x, y)


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 numbers around |x| (fp32)."""
    e = torch.frexp(x.float().abs().clamp_min(2.0 ** -126)).exponent
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), e - 8)


def _assert_params_close(a: torch.Tensor, b: torch.Tensor):
    """fp32: tight relative tolerance (sqrt of the CPU twin is not correctly rounded, summation
    order may differ); bf16/fp16: at most one ulp of the storage dtype."""
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-8)
    elif a.dtype == torch.bfloat16:
        assert bool(((a.float() - b.float()).abs() <= _bf16_ulp(b)).all())
    else:
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -10, atol=2 ** -24)


def _window(layout: TopKLayout, window: int, seed=0, device="cpu", vdtype=torch.bfloat16):
    """A plausible ring: every row holds valid block top-k indices of random data."""
    g = _gen(seed)
    idx = torch.stack([TK.block_topk(torch.randn(layout.numel, generator=g), layout)
                       for _ in range(window)]) if layout.k else \
        torch.zeros(window, 0, dtype=torch.int16)
    vals = torch.randn(window, layout.k, generator=g).to(vdtype)
    return idx.to(device), vals.to(device)


# --------------------------------------------------------------------------------------------
# quantizer
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,bucket", [(1, 16), (7, 16), (63, 16), (65, 16), (1037, 64),
                                      (1037, 62), (130, 2), (5000, 4098)])
def test_quantize_dequantize_match_twin(n, bucket, dtype):
    x = _randn(n, dtype, seed=n + bucket, scale=3.0)
    a, b = _qstate(n, bucket, random=False), _qstate(n, bucket, random=False)
    Q.quantize4_triton(x, bucket, *a)
    Q.quantize4(x, bucket, *b)
    _assert_equal_all(a, b)
    assert torch.equal(Q.dequantize4_triton(*a, n, bucket), Q.dequantize4(*b, n, bucket))


def test_quantize_constant_and_zero_buckets():
    n, bucket = 100, 16
    x = _randn(n, seed=3)
    x[16:32] = 0.75  # constant bucket (bf16-representable: min == max, step 0)
    x[32:48] = 0.0   # all-zero bucket
    x[96:] = -2.5    # constant partial tail bucket
    a, b = _qstate(n, bucket, random=False), _qstate(n, bucket, random=False)
    Q.quantize4_triton(x, bucket, *a)
    Q.quantize4(x, bucket, *b)
    _assert_equal_all(a, b)
    codes = a[0]
    assert int(codes[8:24].abs().sum()) == 0 and int(codes[48:].sum()) == 0
    deq = Q.dequantize4_triton(*a, n, bucket)
    assert torch.equal(deq, Q.dequantize4(*b, n, bucket))
    assert torch.equal(deq[32:48], torch.zeros(16))
    assert torch.equal(deq[96:], torch.full((4,), -2.5))


def test_quantize_nibble_order_and_bounds():
    x = torch.tensor([0.0, 15.0, 15.0, 0.0, 7.0])  # one bucket, min 0, max 15: step 1
    codes = torch.zeros(3, dtype=torch.uint8)
    mins = torch.zeros(1, dtype=torch.bfloat16)
    maxs = torch.zeros(1, dtype=torch.bfloat16)
    Q.quantize4_triton(x, 6, codes, mins, maxs)
    assert codes.tolist() == [0x0F, 0xF0, 0x70]  # element 2i in the high nibble, odd n padded
    # min and max rounded to the nearest bf16 (as the twin's copy_), not outward
    x = torch.tensor([-1.0 - 2 ** -9, 1.0 + 2 ** -9])
    Q.quantize4_triton(x, 2, codes[:1], mins, maxs)
    assert float(mins) == -1.0 and float(maxs) == 1.0  # inward here: directed rounding was not


def test_quantize_fp32_stats_and_noncontiguous():
    n, bucket = 301, 16
    base = _randn(2 * n, seed=5).view(n, 2)
    x = base[:, 1]  # strided input
    nbq = -(-n // bucket)
    big = torch.zeros(2, (n + 1) // 2, dtype=torch.uint8)
    stats = torch.zeros(2, nbq, 2, dtype=torch.float32)
    Q.quantize4_triton(x, bucket, big[1], stats[0, :, 0], stats[1, :, 1])  # strided outputs
    b = (torch.zeros((n + 1) // 2, dtype=torch.uint8), torch.zeros(nbq), torch.zeros(nbq))
    Q.quantize4(x, bucket, *b)  # fp32 stats: exact min/max, no bf16 rounding
    assert torch.equal(big[1], b[0]) and int(big[0].sum()) == 0
    assert torch.equal(stats[0, :, 0], b[1]) and torch.equal(stats[1, :, 1], b[2])
    assert int(stats[0, :, 1].abs().sum()) == 0
    got = Q.dequantize4_triton(big[1], stats[0, :, 0], stats[1, :, 1], n, bucket)
    assert torch.equal(got, Q.dequantize4(*b, n, bucket))


# --------------------------------------------------------------------------------------------
# block top-k, gather, scatter
# --------------------------------------------------------------------------------------------
def _check_topk(x, layout):
    got = TK.block_topk_triton(x, layout)
    want = TK.block_topk(x, layout)
    assert got.dtype == torch.int16 and torch.equal(got, want)
    g = TK.gather_block_values_triton(x, got, layout)
    assert g.dtype == torch.float32 and torch.equal(g, TK.gather_block_values(x, want, layout))
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("block,density", [(64, 0.1), (128, 0.3), (256, 1.0)])
def test_block_topk_gather_match_twin(n, block, density, dtype):
    x = _randn(n, dtype, seed=n * 7 + block)
    _check_topk(x, TopKLayout.create(n, block, density))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_topk_ties(dtype):
    n, block = 700, 128
    g = _gen(11)
    cases = [
        torch.randint(-3, 4, (n,), generator=g).float(),              # heavy ties, both signs
        torch.full((n,), -1.5),                                      # everything tied
        torch.where(torch.rand(n, generator=g) < 0.5, 2.0, -2.0),     # |x| all tied, signs differ
        torch.zeros(n).index_fill_(0, torch.arange(0, n, 9), 1.0),   # ties above and at zero
    ]
    x = torch.randn(n, generator=g)
    x[::2] = 0.0
    x[1::4] = -0.0  # +0 / -0 tie
    x[5::50] = 2 ** -140  # subnormals
    x[7::60] = float("inf")
    cases.append(x)
    for density in (0.05, 0.25):
        layout = TopKLayout.create(n, block, density)
        for c in cases:
            _check_topk(c.to(dtype), layout)


@pytest.mark.parametrize("xdtype", DTYPES)
@pytest.mark.parametrize("vdtype", [torch.float32, torch.bfloat16, torch.float64])
def test_scatter_matches_twin(xdtype, vdtype):
    n = 1037
    layout = TopKLayout.create(n, 128, 0.1)
    x = _randn(n, xdtype, seed=2)
    idx = TK.block_topk(_randn(n, seed=9), layout)
    vals = _randn(layout.k, vdtype, seed=4, scale=5.0)
    for v in (vals, 0.0, 1.2345678):
        a, b = x.clone(), x.clone()
        TK.scatter_block_values_triton(a, idx, v, layout)
        TK.scatter_block_values(b, idx, v, layout)
        assert torch.equal(a, b)


def test_gather_scatter_noncontiguous():
    n = 300
    layout = TopKLayout.create(n, 64, 0.2)
    base = _randn(2 * n, seed=1).view(n, 2)
    x = base[:, 0]
    idx_rows = torch.stack([TK.block_topk(_randn(n, seed=3), layout)] * 2, dim=1)  # [k, 2]
    idx = idx_rows[:, 1]
    assert not x.is_contiguous() and not idx.is_contiguous()
    assert torch.equal(TK.gather_block_values_triton(x, idx, layout),
                       TK.gather_block_values(x, idx, layout))
    vals = _randn(layout.k, seed=8)
    want = x.clone()
    TK.scatter_block_values(want, idx, vals, layout)
    TK.scatter_block_values_triton(x, idx, vals, layout)
    assert torch.equal(base[:, 0], want) and torch.equal(base[:, 1], _randn(2 * n, seed=1)[1::2])


def test_topk_2d_input_and_large_block_fallback():
    x = _randn(33 * 17, seed=6).view(33, 17)
    _check_topk(x, TopKLayout.create(x.numel(), 128, 0.1))
    layout = TopKLayout.create(70000, 70000, 0.0001)  # beyond MAX_TOPK_TILE: twin fallback
    y = _randn(70000, seed=7)
    assert torch.equal(TK.block_topk_triton(y, layout), TK.block_topk(y, layout))


# --------------------------------------------------------------------------------------------
# window Adam update
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pdtype", DTYPES)
@pytest.mark.parametrize("n,block,density,window,step", [
    (1, 64, 0.1, 3, 1), (7, 64, 0.5, 3, 2), (65, 64, 0.1, 4, 7), (1037, 128, 0.1, 5, 3),
    (1000, 256, 0.05, 4, 11)])
def test_window_adam_update_matches_twin(n, block, density, window, step, pdtype):
    layout = TopKLayout.create(n, block, density)
    idx, vals = _window(layout, window, seed=n + step)
    p = _randn(n, pdtype, seed=step)
    wd = 0.1 if step % 2 else 0.0
    a, b = p.clone(), p.clone()
    WA.window_adam_update_triton(a, idx, vals, layout, step, 0.9, 0.999, 1e-8, 1e-3, wd)
    WA.window_adam_update(b, idx, vals, layout, step, 0.9, 0.999, 1e-8, 1e-3, wd)
    _assert_params_close(a, b)
    assert not torch.equal(a, p) or n == 1  # something moved


@pytest.mark.parametrize("pdtype", DTYPES)
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_window_adam_update_dense_term_matches_twin(pdtype, wd):
    """MicroAdam's alpha variant: a dense fp32 term added to the update before the rounding."""
    n, window, step = 1037, 4, 6
    layout = TopKLayout.create(n, 128, 0.1)
    idx, vals = _window(layout, window, seed=8)
    p = _randn(n, pdtype, seed=9)
    dense = _randn(n, seed=10) * 0.3
    a, b = p.clone(), p.clone()
    WA.window_adam_update_triton(a, idx, vals, layout, step, 0.9, 0.999, 1e-8, 1e-3, wd, None,
                         dense.clone())
    WA.window_adam_update(b, idx, vals, layout, step, 0.9, 0.999, 1e-8, 1e-3, wd, None,
                         dense.clone())
    _assert_params_close(a, b)
    c = p.clone()
    WA.window_adam_update(c, idx, vals, layout, step, 0.9, 0.999, 1e-8, 1e-3, wd)
    assert not torch.equal(a, c)  # the dense term moved every entry


def test_window_adam_update_fp32_values_persistent_loop_noncontiguous(monkeypatch):
    n, window, step = 33 * 17, 4, 6
    layout = TopKLayout.create(n, 64, 0.2)
    idx, vals = _window(layout, window, seed=1, vdtype=torch.float32)
    base = _randn(n, seed=2).view(17, 33)
    p = base.t()  # non-contiguous (33, 17)
    want = p.clone()
    WA.window_adam_update(want, idx, vals, layout, step, 0.8, 0.99, 1e-6, 1e-2, 0.05)
    monkeypatch.setattr(WA, "WINDOW_MAX_PROGRAMS", 3)  # 9 blocks over 3 programs
    WA.window_adam_update_triton(p, idx, vals, layout, step, 0.8, 0.99, 1e-6, 1e-2, 0.05)
    _assert_params_close(p, want)
    _assert_params_close(base.t(), want)


def test_window_adam_update_beta_zero_and_empty():
    n, window = 200, 3
    layout = TopKLayout.create(n, 64, 0.1)
    idx, vals = _window(layout, window, seed=5)
    a, b = _randn(n, seed=1), _randn(n, seed=1)
    WA.window_adam_update_triton(a, idx, vals, layout, 5, 0.0, 0.0, 1e-8, 0.1, 0.0)
    WA.window_adam_update(b, idx, vals, layout, 5, 0.0, 0.0, 1e-8, 0.1, 0.0)
    _assert_params_close(a, b)


def _sr_setup(n=2048, window=2, step=3):
    layout = TopKLayout.create(n, 512, 1.0)  # every entry updated
    idx, vals = _window(layout, window, seed=21)
    p = _randn(n, torch.bfloat16, seed=22)
    exact = p.float()  # the same update without rounding: the value SR must be unbiased about
    WA.window_adam_update_triton(exact, idx, vals, layout, step, 0.9, 0.999, 1e-8, 3e-3, 0.0)
    return layout, idx, vals, p, exact, step


def test_stochastic_rounding_deterministic_and_unbiased():
    layout, idx, vals, p, exact, step = _sr_setup()
    args = (idx, vals, layout, step, 0.9, 0.999, 1e-8, 3e-3, 0.0)
    outs = []
    for seed in range(24):
        q = p.clone()
        WA.window_adam_update_triton(q, *args, sr_seed=1000 + seed)
        outs.append(q.float())
    again = p.clone()
    WA.window_adam_update_triton(again, *args, sr_seed=1000)
    assert torch.equal(again.float(), outs[0])  # same seed, same result
    assert not torch.equal(outs[0], outs[1])  # different seed, different noise
    twin = p.clone()
    WA.window_adam_update(twin, *args, sr_seed=1000)
    assert torch.equal(twin.float(), outs[0])  # same position hash as the PyTorch twin
    s = torch.stack(outs)
    ulp = _bf16_ulp(exact)
    # every result is one of the two bf16 neighbours of the exact fp32 value
    lo = bf16_floor(exact).float()
    hi = bf16_ceil(exact).float()
    assert bool(((s == lo) | (s == hi)).all())
    err = (s - exact) / ulp  # in ulps; unbiased: mean ~ 0
    assert abs(float(err.mean())) < 0.02
    inexact = hi != lo
    assert int(inexact.sum()) > 0.9 * exact.numel()
    frac = ((exact - lo) / (hi - lo))[inexact]
    freq = (s == hi).float().mean(0)[inexact]
    assert float((freq - frac).abs().mean()) < 0.12  # round-up frequency tracks the fraction
    assert float((freq - frac).mean()) < 0.02


def test_stochastic_rounding_ignored_for_fp32():
    layout, idx, vals, p, exact, step = _sr_setup(n=512)
    args = (idx, vals, layout, step, 0.9, 0.999, 1e-8, 3e-3, 0.0)
    a, b = p.float(), p.float()
    WA.window_adam_update_triton(a, *args, sr_seed=7)
    WA.window_adam_update_triton(b, *args)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# error feedback compression (fused and composed paths)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gdtype", DTYPES)
@pytest.mark.parametrize("n,block,bucket", [
    (1, 64, 16), (7, 64, 16), (63, 64, 16), (65, 64, 16), (1037, 128, 16),  # fused
    (50, 128, 16), (561, 128, 32),                                            # fused, partial
    (1000, 100, 16), (129, 64, 6)])                                           # composed
def test_error_feedback_compress_matches_twin(n, block, bucket, gdtype):
    layout = TopKLayout.create(n, block, 0.1)
    assert (EF.fusable(layout, bucket) is None) == (block % bucket != 0 and n > block)
    sa = _qstate(n, bucket, seed=n)
    sb = _clone(sa)
    for step in range(2):
        g = _randn(n, gdtype, seed=100 * step + n)
        ia = torch.zeros(layout.k, dtype=torch.int16)
        ib = ia.clone()
        va = torch.zeros(layout.k, dtype=torch.bfloat16)
        vb = va.clone()
        g0 = g.clone()
        EF.error_feedback_compress_triton(g, *sa, bucket, layout, ia, va)
        EF.error_feedback_compress(g, *sb, bucket, layout, ib, vb)
        assert torch.equal(g, g0)  # gradient untouched
        _assert_equal_all(list(sa) + [ia, va], list(sb) + [ib, vb])


@pytest.mark.parametrize("n,block,bucket", [(65, 64, 16), (1000, 100, 16)])
def test_error_feedback_compress_keep_rounding_matches_twin(n, block, bucket):
    """EFCP's variant (the residual keeps a - stored value at the kept entries): the Triton
    version composes the single-op kernels and gives the twin's bits."""
    layout = TopKLayout.create(n, block, 0.1)
    sa = _qstate(n, bucket, seed=n)
    sb = _clone(sa)
    g = _randn(n, torch.float32, seed=n + 1)
    ia, va = torch.zeros(layout.k, dtype=torch.int16), torch.zeros(layout.k, dtype=torch.bfloat16)
    ib, vb = ia.clone(), va.clone()
    EF.error_feedback_compress_triton(g, *sa, bucket, layout, ia, va, keep_rounding=True)
    EF.error_feedback_compress(g, *sb, bucket, layout, ib, vb, keep_rounding=True)
    _assert_equal_all(list(sa) + [ia, va], list(sb) + [ib, vb])
    sc = _qstate(n, bucket, seed=n)  # and it differs from MicroAdam's (selected entries -> 0)
    EF.error_feedback_compress(g, *sc, bucket, layout, ib, vb)
    assert not all(torch.equal(x, y) for x, y in zip(sc, sb))


def test_error_feedback_compress_first_step_and_window_rows():
    """Zero state (first step), a 2-D gradient, outputs being non-contiguous window columns."""
    n, bucket = 33 * 17, 16
    layout = TopKLayout.create(n, 128, 0.1)
    g = _randn(n, torch.bfloat16, seed=3).view(33, 17)
    sa, sb = _qstate(n, bucket, random=False), _qstate(n, bucket, random=False)
    idx_a = torch.zeros(layout.k, 3, dtype=torch.int16)
    val_a = torch.zeros(layout.k, 3, dtype=torch.bfloat16)
    ib = torch.zeros(layout.k, dtype=torch.int16)
    vb = torch.zeros(layout.k, dtype=torch.bfloat16)
    EF.error_feedback_compress_triton(g, *sa, bucket, layout, idx_a[:, 1], val_a[:, 1])
    EF.error_feedback_compress(g, *sb, bucket, layout, ib, vb)
    _assert_equal_all(list(sa) + [idx_a[:, 1], val_a[:, 1]], list(sb) + [ib, vb])
    assert int(idx_a[:, 0].abs().sum()) == 0 and float(val_a[:, 2].abs().sum()) == 0.0


# --------------------------------------------------------------------------------------------
# edge cases, dispatch, end to end
# --------------------------------------------------------------------------------------------
def test_empty_inputs_are_noops():
    layout = TopKLayout.create(0, 64, 0.1)
    e = torch.zeros(0)
    codes = torch.zeros(0, dtype=torch.uint8)
    mm = torch.zeros(0, dtype=torch.bfloat16)
    Q.quantize4_triton(e, 16, codes, mm, mm.clone())
    assert Q.dequantize4_triton(codes, mm, mm, 0, 16).shape == (0,)
    assert TK.block_topk_triton(e, layout).shape == (0,)
    idx = torch.zeros(0, dtype=torch.int16)
    assert TK.gather_block_values_triton(e, idx, layout).shape == (0,)
    TK.scatter_block_values_triton(e, idx, 0.0, layout)
    WA.window_adam_update_triton(e, torch.zeros(3, 0, dtype=torch.int16),
                         torch.zeros(3, 0, dtype=torch.bfloat16), layout, 1, 0.9, 0.99, 1e-8,
                         1e-3, 0.0)
    EF.error_feedback_compress_triton(e, codes, mm, mm.clone(), 16, layout, idx,
                              torch.zeros(0, dtype=torch.bfloat16))


def test_dispatch_uses_triton_when_forced(monkeypatch):
    x = _randn(100, seed=1)
    monkeypatch.setenv(K.ENV_VAR, "triton")
    assert K.triton_available() and K.backend_for(x) == "triton"
    monkeypatch.setenv(K.ENV_VAR, "torch")
    assert K.backend_for(x) == "torch"


def _run_microadam(monkeypatch, backend, dtype, steps=5, sr=False):
    monkeypatch.setenv(K.ENV_VAR, backend)
    g = _gen(0)
    params = [torch.nn.Parameter(torch.randn(33, 17, generator=g).to(dtype)),
              torch.nn.Parameter(torch.randn(50, generator=g).to(dtype))]
    opt = hco.MicroAdam(params, lr=1e-2, density=0.1, topk_block_size=128, quant_block_size=16,
                        weight_decay=0.01, window_size=3, stochastic_rounding=sr)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        opt.step()
    return params, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_microadam_triton_matches_torch_backend(monkeypatch, dtype):
    pa, oa = _run_microadam(monkeypatch, "triton", dtype)
    pb, ob = _run_microadam(monkeypatch, "torch", dtype)
    for a, b in zip(pa, pb):
        sa, sb = oa.state[a], ob.state[b]
        assert torch.equal(sa["window_indices"], sb["window_indices"])
        assert torch.equal(sa["window_values"], sb["window_values"])
        assert torch.equal(sa["ef_codes"], sb["ef_codes"])
        _assert_params_close(a.detach(), b.detach())


# --------------------------------------------------------------------------------------------
# GPU: the same comparisons on CUDA tensors at realistic sizes
# --------------------------------------------------------------------------------------------
GPU_N = 1_000_003
GPU_BLOCK = 16384


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_quantize_dequantize(cuda_device, dtype):
    x = _randn(GPU_N, dtype, seed=1, device=cuda_device, scale=2.0)
    for bucket in (64, 62):
        a = _qstate(GPU_N, bucket, device=cuda_device, random=False)
        b = _qstate(GPU_N, bucket, random=False)
        Q.quantize4_triton(x, bucket, *a)
        Q.quantize4(x.cpu(), bucket, *b)
        _assert_equal_all([t.cpu() for t in a], b)
        assert torch.equal(Q.dequantize4_triton(*a, GPU_N, bucket).cpu(),
                           Q.dequantize4(*b, GPU_N, bucket))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_topk_gather_scatter(cuda_device, dtype):
    layout = TopKLayout.create(GPU_N, GPU_BLOCK, 0.01)
    x = _randn(GPU_N, dtype, seed=2, device=cuda_device)
    x = torch.round(x * 8) / 8  # plenty of exact ties
    idx = TK.block_topk_triton(x, layout)
    want = TK.block_topk(x.cpu(), layout)
    assert torch.equal(idx.cpu(), want)
    assert torch.equal(TK.gather_block_values_triton(x, idx, layout).cpu(),
                       TK.gather_block_values(x.cpu(), want, layout))
    vals = _randn(layout.k, torch.float32, seed=3, device=cuda_device)
    a, b = x.clone(), x.cpu()
    TK.scatter_block_values_triton(a, idx, vals, layout)
    TK.scatter_block_values(b, want, vals.cpu(), layout)
    assert torch.equal(a.cpu(), b)
    big = TopKLayout.create(GPU_N, 32768, 0.01)
    assert torch.equal(TK.block_topk_triton(x, big).cpu(), TK.block_topk(x.cpu(), big))


@pytest.mark.gpu
@pytest.mark.parametrize("pdtype", DTYPES)
def test_gpu_window_adam_update(cuda_device, pdtype, monkeypatch):
    layout = TopKLayout.create(GPU_N, GPU_BLOCK, 0.01)
    idx, vals = _window(layout, 10, seed=4, device=cuda_device)
    p = _randn(GPU_N, pdtype, seed=5, device=cuda_device)
    for step, cap in ((4, None), (23, 7)):  # partial ring; wrapped ring on 7 persistent programs
        monkeypatch.setattr(WA, "WINDOW_MAX_PROGRAMS", cap)
        a, b = p.clone(), p.clone()
        WA.window_adam_update_triton(a, idx, vals, layout, step, 0.9, 0.999, 1e-8, 1e-3, 0.1)
        WA.window_adam_update(b, idx, vals, layout, step, 0.9, 0.999, 1e-8, 1e-3, 0.1)
        _assert_params_close(a, b)
        c = p.clone()
        WA.window_adam_update_triton(c, idx, vals, layout, step, 0.9, 0.999, 1e-8, 1e-3, 0.1)
        assert torch.equal(a, c)  # deterministic


@pytest.mark.gpu
def test_gpu_stochastic_rounding(cuda_device):
    n = 1 << 20
    layout = TopKLayout.create(n, GPU_BLOCK, 1.0)
    idx, vals = _window(layout, 2, seed=6, device=cuda_device)
    p = _randn(n, torch.bfloat16, seed=7, device=cuda_device)
    exact = p.float()
    args = (idx, vals, layout, 3, 0.9, 0.999, 1e-8, 3e-3, 0.0)
    WA.window_adam_update_triton(exact, *args)
    a, b = p.clone(), p.clone()
    WA.window_adam_update_triton(a, *args, sr_seed=123)
    WA.window_adam_update_triton(b, *args, sr_seed=123)
    assert torch.equal(a, b)
    lo, hi = bf16_floor(exact).float(), bf16_ceil(exact).float()
    assert bool(((a.float() == lo) | (a.float() == hi)).all())
    assert abs(float(((a.float() - exact) / _bf16_ulp(exact)).mean())) < 0.01


@pytest.mark.gpu
@pytest.mark.parametrize("gdtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block,bucket", [(GPU_BLOCK, 64), (10000, 64), (32768, 128)])
def test_gpu_error_feedback_compress(cuda_device, gdtype, block, bucket):
    layout = TopKLayout.create(GPU_N, block, 0.01)
    sa = [t.to(cuda_device) for t in _qstate(GPU_N, bucket, seed=8)]
    sb = [t.cpu() for t in sa]
    for step in range(2):
        g = _randn(GPU_N, gdtype, seed=9 + step, device=cuda_device)
        ia = torch.zeros(layout.k, dtype=torch.int16, device=cuda_device)
        va = torch.zeros(layout.k, dtype=torch.bfloat16, device=cuda_device)
        ib, vb = ia.cpu(), va.cpu()
        EF.error_feedback_compress_triton(g, *sa, bucket, layout, ia, va)
        EF.error_feedback_compress(g.cpu(), *sb, bucket, layout, ib, vb)
        _assert_equal_all([t.cpu() for t in list(sa) + [ia, va]], list(sb) + [ib, vb])


@pytest.mark.gpu
def test_gpu_microadam_backends_agree(cuda_device, monkeypatch):
    results = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv(K.ENV_VAR, backend)
        g = torch.Generator(device=cuda_device).manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(1000, 1003, generator=g, device=cuda_device)),
                  torch.nn.Parameter(torch.randn(4097, generator=g, device=cuda_device))]
        opt = hco.MicroAdam(params, lr=1e-3, density=0.01, quant_block_size=64)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g, device=cuda_device)
            opt.step()
        results[backend] = (params, opt)
    (pa, oa), (pb, ob) = results["triton"], results["torch"]
    for a, b in zip(pa, pb):
        assert torch.equal(oa.state[a]["window_indices"], ob.state[b]["window_indices"])
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
