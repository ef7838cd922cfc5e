"""The CPU twins' fast paths (issue #17) give exactly what their plain formulations give.

Each fast path is compared with a straightforward reference written here (torch.topk over the
whole row, torch.unique, index_add_, an out-of-place quantizer) on random inputs with ties,
zeros, bf16 and odd sizes, including sizes where the fast path actually engages.
"""

import pytest
import torch

from hf_compressed_optim.kernels import quant4 as Q, sparse_rows as SR, topk as TK
from hf_compressed_optim.kernels import window_adam as WA
from hf_compressed_optim.kernels.layout import TopKLayout


def _topk_reference(x: torch.Tensor, k: int) -> torch.Tensor:
    """int64 [rows, k]: per row the k largest |x| (ties to the lowest index), ascending: a
    stable sort of the whole row by magnitude."""
    order = torch.sort(x.abs().float(), dim=1, descending=True, stable=True).indices
    return order[:, :k].sort(dim=1).values


def _inputs(kind: str, rows: int, n: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(rows, n, generator=g)
    if kind == "ties":  # few distinct magnitudes: the k-th value is shared by many entries
        x = torch.randint(-3, 4, (rows, n), generator=g).float()
    elif kind == "sparse":  # mostly zeros: fewer non-zeros than k in some rows
        x = x * (torch.rand(rows, n, generator=g) < 0.02)
    elif kind == "coarse":
        x = (x * 4).round() / 4
    elif kind == "heavy":  # heavy tail: a few huge entries, the rest tiny
        x = x ** 7
    return x


@pytest.mark.parametrize("kind", ["normal", "ties", "sparse", "coarse", "heavy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,n,k", [(3, 4096, 41), (5, 2400, 7), (2, 2000, 62), (4, 808, 1),
                                      (1, 16384, 164)])
def test_filtered_topk_equals_whole_row_selection(kind, dtype, rows, n, k):
    g = torch.Generator().manual_seed(rows * n + k)
    x = _inputs(kind, rows, n, g).to(dtype)
    assert n % TK._FILTER_STRIDE == 0 and 4 * k <= n // TK._FILTER_STRIDE  # the filter engages
    assert torch.equal(TK._select_rows(x, k), _topk_reference(x, k))


def test_filtered_topk_actually_filters(monkeypatch):
    """The exact selection sees a small fraction of the row (else the filter is pointless)."""
    seen = []
    exact = TK._select_rows_topk
    monkeypatch.setattr(TK, "_select_rows_topk", lambda m, k: seen.append(m.shape) or exact(m, k))
    x = torch.randn(8, 16384, generator=torch.Generator().manual_seed(0))
    assert torch.equal(TK._select_rows(x, 164), _topk_reference(x, 164))
    assert seen and seen[0][1] < 16384 // 4


@pytest.mark.parametrize("rows,n,k", [(3, 1001, 20), (2, 64, 20), (1, 10, 10), (2, 12, 11)])
def test_topk_without_filter_equals_reference(rows, n, k):
    x = _inputs("ties", rows, n, torch.Generator().manual_seed(n))
    assert torch.equal(TK._select_rows(x, k), _topk_reference(x, k))


def test_block_topk_with_nan_and_inf_keeps_them_first():
    x = torch.randn(16384, generator=torch.Generator().manual_seed(1))
    x[[5, 700, 9000]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    layout = TopKLayout.create(x.numel(), 16384, 0.01)
    idx = TK.block_topk(x, layout).long()
    assert {5, 700, 9000} <= set(idx.tolist()) and idx.numel() == layout.k


def test_distinct_positions_match_unique(torch_threads):
    g = torch.Generator().manual_seed(torch_threads)
    pos = torch.randint(0, 5000, (20000,), generator=g)
    got, slot = WA._distinct_positions(pos, 5000)
    want = torch.unique(pos)
    assert torch.equal(got.sort().values, want)
    assert torch.equal(got[slot], pos)  # every entry points at its own position
    assert got.numel() == want.numel()


def test_window_update_equals_unique_and_index_add(torch_threads):
    """The window's moments: sums per position in row order, as with unique + index_add_."""
    g = torch.Generator().manual_seed(3)
    n, window, step = 40000, 6, 9
    layout = TopKLayout.create(n, 4096, 0.05)
    idx = torch.stack([TK.block_topk(torch.randn(n, generator=g), layout)
                       for _ in range(window)])
    vals = torch.randn(window, layout.k, generator=g).bfloat16()
    p0 = torch.randn(n, generator=g)
    got = p0.clone()
    WA.window_adam_update(got, idx, vals, layout, step, 0.9, 0.999, 1e-8, 1e-2, 0.0)
    # reference: torch.unique + index_add_
    pos, inv = torch.unique(TK.absolute_indices(idx, layout).view(-1), return_inverse=True)
    v = vals.float()
    w1 = WA.window_weights(window, step, 0.9, "cpu")[:, None]
    w2 = WA.window_weights(window, step, 0.999, "cpu")[:, None]
    m = torch.zeros(pos.numel()).index_add_(0, inv.view(-1), (w1 * v).view(-1))
    s = torch.zeros(pos.numel()).index_add_(0, inv.view(-1), (w2 * v.square()).view(-1))
    c1, c2 = WA.adam_coefficients(step, 0.9, 0.999)
    want = p0.clone()
    root = s.mul_(c2).double().sqrt_().float()  # fp32 root rounded once (as the twin's)
    want[pos] = p0[pos].sub_(m.mul_(c1).div_(root.add_(1e-8)), alpha=1e-2)
    assert torch.equal(got, want)


def test_sparse_rows_combine_equals_index_add(torch_threads):
    g = torch.Generator().manual_seed(5)
    n, m = 30001, 7
    layout = TopKLayout.create(n, 4096, 0.03)
    idx = torch.stack([TK.block_topk(torch.randn(n, generator=g), layout) for _ in range(m)])
    vals = torch.randn(m, layout.k, generator=g)
    coeffs = torch.randn(m, generator=g, dtype=torch.float64)
    out = torch.randn(n, generator=g)
    want = out.clone().index_add_(0, TK.absolute_indices(idx, layout).view(-1),
                                  (vals * coeffs.float()[:, None]).view(-1))
    SR.sparse_rows_combine(idx, vals, layout, coeffs, out)
    assert torch.equal(out, want)


def _quantize_reference(x, bucket):
    """Out-of-place quantizer: codes as before the in-place rewrite (q8 then shift/or)."""
    n = x.numel()
    nbq = -(-n // bucket)
    xp = torch.nn.functional.pad(x, (0, nbq * bucket - n), value=float(x[-1])).view(nbq, bucket)
    lo, hi = xp.amin(1).bfloat16(), xp.amax(1).bfloat16()
    scale = Q.quant_scale(lo, hi)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = ((xp - lo.float()[:, None]) / safe[:, None] + 0.5).floor().clamp(0, 15)
    q = q.view(-1)[:n].to(torch.uint8)
    q = torch.nn.functional.pad(q, (0, n & 1))
    return (q[0::2] << 4) | q[1::2], lo, hi


@pytest.mark.parametrize("n,bucket", [(1, 2), (7, 4), (1001, 64), (4097, 128), (65536, 64)])
@pytest.mark.parametrize("overwrite", [False, True])
def test_quantize4_in_place_equals_reference_and_respects_overwrite(n, bucket, overwrite):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3
    keep = x.clone()
    nbq = -(-n // bucket)
    codes = torch.empty((n + 1) // 2, dtype=torch.uint8)
    lo, hi = torch.empty(nbq, dtype=torch.bfloat16), torch.empty(nbq, dtype=torch.bfloat16)
    Q.quantize4(x, bucket, codes, lo, hi, overwrite=overwrite)
    want_codes, want_lo, want_hi = _quantize_reference(keep, bucket)
    assert torch.equal(codes, want_codes) and torch.equal(lo, want_lo) and torch.equal(hi, want_hi)
    if not overwrite:
        assert torch.equal(x, keep)  # the input is the caller's
    # dequantization inverts the packing, padding nibble included
    deq = Q.dequantize4(codes, lo, hi, n, bucket)
    assert deq.shape == (n,) and torch.isfinite(deq).all()
    want = (lo.float().repeat_interleave(bucket)[:n]
            + torch.stack((want_codes >> 4, want_codes & 15), 1).view(-1)[:n].float()
            * Q.quant_scale(lo, hi).repeat_interleave(bucket)[:n])
    assert torch.equal(deq, want)
