"""Kernels behind the optimizers, shipped as ``hf_compressed_optim.kernels``.

Every operation has a pure-PyTorch twin (:mod:`.reference`) and, for CUDA tensors, a Triton
kernel (:mod:`.triton_kernels`). The functions here pick one per call:

* ``HCO_KERNEL_BACKEND=auto`` (default): Triton for CUDA tensors when triton imports, else PyTorch;
* ``HCO_KERNEL_BACKEND=torch``: always the PyTorch twins;
* ``HCO_KERNEL_BACKEND=triton``: always Triton (on CPU tensors this needs ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools
import os

import torch

from . import reference
from .layout import MAX_INT16_BLOCK, TopKLayout, entries_per_block

ENV_VAR = "HCO_KERNEL_BACKEND"
_CHOICES = ("auto", "torch", "triton")


@functools.lru_cache(maxsize=1)
def _triton_module():
    """The Triton implementation module, or None when triton (or a driver) is unavailable."""
    try:
        from . import triton_kernels
    except Exception:  # ImportError, or triton failing to initialise
        return None
    return triton_kernels


def triton_available() -> bool:
    return _triton_module() is not None


def backend_for(tensor: torch.Tensor) -> str:
    """'triton' or 'torch' for an operation on ``tensor`` (see module docstring)."""
    choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"{ENV_VAR} must be one of {_CHOICES}, got {choice!r}")
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV_VAR}=triton but triton could not be imported")
        return "triton"
    return "triton" if tensor.is_cuda and triton_available() else "torch"


def _impl(tensor: torch.Tensor):
    return _triton_module() if backend_for(tensor) == "triton" else reference


def quantize4(x, bucket, codes, mins, maxs):
    return _impl(x).quantize4(x, bucket, codes, mins, maxs)


def dequantize4(codes, mins, maxs, numel, bucket):
    return _impl(codes).dequantize4(codes, mins, maxs, numel, bucket)


def block_topk(x, layout):
    return _impl(x).block_topk(x, layout)


def gather_block_values(x, idx, layout):
    return _impl(x).gather_block_values(x, idx, layout)


def scatter_block_values(x, idx, values, layout):
    return _impl(x).scatter_block_values(x, idx, values, layout)


def window_adam_update(param, idx, vals, layout, step, beta1, beta2, eps, lr, weight_decay,
                       sr_seed=None):
    return _impl(param).window_adam_update(param, idx, vals, layout, step, beta1, beta2, eps, lr,
                                           weight_decay, sr_seed)


def error_feedback_compress(grad, codes, mins, maxs, bucket, layout, idx_out, val_out):
    return _impl(grad).error_feedback_compress(grad, codes, mins, maxs, bucket, layout, idx_out,
                                               val_out)


# ---- shampoo kernels (issue #3) ----
@functools.lru_cache(maxsize=1)
def _codebook_triton_module():
    """The Triton codebook quantizer, or None when triton is unavailable."""
    try:
        from . import codebook_triton
    except Exception:  # ImportError, or triton failing to initialise
        return None
    return codebook_triton


def _codebook_impl(tensor: torch.Tensor):
    from . import codebook

    if backend_for(tensor) == "triton":
        mod = _codebook_triton_module()
        if mod is None:
            raise RuntimeError(f"{ENV_VAR}=triton but the Triton codebook kernels did not import")
        return mod
    return codebook


def codebook_quantize_rows(x, name, block):
    """(codes, absmax) of ``x`` (..., rows, cols); see :mod:`.codebook`."""
    return _codebook_impl(x).quantize_rows(x, name, block)


def codebook_dequantize_rows(codes, absmax, cols, name, block, dtype=torch.float32):
    return _codebook_impl(codes).dequantize_rows(codes, absmax, cols, name, block, dtype)


def codebook_quantize_offdiag(x, name, block):
    """(fp32 diagonal, codes, absmax) of square ``x`` (..., n, n)."""
    return _codebook_impl(x).quantize_offdiag(x, name, block)


def codebook_dequantize_offdiag(diag, codes, absmax, name, block, dtype=torch.float32):
    return _codebook_impl(codes).dequantize_offdiag(diag, codes, absmax, name, block, dtype)
# ---- end shampoo kernels ----

# ---- efcp kernels (issue #4) ----
@functools.lru_cache(maxsize=1)
def _sparse_rows_triton():
    """The Triton twins of the EFCP window passes, or None without triton."""
    if not triton_available():
        return None
    try:
        from . import sparse_rows_triton
    except Exception:
        return None
    return sparse_rows_triton


def _sparse_rows_impl(tensor: torch.Tensor):
    from . import sparse_rows

    if backend_for(tensor) == "triton" and _sparse_rows_triton() is not None:
        return _sparse_rows_triton()
    return sparse_rows


def sparse_rows_dot(idx, vals, layout, x, nrows=None):
    """fp64 [nrows]: <row_i, x> of a sparse window (SP); see kernels/sparse_rows.py."""
    return _sparse_rows_impl(x).sparse_rows_dot(idx, vals, layout, x, nrows)


def sparse_rows_combine(idx, vals, layout, coeffs, out, nrows=None):
    """out += sum_i coeffs[i] * row_i (LCG, scatter-add into dense fp32 ``out``)."""
    return _sparse_rows_impl(out).sparse_rows_combine(idx, vals, layout, coeffs, out, nrows)
# ---- end efcp kernels ----

__all__ = [
    "ENV_VAR", "MAX_INT16_BLOCK", "TopKLayout", "entries_per_block", "backend_for",
    "triton_available", "quantize4", "dequantize4", "block_topk", "gather_block_values",
    "scatter_block_values", "window_adam_update", "error_feedback_compress", "reference",
]
# ---- shampoo __all__ (issue #3) ----
__all__ += ["codebook_quantize_rows", "codebook_dequantize_rows", "codebook_quantize_offdiag",
            "codebook_dequantize_offdiag"]
# ---- end shampoo __all__ ----
# ---- efcp __all__ (issue #4) ----
__all__ += ["sparse_rows_dot", "sparse_rows_combine"]
# ---- end efcp __all__ ----
