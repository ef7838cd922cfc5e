"""EFCP window passes: PyTorch twins vs dense float64 math, Triton (interpreter) vs the twins."""

import pytest
import torch

from hf_compressed_optim.kernels import dispatch as K
from hf_compressed_optim.kernels.layout import TopKLayout
from hf_compressed_optim.kernels import sparse_rows as S
from hf_compressed_optim.kernels.topk import absolute_indices, block_topk, gather_block_values

needs_triton = pytest.mark.skipif(not K.triton_available(), reason="triton not usable")


def _window(numel, block, density, m, vdtype, seed=0):
    """A random window: per row, block top-k of a random vector (unique indices per row)."""
    g = torch.Generator().manual_seed(seed)
    layout = TopKLayout.create(numel, block, density)
    idx = torch.empty((m, layout.k), dtype=torch.int16)
    vals = torch.empty((m, layout.k), dtype=vdtype)
    for i in range(m):
        x = torch.randn(numel, generator=g)
        idx[i] = block_topk(x, layout)
        vals[i] = gather_block_values(x, idx[i], layout).to(vdtype)
    return layout, idx, vals


def _dense_rows(idx, vals, layout, nrows):
    dense = torch.zeros((nrows, layout.numel), dtype=torch.float64)
    for i in range(nrows):
        pos = absolute_indices(idx[i], layout)
        dense[i, pos] = vals[i].double()
    return dense


