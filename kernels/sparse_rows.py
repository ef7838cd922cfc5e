"""The two window passes of EFCP's preconditioners: PyTorch twins (they define the semantics)
and their Triton kernels (``*_triton``) and native CPU loops (``*_native``, same bits).

A window holds ``m`` sparse rows of one parameter in the :class:`~.layout.TopKLayout` format:
``idx`` (int16 ``[m, k]``, block-relative) and ``vals`` (bf16/fp32 ``[m, k]``). Only the first
``nrows`` rows take part (the rest of a filling ring is unused).

* **SP** (scalar products), :func:`sparse_rows_dot`: ``dots[i] = sum_j vals[i, j] * x[pos(i, j)]``
  for a dense vector ``x``; products and sums in fp64 (the product of two fp32 values is exact
  in fp64; the reference package's SP kernel also sums in fp64). The Gram matrix built from
  these is then accurate to fp64 rounding, which the preconditioner's m x m algebra relies on.
  The global inner products are sums of these per-parameter vectors (and, later, over
  data-parallel shards). Triton: grid (column chunks, rows); each program sums its chunk of one
  row in fp64 into one partial, the partials are summed on the host in a fixed order.
* **LCG** (linear combination), :func:`sparse_rows_combine`: ``out += sum_i c_i * row_i``,
  scatter-added into a dense fp32 tensor, rows in order, each term ``fp32(c_i * v)``. Triton:
  one program per top-k block walks the rows in order (indices are unique within a row and a
  block belongs to one program, so a barrier between rows is all the synchronisation needed).

Both are deterministic (no atomics). The twins chunk over rows so their temporaries stay bounded
(a few M elements) for any window. Row offsets in the kernels are int64 (``m * k`` may exceed
2**31); block-relative indices outside their block are masked off instead of addressing foreign
memory.
"""

from __future__ import annotations

import torch

from . import _native
from ._triton import (FLOAT_DTYPES, LAUNCH, arg, block_geometry, chunk, flat, jit, load_f32,
                      on_device, tl, triton)
from .layout import MAX_INT16_BLOCK, TopKLayout
from .topk import abs_positions, absolute_indices, col_args, row_entries

#: elements of the per-chunk temporaries (gathered values, positions)
CHUNK_ELEMENTS = 1 << 22
#: columns of one row handled by one program of the SP kernel
DOT_CHUNK = 8192


def _rows(idx: torch.Tensor, nrows: int | None, layout: TopKLayout,
          out: torch.Tensor | None = None) -> tuple[int, bool]:
    """(rows taking part, whether there is any work); checks ``nrows`` and LCG's ``out``."""
    m = idx.shape[0]
    if nrows is not None:
        if not 0 <= nrows <= m:
            raise ValueError(f"nrows must be in [0, {m}], got {nrows}")
        m = int(nrows)
    work = m != 0 and layout.k != 0 and layout.numel != 0
    if work and out is not None and (out.dtype != torch.float32 or not out.is_contiguous()):
        raise ValueError("out must be a contiguous float32 tensor")
    return m, work


def _row_chunks(nrows: int, k: int):
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    for r0 in range(0, nrows, step):
        yield r0, min(nrows, r0 + step)


def _tree_sum(prod: torch.Tensor) -> torch.Tensor:
    """Row sums of fp64 ``prod`` [rows, k] in a fixed order: zero-padded to a power of two
    columns, then halved (first half += second half) until one column is left. ``torch.sum``'s
    order is the build's own; this one is the same on every CPU, and the native loop sums in it,
    so both give the same bits."""
    width = 1 << max(0, (prod.shape[1] - 1).bit_length())
    if width != prod.shape[1]:
        prod = torch.nn.functional.pad(prod, (0, width - prod.shape[1]))
    while width > 1:
        width //= 2
        prod[:, :width].add_(prod[:, width:2 * width])
    return prod[:, 0]


def sparse_rows_dot(idx: torch.Tensor, vals: torch.Tensor, layout: TopKLayout, x: torch.Tensor,
                    nrows: int | None = None) -> torch.Tensor:
    """fp64 ``[nrows]``: ``<row_i, x>`` for the first ``nrows`` window rows and dense flat ``x``."""
    m, work = _rows(idx, nrows, layout)
    out = torch.zeros(m, dtype=torch.float64, device=x.device)
    if not work:
        return out
    k = layout.k
    xf = x.reshape(-1)
    for r0, r1 in _row_chunks(m, k):
        pos = absolute_indices(idx[r0:r1], layout).view(-1)
        prod = torch.index_select(xf, 0, pos).view(r1 - r0, k).double()
        prod.mul_(vals[r0:r1])  # promoted to fp64 inside the op: the same exact products
        out[r0:r1] = _tree_sum(prod)
    return out


