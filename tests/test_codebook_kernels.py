"""Codebook 4-bit quantizer of 4-bit Shampoo: exact code values, nibble packing, nearest-code
selection, error bounds, the diagonal split, and the Triton twins (bitwise) under the
interpreter."""

from __future__ import annotations

import pytest
import torch

from hf_compressed_optim.kernels import dispatch as K
from hf_compressed_optim.kernels import codebook as C

LINEAR2_TABLE = [-1.0, -0.7511, -0.5378, -0.3600, -0.2178, -0.1111, -0.0400, 0.0, 0.0044, 0.0400,
                 0.1111, 0.2178, 0.3600, 0.5378, 0.7511, 1.0]
DT_TABLE = [-0.8875, -0.6625, -0.4375, -0.2125, -0.0775, -0.0325, -0.0055, 0.0, 0.0055, 0.0325,
            0.0775, 0.2125, 0.4375, 0.6625, 0.8875, 1.0]


def test_linear2_values_exact_and_match_paper_table():
    vals = C.linear2_values(4)
    exact = [-1.0] + [-(k / 15) ** 2 for k in (13, 11, 9, 7, 5, 3)] + [0.0, (1 / 15) ** 2] + \
        [(k / 15) ** 2 for k in (3, 5, 7, 9, 11, 13)] + [1.0]
    assert vals == pytest.approx(exact, abs=1e-15)
    assert [round(v, 4) for v in vals] == LINEAR2_TABLE
    # asymmetric: +1/225 exists, -1/225 does not
    assert any(abs(v - 1 / 225) < 1e-12 for v in vals)
    assert not any(abs(v + 1 / 225) < 1e-12 for v in vals)
    assert [round(v, 4) for v in C.linear2_values(3)] == [-1.0, -0.5102, -0.1837, 0.0, 0.0204,
                                                          0.1837, 0.5102, 1.0]
    t = C.codebook("linear2")
    assert t.dtype == torch.float32 and t.numel() == 16
    assert torch.equal(t, torch.tensor(exact, dtype=torch.float64).float())


def test_dynamic_tree_values_match_paper_table():
    vals = C.dynamic_tree_values(4)
    assert vals == pytest.approx(DT_TABLE, abs=1e-12)
    assert max(vals) == 1.0 and min(vals) == -0.8875  # reaches +1 but not -1
    assert torch.all(torch.diff(C.codebook("dynamic_tree")) > 0)


def test_pack_unpack_round_trip_low_nibble_first():
    idx = torch.randint(0, 16, (3, 7))
    packed = C.pack_nibbles(idx)
    assert packed.shape == (3, 4) and packed.dtype == torch.uint8
    assert torch.equal(packed[:, 0] & 0xF, idx[:, 0].to(torch.uint8))   # element 0: low
    assert torch.equal(packed[:, 0] >> 4, idx[:, 1].to(torch.uint8))    # element 1: high
    assert torch.equal(C.unpack_nibbles(packed, 7), idx)
    even = torch.randint(0, 16, (2, 5, 8))
    assert torch.equal(C.unpack_nibbles(C.pack_nibbles(even), 8), even)


@pytest.mark.parametrize("name", C.CODEBOOKS)
def test_nearest_code_equals_brute_force_argmin(name):
    values, mids = C.codebook_and_midpoints(name)
    x = torch.rand(20000) * 2 - 1
    near_tie = (x[:, None] - mids[None, :]).abs().min(dim=1).values < 1e-6
    brute = (x[:, None] - values[None, :]).abs().argmin(dim=1)
    got = C.nearest_code(x, mids)
    assert torch.equal(got[~near_tie], brute[~near_tie])
    # exact midpoints go to the lower code
    assert torch.equal(C.nearest_code(mids, mids), torch.arange(15))


