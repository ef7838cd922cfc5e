"""Triton twins of :mod:`.sparse_rows` (EFCP's SP and LCG window passes).

* ``sparse_rows_dot``: grid (column chunks, rows). A program gathers ``x`` at its chunk of one
  row, multiplies and sums in fp64 (exact products, as in PyTorch) into one partial per
  (row, chunk); the partials are summed on the host side in a fixed
  order. Deterministic, no atomics.
* ``sparse_rows_combine``: one program per top-k block of the parameter. It walks the ring rows
  in order and does ``out[pos] = out[pos] + fp32(c_i * v)`` for its block's entries; indices
  are unique within a row and a block belongs to one program, so a barrier between rows is all
  the synchronisation needed. Deterministic, no atomics, same order of additions as the twin.

Row offsets are int64 (``m * k`` may exceed 2**31); block-relative indices outside their block
are masked off instead of addressing foreign memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import sparse_rows as reference
from .layout import TopKLayout
from .triton_kernels import (_LAUNCH, _FLOAT_DTYPES, _abs_positions, _arg, _col_args, _flat,
                             _load_f32, _np2, _on_device)

#: columns of one row handled by one program of the SP kernel
DOT_CHUNK = 8192


@triton.jit
def _sparse_rows_dot_kernel(x_ptr, idx_ptr, vals_ptr, part_ptr, k, nchunks, chunk,
                            block, num_full, k_full, kf_div, n,
                            X_BF16: tl.constexpr, V_BF16: tl.constexpr, BK: tl.constexpr):
    c = tl.program_id(0)
    row = tl.program_id(1)
    rbase = row.to(tl.int64) * k
    acc = tl.zeros([BK], dtype=tl.float64)
    start = c * chunk
    for j0 in range(0, chunk, BK):
        cols = start + j0 + tl.arange(0, BK)
        mask = cols < k
        # positions of this row's columns: _abs_positions works on the column number, the
        # pointer is shifted to the row
        pos, inb = _abs_positions(idx_ptr + rbase, cols, mask, block, num_full, k_full, kf_div, n)
        xv = _load_f32(x_ptr, pos, inb, X_BF16)
        vv = _load_f32(vals_ptr + rbase, cols, mask, V_BF16)
        acc += tl.where(inb, xv.to(tl.float64) * vv.to(tl.float64), 0.0)
    tl.store(part_ptr + row.to(tl.int64) * nchunks + c, tl.sum(acc, axis=0))


@triton.jit
def _sparse_rows_combine_kernel(out_ptr, idx_ptr, vals_ptr, coef_ptr, k, nrows, block,
                                num_full, k_full, k_tail, n,
                                V_BF16: tl.constexpr, KCH: tl.constexpr):
    b = tl.program_id(0)
    is_tail = b >= num_full
    kb = tl.where(is_tail, k_tail, k_full)
    col0 = b * k_full
    base = b.to(tl.int64) * block
    kofs = tl.arange(0, KCH)
    for r in range(nrows):
        coef = tl.load(coef_ptr + r)
        rbase = tl.cast(r, tl.int64) * k + col0
        for j0 in range(0, kb, KCH):
            cols = j0 + kofs
            mask = cols < kb
            rel = tl.load(idx_ptr + rbase + cols, mask=mask, other=0).to(tl.int64)
            pos = base + rel
            inb = mask & (rel >= 0) & (rel < block) & (pos < n)
            v = _load_f32(vals_ptr + rbase, cols, inb, V_BF16)
            cur = tl.load(out_ptr + pos, mask=inb, other=0.0)
            tl.store(out_ptr + pos, cur + coef * v, mask=inb)
        tl.debug_barrier()


def _nrows(idx: torch.Tensor, nrows: int | None) -> int:
    return reference._rows(idx, nrows)


@_on_device
def sparse_rows_dot(idx: torch.Tensor, vals: torch.Tensor, layout: TopKLayout, x: torch.Tensor,
                    nrows: int | None = None) -> torch.Tensor:
    m = _nrows(idx, nrows)
    k = layout.k
    if m == 0 or k == 0 or layout.numel == 0:
        return torch.zeros(m, dtype=torch.float64, device=x.device)
    if x.dtype not in _FLOAT_DTYPES or vals.dtype not in _FLOAT_DTYPES:
        return reference.sparse_rows_dot(idx, vals, layout, x, nrows)
    chunk = min(DOT_CHUNK, max(16, _np2(k)))
    nchunks = triton.cdiv(k, chunk)
    bk = min(chunk, 1024)
    part = torch.empty((m, nchunks), dtype=torch.float64, device=x.device)
    xf, xbf = _arg(_flat(x))
    vf, vbf = _arg(vals.contiguous())
    _sparse_rows_dot_kernel[(nchunks, m)](xf, idx.contiguous(), vf, part, k, nchunks, chunk,
                                          *_col_args(layout, layout.numel), X_BF16=xbf,
                                          V_BF16=vbf, BK=bk, num_warps=4, **_LAUNCH)
    return part.sum(dim=1)


@_on_device
def sparse_rows_combine(idx: torch.Tensor, vals: torch.Tensor, layout: TopKLayout,
                        coeffs: torch.Tensor, out: torch.Tensor, nrows: int | None = None) -> None:
    m = _nrows(idx, nrows)
    k = layout.k
    if m == 0 or k == 0 or layout.numel == 0:
        return
    if out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError("out must be a contiguous float32 tensor")
    if vals.dtype not in _FLOAT_DTYPES:
        return reference.sparse_rows_combine(idx, vals, layout, coeffs, out, nrows)
    c = coeffs[:m].to(device=out.device, dtype=torch.float32).contiguous()
    vf, vbf = _arg(vals.contiguous())
    nblocks = layout.num_full + (1 if layout.tail else 0)
    kmax = max(layout.k_full, layout.k_tail, 1)
    kch = min(max(_np2(kmax), 16), 1024)
    _sparse_rows_combine_kernel[(nblocks,)](out.view(-1), idx.contiguous(), vf, c, k, m,
                                            layout.block, layout.num_full, layout.k_full,
                                            layout.k_tail, layout.numel, V_BF16=vbf, KCH=kch,
                                            num_warps=4, num_stages=1, **_LAUNCH)
