"""One top-k compression step with 4-bit error feedback: ``a = grad + Q^-1(e)``; the window row
gets the block top-k of ``a``; ``e <- Q(a with those entries zeroed)`` (MicroAdam), or with the
selected entries' storage rounding left in (``keep_rounding``, EFCP).

The PyTorch twin composes the single-op twins. The native CPU version (``*_native``,
``csrc/microadam_cpu.c``) does each top-k block in one pass. The Triton version fuses the whole
step into one program per top-k block (dequantize-add, top-k, gather, zeroing, re-quantization)
when every top-k block starts on a quantization-bucket boundary (the usual case) and not for
``keep_rounding``; otherwise it composes the single-op Triton kernels. All give the same bits.
"""

from __future__ import annotations

import torch

from . import _native, quant4, topk
from ._triton import (FLOAT_DTYPES, LAUNCH, Out, arg, block_geometry, flat, jit, load_f32, np2,
                      on_device, store_f32, tl, warps)
from .layout import MAX_INT16_BLOCK, TopKLayout
from .quant4 import quant_code, round_stat
from .topk import MAX_TOPK_TILE, mag_bits


def _select_and_requantize(acc: torch.Tensor, codes: torch.Tensor, mins: torch.Tensor,
                           maxs: torch.Tensor, bucket: int, layout: TopKLayout,
                           idx_out: torch.Tensor, val_out: torch.Tensor, use_triton: bool,
                           keep_rounding: bool = False) -> None:
    """The step after ``acc = grad + Q^-1(e)``, composed of the single-op kernels (module
    attributes looked up per call, so a profiler that wraps them sees these calls)."""
    sfx = "_triton" if use_triton else ""
    idx = getattr(topk, "block_topk" + sfx)(acc, layout)
    idx_out.copy_(idx)
    picked = getattr(topk, "gather_block_values" + sfx)(acc, idx, layout)
    val_out.copy_(picked)
    # the selected entries leave the error: all of them (MicroAdam), or all but what storing
    # them in the window's dtype rounded off (EFCP: a - c, changed only at the kept entries)
    rest = picked.sub_(val_out.float()) if keep_rounding else 0.0
    getattr(topk, "scatter_block_values" + sfx)(acc, idx, rest, layout)
    getattr(quant4, "quantize4" + sfx)(acc, bucket, codes, mins, maxs, overwrite=True)


def error_feedback_compress(grad: torch.Tensor, codes: torch.Tensor, mins: torch.Tensor,
                            maxs: torch.Tensor, bucket: int, layout: TopKLayout,
                            idx_out: torch.Tensor, val_out: torch.Tensor,
                            keep_rounding: bool = False) -> None:
    """a = grad + Q^-1(e); (idx, val) = block top-k of a; e <- Q(a with the selected entries zeroed).

    ``grad`` is left untouched; ``idx_out`` (int16 [k]) and ``val_out`` (bf16 [k]) receive the new
    window row; ``codes``/``mins``/``maxs`` are overwritten with the quantized residual.
    ``keep_rounding`` (EFCP): the selected entries of the residual are ``a - val_out`` (what
    storing them rounded off) instead of 0.
    """
    acc = quant4.dequantize4(codes, mins, maxs, layout.numel, bucket).add_(grad.reshape(-1))
    _select_and_requantize(acc, codes, mins, maxs, bucket, layout, idx_out, val_out, False,
                           keep_rounding)


def native_compress_applies(grad: torch.Tensor, codes: torch.Tensor, mins: torch.Tensor,
                            maxs: torch.Tensor, bucket: int, layout: TopKLayout,
                            idx_out: torch.Tensor, val_out: torch.Tensor) -> bool:
    """Whether the native loop takes this call: library built, CPU contiguous tensors, fp32/bf16
    data, int16 indices, and every top-k block starting on a quantization-bucket boundary."""
    stats = (torch.bfloat16, torch.float32)
    return (layout.numel > 0 and grad.numel() == layout.numel and bucket >= 2 and bucket % 2 == 0
            and (layout.block % bucket == 0 or (layout.num_full == 1 and layout.tail == 0))
            and grad.dtype in stats and mins.dtype in stats and maxs.dtype == mins.dtype
            and val_out.dtype in stats and codes.dtype == torch.uint8
            and idx_out.dtype == torch.int16 and layout.block <= MAX_INT16_BLOCK
            and _native.takes(grad, codes, mins, maxs, idx_out, val_out))


