"""Triton implementations of the kernels; :mod:`.reference` defines their semantics.

Every public function here has the name, signature and results of its twin in
:mod:`.reference`. Design notes:

* All math is fp32. bf16 tensors travel as their int16 bit patterns: a load widens the 16 bits to
  an fp32 pattern, a store rounds to nearest even (or stochastically) with integer arithmetic.
  This is exact on every backend, including the interpreter, whose own bf16 casts truncate.
* Divisions and square roots use ``div_rn``/``sqrt_rn`` and every launch disables fp contraction
  (``enable_fp_fusion=False``), so the GPU rounds each operation like PyTorch does. The only
  fused multiply-add is the explicit one PyTorch also uses (``param.sub_(upd, alpha=lr)``).
* Top-k per block: the k-th largest ``|x|`` is found by a 31-step bisection on the int32 bit
  pattern of ``|x|`` (monotone for non-negative floats) with counting, then a compaction pass
  with prefix sums keeps every entry above the threshold plus the first equal ones (ties to the
  lowest index) and writes them in ascending index order. No sort.
* Window Adam update: one persistent program per group of top-k blocks; it rebuilds the block's
  m and v in a private fp32 scratch slot (row by row, in ring-row order, with a barrier between
  rows; indices are unique within a row so there are no write conflicts), then updates the
  block's parameters densely. Deterministic, no atomics, one launch; the scratch is bounded by
  the number of programs, not by the parameter size.
* Error feedback: one program per top-k block fuses dequantize-add, top-k, gather, zeroing and
  re-quantization when every top-k block starts on a quantization-bucket boundary (the usual
  case); otherwise it is composed of the kernels above.

Importing this module needs triton but no GPU; CPU tensors work under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from . import reference
from .layout import TopKLayout

# Largest top-k block held in one program (elements). Larger blocks (not produced by the
# optimizers, which cap the block at 32768) fall back to the PyTorch twin.
MAX_TOPK_TILE = 1 << 16
# Upper bound of the persistent grid of window_adam_update (None: a multiple of the SM count on
# GPU, one program per block under the interpreter). Tests lower it to exercise the block loop.
WINDOW_MAX_PROGRAMS: int | None = None

_LAUNCH = {"enable_fp_fusion": False}
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _load_f32(ptr, offs, mask, BF16: tl.constexpr):
    """Load as fp32; bf16 arrives as int16 bit patterns and is widened exactly."""
    if BF16:
        h = tl.load(ptr + offs, mask=mask, other=0)
        out = (h.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        out = tl.load(ptr + offs, mask=mask, other=0).to(tl.float32)
    return out


@triton.jit
def _bf16_rne_bits(x):
    """fp32 -> bf16 bit pattern (in an int32), round to nearest even; NaN -> canonical NaN."""
    b = x.to(tl.int32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, r)


@triton.jit
def _store_f32(ptr, offs, val, mask, BF16: tl.constexpr):
    """Store fp32 ``val`` into the pointer's dtype (bf16: int16 bit patterns, rounded RNE)."""
    if BF16:
        tl.store(ptr + offs, _bf16_rne_bits(val).to(tl.int16), mask=mask)
    else:
        tl.store(ptr + offs, val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _round_stat(x, M_BF16: tl.constexpr):
    """A bucket's min/max as it will be stored: bf16 rounds to nearest even (as the twin's
    ``copy_``), fp32 is kept. Every later use reads this value, so the codes match it."""
    if M_BF16:
        x = (_bf16_rne_bits(x) << 16).to(tl.float32, bitcast=True)
    return x


@triton.jit
def _quant_code(x, lo, safe, ok):
    """4-bit code of x (int32): floor((x - lo) / step + 0.5) in [0, 15]; 0 where ``ok`` is false."""
    q = tl.floor(tl.div_rn(x - lo, safe) + 0.5)
    q = tl.minimum(tl.maximum(q, 0.0), 15.0)
    return tl.where(ok, q, 0.0).to(tl.int32)


@triton.jit
def _mag_bits(x, mask):
    """int32 bit pattern of |x| (order-preserving), -1 where masked (never selected)."""
    return tl.where(mask, x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, -1)


# --------------------------------------------------------------------------------------------
# 4-bit quantizer
# --------------------------------------------------------------------------------------------
@triton.jit
def _load_code_pairs(x_ptr, rbase, rmask, p, half, n, X_BF16: tl.constexpr):
    """Elements 2p and 2p+1 of each bucket row (the two nibbles of byte p), masked, as fp32."""
    e0 = rbase + 2 * p[None, :]
    base = rmask[:, None] & (p < half)[None, :]
    m0 = base & (e0 < n)
    m1 = base & (e0 + 1 < n)
    return e0, m0, m1, _load_f32(x_ptr, e0, m0, X_BF16), _load_f32(x_ptr, e0 + 1, m1, X_BF16)


@triton.jit
def _quantize4_kernel(x_ptr, codes_ptr, mins_ptr, maxs_ptr, n, bucket, nbq,
                      X_BF16: tl.constexpr, M_BF16: tl.constexpr, R: tl.constexpr,
                      CP: tl.constexpr):
    # tile: R buckets x CP element pairs; loops over the bucket in chunks of CP pairs
    pid = tl.program_id(0)
    rows = pid * R + tl.arange(0, R)
    rmask = rows < nbq
    cols = tl.arange(0, CP)
    half = bucket // 2
    rbase = rows.to(tl.int64)[:, None] * bucket
    lo = tl.full([R], float("inf"), tl.float32)
    hi = tl.full([R], float("-inf"), tl.float32)
    for c0 in range(0, half, CP):
        e0, m0, m1, x0, x1 = _load_code_pairs(x_ptr, rbase, rmask, c0 + cols, half, n, X_BF16)
        lo = tl.minimum(lo, tl.min(tl.minimum(tl.where(m0, x0, float("inf")),
                                              tl.where(m1, x1, float("inf"))), axis=1))
        hi = tl.maximum(hi, tl.max(tl.maximum(tl.where(m0, x0, float("-inf")),
                                              tl.where(m1, x1, float("-inf"))), axis=1))
    lo = _round_stat(lo, M_BF16)
    hi = _round_stat(hi, M_BF16)
    _store_f32(mins_ptr, rows, lo, rmask, M_BF16)
    _store_f32(maxs_ptr, rows, hi, rmask, M_BF16)
    scale = tl.div_rn(hi - lo, 15.0)
    pos = scale > 0
    safe = tl.where(pos, scale, 1.0)
    for c0 in range(0, half, CP):
        e0, m0, m1, x0, x1 = _load_code_pairs(x_ptr, rbase, rmask, c0 + cols, half, n, X_BF16)
        q0 = _quant_code(x0, lo[:, None], safe[:, None], pos[:, None])
        q1 = _quant_code(x1, lo[:, None], safe[:, None], pos[:, None] & m1)
        tl.store(codes_ptr + (e0 >> 1), ((q0 << 4) | q1).to(tl.uint8), mask=m0)


@triton.jit
def _dequantize4_kernel(codes_ptr, mins_ptr, maxs_ptr, add_ptr, out_ptr, n, bucket,
                        M_BF16: tl.constexpr, HAS_ADD: tl.constexpr, A_BF16: tl.constexpr,
                        BP: tl.constexpr):
    # out[i] (+= add[i]) = min + code * step, one program per BP byte pairs
    pid = tl.program_id(0)
    p = pid.to(tl.int64) * BP + tl.arange(0, BP)
    e0 = 2 * p
    m0 = e0 < n
    m1 = e0 + 1 < n
    byte = tl.load(codes_ptr + p, mask=m0, other=0).to(tl.int32)
    b = e0 // bucket  # bucket is even: both elements of a byte share it
    lo = _load_f32(mins_ptr, b, m0, M_BF16)
    hi = _load_f32(maxs_ptr, b, m0, M_BF16)
    scale = tl.div_rn(hi - lo, 15.0)
    d0 = lo + ((byte >> 4) & 0xF).to(tl.float32) * scale
    d1 = lo + (byte & 0xF).to(tl.float32) * scale
    if HAS_ADD:
        d0 = _load_f32(add_ptr, e0, m0, A_BF16) + d0
        d1 = _load_f32(add_ptr, e0 + 1, m1, A_BF16) + d1
    tl.store(out_ptr + e0, d0, mask=m0)
    tl.store(out_ptr + e0 + 1, d1, mask=m1)


# --------------------------------------------------------------------------------------------
# block top-k, gather, scatter
# --------------------------------------------------------------------------------------------
@triton.jit
def _kth_bits_1d(bits, k):
    """Largest t with #(bits >= t) >= k, i.e. the k-th largest value (bits >= 0 or -1)."""
    thr = k * 0
    for i in range(31):
        cand = thr | (0x40000000 >> i)
        cnt = tl.sum((bits >= cand).to(tl.int32), axis=0)
        thr = tl.where(cnt >= k, cand, thr)
    return thr


@triton.jit
def _block_topk_kernel(x_ptr, idx_ptr, block, num_full, k_full, tail, k_tail,
                       X_BF16: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    is_tail = pid >= num_full
    length = tl.where(is_tail, tail, block)
    k = tl.where(is_tail, k_tail, k_full)
    col0 = pid * k_full  # the tail's columns start at num_full * k_full as well
    offs = tl.arange(0, BLOCK)
    mask = offs < length
    x = _load_f32(x_ptr, pid.to(tl.int64) * block + offs, mask, X_BF16)
    bits = _mag_bits(x, mask)
    thr = _kth_bits_1d(bits, k)
    gt = bits > thr
    eq = bits == thr
    budget = k - tl.sum(gt.to(tl.int32), axis=0)
    sel = gt | (eq & (tl.cumsum(eq.to(tl.int32), axis=0) <= budget))
    pos = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    tl.store(idx_ptr + col0 + pos, offs.to(tl.int16), mask=sel)


@triton.jit
def _abs_positions(idx_ptr, cols, mask, block, num_full, k_full, kf_div, n):
    """(int64 absolute positions of the block-relative indices at window columns ``cols``, mask
    of those inside [0, n): an out-of-range index is skipped instead of corrupting memory)."""
    rel = tl.load(idx_ptr + cols, mask=mask, other=0).to(tl.int64)
    bid = tl.where(cols < num_full * k_full, cols // kf_div, num_full)
    pos = bid.to(tl.int64) * block + rel
    return pos, mask & (pos >= 0) & (pos < n)


@triton.jit
def _gather_kernel(x_ptr, idx_ptr, out_ptr, k, block, num_full, k_full, kf_div, n,
                   X_BF16: tl.constexpr, BK: tl.constexpr):
    cols = tl.program_id(0) * BK + tl.arange(0, BK)
    mask = cols < k
    pos, inb = _abs_positions(idx_ptr, cols, mask, block, num_full, k_full, kf_div, n)
    tl.store(out_ptr + cols, _load_f32(x_ptr, pos, inb, X_BF16), mask=mask)


@triton.jit
def _scatter_kernel(x_ptr, idx_ptr, v_ptr, k, block, num_full, k_full, kf_div, n,
                    X_BF16: tl.constexpr, V_BF16: tl.constexpr, SCALAR: tl.constexpr,
                    BK: tl.constexpr):
    cols = tl.program_id(0) * BK + tl.arange(0, BK)
    mask = cols < k
    pos, inb = _abs_positions(idx_ptr, cols, mask, block, num_full, k_full, kf_div, n)
    if SCALAR:
        v = _load_f32(v_ptr, cols * 0, mask, V_BF16)
    else:
        v = _load_f32(v_ptr, cols, mask, V_BF16)
    _store_f32(x_ptr, pos, v, inb, X_BF16)


# --------------------------------------------------------------------------------------------
# window statistics -> Adam update
# --------------------------------------------------------------------------------------------
@triton.jit
def _sr_noise16(seed32, pos):
    """Same position hash as reference.sr_noise16 (murmur3 finaliser on uint32)."""
    h = pos.to(tl.uint32) * tl.full([], 0x9E3779B1, tl.uint32) + seed32.to(tl.uint32)
    h = h ^ (h >> 16)
    h = h * tl.full([], 0x85EBCA6B, tl.uint32)
    h = h ^ (h >> 13)
    h = h * tl.full([], 0xC2B2AE35, tl.uint32)
    h = h ^ (h >> 16)
    return (h & 0xFFFF).to(tl.int32)


@triton.jit
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
        is_tail = b >= num_full
        blen = tl.where(is_tail, tail, block)
        kb = tl.where(is_tail, k_tail, k_full)
        col0 = b * k_full
        start = tl.cast(b, tl.int64) * block
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
                c = c0 + kofs
                mk = c < kb
                j = tl.load(idx_ptr + rbase + c, mask=mk, other=0).to(tl.int32)
                mk = mk & (j >= 0) & (j < blen)  # never write outside this program's slot
                if V_BF16:  # inlined _load_f32 (see the note in _ef_compress_kernel)
                    vh = tl.load(vals_ptr + rbase + c, mask=mk, other=0)
                    val = (vh.to(tl.int32) << 16).to(tl.float32, bitcast=True)
                else:
                    val = tl.load(vals_ptr + rbase + c, mask=mk, other=0).to(tl.float32)
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
            p = _load_f32(p_ptr, start + o, mk, P_BF16) * decay
            p = tl.fma(upd, -lr, p)  # as PyTorch's param.sub_(upd, alpha=lr)
            if SR:
                bits = p.to(tl.int32, bitcast=True)
                noise = _sr_noise16(seed, start + o)
                sr = ((bits + noise) & -65536) >> 16
                finite = (bits & 0x7FFFFFFF) < 0x7F800000
                tl.store(p_ptr + start + o, tl.where(finite, sr, _bf16_rne_bits(p)).to(tl.int16),
                         mask=mk)
            else:
                _store_f32(p_ptr, start + o, p, mk, P_BF16)
        tl.debug_barrier()


# --------------------------------------------------------------------------------------------
# fused error feedback: dequantize-add, top-k, gather, zero, quantize (one program per block)
# --------------------------------------------------------------------------------------------
@triton.jit
def _total(x):
    """Sum over every axis of a tile."""
    return tl.sum(x)


@triton.jit
def _prefix_pairs(a, b):
    """Inclusive prefix sums, in element order, of a pair tile (a = even, b = odd elements).

    The tile [rows, pairs] is laid out row-major; returns the prefix at the even and odd element.
    """
    s = a + b
    row_tot = tl.sum(s, axis=1)
    before = tl.cumsum(row_tot, axis=0) - row_tot
    incl = before[:, None] + tl.cumsum(s, axis=1)
    return incl - b, incl


@triton.jit
def _ef_compress_kernel(g_ptr, codes_ptr, mins_ptr, maxs_ptr, idx_ptr, val_ptr,
                        bucket, block, num_full, k_full, tail, k_tail,
                        G_BF16: tl.constexpr, M_BF16: tl.constexpr, V_BF16: tl.constexpr,
                        NBP: tl.constexpr, HP: tl.constexpr):
    # tile [NBP buckets, HP pairs]; element (r, h, s) sits at local offset r*bucket + 2h + s
    pid = tl.program_id(0)
    is_tail = pid >= num_full
    length = tl.where(is_tail, tail, block)
    k = tl.where(is_tail, k_tail, k_full)
    col0 = pid * k_full
    start = pid.to(tl.int64) * block  # a multiple of bucket (hence even)
    half = bucket // 2
    nbk = (length + bucket - 1) // bucket
    rr = tl.arange(0, NBP)
    hh = tl.arange(0, HP)
    le = rr[:, None] * bucket + 2 * hh[None, :]
    valid = (rr < nbk)[:, None] & (hh < half)[None, :]
    me = valid & (le < length)
    mo = valid & (le + 1 < length)
    qrow = start // bucket + rr
    prow = start // 2 + rr[:, None].to(tl.int64) * half + hh[None, :]
    # a = g + Q^-1(e)
    lo = _load_f32(mins_ptr, qrow, rr < nbk, M_BF16)
    hi = _load_f32(maxs_ptr, qrow, rr < nbk, M_BF16)
    scale = tl.div_rn(hi - lo, 15.0)[:, None]
    lo = lo[:, None]
    byte = tl.load(codes_ptr + prow, mask=me, other=0).to(tl.int32)
    de = lo + ((byte >> 4) & 0xF).to(tl.float32) * scale
    do = lo + (byte & 0xF).to(tl.float32) * scale
    ae = _load_f32(g_ptr, start + le, me, G_BF16) + de
    ao = _load_f32(g_ptr, start + le + 1, mo, G_BF16) + do
    # top-k threshold by bisection on the bit pattern of |a|
    be = _mag_bits(ae, me)
    bo = _mag_bits(ao, mo)
    thr = k * 0
    for i in range(31):
        cand = thr | (0x40000000 >> i)
        # one reduction over the whole tile, no helper call: both are slow under the interpreter
        cnt = tl.sum((be >= cand).to(tl.int32) + (bo >= cand).to(tl.int32))
        thr = tl.where(cnt >= k, cand, thr)
    gte = be > thr
    gto = bo > thr
    eqe = (be == thr).to(tl.int32)
    eqo = (bo == thr).to(tl.int32)
    budget = k - _total(gte.to(tl.int32)) - _total(gto.to(tl.int32))
    ce, co = _prefix_pairs(eqe, eqo)
    se = gte | ((eqe != 0) & (ce <= budget))
    so = gto | ((eqo != 0) & (co <= budget))
    pe, po = _prefix_pairs(se.to(tl.int32), so.to(tl.int32))
    tl.debug_barrier()  # all reads of codes/mins/maxs happen before they are overwritten
    tl.store(idx_ptr + col0 + pe - 1, le.to(tl.int16), mask=se)
    tl.store(idx_ptr + col0 + po - 1, (le + 1).to(tl.int16), mask=so)
    _store_f32(val_ptr, col0 + pe - 1, ae, se, V_BF16)
    _store_f32(val_ptr, col0 + po - 1, ao, so, V_BF16)
    # residual -> quantize
    re = tl.where(se, 0.0, ae)
    ro = tl.where(so, 0.0, ao)
    qlo = tl.min(tl.minimum(tl.where(me, re, float("inf")), tl.where(mo, ro, float("inf"))),
                 axis=1)
    qhi = tl.max(tl.maximum(tl.where(me, re, float("-inf")), tl.where(mo, ro, float("-inf"))),
                 axis=1)
    qlo = _round_stat(qlo, M_BF16)
    qhi = _round_stat(qhi, M_BF16)
    _store_f32(mins_ptr, qrow, qlo, rr < nbk, M_BF16)
    _store_f32(maxs_ptr, qrow, qhi, rr < nbk, M_BF16)
    qs = tl.div_rn(qhi - qlo, 15.0)
    pos = (qs > 0)[:, None]
    safe = tl.where(qs > 0, qs, 1.0)[:, None]
    q0 = _quant_code(re, qlo[:, None], safe, pos)
    q1 = _quant_code(ro, qlo[:, None], safe, pos & mo)
    tl.store(codes_ptr + prow, ((q0 << 4) | q1).to(tl.uint8), mask=me)


# --------------------------------------------------------------------------------------------
# host helpers
# --------------------------------------------------------------------------------------------
def _np2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _warps(tile: int) -> int:
    if tile >= 16384:
        return 16
    if tile >= 4096:
        return 8
    return 4


def _arg(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(tensor as passed to a kernel, is_bf16): bf16 goes as its int16 bit patterns."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16), True
    return t, False


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1) if t.is_contiguous() else t.contiguous().view(-1)


class _Out:
    """A contiguous flat view of an output tensor, copied back on exit when it was a temporary."""

    def __init__(self, t: torch.Tensor):
        self.t = t
        self.flat = _flat(t)

    def done(self) -> None:
        if not self.t.is_contiguous():
            self.t.copy_(self.flat.view(self.t.shape))


def _on_device(fn):
    """Launch on the device of the first tensor argument (Triton uses the current device)."""

    @functools.wraps(fn)
    def wrapper(t, *args, **kwargs):
        ctx = torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
        with ctx:
            return fn(t, *args, **kwargs)

    return wrapper


# --------------------------------------------------------------------------------------------
# public API (same as reference.py)
# --------------------------------------------------------------------------------------------
@_on_device
def quantize4(x: torch.Tensor, bucket: int, codes: torch.Tensor, mins: torch.Tensor,
              maxs: torch.Tensor) -> None:
    n = x.numel()
    if n == 0:
        return
    if mins.dtype not in (torch.bfloat16, torch.float32) or maxs.dtype != mins.dtype:
        return reference.quantize4(x, bucket, codes, mins, maxs)
    if x.dtype not in _FLOAT_DTYPES:
        return reference.quantize4(x, bucket, codes, mins, maxs)
    bucket = int(bucket)
    nbq = -(-n // bucket)
    xf, xbf = _arg(_flat(x))
    oc, omin, omax = _Out(codes), _Out(mins), _Out(maxs)
    mn, mbf = _arg(omin.flat)
    mx, _ = _arg(omax.flat)
    cp = min(_np2(max(1, bucket // 2)), 1024)
    rows = max(1, 1024 // cp)
    grid = (triton.cdiv(nbq, rows),)
    _quantize4_kernel[grid](xf, oc.flat, mn, mx, n, bucket, nbq, X_BF16=xbf, M_BF16=mbf, R=rows,
                            CP=cp, num_warps=4, **_LAUNCH)
    oc.done()
    omin.done()
    omax.done()


def _dequant(codes, mins, maxs, numel, bucket, add=None) -> torch.Tensor:
    out = torch.empty(numel, dtype=torch.float32, device=codes.device)
    if numel == 0:
        return out
    mn, mbf = _arg(_flat(mins))
    mx, _ = _arg(_flat(maxs.to(mins.dtype)))
    if add is not None:
        af, abf = _arg(_flat(add))
    else:
        af, abf = out, False
    bp = 1024
    grid = (triton.cdiv(-(-numel // 2), bp),)
    _dequantize4_kernel[grid](_flat(codes), mn, mx, af, out, numel, int(bucket), M_BF16=mbf,
                              HAS_ADD=add is not None, A_BF16=abf, BP=bp, num_warps=4, **_LAUNCH)
    return out


@_on_device
def dequantize4(codes: torch.Tensor, mins: torch.Tensor, maxs: torch.Tensor, numel: int,
                bucket: int) -> torch.Tensor:
    if numel == 0:
        return torch.zeros(0, dtype=torch.float32, device=codes.device)
    if mins.dtype not in _FLOAT_DTYPES:
        return reference.dequantize4(codes, mins, maxs, numel, bucket)
    return _dequant(codes, mins, maxs, numel, bucket)


@_on_device
def block_topk(x: torch.Tensor, layout: TopKLayout) -> torch.Tensor:
    if layout.numel == 0 or layout.k == 0:
        return torch.zeros(0, dtype=torch.int16, device=x.device)
    if _np2(layout.block) > MAX_TOPK_TILE or x.dtype not in _FLOAT_DTYPES:
        return reference.block_topk(x, layout)
    xf, xbf = _arg(_flat(x))
    out = torch.empty(layout.k, dtype=torch.int16, device=x.device)
    nprog = layout.num_full + (1 if layout.tail and layout.k_tail else 0)
    tile = _np2(layout.block)
    _block_topk_kernel[(nprog,)](xf, out, layout.block, layout.num_full, layout.k_full,
                                 layout.tail, layout.k_tail, X_BF16=xbf, BLOCK=tile,
                                 num_warps=_warps(tile), **_LAUNCH)
    return out


def _k_tile(k: int) -> int:
    return min(max(_np2(k), 16), 1024)


def _col_args(layout: TopKLayout, n: int) -> tuple[int, ...]:
    """(block, num_full, k_full, k_full or 1 as divisor, numel) for _abs_positions."""
    return layout.block, layout.num_full, layout.k_full, max(layout.k_full, 1), n


@_on_device
def gather_block_values(x: torch.Tensor, idx: torch.Tensor, layout: TopKLayout) -> torch.Tensor:
    k = idx.numel()
    out = torch.empty(k, dtype=torch.float32, device=x.device)
    if k == 0 or x.numel() == 0:
        return out
    if x.dtype not in _FLOAT_DTYPES:
        return reference.gather_block_values(x, idx, layout)
    xf, xbf = _arg(_flat(x))
    bk = _k_tile(k)
    _gather_kernel[(triton.cdiv(k, bk),)](xf, _flat(idx), out, k, *_col_args(layout, x.numel()),
                                          X_BF16=xbf, BK=bk, num_warps=4, **_LAUNCH)
    return out


@_on_device
def scatter_block_values(x: torch.Tensor, idx: torch.Tensor, values, layout: TopKLayout) -> None:
    k = idx.numel()
    if k == 0 or x.numel() == 0:
        return
    if x.dtype not in _FLOAT_DTYPES:
        return reference.scatter_block_values(x, idx, values, layout)
    scalar = not torch.is_tensor(values)
    if scalar:
        values = torch.full((1,), float(values), dtype=x.dtype, device=x.device)
    elif values.dtype not in _FLOAT_DTYPES:
        values = values.to(x.dtype)
    values = values.to(x.device)
    ox = _Out(x)
    xf, xbf = _arg(ox.flat)
    vf, vbf = _arg(_flat(values))
    bk = _k_tile(k)
    _scatter_kernel[(triton.cdiv(k, bk),)](xf, _flat(idx), vf, k, *_col_args(layout, x.numel()),
                                           X_BF16=xbf, V_BF16=vbf, SCALAR=scalar, BK=bk,
                                           num_warps=4, **_LAUNCH)
    ox.done()


def _window_programs(device: torch.device, nblocks: int) -> int:
    if WINDOW_MAX_PROGRAMS is not None:
        return max(1, min(nblocks, int(WINDOW_MAX_PROGRAMS)))
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(nblocks, 4 * sms))
    return max(1, nblocks)


@_on_device
def window_adam_update(param: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor,
                       layout: TopKLayout, step: int, beta1: float, beta2: float, eps: float,
                       lr: float, weight_decay: float, sr_seed: int | None = None,
                       dense: torch.Tensor | None = None) -> None:
    n = param.numel()
    if n == 0:
        return
    if param.dtype not in _FLOAT_DTYPES:
        return reference.window_adam_update(param, idx, vals, layout, step, beta1, beta2, eps, lr,
                                            weight_decay, sr_seed, dense)
    window = idx.shape[0]
    k = layout.k
    dev = param.device
    w1 = reference.window_weights(window, step, beta1, dev)
    w2 = reference.window_weights(window, step, beta2, dev)
    c1, c2 = reference.adam_coefficients(step, beta1, beta2)
    decay = 1.0 - lr * weight_decay if weight_decay != 0.0 else 1.0
    nrows = max(0, min(window, int(step)))  # rows >= step have weight 0
    if k == 0:
        nrows = 0
    if vals.dtype not in _FLOAT_DTYPES:
        vals = vals.float()
    idx_c = idx.contiguous()
    vf, vbf = _arg(vals.contiguous())
    op = _Out(param)
    pf, pbf = _arg(op.flat)
    sr = sr_seed is not None and param.dtype == torch.bfloat16
    nblocks = layout.num_full + (1 if layout.tail else 0)
    nprog = _window_programs(dev, nblocks)
    scratch = torch.empty(nprog * 2 * layout.block, dtype=torch.float32, device=dev)
    kmax = max(layout.k_full, layout.k_tail, 1)
    kch = min(max(_np2(kmax), 16), 1024)
    dch = min(max(_np2(layout.block), 16), 2048)
    dense_f = _flat(dense.float()) if dense is not None else scratch
    _window_adam_kernel[(nprog,)](
        pf, idx_c, vf, w1, w2, scratch, dense_f, layout.block, layout.num_full, layout.k_full,
        layout.tail, layout.k_tail, k, nrows, nblocks, float(c1), float(c2), float(eps), float(lr),
        float(decay), ((sr_seed ^ (sr_seed >> 32)) & 0xFFFFFFFF) if sr else 0, P_BF16=pbf, V_BF16=vbf, SR=sr,
        HAS_DENSE=dense is not None, KCH=kch,
        DCH=dch, num_warps=4 if dch <= 1024 else 8, num_stages=1, **_LAUNCH)
    op.done()


def _fusable(layout: TopKLayout, bucket: int) -> tuple[int, int] | None:
    """(NBP, HP) tile of the fused error-feedback kernel, or None when it does not apply."""
    if bucket < 2 or bucket % 2:
        return None
    aligned = layout.block % bucket == 0 or (layout.num_full == 1 and layout.tail == 0)
    if not aligned:
        return None
    nbp = _np2(-(-layout.block // bucket))
    hp = _np2(bucket // 2)
    if nbp * hp * 2 > MAX_TOPK_TILE:
        return None
    return nbp, hp


@_on_device
def error_feedback_compress(grad: torch.Tensor, codes: torch.Tensor, mins: torch.Tensor,
                            maxs: torch.Tensor, bucket: int, layout: TopKLayout,
                            idx_out: torch.Tensor, val_out: torch.Tensor) -> None:
    n = layout.numel
    if n == 0:
        return
    bucket = int(bucket)
    tile = _fusable(layout, bucket)
    ok_dtypes = (grad.dtype in _FLOAT_DTYPES and val_out.dtype in _FLOAT_DTYPES
                 and mins.dtype in (torch.bfloat16, torch.float32) and maxs.dtype == mins.dtype
                 and idx_out.dtype == torch.int16)
    if tile is None or not ok_dtypes:
        acc = _dequant(codes, mins, maxs, n, bucket, add=grad)
        idx = block_topk(acc, layout)
        idx_out.copy_(idx)
        val_out.copy_(gather_block_values(acc, idx, layout))
        scatter_block_values(acc, idx, 0.0, layout)
        quantize4(acc, bucket, codes, mins, maxs)
        return
    nbp, hp = tile
    gf, gbf = _arg(_flat(grad))
    oc, omin, omax = _Out(codes), _Out(mins), _Out(maxs)
    oi, ov = _Out(idx_out), _Out(val_out)
    mn, mbf = _arg(omin.flat)
    mx, _ = _arg(omax.flat)
    vf, vbf = _arg(ov.flat)
    nprog = layout.num_full + (1 if layout.tail else 0)
    _ef_compress_kernel[(nprog,)](gf, oc.flat, mn, mx, oi.flat, vf, bucket, layout.block,
                                  layout.num_full, layout.k_full, layout.tail, layout.k_tail,
                                  G_BF16=gbf, M_BF16=mbf, V_BF16=vbf, NBP=nbp, HP=hp,
                                  num_warps=_warps(nbp * hp * 2), **_LAUNCH)
    for o in (oc, omin, omax, oi, ov):
        o.done()