CASES = [  # numel, block, density, m, nrows (odd sizes, a tail block, a partial ring)
    (1000, 256, 0.05, 5, 5),
    (777, 777, 0.3, 4, 3),
    (4099, 1024, 0.01, 7, 2),
    (37, 16, 1.0, 3, 3),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("vdtype", [torch.float32, torch.bfloat16])
def test_twins_match_dense_float64(case, vdtype):
    numel, block, density, m, nrows = case
    layout, idx, vals = _window(numel, block, density, m, vdtype)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(9))
    dense = _dense_rows(idx, vals, layout, nrows)
    dots = S.sparse_rows_dot(idx, vals, layout, x, nrows)
    assert dots.dtype == torch.float64 and dots.shape == (nrows,)
    torch.testing.assert_close(dots, dense @ x.double(), rtol=1e-6, atol=1e-6)

    coeffs = torch.randn(m, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    base = torch.randn(numel)
    out = base.clone()
    vals_before = vals.clone()
    S.sparse_rows_combine(idx, vals, layout, coeffs, out, nrows)
    assert torch.equal(vals, vals_before)  # the window is read, never scaled in place
    expected = base.double() + coeffs[:nrows].float().double() @ dense
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_slot_dots_are_dots_with_the_dense_row(case):
    """<row_i, row_slot> (EFCP's new Gram row) without a dense copy: the same bits as SP with
    the slot's dense vector, on every backend; and the dense float64 products."""
    numel, block, density, m, nrows = case
    layout, idx, vals = _window(numel, block, density, m, torch.bfloat16, seed=5)
    slot = nrows - 1
    dense = _dense_rows(idx, vals, layout, nrows)
    want = S.sparse_rows_dot(idx, vals, layout, dense[slot].float(), nrows)
    assert torch.equal(S.sparse_rows_dot_slot(idx, vals, layout, slot, nrows), want)
    assert torch.equal(S.sparse_rows_dot_slot_native(idx, vals, layout, slot, nrows), want)
    torch.testing.assert_close(want, dense @ dense[slot], rtol=1e-9, atol=1e-9)
    if K.triton_available():
        got = S.sparse_rows_dot_slot_triton(idx, vals, layout, slot, nrows)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@needs_triton
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("vdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_matches_twin(case, vdtype, xdtype):
    numel, block, density, m, nrows = case
    layout, idx, vals = _window(numel, block, density, m, vdtype, seed=1)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(2)).to(xdtype)
    want = S.sparse_rows_dot(idx, vals, layout, x, nrows)
    got = S.sparse_rows_dot_triton(idx, vals, layout, x, nrows)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    coeffs = torch.randn(m, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    base = torch.randn(numel)
    want_out, got_out = base.clone(), base.clone()
    S.sparse_rows_combine(idx, vals, layout, coeffs, want_out, nrows)
    S.sparse_rows_combine_triton(idx, vals, layout, coeffs, got_out, nrows)
    torch.testing.assert_close(got_out, want_out, rtol=1e-6, atol=1e-6)
    fresh = torch.full((numel,), float("nan"))  # uninitialised: zeroed first
    S.sparse_rows_combine_triton(idx, vals, layout, coeffs, fresh, nrows, zero_first=True)
    torch.testing.assert_close(fresh, want_out - base, rtol=1e-5, atol=1e-5)


@needs_triton
def test_triton_dot_multiple_chunks_and_large_block(monkeypatch):
    """Several SP programs per row and a block at the int16 limit (32768)."""
    monkeypatch.setattr(S, "DOT_CHUNK", 64)
    layout, idx, vals = _window(70000, 32768, 0.004, 2, torch.float32, seed=5)
    assert int(idx.max()) > 30000  # indices near the top of the int16 range
    x = torch.randn(70000)
    want = S.sparse_rows_dot(idx, vals, layout, x)
    got = S.sparse_rows_dot_triton(idx, vals, layout, x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    out_w, out_g = torch.zeros(70000), torch.zeros(70000)
    c = torch.tensor([0.5, -2.0], dtype=torch.float64)
    S.sparse_rows_combine(idx, vals, layout, c, out_w)
    S.sparse_rows_combine_triton(idx, vals, layout, c, out_g)
    torch.testing.assert_close(out_g, out_w, rtol=1e-6, atol=1e-6)
    # absolute positions above 65535 were reached
    assert bool(out_w[65536:].ne(0).any())


@needs_triton
def test_dispatch_and_empty_inputs(monkeypatch):
    layout = TopKLayout.create(0, 16, 0.5)
    idx = torch.zeros((3, 0), dtype=torch.int16)
    vals = torch.zeros((3, 0))
    assert K.sparse_rows_dot(idx, vals, layout, torch.zeros(0)).tolist() == [0.0, 0.0, 0.0]
    out = torch.zeros(0)
    K.sparse_rows_combine(idx, vals, layout, torch.ones(3), out)
    with pytest.raises(ValueError, match="nrows"):
        S.sparse_rows_dot(idx, vals, layout, torch.zeros(0), nrows=4)
    # the env switch routes CPU tensors to Triton under the interpreter
    layout, idx, vals = _window(300, 64, 0.1, 3, torch.float32)
    x = torch.randn(300)
    monkeypatch.setenv(K.ENV_VAR, "triton")
    a = K.sparse_rows_dot(idx, vals, layout, x)
    monkeypatch.setenv(K.ENV_VAR, "torch")
    b = K.sparse_rows_dot(idx, vals, layout, x)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_combine_rejects_non_fp32_out():
    layout, idx, vals = _window(100, 64, 0.1, 2, torch.float32)
    with pytest.raises(ValueError, match="out must be"):
        S.sparse_rows_combine(idx, vals, layout, torch.ones(2), torch.zeros(100,
                              dtype=torch.bfloat16))


@needs_triton
@pytest.mark.gpu
@pytest.mark.parametrize("vdtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_match_cpu_twins(cuda_device, vdtype):
    layout, idx, vals = _window(100_003, 16384, 0.01, 16, vdtype, seed=7)
    x = torch.randn(100_003)
    want = S.sparse_rows_dot(idx, vals, layout, x, 11)
    got = K.sparse_rows_dot(idx.to(cuda_device), vals.to(cuda_device), layout,
                            x.to(cuda_device), 11)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12)
    c = torch.randn(16, dtype=torch.float64)
    out_w = torch.zeros(100_003)
    out_g = torch.zeros(100_003, device=cuda_device)
    S.sparse_rows_combine(idx, vals, layout, c, out_w)
    K.sparse_rows_combine(idx.to(cuda_device), vals.to(cuda_device), layout, c.to(cuda_device),
                          out_g)
    torch.testing.assert_close(out_g.cpu(), out_w, rtol=1e-6, atol=1e-6)
