"""What the Triton kernels share: the optional import of triton, bf16 loads/stores, helpers.

triton is optional (CPU users, macOS): without it, or when it fails to import or to compile a
kernel's source, :data:`UNAVAILABLE` says why, :func:`jit` leaves the kernels as plain functions
that never run, and the dispatcher uses the PyTorch twins. Kernel modules use
``from __future__ import annotations`` (``tl.constexpr`` annotations stay strings, which triton
reads), so they import without triton.

Numerics (all kernels): math is fp32; bf16 tensors travel as their int16 bit patterns (a load
widens them exactly, a store rounds to nearest even with integer arithmetic, exact on every
backend including the interpreter, whose own bf16 casts truncate). Every launch disables fp
contraction and divisions/square roots use ``div_rn``/``sqrt_rn``, so the GPU rounds each
operation like PyTorch. CPU tensors run under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import contextlib
import functools

import torch

try:
    import triton
    import triton.language as tl
except Exception as err:  # ImportError, or triton failing to initialise
    triton = tl = None
    UNAVAILABLE: str | None = f"{type(err).__name__}: {err}"
else:
    UNAVAILABLE = None


def jit(fn):
    """``triton.jit(fn)``, or ``fn`` unchanged (never launched) where triton cannot be used."""
    global UNAVAILABLE
    if UNAVAILABLE is None:
        try:
            return triton.jit(fn)
        except Exception as err:  # e.g. no source to read: the twins run instead
            UNAVAILABLE = f"{type(err).__name__}: {err}"
    return fn


LAUNCH = {"enable_fp_fusion": False}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---- device helpers -----------------------------------------------------------------------------
@jit
def load_f32(ptr, offs, mask, BF16: tl.constexpr):
    """Load as fp32; bf16 arrives as int16 bit patterns and is widened exactly."""
    if BF16:
        h = tl.load(ptr + offs, mask=mask, other=0)
        out = (h.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        out = tl.load(ptr + offs, mask=mask, other=0).to(tl.float32)
    return out


@jit
def bf16_rne_bits(x):
    """fp32 -> bf16 bit pattern (in an int32), round to nearest even; NaN -> canonical NaN."""
    b = x.to(tl.int32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, r)


@jit
def store_f32(ptr, offs, val, mask, BF16: tl.constexpr):
    """Store fp32 ``val`` into the pointer's dtype (bf16: int16 bit patterns, rounded RNE)."""
    if BF16:
        tl.store(ptr + offs, bf16_rne_bits(val).to(tl.int16), mask=mask)
    else:
        tl.store(ptr + offs, val.to(ptr.dtype.element_ty), mask=mask)


@jit
def block_geometry(b, block, num_full, k_full, tail, k_tail):
    """(length, entries, first window column, first element) of top-k block ``b``; the tail's
    columns start at ``num_full * k_full`` as well."""
    is_tail = b >= num_full
    return (tl.where(is_tail, tail, block), tl.where(is_tail, k_tail, k_full), b * k_full,
            tl.cast(b, tl.int64) * block)


# ---- host helpers -------------------------------------------------------------------------------
def np2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1): tile sizes."""
    return 1 << max(0, int(n) - 1).bit_length()


def warps(tile: int) -> int:
    return 16 if tile >= 16384 else 8 if tile >= 4096 else 4


def chunk(n: int, cap: int = 1024) -> int:
    """Tile for a loop over ``n`` entries: a power of two in [16, cap]."""
    return min(max(np2(n), 16), cap)


def arg(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(tensor as passed to a kernel, is_bf16): bf16 goes as its int16 bit patterns."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16), True
    return t, False


def flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1) if t.is_contiguous() else t.contiguous().view(-1)


class Out:
    """A contiguous flat view of an output tensor, copied back on exit when it was a temporary."""

    def __init__(self, t: torch.Tensor):
        self.t = t
        self.flat = flat(t)

    def done(self) -> None:
        if not self.t.is_contiguous():
            self.t.copy_(self.flat.view(self.t.shape))


def on_device(fn):
    """Launch on the device of the first tensor argument (Triton uses the current device)."""

    @functools.wraps(fn)
    def wrapper(t, *args, **kwargs):
        with torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext():
            return fn(t, *args, **kwargs)

    return wrapper
