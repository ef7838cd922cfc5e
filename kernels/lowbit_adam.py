"""AdamW with block-wise quantized moments: the 8-bit and 4-bit first-order optimizers that
4-bit Shampoo grafts onto (``first_order="adamw_8bit"`` / ``"adamw_4bit"``).

Storage, per moment of a flat tensor of ``n`` elements cut into blocks of ``block`` elements:
one fp32 absmax per block and one code per element (8-bit: a byte each; 4-bit: two per byte,
element ``2i`` in the low nibble, packed by :mod:`.codebook`'s helpers). A code indexes an ascending
map of values in [-1, 1]; the element is ``map[code] * absmax``.

* first moment ``m``: the signed dynamic-tree map (:func:`.codebook.dynamic_tree_values`), which
  holds 0 and resolves magnitudes down to 5.5e-7 (8-bit) or 5.5e-3 (4-bit) of the block's absmax;
* second moment ``v``: an unsigned dynamic map **without zero** (:func:`unsigned_dynamic_values`):
  ``v`` never rounds to 0, so ``m / sqrt(v)`` cannot blow up (the zero-point problem of 4-bit
  Adam, Li et al. 2023, §4.1), small entries round up, which only damps their step. At 4 bits
  the codes hold ``sqrt(v)`` (:data:`SQRT_DOMAIN`), which the step computes anyway.
* 8-bit: block 256 (bitsandbytes' and torchao's); 4-bit: block 128 for both moments (the
  B128/DE and B128/DE-0 settings of Li et al. 2023, which torchao's AdamW4bit also uses).

One step per block: dequantize m and v, ``m = b1 m + (1-b1) g``, ``v = b2 v + (1-b2) g^2``,
``p = p (1 - lr wd) - (lr / (1-b1^t)) m / (sqrt(v) / sqrt(1-b2^t) + eps)`` in fp32 with one
rounding to the parameter dtype, then re-quantize m and v with the block's new absmax (nearest
map value; ties to the lower code). The PyTorch twin processes the tensor in chunks (bounded
temporaries); the Triton kernel does it in one pass, one program per block, and matches the twin
bitwise.
"""

from __future__ import annotations

import functools

import torch

from ._triton import FLOAT_DTYPES, LAUNCH, arg, flat, jit, load_f32, on_device, store_f32, tl
from .codebook import dynamic_tree_values, pack_nibbles, unpack_nibbles

#: bits -> elements per absmax block (both moments)
BLOCK = {8: 256, 4: 128}
#: bits whose second-moment codes hold sqrt(v) (the RMS) rather than v: squaring halves the
#: relative error of small entries and doubles the dynamic range the 15 values of the 4-bit map
#: cover (at 8 bits the map already reaches 3e-7 of the block maximum; measured on the
#: least-squares benchmark: better for 4-bit, slightly worse for 8-bit)
SQRT_DOMAIN = (4,)
#: elements the PyTorch twin processes at once (a multiple of every block): bounds its
#: temporaries to a few MiB whatever the parameter size
TWIN_CHUNK = 1 << 18


def unsigned_dynamic_values(bits: int) -> list[float]:
    """Unsigned dynamic map without 0: ``1`` plus ``bits - 1`` exponent levels, level ``i``
    holding the midpoints of ``2^(i+1) + 1`` evenly spaced points in [0.1, 1] scaled by
    ``10^(i - (bits - 2))`` (the signed map's sign bit spent on one more fraction bit), so
    ``2^bits - 1`` values, ascending; the smallest is 3.25e-3 (4-bit) / 3.25e-7 (8-bit)."""
    levels = bits - 1
    vals = [1.0]
    for i in range(levels):
        k = 2 ** (i + 1) + 1
        pts = [0.1 + 0.9 * t / (k - 1) for t in range(k)]
        scale = 10.0 ** (i - (levels - 1))
        vals += [scale * (a + b) / 2.0 for a, b in zip(pts[:-1], pts[1:])]
    return sorted(vals)