def compress_native(grad: torch.Tensor, codes: torch.Tensor, mins: torch.Tensor,
                    maxs: torch.Tensor, bucket: int, layout: TopKLayout, idx_out: torch.Tensor,
                    val_out: torch.Tensor, keep_rounding: bool) -> None:
    """The native loop (see :func:`native_compress_applies`). ``keep_rounding``: the selected
    entries of the new error are ``a - stored value`` (EFCP) instead of 0 (MicroAdam)."""
    bf16 = torch.bfloat16
    _native.call(
        "hco_ef_compress", grad.data_ptr(), grad.dtype == bf16, codes.data_ptr(),
        mins.data_ptr(), maxs.data_ptr(), mins.dtype == bf16, int(bucket), layout.block,
        layout.num_full, layout.k_full, layout.tail, layout.k_tail, idx_out.data_ptr(),
        val_out.data_ptr(), val_out.dtype == bf16, bool(keep_rounding), torch.get_num_threads())


def error_feedback_compress_native(grad: torch.Tensor, codes: torch.Tensor, mins: torch.Tensor,
                                   maxs: torch.Tensor, bucket: int, layout: TopKLayout,
                                   idx_out: torch.Tensor, val_out: torch.Tensor,
                                   keep_rounding: bool = False) -> None:
    """Native CPU twin of :func:`error_feedback_compress` (same bits); the PyTorch twin where
    it does not apply (:func:`native_compress_applies`)."""
    args = (grad, codes, mins, maxs, int(bucket), layout, idx_out, val_out)
    if not native_compress_applies(*args):
        return error_feedback_compress(*args, keep_rounding)
    compress_native(*args, keep_rounding)


@jit
def _prefix_pairs(a, b):
    """Inclusive prefix sums, in element order, of a pair tile (a = even, b = odd elements).

    The tile [rows, pairs] is laid out row-major; returns the prefix at the even and odd element.
    """
    s = a + b
    row_tot = tl.sum(s, axis=1)
    before = tl.cumsum(row_tot, axis=0) - row_tot
    incl = before[:, None] + tl.cumsum(s, axis=1)
    return incl - b, incl


@jit
def _ef_compress_kernel(g_ptr, codes_ptr, mins_ptr, maxs_ptr, idx_ptr, val_ptr,
                        bucket, block, num_full, k_full, tail, k_tail,
                        G_BF16: tl.constexpr, M_BF16: tl.constexpr, V_BF16: tl.constexpr,
                        NBP: tl.constexpr, HP: tl.constexpr):
    # tile [NBP buckets, HP pairs]; element (r, h, s) sits at local offset r*bucket + 2h + s
    pid = tl.program_id(0)
    # start: a multiple of bucket (hence even)
    length, k, col0, start = block_geometry(pid, block, num_full, k_full, tail, k_tail)
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
    lo = load_f32(mins_ptr, qrow, rr < nbk, M_BF16)
    hi = load_f32(maxs_ptr, qrow, rr < nbk, M_BF16)
    scale = tl.div_rn(hi - lo, 15.0)[:, None]
    lo = lo[:, None]
    byte = tl.load(codes_ptr + prow, mask=me, other=0).to(tl.int32)
    de = lo + ((byte >> 4) & 0xF).to(tl.float32) * scale
    do = lo + (byte & 0xF).to(tl.float32) * scale
    ae = load_f32(g_ptr, start + le, me, G_BF16) + de
    ao = load_f32(g_ptr, start + le + 1, mo, G_BF16) + do
    # top-k threshold by bisection on the bit pattern of |a|
    be = mag_bits(ae, me)
    bo = mag_bits(ao, mo)
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
    budget = k - tl.sum(gte.to(tl.int32)) - tl.sum(gto.to(tl.int32))
    ce, co = _prefix_pairs(eqe, eqo)
    se = gte | ((eqe != 0) & (ce <= budget))
    so = gto | ((eqo != 0) & (co <= budget))
    pe, po = _prefix_pairs(se.to(tl.int32), so.to(tl.int32))
    tl.debug_barrier()  # all reads of codes/mins/maxs happen before they are overwritten
    tl.store(idx_ptr + col0 + pe - 1, le.to(tl.int16), mask=se)
    tl.store(idx_ptr + col0 + po - 1, (le + 1).to(tl.int16), mask=so)
    store_f32(val_ptr, col0 + pe - 1, ae, se, V_BF16)
    store_f32(val_ptr, col0 + po - 1, ao, so, V_BF16)
    # residual -> quantize
    re = tl.where(se, 0.0, ae)
    ro = tl.where(so, 0.0, ao)
    qlo = tl.min(tl.minimum(tl.where(me, re, float("inf")), tl.where(mo, ro, float("inf"))),
                 axis=1)
    qhi = tl.max(tl.maximum(tl.where(me, re, float("-inf")), tl.where(mo, ro, float("-inf"))),
                 axis=1)
    qlo = round_stat(qlo, M_BF16)
    qhi = round_stat(qhi, M_BF16)
    store_f32(mins_ptr, qrow, qlo, rr < nbk, M_BF16)
    store_f32(maxs_ptr, qrow, qhi, rr < nbk, M_BF16)
    qs = tl.div_rn(qhi - qlo, 15.0)
    pos = (qs > 0)[:, None]
    safe = tl.where(qs > 0, qs, 1.0)[:, None]
    q0 = quant_code(re, qlo[:, None], safe, pos)
    q1 = quant_code(ro, qlo[:, None], safe, pos & mo)
    tl.store(codes_ptr + prow, ((q0 << 4) | q1).to(tl.uint8), mask=me)