@pytest.mark.parametrize("name", C.CODEBOOKS)
@pytest.mark.parametrize("shape,block", [((4, 130), 64), ((2, 3, 33), 8), ((5, 7), 6)])
def test_quantize_round_trip_error_bound(name, shape, block):
    torch.manual_seed(0)
    x = torch.randn(shape) * torch.logspace(-3, 2, shape[-1])  # blocks of very different scale
    codes, absmax = C.quantize_rows(x, name, block)
    cols = shape[-1]
    assert codes.shape == (*shape[:-1], (cols + 1) // 2) and codes.dtype == torch.uint8
    assert absmax.shape == (*shape[:-1], -(-cols // block)) and absmax.dtype == torch.float32
    y = C.dequantize_rows(codes, absmax, cols, name, block)
    assert y.shape == x.shape
    values = C.codebook(name)
    half_gap = float((values[1:] - values[:-1]).max()) / 2
    scale = absmax.repeat_interleave(block, dim=-1)[..., :cols]
    err = (x - y).abs()
    assert bool((err <= scale * half_gap * (1 + 1e-6) + 1e-30).all())
    # the absmax of every block is represented exactly when the codebook holds +1
    amax_pos = x.reshape(-1)[x.abs().reshape(-1).argmax()]
    if amax_pos > 0 or name == "linear2":
        assert float(y.abs().max()) == pytest.approx(float(x.abs().max()))
    if name == "linear2":  # symmetric end points: requantizing is a fixed point
        c2, a2 = C.quantize_rows(y, name, block)
        assert torch.allclose(C.dequantize_rows(c2, a2, cols, name, block), y, rtol=1e-6, atol=0)


def test_zero_blocks_stay_zero_and_orthogonal_error_is_small():
    x = torch.zeros(3, 10)
    codes, absmax = C.quantize_rows(x, "linear2", 4)
    assert torch.equal(absmax, torch.zeros_like(absmax))
    assert torch.equal(C.dequantize_rows(codes, absmax, 10, "linear2", 4), x)
    eye = torch.eye(70)
    assert torch.equal(C.dequantize_rows(*C.quantize_rows(eye, "linear2", 64), 70, "linear2",
                                         64), eye)
    q, _ = torch.linalg.qr(torch.randn(256, 256))
    y = C.dequantize_rows(*C.quantize_rows(q, "linear2", 64), 256, "linear2", 64)
    assert 0.01 < float(torch.linalg.norm(y - q) / torch.linalg.norm(q)) < 0.2


def test_diagonal_split_keeps_diagonal_exact_and_excludes_it_from_absmax():
    torch.manual_seed(1)
    x = torch.randn(2, 9, 9) * 0.1
    x.diagonal(dim1=-2, dim2=-1).copy_(torch.randn(2, 9) * 100)  # a dominant diagonal
    diag, codes, absmax = C.quantize_offdiag(x, "linear2", 4)
    assert diag.dtype == torch.float32 and torch.equal(diag, x.diagonal(dim1=-2, dim2=-1))
    off = x.clone()
    off.diagonal(dim1=-2, dim2=-1).zero_()
    assert torch.equal(absmax, C.quantize_rows(off, "linear2", 4)[1])
    y = C.dequantize_offdiag(diag, codes, absmax, "linear2", 4)
    assert torch.equal(y.diagonal(dim1=-2, dim2=-1), diag)
    assert float((y - x).abs().max()) < 0.1 * float(off.abs().max())


# ---------------------------------------------------------------------- Triton twins
needs_triton = pytest.mark.skipif(not K.triton_available(), reason="triton not usable")


@needs_triton
@pytest.mark.parametrize("name", C.CODEBOOKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,block", [((3, 5, 7), 4), ((2, 5, 130), 64), ((2, 13, 13), 6),
                                         ((1, 10, 10), 64)])
def test_triton_twins_bitwise(name, dtype, shape, block):
    torch.manual_seed(2)
    x = (torch.randn(shape) * torch.logspace(-2, 1, shape[-1])).to(dtype)
    ref = C.quantize_rows(x, name, block)
    got = C.quantize_rows_triton(x, name, block)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
    cols = shape[-1]
    for out_dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(C.dequantize_rows(*ref, cols, name, block, out_dtype),
                           C.dequantize_rows_triton(*got, cols, name, block, out_dtype))
    if shape[-1] == shape[-2]:
        ref = C.quantize_offdiag(x, name, block)
        got = C.quantize_offdiag_triton(x, name, block)
        assert all(torch.equal(a, b) for a, b in zip(ref, got))
        assert torch.equal(C.dequantize_offdiag(*ref, name, block),
                           C.dequantize_offdiag_triton(*got, name, block))


@needs_triton
def test_dispatch_respects_backend_env(monkeypatch):
    x = torch.randn(4, 6)
    monkeypatch.setenv("HCO_KERNEL_BACKEND", "torch")
    a = K.codebook_quantize_rows(x, "linear2", 4)
    monkeypatch.setenv("HCO_KERNEL_BACKEND", "triton")
    b = K.codebook_quantize_rows(x, "linear2", 4)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    d = K.codebook_dequantize_offdiag(*K.codebook_quantize_offdiag(torch.randn(6, 6), "linear2",
                                                                   4), "linear2", 4)
    assert d.shape == (6, 6)


@needs_triton
@pytest.mark.gpu
def test_triton_on_cuda_matches_twin(cuda_device):
    x = torch.randn(8, 1200, 1200, device=cuda_device)
    ref = C.quantize_offdiag(x, "linear2", 64)
    got = C.quantize_offdiag_triton(x, "linear2", 64)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


@pytest.mark.parametrize("name", C.CODEBOOKS)
def test_quantize_rows_in_chunks_equals_one_pass(name, monkeypatch):
    """quantize_rows works over cache-sized chunks of whole rows: the codes and absmax are those
    of the one-pass definition (normalise, count the midpoints below, pack), bitwise, for any
    chunk size; the diagonal split too."""
    _, mids = C.codebook_and_midpoints(name)
    g = torch.Generator().manual_seed(3)
    for shape, block in [((3, 37, 37), 8), ((2, 64, 64), 64), ((5, 71), 4), ((2, 2, 9, 9), 2)]:
        x = torch.randn(shape, generator=g) * torch.rand(shape, generator=g) ** 3
        x.view(-1)[:15] = mids  # exact ties
        x.view(-1)[15:20] = 0.0
        xn, absmax = C._normalised(x, block)
        idx = C.nearest_code(xn, mids).flatten(-2)[..., :2 * C.packed_cols(shape[-1])]
        expected = (C.pack_nibbles(idx), absmax)
        off = x.clone()
        torch.diagonal(off, dim1=-2, dim2=-1).zero_()
        for chunk in (1, 40, 1 << 20):
            monkeypatch.setattr(C, "QUANT_CHUNK", chunk)
            got = C.quantize_rows(x, name, block)
            assert all(torch.equal(a, b) for a, b in zip(got, expected)), (shape, chunk)
            assert all(torch.equal(a, b) for a, b in zip(C.quantize_rows(x.mT, name, block),
                                                          C.quantize_rows(x.mT.contiguous(),
                                                                          name, block)))
            if shape[-1] == shape[-2]:
                diag, codes, amax = C.quantize_offdiag(x, name, block)
                assert torch.equal(diag, torch.diagonal(x, dim1=-2, dim2=-1))
                ref = C.quantize_rows(off, name, block)
                assert torch.equal(codes, ref[0]) and torch.equal(amax, ref[1]), (shape, chunk)
