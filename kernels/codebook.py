"""Codebook (non-linear) 4-bit block quantization: PyTorch twins (the semantics) and their
Triton kernels (``*_triton``, same bits).

Used by 4-bit Shampoo for its eigenvector matrices and the off-diagonal part of its inverse roots.

* A matrix ``x`` of shape ``(..., rows, cols)`` is quantized row by row in blocks of ``block``
  consecutive elements of one row (for an eigenvector matrix whose rows are eigenvectors, blocks
  run along each eigenvector). The last block of a row may be shorter.
* Each block is divided by its absolute maximum (stored fp32; a zero block stays zero) and every
  normalised value is mapped to the nearest of the 16 codebook values (ties to the lower code,
  decided against the midpoints between neighbouring values).
* Codes are packed two per byte **per row**: element ``2j`` of a row in the low nibble, element
  ``2j + 1`` in the high nibble; a row of odd length gets one padding code (that of 0.0), so rows
  never straddle bytes and absmax blocks stay aligned with bytes.
* The diagonal-split variant (inverse roots) keeps the diagonal of each square matrix in fp32
  and zeroes it before the absmax reduction and quantization of the off-diagonal part.

Codebooks (ascending, fp32): ``linear2`` (Linear-2 / linear-square, the paper's choice) and
``dynamic_tree`` (the signed 4-bit dynamic-tree map).

Triton: one program per (row, absmax block); it loads the block's even and odd elements
separately, so the two codes of a byte come from the same lane and pack without shuffles. The
nearest code is the number of midpoints below the normalised value (the twin's ``bucketize``);
the reciprocal of the absmax uses ``div_rn``. ``DIAG`` handles the diagonal split inside the same
kernels. Math is fp32; other dtypes are converted at the boundary.
"""

from __future__ import annotations

import functools

import torch

from ._triton import LAUNCH, jit, np2, tl

CODEBOOKS = ("linear2", "dynamic_tree")


# ---- code values --------------------------------------------------------------------------------
def linear2_values(bits: int = 4) -> list[float]:
    """Linear-2: ``R(j) = sign * (-1 + 2j/(2^b - 1))^2``, 0 at ``j = 2^(b-1) - 1``."""
    top = 2 ** bits - 1
    zero = 2 ** (bits - 1) - 1
    out = []
    for j in range(2 ** bits):
        base = (-1.0 + 2.0 * j / top) ** 2
        out.append(-base if j < zero else (0.0 if j == zero else base))
    return out


def dynamic_tree_values(bits: int = 4) -> list[float]:
    """Signed dynamic tree with ``bits - 1`` exponent levels: level ``i`` holds the midpoints of
    ``2^i + 1`` evenly spaced points in [0.1, 1], scaled by ``10^(i - (bits - 2))``, with both
    signs; plus 0 and 1 (so the map reaches +1 but not -1)."""
    levels = bits - 1
    vals = [0.0, 1.0]
    for i in range(levels):
        k = 2 ** i + 1
        pts = [0.1 + 0.9 * t / (k - 1) for t in range(k)]
        scale = 10.0 ** (i - (levels - 1))
        for a, b in zip(pts[:-1], pts[1:]):
            m = scale * (a + b) / 2.0
            vals += [m, -m]
    return sorted(vals)


@functools.lru_cache(maxsize=None)
def _codebook_cpu(name: str) -> torch.Tensor:
    if name == "linear2":
        vals = linear2_values(4)
    elif name == "dynamic_tree":
        vals = dynamic_tree_values(4)
    else:
        raise ValueError(f"codebook must be one of {list(CODEBOOKS)}, got {name!r}")
    return torch.tensor(vals, dtype=torch.float64).to(torch.float32)


_DEVICE_CACHE: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def codebook(name: str, device=None) -> torch.Tensor:
    """The 16 code values of ``name`` (fp32, ascending) on ``device``."""
    return codebook_and_midpoints(name, device)[0]


def codebook_and_midpoints(name: str, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (16,), midpoints between neighbours (15,)), fp32, cached per device."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    key = (name, dev)
    hit = _DEVICE_CACHE.get(key)
    if hit is None:
        values = _codebook_cpu(name).to(dev)
        mids = (values[:-1] + values[1:]) * 0.5
        hit = _DEVICE_CACHE[key] = (values, mids)
    return hit


# ---- geometry and nibble packing ----------------------------------------------------------------
def packed_cols(cols: int) -> int:
    """Bytes per row of ``cols`` 4-bit codes."""
    return (cols + 1) // 2