def sparse_rows_combine(idx: torch.Tensor, vals: torch.Tensor, layout: TopKLayout,
                        coeffs: torch.Tensor, out: torch.Tensor, nrows: int | None = None,
                        zero_first: bool = False) -> None:
    """In place: ``out`` (fp32, ``numel`` elements) ``+= sum_{i < nrows} coeffs[i] * row_i``;
    ``zero_first``: ``out`` is zeroed first (it may be uninitialised)."""
    m, work = _rows(idx, nrows, layout, out)
    if zero_first:
        out.zero_()
    if not work:
        return
    flat_out = out.view(-1)
    c = coeffs[:m].to(device=out.device, dtype=torch.float32)
    for r0, r1 in _row_chunks(m, layout.k):
        pos = absolute_indices(idx[r0:r1], layout).view(-1)
        contrib = torch.mul(vals[r0:r1], c[r0:r1, None]).view(-1)  # fp32 products, new tensor
        flat_out.scatter_add_(0, pos, contrib)  # entry order as index_add_, about 2x faster


def _native_applies(idx: torch.Tensor, vals: torch.Tensor, layout: TopKLayout,
                    dense: torch.Tensor | None) -> bool:
    """Whether the native loops take this window (and the dense fp32 vector, if any)."""
    tensors = (idx, vals) if dense is None else (idx, vals, dense)
    return (idx.dtype == torch.int16 and idx.dim() == 2
            and vals.shape == idx.shape and vals.dtype in (torch.float32, torch.bfloat16)
            and idx.shape[1] == layout.k and layout.block <= MAX_INT16_BLOCK
            and (dense is None or (dense.dtype == torch.float32 and dense.numel() == layout.numel))
            and _native.takes(*tensors))


def _dot_native(idx: torch.Tensor, vals: torch.Tensor, layout: TopKLayout,
                x: torch.Tensor | None, slot: int, m: int) -> torch.Tensor:
    out = torch.empty(m, dtype=torch.float64)
    _native.call(
        "hco_sparse_dot", idx.data_ptr(), vals.data_ptr(), vals.dtype == torch.bfloat16,
        x.data_ptr() if x is not None else None, slot, layout.k, m, layout.block,
        layout.num_full, layout.k_full, layout.tail, layout.k_tail, out.data_ptr(),
        torch.get_num_threads())
    return out


def sparse_rows_dot_native(idx: torch.Tensor, vals: torch.Tensor, layout: TopKLayout,
                           x: torch.Tensor, nrows: int | None = None) -> torch.Tensor:
    """Native CPU twin of :func:`sparse_rows_dot` (same bits); the twin where it does not apply."""
    m, work = _rows(idx, nrows, layout)
    if not work or not _native_applies(idx, vals, layout, x):
        return sparse_rows_dot(idx, vals, layout, x, nrows)
    return _dot_native(idx, vals, layout, x, -1, m)


def _slot_vector(idx: torch.Tensor, vals: torch.Tensor, layout: TopKLayout, slot: int
                 ) -> torch.Tensor:
    """fp32 [numel]: window row ``slot`` as a dense vector (zero off its entries)."""
    c = torch.zeros(layout.numel, dtype=torch.float32, device=vals.device)
    if layout.k:
        c.scatter_(0, absolute_indices(idx[slot], layout), vals[slot].float())
    return c


def sparse_rows_dot_slot(idx: torch.Tensor, vals: torch.Tensor, layout: TopKLayout, slot: int,
                         nrows: int | None = None) -> torch.Tensor:
    """fp64 ``[nrows]``: ``<row_i, row_slot>`` of the window's own rows (EFCP's new Gram row):
    :func:`sparse_rows_dot` with the dense vector of row ``slot``."""
    return sparse_rows_dot(idx, vals, layout, _slot_vector(idx, vals, layout, slot), nrows)


def sparse_rows_dot_slot_triton(idx: torch.Tensor, vals: torch.Tensor, layout: TopKLayout,
                                slot: int, nrows: int | None = None) -> torch.Tensor:
    """:func:`sparse_rows_dot_slot` with the Triton SP kernel."""
    return sparse_rows_dot_triton(idx, vals, layout, _slot_vector(idx, vals, layout, slot), nrows)


def sparse_rows_dot_slot_native(idx: torch.Tensor, vals: torch.Tensor, layout: TopKLayout,
                                slot: int, nrows: int | None = None) -> torch.Tensor:
    """Native CPU twin of :func:`sparse_rows_dot_slot` (same bits), without the dense vector:
    each block of row ``slot`` is spread into a block-sized scratch while the rows read it."""
    m, work = _rows(idx, nrows, layout)
    if (not work or not 0 <= slot < idx.shape[0]
            or not _native_applies(idx, vals, layout, None)):
        return sparse_rows_dot_slot(idx, vals, layout, slot, nrows)
    return _dot_native(idx, vals, layout, None, slot, m)


