"""The native CPU loops (``kernels/csrc``, issue #17) give the PyTorch twins' bits, and the
package works the same without them.

Every native op is compared with its twin, bit for bit, on random inputs (never zeros) with
ties, odd sizes, tails, partial windows, fp32 and bf16, and with one and two threads (the loops
split blocks over OpenMP threads); then whole optimizers with the native backend against
``HCO_KERNEL_BACKEND=torch``. The build itself is checked in a subprocess without a compiler.
"""

import math
import os
import subprocess
import sys

import pytest
import torch

import hf_compressed_optim as hco
from hf_compressed_optim.kernels import _native, dispatch as K
from hf_compressed_optim.kernels import error_feedback as EF, sparse_rows as SR, topk as TK
from hf_compressed_optim.kernels import window_adam as WA
from hf_compressed_optim.kernels.layout import TopKLayout

pytestmark = pytest.mark.skipif(_native.library() is None,
                                reason=f"native library unavailable: {_native.unavailable()}")

SIZES = [(1, 64), (7, 64), (1000, 256), (4097, 64), (40000, 16384)]  # 40000: blocks + tail


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _grad(n: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, generator=g)
    if n > 50:  # ties: shared magnitudes compete for the last places of the top-k
        x[::13] = x[5]
        x[1::29] = -x[5]
    return x.to(dtype)


def _error_buffer(n: int, bucket: int, stats: torch.dtype, g: torch.Generator):
    buckets = -(-n // bucket)
    codes = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8, generator=g)
    lo = torch.randn(buckets, generator=g)
    return codes, lo.to(stats), (lo + torch.rand(buckets, generator=g)).to(stats)


@pytest.mark.parametrize("n,block", SIZES)
@pytest.mark.parametrize("density", [0.01, 0.3, 1.0])
@pytest.mark.parametrize("bucket", [2, 64])
@pytest.mark.parametrize("keep_rounding", [False, True], ids=["microadam", "efcp"])
def test_compress_matches_twin(n, block, density, bucket, keep_rounding, torch_threads):
    g = _gen(n + bucket)
    layout = TopKLayout.create(n, block, density)
    for gdt, stats, vdt in [(torch.float32, torch.bfloat16, torch.bfloat16),
                            (torch.bfloat16, torch.float32, torch.float32)]:
        grad = _grad(n, gdt, g)
        buf = _error_buffer(n, bucket, stats, g)
        results = []
        for fn in (EF.error_feedback_compress, EF.error_feedback_compress_native):
            codes, mins, maxs = (t.clone() for t in buf)
            idx = torch.full((layout.k,), -1, dtype=torch.int16)
            vals = torch.full((layout.k,), 7.0, dtype=vdt)
            fn(grad, codes, mins, maxs, bucket, layout, idx, vals, keep_rounding)
            results.append((codes, mins, maxs, idx, vals))
        for want, got in zip(*results):
            assert torch.equal(want.view(torch.uint8), got.view(torch.uint8))
        assert EF.native_compress_applies(grad, *buf, bucket, layout, results[1][3],
                                          results[1][4])


def test_compress_non_finite_and_huge_values_match_twin():
    """NaN/inf reach the compression only through overflow; both paths still agree."""
    n, bucket = 4096, 64
    layout = TopKLayout.create(n, 1024, 0.05)
    g = _gen(1)
    grad = torch.randn(n, generator=g)
    grad[100], grad[2000], grad[3000:3010] = float("nan"), float("inf"), 3e38
    buf = _error_buffer(n, bucket, torch.bfloat16, g)
    results = []
    for fn in (EF.error_feedback_compress, EF.error_feedback_compress_native):
        codes, mins, maxs = (t.clone() for t in buf)
        idx = torch.zeros(layout.k, dtype=torch.int16)
        vals = torch.zeros(layout.k, dtype=torch.bfloat16)
        fn(grad, codes, mins, maxs, bucket, layout, idx, vals)
        results.append((mins, maxs, idx, vals))
    for want, got in zip(*results):  # NaN payloads aside, the same bits
        assert torch.equal(want.isnan(), got.isnan())
        assert torch.equal(want[~want.isnan()].view(torch.uint8),
                           got[~got.isnan()].view(torch.uint8))
    assert results[0][3].isnan().any() and results[0][3].isinf().any()  # both were selected


def test_compress_falls_back_to_twin_where_it_does_not_apply():
    """A bucket that straddles top-k blocks, or non-contiguous inputs: the twin runs."""
    g = _gen(2)
    layout = TopKLayout.create(1000, 100, 0.1)  # block 100 is no multiple of bucket 64
    grad = torch.randn(2000, generator=g)[::2]  # and strided
    buf = _error_buffer(1000, 64, torch.bfloat16, g)
    out = [torch.zeros(layout.k, dtype=torch.int16), torch.zeros(layout.k, dtype=torch.bfloat16)]
    assert not EF.native_compress_applies(grad, *buf, 64, layout, *out)
    results = []
    for fn in (EF.error_feedback_compress, EF.error_feedback_compress_native):
        codes, mins, maxs = (t.clone() for t in buf)
        idx, vals = (t.clone() for t in out)
        fn(grad, codes, mins, maxs, 64, layout, idx, vals)
        results.append((codes, mins, maxs, idx, vals))
    for want, got in zip(*results):
        assert torch.equal(want, got)


