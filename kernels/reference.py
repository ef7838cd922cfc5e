"""Pure-PyTorch twins of every kernel: they *define* the semantics the Triton kernels must match.

They run on any device and dtype (math in fp32) and are the path used on CPU, on macOS and
wherever triton is missing. Tests compare each Triton kernel against the function of the same
name here.
"""

from __future__ import annotations

import torch

from .layout import TopKLayout

_LOW16 = 0xFFFF
_HIGH16 = -65536  # 0xFFFF0000 as int32


# --------------------------------------------------------------------------------------------
# 4-bit asymmetric block quantizer (two codes per byte, element 2i in the HIGH nibble)
# --------------------------------------------------------------------------------------------
def quant_scale(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Step of each bucket, fp32; 0 for a constant bucket."""
    return (hi.float() - lo.float()) / 15.0


def quantize4(x: torch.Tensor, bucket: int, codes: torch.Tensor, mins: torch.Tensor,
              maxs: torch.Tensor) -> None:
    """Quantize flat ``x`` into ``codes`` (uint8 [ceil(n/2)]), ``mins``/``maxs`` (bf16 [ceil(n/bucket)]).

    min and max are rounded to the nearest value of the stats' dtype (bf16: round to nearest
    even), as the reference stores them: re-quantizing dequantized values is then a fixed point
    (no drift). An element up to half a bf16 ulp outside the rounded range gets code 0 or 15
    (clamped). code = floor((x - min) / step + 0.5) clamped to [0, 15]; a constant bucket has
    step 0 and gets code 0 (no 0/0).
    """
    n = x.numel()
    if n == 0:
        return
    x = x.reshape(-1)
    if x.dtype != torch.float32:
        x = x.float()
    nf = n // bucket
    lo = torch.empty(mins.numel(), dtype=torch.float32, device=x.device)
    hi = torch.empty_like(lo)
    if nf:
        xv = x[: nf * bucket].view(nf, bucket)  # amin/amax with out= beat aminmax(dim=1) on CPU
        torch.amin(xv, dim=1, out=lo[:nf])
        torch.amax(xv, dim=1, out=hi[:nf])
    if nf * bucket < n:
        lo[nf], hi[nf] = torch.aminmax(x[nf * bucket:])
    mins.copy_(lo)
    maxs.copy_(hi)
    lo32 = mins.float()
    scale = quant_scale(mins, maxs)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant bucket: x - lo == 0
    q8 = torch.empty(n + (n & 1), dtype=torch.uint8, device=x.device)
    if n & 1:
        q8[-1] = 0
    for start, rows, width in ((0, nf, bucket), (nf * bucket, 1 if nf * bucket < n else 0,
                                                   n - nf * bucket)):
        if rows == 0:
            continue
        b0 = start // bucket
        t = x[start:start + rows * width].view(rows, width) - lo32[b0:b0 + rows, None]
        t.div_(safe[b0:b0 + rows, None]).add_(0.5).floor_().clamp_(0, 15)
        q8[start:start + rows * width] = t.view(-1)
    torch.bitwise_or(q8[0::2] << 4, q8[1::2], out=codes)


def dequantize4(codes: torch.Tensor, mins: torch.Tensor, maxs: torch.Tensor, numel: int,
                bucket: int) -> torch.Tensor:
    """Inverse of :func:`quantize4`: fp32 [numel] = min + code * step (a fresh tensor)."""
    if numel == 0:
        return torch.zeros(0, dtype=torch.float32, device=codes.device)
    nbq = mins.numel()
    c = torch.stack((codes >> 4, codes & 0xF), dim=1).view(-1)
    out = torch.empty(nbq * bucket, dtype=torch.float32, device=codes.device)
    out[:numel] = c[:numel]
    if nbq * bucket > numel:
        out[numel:] = 0
    ov = out.view(nbq, bucket)
    ov.mul_(quant_scale(mins, maxs)[:, None]).add_(mins.float()[:, None])
    return out[:numel]


# --------------------------------------------------------------------------------------------
# Block top-k by magnitude
# --------------------------------------------------------------------------------------------
def _select_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """int64 [rows, k]: per row the k largest |x|, ties to the lowest index, ascending order."""
    rows, n = x.shape
    if k >= n:
        return torch.arange(n, device=x.device).expand(rows, n)
    mag = x.abs()
    # the k+1 largest: if the smallest of them is strictly below the k-th, the top-k set is
    # unambiguous (drop that one); otherwise equal magnitudes compete for the last places
    vals, inds = torch.topk(mag, k + 1, dim=1, sorted=False)
    two = torch.topk(vals, 2, dim=1, largest=False)
    ties = two.values[:, 0] == two.values[:, 1]
    keep = torch.ones_like(vals, dtype=torch.bool)
    keep[torch.arange(rows, device=x.device), two.indices[:, 0]] = False
    inds = inds[keep].view(rows, k)
    if bool(ties.any()):
        r = ties.nonzero()[:, 0]
        m = mag[r]
        t = two.values[r, 1:2]  # the k-th largest magnitude of those rows
        gt, eq = m > t, m == t
        sel = gt | (eq & (eq.cumsum(1) <= k - gt.sum(1, keepdim=True)))
        inds[r] = sel.nonzero()[:, 1].view(-1, k)
    return inds.sort(dim=1).values


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
    flat = x.view(-1)
    pos = absolute_indices(idx, layout).view(-1)
    if torch.is_tensor(values):
        flat.scatter_(0, pos, values.reshape(-1).to(flat.dtype))
    else:
        flat.index_fill_(0, pos, float(values))


# --------------------------------------------------------------------------------------------
# Stochastic rounding fp32 -> bf16
# --------------------------------------------------------------------------------------------
_M32 = 0xFFFFFFFF


def sr_noise16(seed: int, positions: torch.Tensor) -> torch.Tensor:
    """int32 noise in [0, 65536) per element position: a murmur3-style hash of (seed, position).

    Hashing the position (instead of drawing from a generator) makes the noise independent of
    the order or subset of elements processed, so the sparse and dense update paths, the Triton
    kernels and every data-parallel rank round identically.
    """
    s = (seed ^ (seed >> 32)) & _M32
    h = (positions.long() * 0x9E3779B1 + s) & _M32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    h ^= h >> 16
    return (h & 0xFFFF).to(torch.int32)


def stochastic_round_bf16(x: torch.Tensor, seed: int,
                          positions: torch.Tensor | None = None) -> torch.Tensor:
    """Unbiased rounding of fp32 ``x`` to bf16: add 16 pseudo-random low bits, then truncate.

    ``positions`` (default 0..n-1) are the elements' indices in the parameter; see sr_noise16.
    """
    flat = x.reshape(-1).contiguous()
    if positions is None:
        positions = torch.arange(flat.numel(), device=x.device)
    bits = flat.view(torch.int32)
    rounded = ((bits + sr_noise16(seed, positions)) & _HIGH16).view(torch.float32)
    return torch.where(torch.isfinite(flat), rounded, flat).to(torch.bfloat16).view(x.shape)


def _round_to(param: torch.Tensor, new: torch.Tensor, sr_seed: int | None,
              positions: torch.Tensor | None = None) -> torch.Tensor:
    if param.dtype == torch.bfloat16 and sr_seed is not None:
        return stochastic_round_bf16(new, sr_seed, positions)
    return new.to(param.dtype)


# --------------------------------------------------------------------------------------------
# Fused window statistics -> Adam update (with decoupled weight decay)
# --------------------------------------------------------------------------------------------
def window_weights(window: int, step: int, beta: float, device) -> torch.Tensor:
    """fp32 [window]: beta ** age of each ring row at ``step`` (1-based); 0 for rows not yet written."""
    rows = torch.arange(window, dtype=torch.int64)
    ages = (step - 1 - rows) % window
    w = torch.pow(torch.tensor(beta, dtype=torch.float64), ages.double())
    w = torch.where(rows < step, w, torch.zeros_like(w))
    return w.to(device=device, dtype=torch.float32)


def adam_coefficients(step: int, beta1: float, beta2: float) -> tuple[float, float]:
    """(c1, c2) = ((1-b1)/(1-b1^t), (1-b2)/(1-b2^t)); bias correction by the step count t."""
    return (1.0 - beta1) / (1.0 - beta1 ** step), (1.0 - beta2) / (1.0 - beta2 ** step)


def window_adam_update(param: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor,
                       layout: TopKLayout, step: int, beta1: float, beta2: float, eps: float,
                       lr: float, weight_decay: float, sr_seed: int | None = None,
                       dense: torch.Tensor | None = None) -> None:
    """Rebuild Adam's moments from the window and update ``param`` in place.

    ``m[j] = c1 * sum_r beta1^age_r V[r, j]``, ``v[j] = c2 * sum_r beta2^age_r V[r, j]^2``,
    ``param <- param * (1 - lr * wd) - lr * (m / (sqrt(v) + eps) + dense)``, math in fp32, one
    rounding to the parameter dtype (stochastic for bf16 when ``sr_seed`` is given). ``dense``
    (fp32 [numel], consumed) is MicroAdam's ``alpha * Q^-1(e)`` densification term.

    The moments are accumulated only over the distinct positions the window holds (rows in ring
    order, so sums are in the same order as the Triton kernel's): the temporaries are
    O(window entries), never O(numel). Without weight decay and ``dense`` only those entries of
    ``param`` are touched, since the update is zero elsewhere.
    """
    n = param.numel()
    if n == 0:
        return
    window = idx.shape[0]
    nrows = max(0, min(window, int(step)))  # rows >= step were never written (weight 0)
    w1 = window_weights(window, step, beta1, param.device)[:nrows, None]
    w2 = window_weights(window, step, beta2, param.device)[:nrows, None]
    pos, slot = torch.unique(absolute_indices(idx[:nrows], layout).reshape(-1),
                             return_inverse=True)
    v = vals[:nrows].float()
    m_acc = torch.zeros(pos.numel(), dtype=torch.float32, device=param.device)
    v_acc = torch.zeros_like(m_acc)
    m_acc.index_add_(0, slot.view(-1), (w1 * v).view(-1))
    v_acc.index_add_(0, slot.view(-1), (w2 * v.square()).view(-1))
    c1, c2 = adam_coefficients(step, beta1, beta2)
    upd = m_acc.mul_(c1).div_(v_acc.mul_(c2).sqrt_().add_(eps))
    flat = param.view(-1) if param.is_contiguous() else param.reshape(-1).clone()
    if weight_decay != 0.0 or dense is not None:
        if dense is not None:
            upd = dense.index_add_(0, pos, upd)
        new = flat.to(torch.float32, copy=True)
        if weight_decay != 0.0:
            new.mul_(1.0 - lr * weight_decay)
        if dense is not None:
            new.sub_(upd, alpha=lr)
        else:
            new.index_copy_(0, pos, torch.index_select(new, 0, pos).sub_(upd, alpha=lr))
        flat.copy_(_round_to(param, new, sr_seed))
    else:
        new = torch.index_select(flat, 0, pos).float().sub_(upd, alpha=lr)
        flat.index_copy_(0, pos, _round_to(param, new, sr_seed, pos))
    if flat.data_ptr() != param.data_ptr():
        param.copy_(flat.view(param.shape))


# --------------------------------------------------------------------------------------------
# One MicroAdam compression step (composition of the kernels above)
# --------------------------------------------------------------------------------------------
def error_feedback_compress(grad: torch.Tensor, codes: torch.Tensor, mins: torch.Tensor,
                            maxs: torch.Tensor, bucket: int, layout: TopKLayout,
                            idx_out: torch.Tensor, val_out: torch.Tensor) -> None:
    """a = grad + Q^-1(e); (idx, val) = block top-k of a; e <- Q(a with the selected entries zeroed).

    ``grad`` is left untouched; ``idx_out`` (int16 [k]) and ``val_out`` (bf16 [k]) receive the new
    window row; ``codes``/``mins``/``maxs`` are overwritten with the quantized residual.
    """
    n = layout.numel
    acc = dequantize4(codes, mins, maxs, n, bucket).add_(grad.reshape(-1))
    idx = block_topk(acc, layout)
    idx_out.copy_(idx)
    val_out.copy_(gather_block_values(acc, idx, layout))
    scatter_block_values(acc, idx, 0.0, layout)
    quantize4(acc, bucket, codes, mins, maxs)