def sparse_rows_combine_native(idx: torch.Tensor, vals: torch.Tensor, layout: TopKLayout,
                               coeffs: torch.Tensor, out: torch.Tensor,
                               nrows: int | None = None, zero_first: bool = False) -> None:
    """Native CPU twin of :func:`sparse_rows_combine` (same bits; ``zero_first`` clears each
    block just before adding into it, while it is in cache); the twin where it does not
    apply."""
    m, work = _rows(idx, nrows, layout, out)
    if not work or not _native_applies(idx, vals, layout, out):
        return sparse_rows_combine(idx, vals, layout, coeffs, out, nrows, zero_first)
    c = coeffs[:m].to(device="cpu", dtype=torch.float32).contiguous()
    _native.call(
        "hco_sparse_combine", idx.data_ptr(), vals.data_ptr(), vals.dtype == torch.bfloat16,
        c.data_ptr(), out.data_ptr(), layout.k, m, layout.block, layout.num_full, layout.k_full,
        layout.tail, layout.k_tail, bool(zero_first), torch.get_num_threads())


@jit
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
        # positions of this row's columns: abs_positions works on the column number, the
        # pointer is shifted to the row
        pos, inb = abs_positions(idx_ptr + rbase, cols, mask, block, num_full, k_full, kf_div, n)
        xv = load_f32(x_ptr, pos, inb, X_BF16)
        vv = load_f32(vals_ptr + rbase, cols, mask, V_BF16)
        acc += tl.where(inb, xv.to(tl.float64) * vv.to(tl.float64), 0.0)
    tl.store(part_ptr + row.to(tl.int64) * nchunks + c, tl.sum(acc, axis=0))


@jit
def _sparse_rows_combine_kernel(out_ptr, idx_ptr, vals_ptr, coef_ptr, k, nrows, block,
                                num_full, k_full, tail, k_tail,
                                V_BF16: tl.constexpr, KCH: tl.constexpr):
    blen, kb, col0, base = block_geometry(tl.program_id(0), block, num_full, k_full, tail,
                                          k_tail)
    kofs = tl.arange(0, KCH)
    for r in range(nrows):
        coef = tl.load(coef_ptr + r)
        rbase = tl.cast(r, tl.int64) * k + col0
        for j0 in range(0, kb, KCH):
            rel, v, inb = row_entries(idx_ptr, vals_ptr, rbase, j0 + kofs, kb, blen, V_BF16)
            cur = tl.load(out_ptr + base + rel, mask=inb, other=0.0)
            tl.store(out_ptr + base + rel, cur + coef * v, mask=inb)
        tl.debug_barrier()


@on_device
def sparse_rows_dot_triton(idx: torch.Tensor, vals: torch.Tensor, layout: TopKLayout,
                           x: torch.Tensor, nrows: int | None = None) -> torch.Tensor:
    """Triton twin of :func:`sparse_rows_dot`."""
    m, work = _rows(idx, nrows, layout)
    if not work:
        return torch.zeros(m, dtype=torch.float64, device=x.device)
    if x.dtype not in FLOAT_DTYPES or vals.dtype not in FLOAT_DTYPES:
        return sparse_rows_dot(idx, vals, layout, x, nrows)
    k = layout.k
    chunk_k = min(DOT_CHUNK, chunk(k, DOT_CHUNK))
    nchunks = triton.cdiv(k, chunk_k)
    part = torch.empty((m, nchunks), dtype=torch.float64, device=x.device)
    xf, xbf = arg(flat(x))
    vf, vbf = arg(vals.contiguous())
    _sparse_rows_dot_kernel[(nchunks, m)](xf, idx.contiguous(), vf, part, k, nchunks, chunk_k,
                                          *col_args(layout, layout.numel), X_BF16=xbf,
                                          V_BF16=vbf, BK=min(chunk_k, 1024), num_warps=4,
                                          **LAUNCH)
    return part.sum(dim=1)


@on_device
def sparse_rows_combine_triton(idx: torch.Tensor, vals: torch.Tensor, layout: TopKLayout,
                               coeffs: torch.Tensor, out: torch.Tensor,
                               nrows: int | None = None, zero_first: bool = False) -> None:
    """Triton twin of :func:`sparse_rows_combine`."""
    m, work = _rows(idx, nrows, layout, out)
    if zero_first:
        out.zero_()
    if not work:
        return
    if vals.dtype not in FLOAT_DTYPES:
        return sparse_rows_combine(idx, vals, layout, coeffs, out, nrows)
    c = coeffs[:m].to(device=out.device, dtype=torch.float32).contiguous()
    vf, vbf = arg(vals.contiguous())
    nblocks = layout.num_full + (1 if layout.tail else 0)
    _sparse_rows_combine_kernel[(nblocks,)](out.view(-1), idx.contiguous(), vf, c, layout.k, m,
                                            layout.block, layout.num_full, layout.k_full,
                                            layout.tail, layout.k_tail, V_BF16=vbf,
                                            KCH=chunk(max(layout.k_full, layout.k_tail, 1)),
                                            num_warps=4, num_stages=1, **LAUNCH)
