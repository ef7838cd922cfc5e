"""Triton twins of :mod:`.codebook` (same names, signatures and bitwise results).

One program per (row, absmax block): it loads the block's even and odd elements separately, so
the two codes of a byte are produced by the same lane and packed without shuffles. The nearest
code is the number of codebook midpoints below the normalised value (the twin's ``bucketize``),
the reciprocal of the absmax uses ``div_rn`` so the GPU rounds like PyTorch. The diagonal-split
variant handles the diagonal inside the same kernels (``DIAG``): zeroed before the absmax and
stored to / restored from the fp32 diagonal. Math is fp32; other dtypes are converted at the
boundary (the interpreter's own bf16 casts are not trusted).

Importing this module needs triton but no GPU; CPU tensors work under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .codebook import _check_block, absmax_blocks, codebook_and_midpoints, packed_cols

_LAUNCH = {"enable_fp_fusion": False}


@triton.jit
def _quantize_kernel(x_ptr, mids_ptr, codes_ptr, absmax_ptr, diag_ptr, C, PC, NB,
                     BLOCK: tl.constexpr, HALF_P2: tl.constexpr, NCODES: tl.constexpr,
                     DIAG: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    half = tl.arange(0, HALF_P2)
    in_block = half < BLOCK // 2
    col_e = b * BLOCK + 2 * half
    col_o = col_e + 1
    m_e = in_block & (col_e < C)
    m_o = in_block & (col_o < C)
    x_e = tl.load(x_ptr + r * C + col_e, mask=m_e, other=0.0)
    x_o = tl.load(x_ptr + r * C + col_o, mask=m_o, other=0.0)
    if DIAG:
        i = r % C
        tl.store(diag_ptr + r + 0 * half, x_e, mask=m_e & (col_e == i))
        tl.store(diag_ptr + r + 0 * half, x_o, mask=m_o & (col_o == i))
        x_e = tl.where(col_e == i, 0.0, x_e)
        x_o = tl.where(col_o == i, 0.0, x_o)
    amax = tl.maximum(tl.max(tl.abs(x_e), axis=0), tl.max(tl.abs(x_o), axis=0))
    tl.store(absmax_ptr + r * NB + b, amax)
    safe = tl.where(amax > 0, amax, 1.0)
    inv = tl.where(amax > 0, tl.math.div_rn(1.0, safe), 0.0)
    xn_e = x_e * inv
    xn_o = x_o * inv
    code_e = tl.zeros([HALF_P2], dtype=tl.int32)
    code_o = tl.zeros([HALF_P2], dtype=tl.int32)
    for j in tl.static_range(NCODES - 1):
        mid = tl.load(mids_ptr + j)
        code_e += (xn_e > mid).to(tl.int32)
        code_o += (xn_o > mid).to(tl.int32)
    byte = (code_e | (code_o << 4)).to(tl.uint8)
    pos = b * (BLOCK // 2) + half
    tl.store(codes_ptr + r * PC + pos, byte, mask=in_block & (pos < PC))


@triton.jit
def _dequantize_kernel(codes_ptr, absmax_ptr, values_ptr, diag_ptr, out_ptr, C, PC, NB,
                       BLOCK: tl.constexpr, HALF_P2: tl.constexpr, DIAG: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    half = tl.arange(0, HALF_P2)
    in_block = half < BLOCK // 2
    pos = b * (BLOCK // 2) + half
    byte = tl.load(codes_ptr + r * PC + pos, mask=in_block & (pos < PC), other=0).to(tl.int32)
    amax = tl.load(absmax_ptr + r * NB + b)
    v_e = tl.load(values_ptr + (byte & 15)) * amax
    v_o = tl.load(values_ptr + ((byte >> 4) & 15)) * amax
    col_e = b * BLOCK + 2 * half
    col_o = col_e + 1
    if DIAG:
        i = r % C
        d = tl.load(diag_ptr + r)
        v_e = tl.where(col_e == i, d, v_e)
        v_o = tl.where(col_o == i, d, v_o)
    tl.store(out_ptr + r * C + col_e, v_e, mask=in_block & (col_e < C))
    tl.store(out_ptr + r * C + col_o, v_o, mask=in_block & (col_o < C))


def _geometry(cols: int, block: int):
    _check_block(block)
    return packed_cols(cols), absmax_blocks(cols, block), triton.next_power_of_2(block // 2)


def _quantize(x: torch.Tensor, name: str, block: int, diag: bool):
    lead, (rows, cols) = x.shape[:-2], x.shape[-2:]
    pc, nb, half_p2 = _geometry(cols, block)
    values, mids = codebook_and_midpoints(name, x.device)
    xf = x.to(torch.float32).contiguous()
    n_rows = xf.numel() // cols if cols else 0
    codes = torch.empty((*lead, rows, pc), dtype=torch.uint8, device=x.device)
    absmax = torch.empty((*lead, rows, nb), dtype=torch.float32, device=x.device)
    dvec = torch.empty((*lead, rows), dtype=torch.float32, device=x.device)
    if n_rows and nb:
        _quantize_kernel[(n_rows, nb)](xf, mids, codes, absmax, dvec, cols, pc, nb,
                                       BLOCK=block, HALF_P2=half_p2, NCODES=values.numel(),
                                       DIAG=diag, **_LAUNCH)
    return dvec, codes, absmax


def _dequantize(diag, codes, absmax, cols: int, name: str, block: int, dtype):
    lead = codes.shape[:-1]
    pc, nb, half_p2 = _geometry(cols, block)
    if codes.shape[-1] != pc or absmax.shape[-1] != nb:
        raise ValueError(f"codes/absmax shapes {tuple(codes.shape)}/{tuple(absmax.shape)} do not "
                         f"match {cols} columns in blocks of {block}")
    values, _ = codebook_and_midpoints(name, codes.device)
    out = torch.empty((*lead, cols), dtype=torch.float32, device=codes.device)
    n_rows = out.numel() // cols if cols else 0
    d = diag.to(torch.float32).contiguous() if diag is not None else out
    if n_rows and nb:
        _dequantize_kernel[(n_rows, nb)](codes.contiguous(), absmax.to(torch.float32).contiguous(),
                                         values, d, out, cols, pc, nb, BLOCK=block,
                                         HALF_P2=half_p2, DIAG=diag is not None, **_LAUNCH)
    return out.to(dtype)


def quantize_rows(x: torch.Tensor, name: str, block: int):
    _, codes, absmax = _quantize(x, name, block, diag=False)
    return codes, absmax


def dequantize_rows(codes, absmax, cols: int, name: str, block: int, dtype=torch.float32):
    return _dequantize(None, codes, absmax, cols, name, block, dtype)


def quantize_offdiag(x: torch.Tensor, name: str, block: int):
    if x.shape[-2] != x.shape[-1]:
        raise ValueError(f"quantize_offdiag needs square matrices, got {tuple(x.shape)}")
    return _quantize(x, name, block, diag=True)


def dequantize_offdiag(diag, codes, absmax, name: str, block: int, dtype=torch.float32):
    return _dequantize(diag, codes, absmax, diag.shape[-1], name, block, dtype)
