"""MicroAdam's fused update: Adam's moments rebuilt from the sparse gradient window, applied to
the parameter with decoupled weight decay and one rounding (stochastic for bf16 on request).

The PyTorch twin defines the semantics; the Triton kernel and the native CPU loop
(``*_native``, ``csrc/microadam_cpu.c``) match it bitwise. The kernel runs
one persistent program per group of top-k blocks: it rebuilds the block's m and v in a private
fp32 scratch slot (row by row, in ring-row order, with a barrier between rows; indices are
unique within a row so there are no write conflicts), then updates the block's parameters
densely. Deterministic, no atomics, one launch; the scratch is bounded by the number of
programs, not by the parameter size.
"""

from __future__ import annotations

import torch

from . import _native
from ._triton import (FLOAT_DTYPES, LAUNCH, Out, arg, bf16_rne_bits, block_geometry, chunk, jit,
                      load_f32, on_device, store_f32, tl)
from .layout import MAX_INT16_BLOCK, TopKLayout
from .topk import absolute_indices, row_entries

# Upper bound of the persistent grid of window_adam_update_triton (None: a multiple of the SM
# count on GPU, one program per block under the interpreter). Tests lower it to exercise the
# block loop.
WINDOW_MAX_PROGRAMS: int | None = None

_M32 = 0xFFFFFFFF
_HIGH16 = -65536  # 0xFFFF0000 as int32


# ---- PyTorch twins: stochastic rounding fp32 -> bf16 --------------------------------------------
def sr_noise16(seed: int, positions: torch.Tensor) -> torch.Tensor:
    """int32 noise in [0, 65536) per element position: a murmur3-style hash of (seed, position).

    Hashing the position (instead of drawing from a generator) makes the noise independent of
    the order or subset of elements processed, so the sparse and dense update paths, the Triton
    kernels and every data-parallel rank round identically.
    """
    h = (positions.long() * 0x9E3779B1 + _seed32(seed)) & _M32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    h ^= h >> 16
    return (h & 0xFFFF).to(torch.int32)


def _seed32(seed: int) -> int:
    return (seed ^ (seed >> 32)) & _M32


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


# ---- PyTorch twin: window statistics -> Adam update ---------------------------------------------
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


def _sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """fp32 square root rounded once (computed in fp64): the same bits on every CPU build and as
    the Triton kernel's ``sqrt_rn`` and the native loop. torch's vectorised fp32 ``sqrt`` is not
    correctly rounded on every build (one ulp off for about 17% of inputs on torch 2.13 AVX512)."""
    return x.double().sqrt_().float()


