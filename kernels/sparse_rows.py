"""PyTorch twins of the two window passes of EFCP's preconditioners (they define the semantics).

A window holds ``m`` sparse rows of one parameter in the :class:`~.layout.TopKLayout` format:
``idx`` (int16 ``[m, k]``, block-relative) and ``vals`` (bf16/fp32 ``[m, k]``). Only the first
``nrows`` rows take part (the rest of a filling ring is unused).

* **SP** (scalar products), :func:`sparse_rows_dot`: ``dots[i] = sum_j vals[i, j] * x[pos(i, j)]``
  for a dense vector ``x``; products and sums in fp64 (the product of two fp32 values is exact
  in fp64; the reference package's SP kernel also sums in fp64). The Gram matrix built from
  these is then accurate to fp64 rounding, which the preconditioner's m x m algebra relies on.
  The global inner products are sums of these per-parameter vectors (and, later, over
  data-parallel shards).
* **LCG** (linear combination), :func:`sparse_rows_combine`: ``out += sum_i c_i * row_i``,
  scatter-added into a dense fp32 tensor, rows in order, each term ``fp32(c_i * v)``.

Work is chunked over rows so the temporaries stay bounded (a few M elements) for any window.
"""

from __future__ import annotations

import torch

from .layout import TopKLayout
from .reference import absolute_indices

#: elements of the per-chunk temporaries (gathered values, positions)
CHUNK_ELEMENTS = 1 << 22


def _rows(idx: torch.Tensor, nrows: int | None) -> int:
    m = idx.shape[0]
    if nrows is None:
        return m
    if not 0 <= nrows <= m:
        raise ValueError(f"nrows must be in [0, {m}], got {nrows}")
    return int(nrows)


def _row_chunks(nrows: int, k: int):
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    for r0 in range(0, nrows, step):
        yield r0, min(nrows, r0 + step)


def sparse_rows_dot(idx: torch.Tensor, vals: torch.Tensor, layout: TopKLayout, x: torch.Tensor,
                    nrows: int | None = None) -> torch.Tensor:
    """fp64 ``[nrows]``: ``<row_i, x>`` for the first ``nrows`` window rows and dense flat ``x``."""
    m = _rows(idx, nrows)
    out = torch.zeros(m, dtype=torch.float64, device=x.device)
    k = layout.k
    if m == 0 or k == 0 or layout.numel == 0:
        return out
    xf = x.reshape(-1)
    for r0, r1 in _row_chunks(m, k):
        pos = absolute_indices(idx[r0:r1], layout).view(-1)
        prod = torch.mul(torch.index_select(xf, 0, pos).view(r1 - r0, k).double(),
                         vals[r0:r1].double())
        torch.sum(prod, dim=1, out=out[r0:r1])
    return out


def sparse_rows_combine(idx: torch.Tensor, vals: torch.Tensor, layout: TopKLayout,
                        coeffs: torch.Tensor, out: torch.Tensor, nrows: int | None = None) -> None:
    """In place: ``out`` (fp32, ``numel`` elements) ``+= sum_{i < nrows} coeffs[i] * row_i``."""
    m = _rows(idx, nrows)
    k = layout.k
    if m == 0 or k == 0 or layout.numel == 0:
        return
    if out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError("out must be a contiguous float32 tensor")
    flat = out.view(-1)
    c = coeffs[:m].to(device=out.device, dtype=torch.float32)
    for r0, r1 in _row_chunks(m, k):
        pos = absolute_indices(idx[r0:r1], layout).view(-1)
        contrib = torch.mul(vals[r0:r1].float(), c[r0:r1, None]).view(-1)  # never in place
        flat.index_add_(0, pos, contrib)
