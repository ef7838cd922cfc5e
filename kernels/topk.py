"""Block top-k by magnitude, and gather/scatter at the selected (block-relative) indices.

The window rows of MicroAdam and EFCP hold, per block of a :class:`~.layout.TopKLayout`, the
indices of the largest ``|x|`` (ties to the lowest index) in ascending order. The PyTorch twins
define the semantics; the Triton kernels (``*_triton``) match them bitwise. The Triton top-k
finds the k-th largest ``|x|`` by a 31-step bisection on the int32 bit pattern of ``|x|``
(monotone for non-negative floats) with counting, then keeps every entry above it plus the first
equal ones by prefix sums, in index order. No sort.
"""

from __future__ import annotations

import torch

from ._triton import (FLOAT_DTYPES, LAUNCH, Out, arg, block_geometry, chunk, flat, jit,
                      load_f32, np2, on_device, store_f32, tl, triton, warps)
from .layout import TopKLayout

# Largest top-k block held in one program (elements). Larger blocks (not produced by the
# optimizers, which cap the block at 32768) fall back to the PyTorch twin.
MAX_TOPK_TILE = 1 << 16


# ---- PyTorch twins ------------------------------------------------------------------------------
#: elements per sub-chunk of the candidate filter of :func:`_select_rows` (strided, see there)
_FILTER_STRIDE = 8
_LEVEL_BINS = 1024  # histogram bins of the filter, each 2**_LEVEL_SHIFT float ulps wide
_LEVEL_SHIFT = 16


def _select_rows_topk(mag: torch.Tensor, k: int) -> torch.Tensor:
    """bool [rows, n]: per row the k largest of ``mag``, ties to the lowest column (torch.topk)."""
    rows, n = mag.shape
    mask = torch.zeros(mag.shape, dtype=torch.bool, device=mag.device)
    if k >= n:
        return mask.fill_(True)
    # the k+1 largest: if the smallest of them is strictly below the k-th, the top-k set is
    # unambiguous (drop that one); otherwise equal magnitudes compete for the last places
    vals, inds = torch.topk(mag, k + 1, dim=1, sorted=False)
    two = torch.topk(vals, 2, dim=1, largest=False)
    ties = two.values[:, 0] == two.values[:, 1]
    mask.scatter_(1, inds, True)
    r = torch.arange(rows, device=mag.device)
    mask[r, inds[r, two.indices[:, 0]]] = False
    if bool(ties.any()):
        r = ties.nonzero()[:, 0]
        m = mag[r]
        t = two.values[r, 1:2]  # the k-th largest magnitude of those rows
        gt, eq = m > t, m == t
        mask[r] = gt | (eq & (eq.cumsum(1) <= k - gt.sum(1, keepdim=True)))
    return mask