def _distinct_positions(pos: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(distinct values of ``pos``, for each entry the index of its value among them).

    What ``torch.unique(pos, return_inverse=True)`` gives, in first-seen order instead of sorted
    (the callers only need a consistent slot per position), without unique's sort: every
    position elects one of its entries through a scratch map over the parameter's positions
    (any entry may win a write race; all of that position's entries then read the same winner).
    The scratch lives only during the call.
    """
    entries = torch.arange(pos.numel(), dtype=torch.int32, device=pos.device)
    owner = torch.empty(numel, dtype=torch.int32, device=pos.device)
    owner.scatter_(0, pos, entries)  # scatter_ beats index_copy_ on CPU
    winner = owner.index_select(0, pos)
    del owner
    first = winner == entries
    compact = first.cumsum(0).sub_(1)
    return pos.masked_select(first), compact.index_select(0, winner.long())


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
    O(window entries), plus the int32 position map of :func:`_distinct_positions` (4 bytes per
    element, freed before the moments are summed). Without weight decay and ``dense`` only
    those entries of ``param`` are touched, since the update is zero elsewhere.
    """
    n = param.numel()
    if n == 0:
        return
    window = idx.shape[0]
    nrows = max(0, min(window, int(step)))  # rows >= step were never written (weight 0)
    w1 = window_weights(window, step, beta1, param.device)[:nrows, None]
    w2 = window_weights(window, step, beta2, param.device)[:nrows, None]
    v = vals[:nrows].float()
    pos, slot = _distinct_positions(absolute_indices(idx[:nrows], layout).view(-1), n)
    m_acc = torch.zeros(pos.numel(), dtype=torch.float32, device=param.device)
    v_acc = torch.zeros_like(m_acc)
    # scatter_add_ sums in entry order as index_add_ does (rows in ring order), about 2x faster
    m_acc.scatter_add_(0, slot, (w1 * v).view(-1))
    v_acc.scatter_add_(0, slot, (w2 * v.square()).view(-1))
    c1, c2 = adam_coefficients(step, beta1, beta2)
    upd = m_acc.mul_(c1).div_(_sqrt_rn(v_acc.mul_(c2)).add_(eps))
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
            new.scatter_(0, pos, torch.index_select(new, 0, pos).sub_(upd, alpha=lr))
        flat.copy_(_round_to(param, new, sr_seed))
    else:
        new = torch.index_select(flat, 0, pos).float().sub_(upd, alpha=lr)
        flat.scatter_(0, pos, _round_to(param, new, sr_seed, pos))
    if flat.data_ptr() != param.data_ptr():
        param.copy_(flat.view(param.shape))


def window_adam_update_native(param: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor,
                              layout: TopKLayout, step: int, beta1: float, beta2: float,
                              eps: float, lr: float, weight_decay: float,
                              sr_seed: int | None = None, dense: torch.Tensor | None = None
                              ) -> None:
    """Native CPU twin of :func:`window_adam_update` (same bits); the PyTorch twin where it does
    not apply (no library, ``dense``, fp16 or non-contiguous parameters, non-CPU tensors)."""
    floats = (torch.float32, torch.bfloat16)
    if (dense is not None or param.dtype not in floats or vals.dtype not in floats
            or idx.dtype != torch.int16 or layout.block > MAX_INT16_BLOCK
            or param.numel() != layout.numel or idx.dim() != 2 or idx.shape != vals.shape
            or idx.shape[1] != layout.k or not _native.takes(param, idx, vals)):
        return window_adam_update(param, idx, vals, layout, step, beta1, beta2, eps, lr,
                                  weight_decay, sr_seed, dense)
    if param.numel() == 0:
        return
    window = idx.shape[0]
    nrows = max(0, min(window, int(step)))
    w1 = window_weights(window, step, beta1, "cpu")
    w2 = window_weights(window, step, beta2, "cpu")
    c1, c2 = adam_coefficients(step, beta1, beta2)
    sr = sr_seed is not None and param.dtype == torch.bfloat16
    mode = 0 if param.dtype == torch.float32 else (2 if sr else 1)
    _native.call(
        "hco_window_adam", param.data_ptr(), mode, idx.data_ptr(), vals.data_ptr(),
        vals.dtype == torch.bfloat16, layout.k, nrows, w1.data_ptr(), w2.data_ptr(), layout.block,
        layout.num_full, layout.k_full, layout.tail, layout.k_tail, c1, c2, eps, lr,
        1.0 - lr * weight_decay, weight_decay != 0.0, _seed32(sr_seed) if sr else 0,
        torch.get_num_threads())
    # the loop wrote behind autograd's back: bump the version counter as an in-place op does
    if not param.is_inference():  # inference tensors keep no version counter
        torch.autograd.graph.increment_version(param)


# ---- Triton kernel ------------------------------------------------------------------------------
@jit
def _sr_noise16(seed32, pos):
    """Same position hash as :func:`sr_noise16` (murmur3 finaliser on uint32)."""
    h = pos.to(tl.uint32) * tl.full([], 0x9E3779B1, tl.uint32) + seed32.to(tl.uint32)
    h = h ^ (h >> 16)
    h = h * tl.full([], 0x85EBCA6B, tl.uint32)
    h = h ^ (h >> 13)
    h = h * tl.full([], 0xC2B2AE35, tl.uint32)
    h = h ^ (h >> 16)
    return (h & 0xFFFF).to(tl.int32)


@jit
def _window_adam_kernel(p_ptr, idx_ptr, vals_ptr, w1_ptr, w2_ptr, scratch_ptr, dense_ptr,
                        block, num_full, k_full, tail, k_tail, k, nrows, nblocks,
                        c1, c2, eps, lr, decay, seed,
                        P_BF16: tl.constexpr, V_BF16: tl.constexpr, SR: tl.constexpr,
                        HAS_DENSE: tl.constexpr, KCH: tl.constexpr, DCH: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    m_base = scratch_ptr + pid.to(tl.int64) * (2 * block)
    v_base = m_base + block
    kofs = tl.arange(0, KCH)
    dofs = tl.arange(0, DCH)
    for b in range(pid, nblocks, nprog):
        blen, kb, col0, start = block_geometry(b, block, num_full, k_full, tail, k_tail)
        # 1. clear this program's slot
        for d0 in range(0, blen, DCH):
            o = d0 + dofs
            mk = o < blen
            tl.store(m_base + o, tl.zeros([DCH], tl.float32), mask=mk)
            tl.store(v_base + o, tl.zeros([DCH], tl.float32), mask=mk)
        tl.debug_barrier()
        # 2. accumulate the ring rows in order (unique indices within a row: no conflicts)
        for r in range(nrows):
            w1 = tl.load(w1_ptr + r)
            w2 = tl.load(w2_ptr + r)
            rbase = tl.cast(r, tl.int64) * k + col0
            for c0 in range(0, kb, KCH):
                j, val, mk = row_entries(idx_ptr, vals_ptr, rbase, c0 + kofs, kb, blen, V_BF16)
                mo = tl.load(m_base + j, mask=mk, other=0.0)
                vo = tl.load(v_base + j, mask=mk, other=0.0)
                t2 = (w2 * val) * val
                tl.store(m_base + j, mo + w1 * val, mask=mk)
                tl.store(v_base + j, vo + t2, mask=mk)
            tl.debug_barrier()
        # 3. dense update of the block's parameters
        for d0 in range(0, blen, DCH):
            o = d0 + dofs
            mk = o < blen
            mm = tl.load(m_base + o, mask=mk, other=0.0)
            vv = tl.load(v_base + o, mask=mk, other=0.0)
            upd = tl.div_rn(mm * c1, tl.sqrt_rn(vv * c2) + eps)
            if HAS_DENSE:  # MicroAdam's alpha * Q^-1(e), added before the one rounding
                upd = upd + tl.load(dense_ptr + start + o, mask=mk, other=0.0)
            p = load_f32(p_ptr, start + o, mk, P_BF16) * decay
            p = tl.fma(upd, -lr, p)  # as PyTorch's param.sub_(upd, alpha=lr)
            if SR:
                bits = p.to(tl.int32, bitcast=True)
                noise = _sr_noise16(seed, start + o)
                sr = ((bits + noise) & -65536) >> 16
                finite = (bits & 0x7FFFFFFF) < 0x7F800000
                tl.store(p_ptr + start + o, tl.where(finite, sr, bf16_rne_bits(p)).to(tl.int16),
                         mask=mk)
            else:
                store_f32(p_ptr, start + o, p, mk, P_BF16)
        tl.debug_barrier()


def _window_programs(device: torch.device, nblocks: int) -> int:
    if WINDOW_MAX_PROGRAMS is not None:
        return max(1, min(nblocks, int(WINDOW_MAX_PROGRAMS)))
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(nblocks, 4 * sms))
    return max(1, nblocks)


@on_device
def window_adam_update_triton(param: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor,
                              layout: TopKLayout, step: int, beta1: float, beta2: float,
                              eps: float, lr: float, weight_decay: float,
                              sr_seed: int | None = None, dense: torch.Tensor | None = None
                              ) -> None:
    """Triton twin of :func:`window_adam_update`: one launch, persistent programs."""
    n = param.numel()
    if n == 0:
        return
    if param.dtype not in FLOAT_DTYPES:
        return window_adam_update(param, idx, vals, layout, step, beta1, beta2, eps, lr,
                                  weight_decay, sr_seed, dense)
    window = idx.shape[0]
    k = layout.k
    dev = param.device
    w1 = window_weights(window, step, beta1, dev)
    w2 = window_weights(window, step, beta2, dev)
    c1, c2 = adam_coefficients(step, beta1, beta2)
    decay = 1.0 - lr * weight_decay if weight_decay != 0.0 else 1.0
    nrows = max(0, min(window, int(step))) if k else 0  # rows >= step have weight 0
    if vals.dtype not in FLOAT_DTYPES:
        vals = vals.float()
    vf, vbf = arg(vals.contiguous())
    op = Out(param)
    pf, pbf = arg(op.flat)
    sr = sr_seed is not None and param.dtype == torch.bfloat16
    nblocks = layout.num_full + (1 if layout.tail else 0)
    nprog = _window_programs(dev, nblocks)
    scratch = torch.empty(nprog * 2 * layout.block, dtype=torch.float32, device=dev)
    dch = chunk(layout.block, 2048)
    dense_f = dense.float().reshape(-1) if dense is not None else scratch
    _window_adam_kernel[(nprog,)](
        pf, idx.contiguous(), vf, w1, w2, scratch, dense_f, layout.block, layout.num_full,
        layout.k_full, layout.tail, layout.k_tail, k, nrows, nblocks, float(c1), float(c2),
        float(eps), float(lr), float(decay), _seed32(sr_seed) if sr else 0, P_BF16=pbf,
        V_BF16=vbf, SR=sr, HAS_DENSE=dense is not None,
        KCH=chunk(max(layout.k_full, layout.k_tail, 1)), DCH=dch,
        num_warps=4 if dch <= 1024 else 8, num_stages=1, **LAUNCH)
    op.done()