def absmax_blocks(cols: int, block: int) -> int:
    """absmax entries per row."""
    return -(-cols // block)


def pack_nibbles(idx: torch.Tensor) -> torch.Tensor:
    """(..., cols) codes in [0, 16) -> (..., ceil(cols/2)) uint8; even element in the low nibble.
    An odd row is padded with code 0 here (callers pad with the code of 0.0 first)."""
    idx = idx.to(torch.uint8)
    if idx.shape[-1] % 2:
        idx = torch.nn.functional.pad(idx, (0, 1))
    return idx[..., 0::2] | (idx[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: (..., ceil(cols/2)) uint8 -> (..., cols) int64 codes."""
    lo = (packed & 0xF).long()
    hi = (packed >> 4).long()
    out = torch.stack((lo, hi), dim=-1).flatten(-2)
    return out[..., :cols]


def nearest_code(x: torch.Tensor, mids: torch.Tensor) -> torch.Tensor:
    """Index (int64) of the nearest code value for normalised ``x`` (ties at a midpoint: lower
    code): the number of midpoints below ``x``, counted with one vectorised comparison per
    midpoint (about twice as fast as ``torch.bucketize``'s per-element search on CPU for 15
    midpoints; the same result for finite ``x``)."""
    return _midpoints_below(x, mids[1:].tolist(), float(mids[0])).long()


def _midpoints_below(x: torch.Tensor, rest: list[float], first: float) -> torch.Tensor:
    """uint8 count of the midpoints ``[first, *rest]`` strictly below each element of ``x``
    (one comparison per midpoint into a reused buffer)."""
    count = torch.gt(x, first).to(torch.uint8)
    hit = torch.empty_like(count, dtype=torch.bool)
    for m in rest:
        torch.gt(x, m, out=hit)
        count.add_(hit)
    return count


# ---- quantize / dequantize ----------------------------------------------------------------------
def _check_block(block: int) -> None:
    if block < 2 or block % 2:
        raise ValueError(f"block must be an even integer >= 2, got {block}")


def _normalised(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / absmax padded to whole blocks (..., rows, nblk, block), absmax (..., rows, nblk))."""
    cols = x.shape[-1]
    nblk = absmax_blocks(cols, block)
    xf = x.float()
    pad = nblk * block - cols
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    xb = xf.reshape(*xf.shape[:-1], nblk, block)
    absmax = xb.abs().amax(dim=-1)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    return xb * inv.unsqueeze(-1), absmax


#: elements of ``x`` per chunk of :func:`quantize_rows` (whole rows; sized to stay in cache)
QUANT_CHUNK = 1 << 17


def quantize_rows(x: torch.Tensor, name: str, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (..., rows, cols) -> (codes uint8 (..., rows, ceil(cols/2)),
    absmax fp32 (..., rows, ceil(cols/block)))."""
    return _quantize_rows(x, name, block, False)


def _quantize_rows(x: torch.Tensor, name: str, block: int, zero_diag: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows`, run over chunks of whole rows small enough to stay in cache (the
    nearest-code search passes over each chunk once per midpoint); ``zero_diag``: treat the
    diagonal of each square matrix as 0 (the off-diagonal part of :func:`quantize_offdiag`)."""
    _check_block(block)
    lead, cols = x.shape[:-1], x.shape[-1]
    nblk, pc = absmax_blocks(cols, block), packed_cols(cols)
    codes = torch.empty((*lead, pc), dtype=torch.uint8, device=x.device)
    absmax = torch.empty((*lead, nblk), dtype=torch.float32, device=x.device)
    n_rows = codes.numel() // pc if pc else 0
    if not n_rows:
        return codes, absmax
    _, mids = codebook_and_midpoints(name, x.device)
    first, rest = float(mids[0]), mids[1:].tolist()
    rows = x.reshape(n_rows, cols)
    flat_codes, flat_absmax = codes.view(n_rows, pc), absmax.view(n_rows, nblk)
    step = max(1, QUANT_CHUNK // cols)
    for r0 in range(0, n_rows, step):
        r1 = min(r0 + step, n_rows)
        chunk = rows[r0:r1].to(torch.float32, copy=zero_diag)
        if zero_diag:  # row r of the stack is row r % cols of its (square) matrix
            r = torch.arange(r0, r1, device=x.device)
            chunk[r - r0, r % cols] = 0.0
        xn, am = _normalised(chunk, block)
        flat_absmax[r0:r1] = am
        count = _midpoints_below(xn, rest, first)
        # padding positions hold 0.0 -> the code of zero; keep one of them for an odd row
        idx = count.flatten(-2)[..., :2 * pc]
        torch.bitwise_or(idx[..., 0::2], idx[..., 1::2] << 4, out=flat_codes[r0:r1])
    return codes, absmax


def byte_pairs(name: str, device=None) -> torch.Tensor:
    """fp32 (256, 2): the two code values (low nibble, high nibble) each byte decodes to."""
    values, _ = codebook_and_midpoints(name, device)
    return torch.stack((values.repeat(16), values.repeat_interleave(16)), dim=1)


def dequantize_rows(codes: torch.Tensor, absmax: torch.Tensor, cols: int, name: str, block: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_rows` (up to the quantization error).

    Runs every step of 4-bit Shampoo (the inverse roots), so it takes two passes: one gather of
    both values of every byte from a 256-entry table (each entry's two fp32 values moved as one
    8-byte word: a plain copy of their bits, about twice as fast as gathering rows of two), one
    in-place scaling by the absmax."""
    _check_block(block)
    lead, pc = codes.shape[:-1], codes.shape[-1]
    pairs = byte_pairs(name, codes.device).view(torch.int64).view(256)
    out = torch.index_select(pairs, 0, codes.reshape(-1).int()).view(torch.float32)
    out = out.view(*lead, 2 * pc)[..., :cols]
    nblk, nfull = absmax.shape[-1], cols // block
    if nfull:
        out[..., :nfull * block].unflatten(-1, (nfull, block)).mul_(absmax[..., :nfull, None])
    if nfull < nblk:  # a shorter last block
        out[..., nfull * block:].mul_(absmax[..., nfull:])
    return out.contiguous().to(dtype)


def quantize_offdiag(x: torch.Tensor, name: str, block: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Diagonal split of square ``x`` (..., n, n): (diag fp32 (..., n), codes, absmax) where the
    off-diagonal part (diagonal zeroed before the absmax) is quantized by :func:`quantize_rows`."""
    n = x.shape[-1]
    if x.shape[-2] != n:
        raise ValueError(f"quantize_offdiag needs square matrices, got {tuple(x.shape)}")
    diag = torch.diagonal(x, dim1=-2, dim2=-1).float().clone()
    codes, absmax = _quantize_rows(x, name, block, zero_diag=True)
    return diag, codes, absmax


def dequantize_offdiag(diag: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, name: str,
                       block: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_offdiag`: the fp32 diagonal written back exactly."""
    n = diag.shape[-1]
    out = dequantize_rows(codes, absmax, n, name, block, torch.float32)
    torch.diagonal(out, dim1=-2, dim2=-1).copy_(diag)
    return out.to(dtype)


# ---- Triton kernels -----------------------------------------------------------------------------
@jit
def _quantize_kernel(x_ptr, mids_ptr, codes_ptr, absmax_ptr, diag_ptr, C, PC, NB,
                     BLOCK: tl.constexpr, HALF_P2: tl.constexpr, NCODES: tl.constexpr,
                     DIAG: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    half = tl.arange(0, HALF_P2)
    in_block = half < BLOCK // 2
    col_e = b * BLOCK + 2 * half
    col_o = col_e + 1
    m_e = in_block & (col_e < C)
    m_o = in_block & (col_o < C)
    x_e = tl.load(x_ptr + r * C + col_e, mask=m_e, other=0.0)
    x_o = tl.load(x_ptr + r * C + col_o, mask=m_o, other=0.0)
    if DIAG:
        i = r % C
        tl.store(diag_ptr + r + 0 * half, x_e, mask=m_e & (col_e == i))
        tl.store(diag_ptr + r + 0 * half, x_o, mask=m_o & (col_o == i))
        x_e = tl.where(col_e == i, 0.0, x_e)
        x_o = tl.where(col_o == i, 0.0, x_o)
    amax = tl.maximum(tl.max(tl.abs(x_e), axis=0), tl.max(tl.abs(x_o), axis=0))
    tl.store(absmax_ptr + r * NB + b, amax)
    safe = tl.where(amax > 0, amax, 1.0)
    inv = tl.where(amax > 0, tl.math.div_rn(1.0, safe), 0.0)
    xn_e = x_e * inv
    xn_o = x_o * inv
    code_e = tl.zeros([HALF_P2], dtype=tl.int32)
    code_o = tl.zeros([HALF_P2], dtype=tl.int32)
    for j in tl.static_range(NCODES - 1):
        mid = tl.load(mids_ptr + j)
        code_e += (xn_e > mid).to(tl.int32)
        code_o += (xn_o > mid).to(tl.int32)
    byte = (code_e | (code_o << 4)).to(tl.uint8)
    pos = b * (BLOCK // 2) + half
    tl.store(codes_ptr + r * PC + pos, byte, mask=in_block & (pos < PC))


@jit
def _dequantize_kernel(codes_ptr, absmax_ptr, values_ptr, diag_ptr, out_ptr, C, PC, NB,
                       BLOCK: tl.constexpr, HALF_P2: tl.constexpr, DIAG: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    half = tl.arange(0, HALF_P2)
    in_block = half < BLOCK // 2
    pos = b * (BLOCK // 2) + half
    byte = tl.load(codes_ptr + r * PC + pos, mask=in_block & (pos < PC), other=0).to(tl.int32)
    amax = tl.load(absmax_ptr + r * NB + b)
    v_e = tl.load(values_ptr + (byte & 15)) * amax
    v_o = tl.load(values_ptr + ((byte >> 4) & 15)) * amax
    col_e = b * BLOCK + 2 * half
    col_o = col_e + 1
    if DIAG:
        i = r % C
        d = tl.load(diag_ptr + r)
        v_e = tl.where(col_e == i, d, v_e)
        v_o = tl.where(col_o == i, d, v_o)
    tl.store(out_ptr + r * C + col_e, v_e, mask=in_block & (col_e < C))
    tl.store(out_ptr + r * C + col_o, v_o, mask=in_block & (col_o < C))


def _geometry(cols: int, block: int):
    _check_block(block)
    return packed_cols(cols), absmax_blocks(cols, block), np2(block // 2)


def _quantize(x: torch.Tensor, name: str, block: int, diag: bool):
    lead, (rows, cols) = x.shape[:-2], x.shape[-2:]
    pc, nb, half_p2 = _geometry(cols, block)
    values, mids = codebook_and_midpoints(name, x.device)
    xf = x.to(torch.float32).contiguous()
    n_rows = xf.numel() // cols if cols else 0
    codes = torch.empty((*lead, rows, pc), dtype=torch.uint8, device=x.device)
    absmax = torch.empty((*lead, rows, nb), dtype=torch.float32, device=x.device)
    dvec = torch.empty((*lead, rows), dtype=torch.float32, device=x.device)
    if n_rows and nb:
        _quantize_kernel[(n_rows, nb)](xf, mids, codes, absmax, dvec, cols, pc, nb,
                                       BLOCK=block, HALF_P2=half_p2, NCODES=values.numel(),
                                       DIAG=diag, **LAUNCH)
    return dvec, codes, absmax


def _dequantize(diag, codes, absmax, cols: int, name: str, block: int, dtype):
    lead = codes.shape[:-1]
    pc, nb, half_p2 = _geometry(cols, block)
    if codes.shape[-1] != pc or absmax.shape[-1] != nb:
        raise ValueError(f"codes/absmax shapes {tuple(codes.shape)}/{tuple(absmax.shape)} do not "
                         f"match {cols} columns in blocks of {block}")
    values, _ = codebook_and_midpoints(name, codes.device)
    out = torch.empty((*lead, cols), dtype=torch.float32, device=codes.device)
    n_rows = out.numel() // cols if cols else 0
    d = diag.to(torch.float32).contiguous() if diag is not None else out
    if n_rows and nb:
        _dequantize_kernel[(n_rows, nb)](codes.contiguous(), absmax.to(torch.float32).contiguous(),
                                         values, d, out, cols, pc, nb, BLOCK=block,
                                         HALF_P2=half_p2, DIAG=diag is not None, **LAUNCH)
    return out.to(dtype)


def quantize_rows_triton(x: torch.Tensor, name: str, block: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`quantize_rows`."""
    _, codes, absmax = _quantize(x, name, block, diag=False)
    return codes, absmax


def dequantize_rows_triton(codes: torch.Tensor, absmax: torch.Tensor, cols: int, name: str,
                           block: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Triton twin of :func:`dequantize_rows`."""
    return _dequantize(None, codes, absmax, cols, name, block, dtype)


def quantize_offdiag_triton(x: torch.Tensor, name: str, block: int
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`quantize_offdiag`."""
    if x.shape[-2] != x.shape[-1]:
        raise ValueError(f"quantize_offdiag needs square matrices, got {tuple(x.shape)}")
    return _quantize(x, name, block, diag=True)


def dequantize_offdiag_triton(diag: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor,
                              name: str, block: int, dtype: torch.dtype = torch.float32
                              ) -> torch.Tensor:
    """Triton twin of :func:`dequantize_offdiag`."""
    return _dequantize(diag, codes, absmax, diag.shape[-1], name, block, dtype)