def _select_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """int64 [rows, k]: per row the k largest |x|, ties to the lowest index, ascending order.

    torch.topk over whole rows costs about 5 ns per element on one CPU thread, most of
    MicroAdam's step; so a cheap filter first keeps a few candidates per row, and the exact
    selection (the same rule) runs on those alone. Filter: cut each row into S strided sub-chunks
    (element j belongs to sub-chunk j mod S) and take each sub-chunk's max |x| (two strided
    reductions, no full-size temporary). A per-row histogram of those maxima (by float bits,
    which order like the values) gives a threshold t with at least k sub-chunk maxima above it,
    hence at least k elements above it: every selected element is above t, so the candidates are
    the elements of the sub-chunks whose max is above t, and of those only the ones above t (a
    second, per-element pass): about k plus a few per row. Gathered in (stride, sub-chunk) order
    they keep ascending index order, so ties resolve exactly as on the whole row.
    """
    rows, n = x.shape
    stride = _FILTER_STRIDE
    subs = n // stride
    if k >= n or n % stride or 4 * k > subs:  # the filter would keep most of the row
        if k >= n:
            return torch.arange(n, device=x.device).expand(rows, n)
        return _select_rows_topk(x.abs(), k).nonzero()[:, 1].view(rows, k)
    dev = x.device
    xv = x.view(rows, stride, subs)
    peak = torch.maximum(xv.amax(1), xv.amin(1).neg_()).float()  # [rows, subs] max |x|
    bits = peak.view(torch.int32) & 0x7FFFFFFF  # NaN ranks above inf, as in torch.topk
    # histogram of the maxima by distance below the row's largest, in bins of 2**16 float ulps
    # (1/128 octave); the last bin takes everything further down
    nb = _LEVEL_BINS
    top = bits.amax(1, keepdim=True)
    key = torch.sub(top, bits).bitwise_right_shift_(_LEVEL_SHIFT).clamp_(max=nb - 1)
    key.add_(torch.arange(0, rows * nb, nb, dtype=torch.int32, device=dev)[:, None])
    upto = torch.bincount(key.view(-1), minlength=rows * nb).view(rows, nb).cumsum_(1)
    level = (upto < k).sum(1, keepdim=True, dtype=torch.int32)  # first bin reaching k maxima
    # keep the sub-chunks in bins <= level (at least k of them); the last bin keeps them all
    floor = torch.where(level < nb - 1, top - ((level + 1) << _LEVEL_SHIFT), -1)
    r, col, slot, width = _pack(bits > floor, -(-(k + 1) // stride))
    cols = torch.zeros(rows * width, dtype=torch.int64, device=dev).index_copy_(0, slot, col)
    pos = (cols.view(rows, 1, width) + torch.arange(0, n, subs, device=dev)[None, :, None])
    pos = pos.view(rows, -1)
    cand = x.gather(1, pos).abs_()
    # second pass, per element: only elements above the same threshold can be selected
    above = cand.float().view(torch.int32) > floor
    above.view(rows, stride, width).mul_(torch.zeros(rows * width, dtype=torch.bool, device=dev)
                                         .index_fill_(0, slot, True).view(rows, 1, width))
    r, col, slot, width = _pack(above, k + 1)
    src = col.add_(r * cand.shape[1])
    mags = torch.full((rows * width,), -1.0, dtype=cand.dtype, device=dev)  # -1: never selected
    mags.index_copy_(0, slot, cand.view(-1).index_select(0, src))
    where = torch.zeros(rows * width, dtype=torch.int64, device=dev)
    where.index_copy_(0, slot, pos.view(-1).index_select(0, src))
    keep = _select_rows_topk(mags.view(rows, width), k)
    return where.view(rows, width).masked_select(keep).view(rows, k)


def _pack(keep: torch.Tensor, min_width: int) -> tuple[torch.Tensor, ...]:
    """The kept columns of each row of bool ``keep``, left-aligned in rows of a common width:
    (row, column, flat slot ``row * width + rank in the row``, width >= ``min_width``)."""
    count = keep.sum(1)
    width = max(int(count.max()), min_width)
    r, col = keep.nonzero(as_tuple=True)
    slot = torch.arange(r.numel(), device=keep.device)
    slot.sub_((count.cumsum(0) - count).index_select(0, r)).add_(r * width)
    return r, col, slot, width


def block_topk(x: torch.Tensor, layout: TopKLayout) -> torch.Tensor:
    """int16 [k] block-relative indices of the selected entries of flat ``x`` (see TopKLayout)."""
    x = x.reshape(-1)
    parts = []
    nf, blk = layout.num_full, layout.block
    if nf and layout.k_full:
        parts.append(_select_rows(x[: nf * blk].view(nf, blk), layout.k_full).reshape(-1))
    if layout.tail and layout.k_tail:
        parts.append(_select_rows(x[nf * blk:].view(1, -1), layout.k_tail).reshape(-1))
    if not parts:
        return torch.zeros(0, dtype=torch.int16, device=x.device)
    return torch.cat(parts).to(torch.int16)


def absolute_indices(idx: torch.Tensor, layout: TopKLayout) -> torch.Tensor:
    """int64 absolute positions of block-relative indices ``idx`` ([..., k]).

    Computed per call (O(k)) rather than cached: a cached offsets tensor per layout would be
    memory outside the optimizer's state that the memory report cannot show.
    """
    out = idx.long()
    nf, kf = layout.num_full, layout.k_full
    if nf and kf:
        starts = torch.arange(0, nf * layout.block, layout.block, device=idx.device)
        out[..., : nf * kf].unflatten(-1, (nf, kf)).add_(starts[:, None])
    if layout.k_tail and nf:
        out[..., nf * kf:].add_(nf * layout.block)
    return out


def gather_block_values(x: torch.Tensor, idx: torch.Tensor, layout: TopKLayout) -> torch.Tensor:
    """fp32 [k]: ``x`` at the block-relative indices ``idx``."""
    pos = absolute_indices(idx, layout)
    return torch.index_select(x.reshape(-1), 0, pos.view(-1)).view(pos.shape).float()


def scatter_block_values(x: torch.Tensor, idx: torch.Tensor, values: torch.Tensor | float,
                         layout: TopKLayout) -> None:
    """In place: ``x[absolute(idx)] = values`` (a tensor [k] or a scalar, e.g. 0 to zero them)."""
    flat_x = x.view(-1)
    pos = absolute_indices(idx, layout).view(-1)
    if torch.is_tensor(values):
        flat_x.scatter_(0, pos, values.reshape(-1).to(flat_x.dtype))
    else:
        flat_x.index_fill_(0, pos, float(values))


# ---- Triton kernels -----------------------------------------------------------------------------
@jit
def mag_bits(x, mask):
    """int32 bit pattern of |x| (order-preserving), -1 where masked (never selected)."""
    return tl.where(mask, x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, -1)


@jit
def _kth_bits_1d(bits, k):
    """Largest t with #(bits >= t) >= k, i.e. the k-th largest value (bits >= 0 or -1)."""
    thr = k * 0
    for i in range(31):
        cand = thr | (0x40000000 >> i)
        cnt = tl.sum((bits >= cand).to(tl.int32), axis=0)
        thr = tl.where(cnt >= k, cand, thr)
    return thr


@jit
def _block_topk_kernel(x_ptr, idx_ptr, block, num_full, k_full, tail, k_tail,
                       X_BF16: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    length, k, col0, start = block_geometry(pid, block, num_full, k_full, tail, k_tail)
    offs = tl.arange(0, BLOCK)
    mask = offs < length
    x = load_f32(x_ptr, start + offs, mask, X_BF16)
    bits = mag_bits(x, mask)
    thr = _kth_bits_1d(bits, k)
    gt = bits > thr
    eq = bits == thr
    budget = k - tl.sum(gt.to(tl.int32), axis=0)
    sel = gt | (eq & (tl.cumsum(eq.to(tl.int32), axis=0) <= budget))
    pos = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    tl.store(idx_ptr + col0 + pos, offs.to(tl.int16), mask=sel)


@jit
def abs_positions(idx_ptr, cols, mask, block, num_full, k_full, kf_div, n):
    """(int64 absolute positions of the block-relative indices at window columns ``cols``, mask
    of those inside [0, n): an out-of-range index is skipped instead of corrupting memory)."""
    rel = tl.load(idx_ptr + cols, mask=mask, other=0).to(tl.int64)
    bid = tl.where(cols < num_full * k_full, cols // kf_div, num_full)
    pos = bid.to(tl.int64) * block + rel
    return pos, mask & (pos >= 0) & (pos < n)


@jit
def row_entries(idx_ptr, vals_ptr, rbase, c, kb, blen, V_BF16: tl.constexpr):
    """(block-relative index, fp32 value, mask) of the window entries at columns ``rbase + c``
    (``c < kb``) of one block; indices outside [0, blen) are masked off, so a program that owns
    the block never writes outside it."""
    mk = c < kb
    j = tl.load(idx_ptr + rbase + c, mask=mk, other=0).to(tl.int32)
    mk = mk & (j >= 0) & (j < blen)
    return j, load_f32(vals_ptr + rbase, c, mk, V_BF16), mk


@jit
def _gather_kernel(x_ptr, idx_ptr, out_ptr, k, block, num_full, k_full, kf_div, n,
                   X_BF16: tl.constexpr, BK: tl.constexpr):
    cols = tl.program_id(0) * BK + tl.arange(0, BK)
    mask = cols < k
    pos, inb = abs_positions(idx_ptr, cols, mask, block, num_full, k_full, kf_div, n)
    tl.store(out_ptr + cols, load_f32(x_ptr, pos, inb, X_BF16), mask=mask)


@jit
def _scatter_kernel(x_ptr, idx_ptr, v_ptr, k, block, num_full, k_full, kf_div, n,
                    X_BF16: tl.constexpr, V_BF16: tl.constexpr, SCALAR: tl.constexpr,
                    BK: tl.constexpr):
    cols = tl.program_id(0) * BK + tl.arange(0, BK)
    mask = cols < k
    pos, inb = abs_positions(idx_ptr, cols, mask, block, num_full, k_full, kf_div, n)
    if SCALAR:
        v = load_f32(v_ptr, cols * 0, mask, V_BF16)
    else:
        v = load_f32(v_ptr, cols, mask, V_BF16)
    store_f32(x_ptr, pos, v, inb, X_BF16)


def col_args(layout: TopKLayout, n: int) -> tuple[int, ...]:
    """(block, num_full, k_full, k_full or 1 as divisor, numel) for :func:`abs_positions`."""
    return layout.block, layout.num_full, layout.k_full, max(layout.k_full, 1), n


@on_device
def block_topk_triton(x: torch.Tensor, layout: TopKLayout) -> torch.Tensor:
    """Triton twin of :func:`block_topk`: one program per block."""
    if layout.numel == 0 or layout.k == 0:
        return torch.zeros(0, dtype=torch.int16, device=x.device)
    if np2(layout.block) > MAX_TOPK_TILE or x.dtype not in FLOAT_DTYPES:
        return block_topk(x, layout)
    xf, xbf = arg(flat(x))
    out = torch.empty(layout.k, dtype=torch.int16, device=x.device)
    nprog = layout.num_full + (1 if layout.tail and layout.k_tail else 0)
    tile = np2(layout.block)
    _block_topk_kernel[(nprog,)](xf, out, layout.block, layout.num_full, layout.k_full,
                                 layout.tail, layout.k_tail, X_BF16=xbf, BLOCK=tile,
                                 num_warps=warps(tile), **LAUNCH)
    return out


@on_device
def gather_block_values_triton(x: torch.Tensor, idx: torch.Tensor, layout: TopKLayout
                               ) -> torch.Tensor:
    """Triton twin of :func:`gather_block_values`."""
    k = idx.numel()
    out = torch.empty(k, dtype=torch.float32, device=x.device)
    if k == 0 or x.numel() == 0:
        return out
    if x.dtype not in FLOAT_DTYPES:
        return gather_block_values(x, idx, layout)
    xf, xbf = arg(flat(x))
    bk = chunk(k)
    _gather_kernel[(triton.cdiv(k, bk),)](xf, flat(idx), out, k, *col_args(layout, x.numel()),
                                          X_BF16=xbf, BK=bk, num_warps=4, **LAUNCH)
    return out


@on_device
def scatter_block_values_triton(x: torch.Tensor, idx: torch.Tensor, values: torch.Tensor | float,
                                layout: TopKLayout) -> None:
    """Triton twin of :func:`scatter_block_values`."""
    k = idx.numel()
    if k == 0 or x.numel() == 0:
        return
    if x.dtype not in FLOAT_DTYPES:
        return scatter_block_values(x, idx, values, layout)
    scalar = not torch.is_tensor(values)
    if scalar:
        values = torch.full((1,), float(values), dtype=x.dtype, device=x.device)
    elif values.dtype not in FLOAT_DTYPES:
        values = values.to(x.dtype)
    ox = Out(x)
    xf, xbf = arg(ox.flat)
    vf, vbf = arg(flat(values.to(x.device)))
    bk = chunk(k)
    _scatter_kernel[(triton.cdiv(k, bk),)](xf, flat(idx), vf, k, *col_args(layout, x.numel()),
                                           X_BF16=xbf, V_BF16=vbf, SCALAR=scalar, BK=bk,
                                           num_warps=4, **LAUNCH)
    ox.done()