@functools.lru_cache(maxsize=None)
def _maps_cpu(bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if bits not in BLOCK:
        raise ValueError(f"bits must be one of {sorted(BLOCK)}, got {bits}")
    size = 2 ** bits
    out = []
    for vals in (dynamic_tree_values(bits), unsigned_dynamic_values(bits)):
        vals = vals + [1.0] * (size - len(vals))  # pad to 2^bits codes (never chosen: x <= 1)
        v = torch.tensor(vals, dtype=torch.float64).to(torch.float32)
        out += [v, (v[:-1] + v[1:]) * 0.5]
    return tuple(out)


_DEVICE_MAPS: dict[tuple[int, torch.device], tuple[torch.Tensor, ...]] = {}


def moment_maps(bits: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor]:
    """(m values, m midpoints, v values, v midpoints), fp32, ``2^bits`` values each (ascending,
    midpoints between neighbours), cached per device."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    hit = _DEVICE_MAPS.get((bits, dev))
    if hit is None:
        hit = _DEVICE_MAPS[(bits, dev)] = tuple(t.to(dev) for t in _maps_cpu(bits))
    return hit


def state_shapes(numel: int, bits: int) -> dict[str, tuple[int]]:
    """Shapes of the quantized moments of a tensor of ``numel`` elements."""
    codes = numel if bits == 8 else (numel + 1) // 2
    blocks = -(-numel // BLOCK[bits])
    return {"exp_avg_codes": (codes,), "exp_avg_absmax": (blocks,),
            "exp_avg_sq_codes": (codes,), "exp_avg_sq_absmax": (blocks,)}


# ---- PyTorch twins ------------------------------------------------------------------------------
def _unpack(codes: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """int64 codes of ``count`` elements from their storage."""
    return codes.long() if bits == 8 else unpack_nibbles(codes, count)


def _pack(idx: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    out.copy_(idx if bits == 8 else pack_nibbles(idx))


def dequantize_moment(codes: torch.Tensor, absmax: torch.Tensor, values: torch.Tensor, bits: int,
                      numel: int) -> torch.Tensor:
    """fp32 [numel] = ``values[code] * absmax`` of its block."""
    block = BLOCK[bits]
    x = values[_unpack(codes, bits, numel)]
    nb = absmax.numel()
    full = torch.nn.functional.pad(x, (0, nb * block - numel)).view(nb, block)
    return full.mul_(absmax.view(nb, 1)).view(-1)[:numel]


def quantize_moment(x: torch.Tensor, mids: torch.Tensor, bits: int, codes: torch.Tensor,
                    absmax: torch.Tensor) -> None:
    """Block absmax and nearest codes of fp32 ``x`` (flat) into ``codes`` / ``absmax``."""
    block, n = BLOCK[bits], x.numel()
    nb = absmax.numel()
    xb = torch.nn.functional.pad(x, (0, nb * block - n)).view(nb, block)
    amax = xb.abs().amax(dim=1)
    absmax.copy_(amax)
    inv = torch.where(amax > 0, 1.0 / torch.where(amax > 0, amax, 1.0), 0.0)
    xn = (xb * inv.view(nb, 1)).view(-1)[:n]
    _pack(torch.bucketize(xn, mids, right=False), bits, codes)


def lowbit_adam_update(param: torch.Tensor, grad: torch.Tensor, m_codes: torch.Tensor,
                       m_absmax: torch.Tensor, v_codes: torch.Tensor, v_absmax: torch.Tensor,
                       bits: int, step: int, beta1: float, beta2: float, eps: float, lr: float,
                       weight_decay: float) -> None:
    """One AdamW step of ``param`` with moments held in ``bits``-bit codes (module docstring);
    everything is updated in place."""
    n = param.numel()
    if n == 0:
        return
    block = BLOCK[bits]
    mvals, mmids, vvals, vmids = moment_maps(bits, param.device)
    step_size, inv_bc2, decay = _scalars(step, beta1, beta2, lr, weight_decay)
    p_flat = param.view(-1) if param.is_contiguous() else param.reshape(-1).clone()
    g_flat = grad.reshape(-1)
    per_byte = 1 if bits == 8 else 2
    for s in range(0, n, TWIN_CHUNK):
        e = min(n, s + TWIN_CHUNK)
        cs, ce = s // per_byte, -(-e // per_byte)
        bs, be = s // block, -(-e // block)
        g = g_flat[s:e].float()
        m = dequantize_moment(m_codes[cs:ce], m_absmax[bs:be], mvals, bits, e - s)
        v = dequantize_moment(v_codes[cs:ce], v_absmax[bs:be], vvals, bits, e - s)
        if bits in SQRT_DOMAIN:
            v = v * v
        m = (m * beta1).add_(g * (1.0 - beta1))
        v = (v * beta2).add_((g * g).mul_(1.0 - beta2)).clamp_(max=_FP32_MAX)
        # sqrt through fp64: correctly rounded, as the kernel's sqrt_rn (this build's vectorised
        # fp32 sqrt on CPU is not)
        r = v.double().sqrt_().float()
        denom = (r * inv_bc2).add_(eps)
        p = p_flat[s:e].float()
        if decay != 1.0:
            p = p * decay
        p = p - (m / denom).mul_(step_size)
        p_flat[s:e] = p.to(param.dtype)
        quantize_moment(m, mmids, bits, m_codes[cs:ce], m_absmax[bs:be])
        quantize_moment(r if bits in SQRT_DOMAIN else v, vmids, bits, v_codes[cs:ce],
                        v_absmax[bs:be])
    if p_flat.data_ptr() != param.data_ptr():
        param.copy_(p_flat.view(param.shape))


_FP32_MAX = torch.finfo(torch.float32).max


def _scalars(step: int, beta1: float, beta2: float, lr: float, weight_decay: float):
    """(lr / (1 - b1^t), 1 / sqrt(1 - b2^t), 1 - lr wd), computed in double once per step (a
    multiplication by the reciprocal: PyTorch divides by a scalar that way on CPU, so the twin
    and the kernel round alike)."""
    return (lr / (1.0 - beta1 ** step), 1.0 / (1.0 - beta2 ** step) ** 0.5, 1.0 - lr * weight_decay)


# ---- Triton kernel ------------------------------------------------------------------------------
@jit
def _code_of(xn, mids_ptr, NBITS: tl.constexpr):
    """Number of midpoints below ``xn`` (the nearest code; ties to the lower one) by binary
    search over the ``2^NBITS - 1`` ascending midpoints."""
    code = tl.zeros(xn.shape, dtype=tl.int32)
    for i in tl.static_range(NBITS):
        half = 1 << (NBITS - 1 - i)
        mid = tl.load(mids_ptr + code + half - 1)
        code = tl.where(xn > mid, code + half, code)
    return code


@jit
def _load_codes(codes_ptr, offs, mask, NBITS: tl.constexpr):
    if NBITS == 8:
        c = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    else:
        byte = tl.load(codes_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
        c = tl.where(offs % 2 == 0, byte & 0xF, (byte >> 4) & 0xF)
    return c


@jit
def _lowbit_adam_kernel(p_ptr, g_ptr, mc_ptr, ma_ptr, vc_ptr, va_ptr, mvals_ptr, mmids_ptr,
                        vvals_ptr, vmids_ptr, n, beta1, beta2, one_m_b1, one_m_b2, eps, step_size,
                        inv_bc2, decay, fp32_max,
                        P_BF16: tl.constexpr, G_BF16: tl.constexpr, NBITS: tl.constexpr,
                        BLOCK: tl.constexpr, HAS_DECAY: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = load_f32(g_ptr, offs, mask, G_BF16)
    m = tl.load(mvals_ptr + _load_codes(mc_ptr, offs, mask, NBITS)) * tl.load(ma_ptr + b)
    v = tl.load(vvals_ptr + _load_codes(vc_ptr, offs, mask, NBITS)) * tl.load(va_ptr + b)
    if NBITS == 4:  # SQRT_DOMAIN: the codes hold sqrt(v)
        v = v * v
    m = m * beta1 + g * one_m_b1
    v = v * beta2 + (g * g) * one_m_b2
    v = tl.minimum(v, fp32_max)
    r = tl.sqrt_rn(v)
    denom = r * inv_bc2 + eps
    p = load_f32(p_ptr, offs, mask, P_BF16)
    if HAS_DECAY:
        p = p * decay
    p = p - tl.div_rn(m, denom) * step_size
    store_f32(p_ptr, offs, p, mask, P_BF16)
    if NBITS == 4:
        v = r
    m = tl.where(mask, m, 0.0)
    v = tl.where(mask, v, 0.0)
    m_amax = tl.max(tl.abs(m), axis=0)
    v_amax = tl.max(v, axis=0)
    tl.store(ma_ptr + b, m_amax)
    tl.store(va_ptr + b, v_amax)
    m_inv = tl.where(m_amax > 0, tl.div_rn(1.0, tl.where(m_amax > 0, m_amax, 1.0)), 0.0)
    v_inv = tl.where(v_amax > 0, tl.div_rn(1.0, tl.where(v_amax > 0, v_amax, 1.0)), 0.0)
    # lanes past the end get code 0, as the twin pads an odd tensor's last byte
    mq = tl.where(mask, _code_of(m * m_inv, mmids_ptr, NBITS), 0)
    vq = tl.where(mask, _code_of(v * v_inv, vmids_ptr, NBITS), 0)
    if NBITS == 8:
        tl.store(mc_ptr + offs, mq.to(tl.uint8), mask=mask)
        tl.store(vc_ptr + offs, vq.to(tl.uint8), mask=mask)
    else:
        # pair the nibbles: reshape the block into (BLOCK / 2, 2) and combine even | odd << 4
        mlo, mhi = tl.split(tl.reshape(mq, (BLOCK // 2, 2)))
        vlo, vhi = tl.split(tl.reshape(vq, (BLOCK // 2, 2)))
        poffs = b * (BLOCK // 2) + tl.arange(0, BLOCK // 2)
        pmask = poffs * 2 < n
        tl.store(mc_ptr + poffs, (mlo | (mhi << 4)).to(tl.uint8), mask=pmask)
        tl.store(vc_ptr + poffs, (vlo | (vhi << 4)).to(tl.uint8), mask=pmask)


@on_device
def lowbit_adam_update_triton(param: torch.Tensor, grad: torch.Tensor, m_codes: torch.Tensor,
                              m_absmax: torch.Tensor, v_codes: torch.Tensor,
                              v_absmax: torch.Tensor, bits: int, step: int, beta1: float,
                              beta2: float, eps: float, lr: float, weight_decay: float) -> None:
    """Triton twin of :func:`lowbit_adam_update`: one program per block, one pass."""
    n = param.numel()
    if n == 0:
        return
    if param.dtype not in FLOAT_DTYPES or grad.dtype not in FLOAT_DTYPES or \
            not param.is_contiguous():
        return lowbit_adam_update(param, grad, m_codes, m_absmax, v_codes, v_absmax, bits, step,
                                  beta1, beta2, eps, lr, weight_decay)
    block = BLOCK[bits]
    mvals, mmids, vvals, vmids = moment_maps(bits, param.device)
    # pad the midpoints to 2^bits entries so the binary search never reads past them
    mmids = torch.cat((mmids, mmids.new_full((1,), float("inf"))))
    vmids = torch.cat((vmids, vmids.new_full((1,), float("inf"))))
    step_size, inv_bc2, decay = _scalars(step, beta1, beta2, lr, weight_decay)
    pf, pbf = arg(flat(param))
    gf, gbf = arg(flat(grad))
    grid = (-(-n // block),)
    _lowbit_adam_kernel[grid](pf, gf, m_codes, m_absmax, v_codes, v_absmax, mvals, mmids, vvals,
                              vmids, n, beta1, beta2, 1.0 - beta1, 1.0 - beta2, eps, step_size,
                              inv_bc2, decay, _FP32_MAX, P_BF16=pbf, G_BF16=gbf, NBITS=bits,
                              BLOCK=block, HAS_DECAY=decay != 1.0, num_warps=4, **LAUNCH)


__all__ = ["BLOCK", "dequantize_moment", "lowbit_adam_update",
           "lowbit_adam_update_triton", "moment_maps", "quantize_moment", "state_shapes",
           "unsigned_dynamic_values"]
