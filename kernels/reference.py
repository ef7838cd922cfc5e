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
# bf16 directed rounding (keeps the quantizer's [min, max] range a superset of the data)
# --------------------------------------------------------------------------------------------
def bf16_floor(x: torch.Tensor) -> torch.Tensor:
    """Largest bf16 value <= x (x fp32, finite), exact bit manipulation."""
    bits = x.contiguous().view(torch.int32)
    trunc = bits & _HIGH16  # toward zero
    need = (bits < 0) & ((bits & _LOW16) != 0)  # negative with dropped bits: grow magnitude
    out = torch.where(need, trunc + 0x10000, trunc)
    return out.view(torch.float32).to(torch.bfloat16)


def bf16_ceil(x: torch.Tensor) -> torch.Tensor:
    """Smallest bf16 value >= x."""
    return -bf16_floor(-x)


# --------------------------------------------------------------------------------------------
# 4-bit asymmetric block quantizer (two codes per byte, element 2i in the HIGH nibble)
# --------------------------------------------------------------------------------------------
def quant_scale(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Step of each bucket, fp32; 0 for a constant bucket."""
    return (hi.float() - lo.float()) / 15.0


def quantize4(x: torch.Tensor, bucket: int, codes: torch.Tensor, mins: torch.Tensor,
              maxs: torch.Tensor) -> None:
    """Quantize flat ``x`` into ``codes`` (uint8 [ceil(n/2)]), ``mins``/``maxs`` (bf16 [ceil(n/bucket)]).

    min is rounded down and max up to bf16, so every element lies inside its bucket's range and the
    round-trip error is at most half a step. A constant bucket gets step 0 and code 0 (no 0/0).
    """
    n = x.numel()
    if n == 0:
        return
    x = x.reshape(-1).float()
    nbq = -(-n // bucket)
    pad = nbq * bucket - n
    xp = torch.nn.functional.pad(x, (0, pad)) if pad else x
    xb = xp.view(nbq, bucket)
    if pad:
        nf = n // bucket
        lo = torch.empty(nbq, dtype=torch.float32, device=x.device)
        hi = torch.empty_like(lo)
        if nf:
            lo[:nf] = xb[:nf].amin(1)
            hi[:nf] = xb[:nf].amax(1)
        tail = x[nf * bucket:]
        lo[nf] = tail.amin()
        hi[nf] = tail.amax()
    else:
        lo, hi = xb.amin(1), xb.amax(1)
    mins.copy_(bf16_floor(lo))
    maxs.copy_(bf16_ceil(hi))
    lo32 = mins.float()
    scale = quant_scale(mins, maxs)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.floor((xb - lo32[:, None]) / safe[:, None] + 0.5)
    q = torch.where(scale[:, None] > 0, q, torch.zeros_like(q)).clamp_(0, 15).to(torch.uint8)
    q = q.view(-1)[:n]
    if n % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    q = q.view(-1, 2)
    codes.copy_((q[:, 0] << 4) | q[:, 1])


def dequantize4(codes: torch.Tensor, mins: torch.Tensor, maxs: torch.Tensor, numel: int,
                bucket: int) -> torch.Tensor:
    """Inverse of :func:`quantize4`: fp32 [numel] = min + code * step."""
    if numel == 0:
        return torch.zeros(0, dtype=torch.float32, device=codes.device)
    c = torch.stack(((codes >> 4) & 0xF, codes & 0xF), dim=1).view(-1)[:numel].float()
    nbq = mins.numel()
    pad = nbq * bucket - numel
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.view(nbq, bucket)
    out = mins.float()[:, None] + c * quant_scale(mins, maxs)[:, None]
    return out.view(-1)[:numel]


# --------------------------------------------------------------------------------------------
# Block top-k by magnitude
# --------------------------------------------------------------------------------------------
def _select_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """int64 [rows, k]: per row the k largest |x|, ties to the lowest index, ascending order."""
    rows, n = x.shape
    if k >= n:
        return torch.arange(n, device=x.device).expand(rows, n)
    mag = x.abs()
    thr = torch.topk(mag, k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    gt = mag > thr
    eq = mag == thr
    budget = k - gt.sum(1, keepdim=True)
    sel = gt | (eq & (eq.cumsum(1) <= budget))
    return sel.nonzero()[:, 1].view(rows, k)


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
    """int64 absolute positions of block-relative indices ``idx`` ([..., k])."""
    return idx.long() + layout.column_offsets(idx.device)


def gather_block_values(x: torch.Tensor, idx: torch.Tensor, layout: TopKLayout) -> torch.Tensor:
    """fp32 [k]: ``x`` at the block-relative indices ``idx``."""
    return x.reshape(-1)[absolute_indices(idx, layout)].float()


def scatter_block_values(x: torch.Tensor, idx: torch.Tensor, values: torch.Tensor | float,
                         layout: TopKLayout) -> None:
    """In place: ``x[absolute(idx)] = values`` (a tensor [k] or a scalar, e.g. 0 to zero them)."""
    flat = x.view(-1)
    pos = absolute_indices(idx, layout)
    if not torch.is_tensor(values):
        values = torch.full(pos.shape, float(values), dtype=flat.dtype, device=flat.device)
    flat[pos] = values.to(flat.dtype)


# --------------------------------------------------------------------------------------------
# Stochastic rounding fp32 -> bf16
# --------------------------------------------------------------------------------------------
def stochastic_round_bf16(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Unbiased rounding of fp32 ``x`` to bf16: add 16 random low bits, then truncate.

    The noise comes from a generator seeded with ``seed`` on ``x``'s device, so every data-parallel
    rank that passes the same seed rounds identically.
    """
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    noise = torch.randint(0, 1 << 16, x.shape, generator=gen, device=x.device, dtype=torch.int32)
    bits = x.contiguous().view(torch.int32)
    finite = torch.isfinite(x)
    rounded = ((bits + noise) & _HIGH16).view(torch.float32)
    return torch.where(finite, rounded, x).to(torch.bfloat16)


def store_param(param: torch.Tensor, new: torch.Tensor, sr_seed: int | None) -> None:
    """Write fp32 ``new`` into ``param`` (round-to-nearest, or stochastic for bf16 if seeded)."""
    if param.dtype == torch.bfloat16 and sr_seed is not None:
        param.copy_(stochastic_round_bf16(new, sr_seed).view(param.shape))
    else:
        param.copy_(new.view(param.shape))


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
                       lr: float, weight_decay: float, sr_seed: int | None = None) -> None:
    """Rebuild Adam's moments from the window and update ``param`` in place.

    ``m[j] = c1 * sum_r beta1^age_r V[r, j]``, ``v[j] = c2 * sum_r beta2^age_r V[r, j]^2``,
    ``param <- param * (1 - lr * wd) - lr * m / (sqrt(v) + eps)``, math in fp32.
    """
    n = param.numel()
    if n == 0:
        return
    window = idx.shape[0]
    w1 = window_weights(window, step, beta1, param.device)
    w2 = window_weights(window, step, beta2, param.device)
    pos = absolute_indices(idx, layout).reshape(-1)
    v = vals.float()
    m_acc = torch.zeros(n, dtype=torch.float32, device=param.device)
    v_acc = torch.zeros(n, dtype=torch.float32, device=param.device)
    m_acc.index_add_(0, pos, (w1[:, None] * v).reshape(-1))
    v_acc.index_add_(0, pos, (w2[:, None] * v * v).reshape(-1))
    c1, c2 = adam_coefficients(step, beta1, beta2)
    upd = (m_acc * c1).div_((v_acc * c2).sqrt_().add_(eps))
    new = param.reshape(-1).to(torch.float32, copy=True)
    if weight_decay != 0.0:
        new.mul_(1.0 - lr * weight_decay)
    new.sub_(upd, alpha=lr)
    store_param(param, new, sr_seed)


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
    acc = grad.reshape(-1).float() + dequantize4(codes, mins, maxs, n, bucket)
    idx = block_topk(acc, layout)
    idx_out.copy_(idx)
    val_out.copy_(gather_block_values(acc, idx, layout))
    scatter_block_values(acc, idx, 0.0, layout)
    quantize4(acc, bucket, codes, mins, maxs)
