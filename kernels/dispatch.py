"""Kernels behind the optimizers, shipped as ``hf_compressed_optim.kernels``.

Every operation has a pure-PyTorch twin and a Triton kernel: :mod:`.reference` /
:mod:`.triton_kernels` (MicroAdam's quantizer, top-k and window update), :mod:`.codebook` /
:mod:`.codebook_triton` (4-bit Shampoo), :mod:`.sparse_rows` / :mod:`.sparse_rows_triton`
(EFCP's window passes). The functions here pick one per call, by one rule for every op:

* ``HCO_KERNEL_BACKEND=auto`` (default): Triton for CUDA tensors when its module imports, else
  the PyTorch twin, quietly (CPU, macOS, no triton, a Triton that fails to initialise);
* ``HCO_KERNEL_BACKEND=torch``: always the PyTorch twins;
* ``HCO_KERNEL_BACKEND=triton``: always Triton. Where it cannot run (triton missing or failing
  to import, or a CPU tensor without ``TRITON_INTERPRET=1``) the call raises
  :class:`KernelBackendError` naming the op, the device and the alternative; a forced backend
  never falls back silently.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

from . import reference
from .codebook import CODEBOOKS, absmax_blocks, packed_cols
from .layout import MAX_INT16_BLOCK, TopKLayout, entries_per_block

ENV_VAR = "HCO_KERNEL_BACKEND"
_CHOICES = ("auto", "torch", "triton")


class KernelBackendError(RuntimeError):
    """A kernel backend forced with ``HCO_KERNEL_BACKEND`` cannot run the requested op."""


@functools.lru_cache(maxsize=None)
def _import_triton_module(name: str):
    """(module, None) or (None, why it failed) for the Triton module ``name`` of this package."""
    try:
        return importlib.import_module(f".{name}", __package__), None
    except Exception as err:  # ImportError, or triton failing to initialise
        return None, f"{type(err).__name__}: {err}"


def _triton_module():
    """MicroAdam's Triton module, or None when triton (or a driver) is unavailable."""
    return _import_triton_module("triton_kernels")[0]


def triton_available() -> bool:
    return _triton_module() is not None


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip() == "1"


def _choice() -> str:
    choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"{ENV_VAR} must be one of {_CHOICES}, got {choice!r}")
    return choice


def _select(op: str, tensor: torch.Tensor, twin, triton_name: str):
    """The module that runs ``op`` on ``tensor``: ``twin`` or the Triton module (module docs)."""
    choice = _choice()
    if choice == "torch":
        return twin
    module, why = _import_triton_module(triton_name)
    if choice == "auto":
        return module if tensor.is_cuda and module is not None else twin
    if module is None:
        reason = f"triton could not be imported ({why})"
    elif not tensor.is_cuda and not _interpreted():
        reason = ("Triton runs on CUDA tensors, or on CPU tensors only under TRITON_INTERPRET=1 "
                  "(set before triton is imported)")
    else:
        return module
    raise KernelBackendError(
        f"{ENV_VAR}=triton: the Triton kernel for {op} cannot run on a {tensor.device} tensor: "
        f"{reason}. Unset {ENV_VAR} (or set it to 'auto' or 'torch') to use the PyTorch "
        "implementation.")


def backend_for(tensor: torch.Tensor, op: str = "kernels") -> str:
    """'triton' or 'torch' for MicroAdam's ops on ``tensor`` (see the module docstring)."""
    return "torch" if _impl(tensor, op) is reference else "triton"


def _impl(tensor: torch.Tensor, op: str):
    return _select(op, tensor, reference, "triton_kernels")


def quantize4(x, bucket, codes, mins, maxs):
    return _impl(x, "quantize4").quantize4(x, bucket, codes, mins, maxs)


def dequantize4(codes, mins, maxs, numel, bucket):
    return _impl(codes, "dequantize4").dequantize4(codes, mins, maxs, numel, bucket)


def block_topk(x, layout):
    return _impl(x, "block_topk").block_topk(x, layout)


def gather_block_values(x, idx, layout):
    return _impl(x, "gather_block_values").gather_block_values(x, idx, layout)


def scatter_block_values(x, idx, values, layout):
    return _impl(x, "scatter_block_values").scatter_block_values(x, idx, values, layout)


def window_adam_update(param, idx, vals, layout, step, beta1, beta2, eps, lr, weight_decay,
                       sr_seed=None, dense=None):
    return _impl(param, "window_adam_update").window_adam_update(
        param, idx, vals, layout, step, beta1, beta2, eps, lr, weight_decay, sr_seed, dense)


def error_feedback_compress(grad, codes, mins, maxs, bucket, layout, idx_out, val_out):
    return _impl(grad, "error_feedback_compress").error_feedback_compress(
        grad, codes, mins, maxs, bucket, layout, idx_out, val_out)


def _codebook_impl(tensor: torch.Tensor, op: str):
    from . import codebook

    return _select(op, tensor, codebook, "codebook_triton")


def codebook_quantize_rows(x, name, block):
    """(codes, absmax) of ``x`` (..., rows, cols); see :mod:`.codebook`."""
    return _codebook_impl(x, "codebook_quantize_rows").quantize_rows(x, name, block)


def codebook_dequantize_rows(codes, absmax, cols, name, block, dtype=torch.float32):
    return _codebook_impl(codes, "codebook_dequantize_rows").dequantize_rows(
        codes, absmax, cols, name, block, dtype)


def codebook_quantize_offdiag(x, name, block):
    """(fp32 diagonal, codes, absmax) of square ``x`` (..., n, n)."""
    return _codebook_impl(x, "codebook_quantize_offdiag").quantize_offdiag(x, name, block)


def codebook_dequantize_offdiag(diag, codes, absmax, name, block, dtype=torch.float32):
    return _codebook_impl(codes, "codebook_dequantize_offdiag").dequantize_offdiag(
        diag, codes, absmax, name, block, dtype)


def _sparse_rows_impl(tensor: torch.Tensor, op: str):
    from . import sparse_rows

    return _select(op, tensor, sparse_rows, "sparse_rows_triton")


def sparse_rows_dot(idx, vals, layout, x, nrows=None):
    """fp64 [nrows]: <row_i, x> of a sparse window (SP); see kernels/sparse_rows.py."""
    return _sparse_rows_impl(x, "sparse_rows_dot").sparse_rows_dot(idx, vals, layout, x, nrows)


def sparse_rows_combine(idx, vals, layout, coeffs, out, nrows=None):
    """out += sum_i coeffs[i] * row_i (LCG, scatter-add into dense fp32 ``out``)."""
    return _sparse_rows_impl(out, "sparse_rows_combine").sparse_rows_combine(
        idx, vals, layout, coeffs, out, nrows)


__all__ = [
    "ENV_VAR", "MAX_INT16_BLOCK", "KernelBackendError", "TopKLayout", "entries_per_block",
    "backend_for", "triton_available", "quantize4", "dequantize4", "block_topk",
    "gather_block_values", "scatter_block_values", "window_adam_update",
    "error_feedback_compress", "reference", "codebook_quantize_rows", "codebook_dequantize_rows",
    "codebook_quantize_offdiag", "codebook_dequantize_offdiag", "sparse_rows_dot",
    "sparse_rows_combine",
]