def _window(layout: TopKLayout, rows: int, vdt: torch.dtype, g: torch.Generator):
    idx = torch.stack([TK.block_topk(torch.randn(layout.numel, generator=g), layout)
                       for _ in range(rows)])
    return idx, torch.randn(rows, layout.k, generator=g).to(vdt)


@pytest.mark.parametrize("n,block", SIZES)
@pytest.mark.parametrize("step", [3, 11])  # 3: a partly filled window of 5 rows
@pytest.mark.parametrize("pdtype,sr", [(torch.float32, None), (torch.bfloat16, None),
                                       (torch.bfloat16, 1234)], ids=["fp32", "bf16", "bf16-sr"])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_window_update_matches_twin(n, block, step, pdtype, sr, wd, torch_threads):
    g = _gen(n + step)
    layout = TopKLayout.create(n, block, 0.2)
    idx, vals = _window(layout, 5, torch.bfloat16, g)
    p0 = torch.randn(n, generator=g).to(pdtype)
    want, got = p0.clone(), p0.clone()
    WA.window_adam_update(want, idx, vals, layout, step, 0.9, 0.999, 1e-8, 1e-2, wd, sr)
    WA.window_adam_update_native(got, idx, vals, layout, step, 0.9, 0.999, 1e-8, 1e-2, wd, sr)
    assert torch.equal(want.view(torch.int16 if pdtype == torch.bfloat16 else torch.int32),
                       got.view(torch.int16 if pdtype == torch.bfloat16 else torch.int32))
    assert not torch.equal(got, p0) or n == 1  # one bf16 element may not move


def test_window_update_bumps_the_version_counter():
    """Like an in-place torch op, so autograd notices a parameter changed under a saved graph."""
    g = _gen(7)
    layout = TopKLayout.create(300, 64, 0.2)
    idx, vals = _window(layout, 3, torch.bfloat16, g)
    p = torch.randn(300, generator=g)
    before = p._version
    WA.window_adam_update_native(p, idx, vals, layout, 3, 0.9, 0.999, 1e-8, 1e-2, 0.0)
    assert p._version > before


def test_window_update_dense_term_runs_the_twin():
    g = _gen(3)
    layout = TopKLayout.create(500, 64, 0.2)
    idx, vals = _window(layout, 3, torch.bfloat16, g)
    p0, dense = torch.randn(500, generator=g), torch.randn(500, generator=g)
    want, got = p0.clone(), p0.clone()
    WA.window_adam_update(want, idx, vals, layout, 4, 0.9, 0.999, 1e-8, 1e-2, 0.0, None,
                          dense.clone())
    WA.window_adam_update_native(got, idx, vals, layout, 4, 0.9, 0.999, 1e-8, 1e-2, 0.0, None,
                                 dense.clone())
    assert torch.equal(want, got)


def test_sqrt_rn_is_correctly_rounded():
    """The window update's root: fp32 rounded once, whatever torch's vectorised sqrt does."""
    x = torch.rand(4096, generator=_gen(4)) * torch.logspace(-30, 30, 4096)
    got = WA._sqrt_rn(x)
    want = torch.tensor([math.sqrt(v) for v in x.double().tolist()], dtype=torch.float64).float()
    assert torch.equal(got, want)


@pytest.mark.parametrize("n,block", SIZES)
@pytest.mark.parametrize("density", [0.01, 0.3, 1.0])
@pytest.mark.parametrize("vdt", [torch.bfloat16, torch.float32])
def test_sparse_rows_match_twin(n, block, density, vdt, torch_threads):
    g = _gen(n)
    layout = TopKLayout.create(n, block, density)
    idx, vals = _window(layout, 5, vdt, g)
    x = torch.randn(n, generator=g)
    coeffs = torch.randn(5, dtype=torch.float64, generator=g)
    for nrows in (0, 1, 4, 5):
        want = SR.sparse_rows_dot(idx, vals, layout, x, nrows)
        got = SR.sparse_rows_dot_native(idx, vals, layout, x, nrows)
        assert torch.equal(want.view(torch.int64), got.view(torch.int64))
        if nrows:
            want = SR.sparse_rows_dot_slot(idx, vals, layout, nrows - 1, nrows)
            got = SR.sparse_rows_dot_slot_native(idx, vals, layout, nrows - 1, nrows)
            assert torch.equal(want.view(torch.int64), got.view(torch.int64))
        out_want, out_got = x.clone(), x.clone()
        SR.sparse_rows_combine(idx, vals, layout, coeffs, out_want, nrows)
        SR.sparse_rows_combine_native(idx, vals, layout, coeffs, out_got, nrows)
        assert torch.equal(out_want.view(torch.int32), out_got.view(torch.int32))
        # into an uninitialised buffer (NaN here): cleared first, as adding into zeros
        fresh_want, fresh_got = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
        SR.sparse_rows_combine(idx, vals, layout, coeffs, fresh_want, nrows, zero_first=True)
        SR.sparse_rows_combine_native(idx, vals, layout, coeffs, fresh_got, nrows, zero_first=True)
        zeros = torch.zeros_like(x)
        SR.sparse_rows_combine(idx, vals, layout, coeffs, zeros, nrows)
        assert torch.equal(fresh_want, zeros)
        assert torch.equal(fresh_want.view(torch.int32), fresh_got.view(torch.int32))