def fusable(layout: TopKLayout, bucket: int) -> tuple[int, int] | None:
    """(NBP, HP) tile of the fused error-feedback kernel, or None when it does not apply."""
    if bucket < 2 or bucket % 2 or not (layout.block % bucket == 0
                                        or (layout.num_full == 1 and layout.tail == 0)):
        return None
    nbp = np2(-(-layout.block // bucket))
    hp = np2(bucket // 2)
    if nbp * hp * 2 > MAX_TOPK_TILE:
        return None
    return nbp, hp


@on_device
def error_feedback_compress_triton(grad: torch.Tensor, codes: torch.Tensor, mins: torch.Tensor,
                                   maxs: torch.Tensor, bucket: int, layout: TopKLayout,
                                   idx_out: torch.Tensor, val_out: torch.Tensor,
                                   keep_rounding: bool = False) -> None:
    """Triton twin of :func:`error_feedback_compress` (fused where :func:`fusable`, and not
    for ``keep_rounding``: then the single-op kernels)."""
    n = layout.numel
    if n == 0:
        return
    bucket = int(bucket)
    tile = fusable(layout, bucket)
    ok_dtypes = (grad.dtype in FLOAT_DTYPES and val_out.dtype in FLOAT_DTYPES
                 and mins.dtype in (torch.bfloat16, torch.float32) and maxs.dtype == mins.dtype
                 and idx_out.dtype == torch.int16)
    if tile is None or not ok_dtypes or keep_rounding:
        acc = quant4.dequantize_add_triton(codes, mins, maxs, n, bucket, add=grad)
        _select_and_requantize(acc, codes, mins, maxs, bucket, layout, idx_out, val_out, True,
                               keep_rounding)
        return
    nbp, hp = tile
    gf, gbf = arg(flat(grad))
    outs = oc, omin, omax, oi, ov = [Out(t) for t in (codes, mins, maxs, idx_out, val_out)]
    mn, mbf = arg(omin.flat)
    mx, _ = arg(omax.flat)
    vf, vbf = arg(ov.flat)
    nprog = layout.num_full + (1 if layout.tail else 0)
    _ef_compress_kernel[(nprog,)](gf, oc.flat, mn, mx, oi.flat, vf, bucket, layout.block,
                                  layout.num_full, layout.k_full, layout.tail, layout.k_tail,
                                  G_BF16=gbf, M_BF16=mbf, V_BF16=vbf, NBP=nbp, HP=hp,
                                  num_warps=warps(nbp * hp * 2), **LAUNCH)
    for o in outs:
        o.done()
