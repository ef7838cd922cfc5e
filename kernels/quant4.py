"""4-bit asymmetric block quantizer of MicroAdam's error feedback (and EFCP's ``ef_bits=4``).

A flat tensor is cut into buckets of ``bucket`` elements, each stored as its min and max (bf16
or fp32) and one 4-bit code per element, two codes per byte (element 2i in the HIGH nibble).
The PyTorch twins define the semantics; the Triton kernels (``*_triton``) match them bitwise.
"""

from __future__ import annotations

import torch

from ._triton import (FLOAT_DTYPES, LAUNCH, Out, arg, bf16_rne_bits, flat, jit, load_f32,
                      np2, on_device, store_f32, tl, triton)


# ---- PyTorch twins ------------------------------------------------------------------------------
def quant_scale(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Step of each bucket, fp32; 0 for a constant bucket."""
    return (hi.float() - lo.float()) / 15.0


def quantize4(x: torch.Tensor, bucket: int, codes: torch.Tensor, mins: torch.Tensor,
              maxs: torch.Tensor, overwrite: bool = False) -> None:
    """Quantize flat ``x`` into ``codes`` (uint8 [ceil(n/2)]), ``mins``/``maxs`` (bf16 [ceil(n/bucket)]).

    min and max are rounded to the nearest value of the stats' dtype (bf16: round to nearest
    even), as the reference stores them: re-quantizing dequantized values is then a fixed point
    (no drift). An element up to half a bf16 ulp outside the rounded range gets code 0 or 15
    (clamped). code = floor((x - min) / step + 0.5) clamped to [0, 15]; a constant bucket has
    step 0 and gets code 0 (no 0/0). ``overwrite=True`` lets the twin use a contiguous fp32 ``x``
    as its workspace (the callers pass scratch they discard; saves a full-size temporary).
    """
    n = x.numel()
    if n == 0:
        return
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.reshape(-1).float().contiguous()  # a private copy: free to overwrite
    elif not overwrite:
        x = x.reshape(-1).clone()
    x = x.view(-1)
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
    for start, rows, width in ((0, nf, bucket), (nf * bucket, 1 if nf * bucket < n else 0,
                                                   n - nf * bucket)):
        if rows == 0:
            continue
        b0 = start // bucket
        t = x[start:start + rows * width].view(rows, width)
        t.sub_(lo32[b0:b0 + rows, None]).div_(safe[b0:b0 + rows, None]).add_(0.5).floor_()
        t.clamp_(0, 15)
    # pack in float (exact: integers below 256): byte i = 16 * code[2i] + code[2i + 1]
    high = x[0::2]
    high[: n // 2].mul_(16).add_(x[1::2])
    if n & 1:
        high[-1:].mul_(16)
    codes.copy_(high)


def dequantize4(codes: torch.Tensor, mins: torch.Tensor, maxs: torch.Tensor, numel: int,
                bucket: int) -> torch.Tensor:
    """Inverse of :func:`quantize4`: fp32 [numel] = min + code * step (a fresh tensor)."""
    if numel == 0:
        return torch.zeros(0, dtype=torch.float32, device=codes.device)
    nbq = mins.numel()
    out = torch.empty(nbq * bucket, dtype=torch.float32, device=codes.device)
    pairs = 2 * codes.numel()  # <= nbq * bucket: bucket is even
    out[0:pairs:2] = codes >> 4
    out[1:pairs:2] = codes & 0xF
    out[numel:] = 0
    ov = out.view(nbq, bucket)
    ov.mul_(quant_scale(mins, maxs)[:, None]).add_(mins.float()[:, None])
    return out[:numel]


# ---- Triton kernels -----------------------------------------------------------------------------
@jit
def round_stat(x, M_BF16: tl.constexpr):
    """A bucket's min/max as it will be stored: bf16 rounds to nearest even (as the twin's
    ``copy_``), fp32 is kept. Every later use reads this value, so the codes match it."""
    if M_BF16:
        x = (bf16_rne_bits(x) << 16).to(tl.float32, bitcast=True)
    return x


@jit
def quant_code(x, lo, safe, ok):
    """4-bit code of x (int32): floor((x - lo) / step + 0.5) in [0, 15]; 0 where ``ok`` is false."""
    q = tl.floor(tl.div_rn(x - lo, safe) + 0.5)
    q = tl.minimum(tl.maximum(q, 0.0), 15.0)
    return tl.where(ok, q, 0.0).to(tl.int32)


@jit
def _load_code_pairs(x_ptr, rbase, rmask, p, half, n, X_BF16: tl.constexpr):
    """Elements 2p and 2p+1 of each bucket row (the two nibbles of byte p), masked, as fp32."""
    e0 = rbase + 2 * p[None, :]
    base = rmask[:, None] & (p < half)[None, :]
    m0 = base & (e0 < n)
    m1 = base & (e0 + 1 < n)
    return e0, m0, m1, load_f32(x_ptr, e0, m0, X_BF16), load_f32(x_ptr, e0 + 1, m1, X_BF16)


@jit
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
    lo = round_stat(lo, M_BF16)
    hi = round_stat(hi, M_BF16)
    store_f32(mins_ptr, rows, lo, rmask, M_BF16)
    store_f32(maxs_ptr, rows, hi, rmask, M_BF16)
    scale = tl.div_rn(hi - lo, 15.0)
    pos = scale > 0
    safe = tl.where(pos, scale, 1.0)
    for c0 in range(0, half, CP):
        e0, m0, m1, x0, x1 = _load_code_pairs(x_ptr, rbase, rmask, c0 + cols, half, n, X_BF16)
        q0 = quant_code(x0, lo[:, None], safe[:, None], pos[:, None])
        q1 = quant_code(x1, lo[:, None], safe[:, None], pos[:, None] & m1)
        tl.store(codes_ptr + (e0 >> 1), ((q0 << 4) | q1).to(tl.uint8), mask=m0)


@jit
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
    lo = load_f32(mins_ptr, b, m0, M_BF16)
    hi = load_f32(maxs_ptr, b, m0, M_BF16)
    scale = tl.div_rn(hi - lo, 15.0)
    d0 = lo + ((byte >> 4) & 0xF).to(tl.float32) * scale
    d1 = lo + (byte & 0xF).to(tl.float32) * scale
    if HAS_ADD:
        d0 = load_f32(add_ptr, e0, m0, A_BF16) + d0
        d1 = load_f32(add_ptr, e0 + 1, m1, A_BF16) + d1
    tl.store(out_ptr + e0, d0, mask=m0)
    tl.store(out_ptr + e0 + 1, d1, mask=m1)


@on_device
def quantize4_triton(x: torch.Tensor, bucket: int, codes: torch.Tensor, mins: torch.Tensor,
                     maxs: torch.Tensor, overwrite: bool = False) -> None:
    """Triton twin of :func:`quantize4`: one program per group of buckets."""
    n = x.numel()
    if n == 0:
        return
    if (mins.dtype not in (torch.bfloat16, torch.float32) or maxs.dtype != mins.dtype
            or x.dtype not in FLOAT_DTYPES):
        return quantize4(x, bucket, codes, mins, maxs)
    bucket = int(bucket)
    nbq = -(-n // bucket)
    xf, xbf = arg(flat(x))
    oc, omin, omax = Out(codes), Out(mins), Out(maxs)
    mn, mbf = arg(omin.flat)
    mx, _ = arg(omax.flat)
    cp = min(np2(max(1, bucket // 2)), 1024)
    rows = max(1, 1024 // cp)
    grid = (triton.cdiv(nbq, rows),)
    _quantize4_kernel[grid](xf, oc.flat, mn, mx, n, bucket, nbq, X_BF16=xbf, M_BF16=mbf, R=rows,
                            CP=cp, num_warps=4, **LAUNCH)
    for o in (oc, omin, omax):
        o.done()


def dequantize_add_triton(codes: torch.Tensor, mins: torch.Tensor, maxs: torch.Tensor,
                          numel: int, bucket: int, add: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """fp32 [numel] ``Q^-1(codes) (+ add)``, one pass (error feedback adds the gradient)."""
    out = torch.empty(numel, dtype=torch.float32, device=codes.device)
    if numel == 0:
        return out
    mn, mbf = arg(flat(mins))
    mx, _ = arg(flat(maxs.to(mins.dtype)))
    af, abf = arg(flat(add)) if add is not None else (out, False)
    bp = 1024
    grid = (triton.cdiv(-(-numel // 2), bp),)
    _dequantize4_kernel[grid](flat(codes), mn, mx, af, out, numel, int(bucket), M_BF16=mbf,
                              HAS_ADD=add is not None, A_BF16=abf, BP=bp, num_warps=4, **LAUNCH)
    return out


@on_device
def dequantize4_triton(codes: torch.Tensor, mins: torch.Tensor, maxs: torch.Tensor, numel: int,
                       bucket: int) -> torch.Tensor:
    """Triton twin of :func:`dequantize4`."""
    if mins.dtype not in FLOAT_DTYPES:
        return dequantize4(codes, mins, maxs, numel, bucket)
    return dequantize_add_triton(codes, mins, maxs, numel, bucket)