def test_tree_sum_order():
    """SP's fixed summation order: pad to a power of two, add the halves until one is left."""
    prod = torch.randn(3, 11, dtype=torch.float64, generator=_gen(5)) * 1e8
    want = []
    for row in prod.tolist():
        row = row + [0.0] * 5
        while len(row) > 1:
            h = len(row) // 2
            row = [row[i] + row[i + h] for i in range(h)]
        want.append(row[0])
    assert SR._tree_sum(prod.clone()).tolist() == want
    assert torch.allclose(SR._tree_sum(prod.clone()), prod.sum(1), rtol=1e-12)


def test_dispatch_picks_native_on_cpu(monkeypatch):
    x = torch.zeros(8)
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    assert K.native_available()
    assert K.backend_for(x, "window_adam_update") == "native"
    assert K.backend_for(x, "quantize4") == "torch"  # no native version
    monkeypatch.setenv(K.ENV_VAR, "torch")
    assert K.backend_for(x, "window_adam_update") == "torch"
    monkeypatch.setenv(K.ENV_VAR, "native")
    assert K.backend_for(x, "sparse_rows_dot") == "native"


def test_dispatch_without_the_library(monkeypatch):
    """auto: the twins, quietly; native forced: an error naming the reason and the way out."""
    monkeypatch.setitem(_native._state, "lib", None)
    monkeypatch.setitem(_native._state, "why", "no C compiler found")
    x = torch.zeros(8)
    monkeypatch.setenv(K.ENV_VAR, "auto")
    assert K.backend_for(x, "error_feedback_compress") == "torch"
    monkeypatch.setenv(K.ENV_VAR, "native")
    with pytest.raises(K.KernelBackendError, match="no C compiler found.*HCO_KERNEL_BACKEND"):
        K.backend_for(x, "error_feedback_compress")


def _train(make, backend: str, monkeypatch, dtype=torch.float32, steps: int = 12):
    monkeypatch.setenv(K.ENV_VAR, backend)
    g = _gen(6)
    params = [torch.nn.Parameter(torch.randn(300, 70, generator=g).to(dtype)),
              torch.nn.Parameter(torch.randn(5000, generator=g).to(dtype))]
    opt = make(params)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        opt.step()
    return [p.detach().clone() for p in params], opt


OPTIMIZERS = {
    "microadam": lambda ps: hco.MicroAdam(ps, lr=1e-2, window_size=4, density=0.05,
                                          topk_block_size=1024, weight_decay=0.01),
    "microadam-bf16-sr": lambda ps: hco.MicroAdam(ps, lr=1e-2, window_size=4, density=0.05,
                                                  topk_block_size=1024, stochastic_rounding=True),
    "mfac": lambda ps: hco.SparseMFAC(ps, lr=1e-3, window_size=6, density=0.05,
                                      topk_block_size=1024),
    "ggt": lambda ps: hco.SparseGGT(ps, lr=1e-3, window_size=6, density=0.05,
                                    topk_block_size=1024),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizers_native_equal_torch_backend(name, monkeypatch):
    dtype = torch.bfloat16 if "bf16" in name else torch.float32
    want, _ = _train(OPTIMIZERS[name], "torch", monkeypatch, dtype)
    got, opt = _train(OPTIMIZERS[name], "native", monkeypatch, dtype)
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(got, _train(OPTIMIZERS[name], "native",
                                                                 monkeypatch, dtype, 1)[0]))


def test_package_works_without_a_compiler(tmp_path):
    """No compiler on PATH and an empty cache: the library is unavailable, the reason says so,
    and MicroAdam steps on the twins."""
    code = (
        "import torch, hf_compressed_optim as hco\n"
        "from hf_compressed_optim.kernels import _native, dispatch as K\n"
        "p = torch.nn.Parameter(torch.randn(64, 64)); p.grad = torch.randn(64, 64)\n"
        "hco.MicroAdam([p], lr=1e-3).step()\n"
        "assert _native.library() is None and 'no C compiler' in _native.unavailable()\n"
        "assert K.backend_for(p, 'window_adam_update') == 'torch'\n"
        "print('ok')\n")
    env = {**os.environ, "PATH": str(tmp_path), "CC": "", _native.CACHE_ENV: str(tmp_path / "c")}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-2000:]


def test_build_goes_to_the_cache_once(tmp_path, monkeypatch):
    """A fresh cache gets one library file (written under a temporary name, then renamed)."""
    monkeypatch.setenv(_native.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(_native, "_state", {})
    assert _native.library() is not None
    assert [p.suffix for p in tmp_path.iterdir()] == [".so"]
