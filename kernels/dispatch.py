"""The one dispatcher of the kernels behind the optimizers (``hf_compressed_optim.kernels``).

Every op has a PyTorch twin and a Triton kernel in its module (:mod:`.quant4`, :mod:`.topk`,
:mod:`.window_adam`, :mod:`.error_feedback`, :mod:`.codebook`, :mod:`.sparse_rows`,
:mod:`.lowbit_adam`); the functions here pick one per call, by one rule for every op:

* ``HCO_KERNEL_BACKEND=auto`` (default): Triton for CUDA tensors when triton is usable; on
  CPU the native C loops of the ops that have them (:data:`_NATIVE_OPS`, :mod:`._native`) when
  a C compiler built them; else the PyTorch twin, quietly (no triton, no compiler, a backend
  that fails to initialise);
* ``HCO_KERNEL_BACKEND=torch``: always the PyTorch twins;
* ``HCO_KERNEL_BACKEND=native``: the native loops for CPU tensors of the ops that have them, the
  PyTorch twins for everything else; raises :class:`KernelBackendError` when the library cannot
  be built;
* ``HCO_KERNEL_BACKEND=triton``: always Triton. Where it cannot run (triton missing or failing
  to import, or a CPU tensor without ``TRITON_INTERPRET=1``) the call raises
  :class:`KernelBackendError` naming the op, the device and the alternative; a forced backend
  never falls back silently.

It also re-exports what the optimizers need from the kernel modules (layout, codebook geometry).
"""

from __future__ import annotations

import os

import torch

from . import (_native, _triton, codebook, error_feedback, lowbit_adam, quant4, sparse_rows, topk,
               window_adam)
from .codebook import CODEBOOKS, absmax_blocks, packed_cols
from .layout import MAX_INT16_BLOCK, TopKLayout, entries_per_block

ENV_VAR = "HCO_KERNEL_BACKEND"
_CHOICES = ("auto", "torch", "triton", "native")

#: public op -> (module, name of its PyTorch twin there); the Triton version is ``name_triton``.
#: Looked up per call, so wrapping a module's function (a profiler) affects the dispatch.
_OPS = {
    "quantize4": (quant4, "quantize4"),
    "dequantize4": (quant4, "dequantize4"),
    "block_topk": (topk, "block_topk"),
    "gather_block_values": (topk, "gather_block_values"),
    "scatter_block_values": (topk, "scatter_block_values"),
    "window_adam_update": (window_adam, "window_adam_update"),
    "error_feedback_compress": (error_feedback, "error_feedback_compress"),
    "codebook_quantize_rows": (codebook, "quantize_rows"),
    "codebook_dequantize_rows": (codebook, "dequantize_rows"),
    "codebook_quantize_offdiag": (codebook, "quantize_offdiag"),
    "codebook_dequantize_offdiag": (codebook, "dequantize_offdiag"),
    "sparse_rows_dot": (sparse_rows, "sparse_rows_dot"),
    "sparse_rows_dot_slot": (sparse_rows, "sparse_rows_dot_slot"),
    "sparse_rows_combine": (sparse_rows, "sparse_rows_combine"),
    "lowbit_adam_update": (lowbit_adam, "lowbit_adam_update"),
}


#: ops with a native CPU version, ``name_native`` beside the twin (a C loop per top-k block)
_NATIVE_OPS = frozenset({"error_feedback_compress", "window_adam_update", "sparse_rows_dot",
                         "sparse_rows_dot_slot", "sparse_rows_combine"})


class KernelBackendError(RuntimeError):
    """A kernel backend forced with ``HCO_KERNEL_BACKEND`` cannot run the requested op."""


def triton_available() -> bool:
    """Whether triton imported and compiled the kernels' sources (no GPU needed)."""
    return _triton.UNAVAILABLE is None


def _choice() -> str:
    choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"{ENV_VAR} must be one of {_CHOICES}, got {choice!r}")
    return choice


def native_available() -> bool:
    """Whether the native CPU library is built and loaded (builds it on the first call)."""
    return _native.library() is not None


def _use_native(op: str, tensor: torch.Tensor, choice: str) -> bool:
    """Whether ``op`` on ``tensor`` runs its native CPU loop (policy: module docstring)."""
    if choice not in ("auto", "native") or op not in _NATIVE_OPS or tensor.device.type != "cpu":
        return False
    if choice == "native" and _native.unavailable() is not None:
        raise KernelBackendError(
            f"{ENV_VAR}=native: the native CPU kernel for {op} could not be built or loaded "
            f"({_native.unavailable()}). Unset {ENV_VAR} (or set it to 'auto' or 'torch') to "
            "use the PyTorch implementation.")
    return _native.library() is not None


def _use_triton(op: str, tensor: torch.Tensor) -> bool:
    """Whether ``op`` on ``tensor`` runs the Triton kernel (policy: module docstring)."""
    choice = _choice()
    if choice in ("torch", "native"):
        return False
    why = _triton.UNAVAILABLE
    if choice == "auto":
        return tensor.is_cuda and why is None
    if why is not None:
        reason = f"triton could not be imported ({why})"
    elif not tensor.is_cuda and os.environ.get("TRITON_INTERPRET", "").strip() != "1":
        reason = ("Triton runs on CUDA tensors, or on CPU tensors only under TRITON_INTERPRET=1 "
                  "(set before triton is imported)")
    else:
        return True
    raise KernelBackendError(
        f"{ENV_VAR}=triton: the Triton kernel for {op} cannot run on a {tensor.device} tensor: "
        f"{reason}. Unset {ENV_VAR} (or set it to 'auto' or 'torch') to use the PyTorch "
        "implementation.")


def _backend(op: str, tensor: torch.Tensor) -> str:
    if _use_native(op, tensor, _choice()):
        return "native"
    return "triton" if _use_triton(op, tensor) else "torch"


def _impl(op: str, tensor: torch.Tensor):
    """The function that runs ``op`` on ``tensor``: the twin, its Triton or native version."""
    module, name = _OPS[op]
    backend = _backend(op, tensor)
    return getattr(module, name if backend == "torch" else f"{name}_{backend}")


def backend_for(tensor: torch.Tensor, op: str = "kernels") -> str:
    """'triton', 'native' or 'torch' for ``op`` on ``tensor`` (see the module docstring)."""
    return _backend(op, tensor)


def quantize4(x: torch.Tensor, bucket: int, codes: torch.Tensor, mins: torch.Tensor,
              maxs: torch.Tensor, overwrite: bool = False) -> None:
    """4-bit block quantization of flat ``x`` into ``codes``/``mins``/``maxs`` (:mod:`.quant4`);
    ``overwrite=True``: ``x`` is scratch the call may use as its workspace."""
    return _impl("quantize4", x)(x, bucket, codes, mins, maxs, overwrite)


def dequantize4(codes: torch.Tensor, mins: torch.Tensor, maxs: torch.Tensor, numel: int,
                bucket: int) -> torch.Tensor:
    """fp32 [numel] from 4-bit codes (:mod:`.quant4`)."""
    return _impl("dequantize4", codes)(codes, mins, maxs, numel, bucket)


def block_topk(x: torch.Tensor, layout: TopKLayout) -> torch.Tensor:
    """int16 block-relative indices of the largest ``|x|`` per block (:mod:`.topk`)."""
    return _impl("block_topk", x)(x, layout)


def gather_block_values(x: torch.Tensor, idx: torch.Tensor, layout: TopKLayout) -> torch.Tensor:
    """fp32 [k]: ``x`` at block-relative indices ``idx``."""
    return _impl("gather_block_values", x)(x, idx, layout)


def scatter_block_values(x: torch.Tensor, idx: torch.Tensor, values: torch.Tensor | float,
                         layout: TopKLayout) -> None:
    """In place: ``x`` at block-relative indices ``idx`` = ``values`` (tensor or scalar)."""
    return _impl("scatter_block_values", x)(x, idx, values, layout)


def window_adam_update(param: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor,
                       layout: TopKLayout, step: int, beta1: float, beta2: float, eps: float,
                       lr: float, weight_decay: float, sr_seed: int | None = None,
                       dense: torch.Tensor | None = None) -> None:
    """MicroAdam's fused Adam update from the gradient window (:mod:`.window_adam`)."""
    return _impl("window_adam_update", param)(param, idx, vals, layout, step, beta1, beta2, eps,
                                              lr, weight_decay, sr_seed, dense)


def error_feedback_compress(grad: torch.Tensor, codes: torch.Tensor, mins: torch.Tensor,
                            maxs: torch.Tensor, bucket: int, layout: TopKLayout,
                            idx_out: torch.Tensor, val_out: torch.Tensor,
                            keep_rounding: bool = False) -> None:
    """Top-k compression with 4-bit error feedback (:mod:`.error_feedback`): MicroAdam's, or
    EFCP's with ``keep_rounding``."""
    return _impl("error_feedback_compress", grad)(grad, codes, mins, maxs, bucket, layout,
                                                  idx_out, val_out, keep_rounding)


def codebook_quantize_rows(x: torch.Tensor, name: str, block: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax) of ``x`` (..., rows, cols); see :mod:`.codebook`."""
    return _impl("codebook_quantize_rows", x)(x, name, block)


def codebook_dequantize_rows(codes: torch.Tensor, absmax: torch.Tensor, cols: int, name: str,
                             block: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`codebook_quantize_rows`."""
    return _impl("codebook_dequantize_rows", codes)(codes, absmax, cols, name, block, dtype)


def codebook_quantize_offdiag(x: torch.Tensor, name: str, block: int
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp32 diagonal, codes, absmax) of square ``x`` (..., n, n)."""
    return _impl("codebook_quantize_offdiag", x)(x, name, block)


def codebook_dequantize_offdiag(diag: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor,
                                name: str, block: int, dtype: torch.dtype = torch.float32
                                ) -> torch.Tensor:
    """Inverse of :func:`codebook_quantize_offdiag`."""
    return _impl("codebook_dequantize_offdiag", codes)(diag, codes, absmax, name, block, dtype)


def sparse_rows_dot(idx: torch.Tensor, vals: torch.Tensor, layout: TopKLayout, x: torch.Tensor,
                    nrows: int | None = None) -> torch.Tensor:
    """fp64 [nrows]: <row_i, x> of a sparse window (SP); see :mod:`.sparse_rows`."""
    return _impl("sparse_rows_dot", x)(idx, vals, layout, x, nrows)


def sparse_rows_dot_slot(idx: torch.Tensor, vals: torch.Tensor, layout: TopKLayout, slot: int,
                         nrows: int | None = None) -> torch.Tensor:
    """fp64 [nrows]: <row_i, row_slot> of the window's own rows; see :mod:`.sparse_rows`."""
    return _impl("sparse_rows_dot_slot", vals)(idx, vals, layout, slot, nrows)


def sparse_rows_combine(idx: torch.Tensor, vals: torch.Tensor, layout: TopKLayout,
                        coeffs: torch.Tensor, out: torch.Tensor, nrows: int | None = None,
                        zero_first: bool = False) -> None:
    """out += sum_i coeffs[i] * row_i (LCG, scatter-add into dense fp32 ``out``; ``zero_first``:
    ``out`` may be uninitialised and is zeroed first)."""
    return _impl("sparse_rows_combine", out)(idx, vals, layout, coeffs, out, nrows, zero_first)


def lowbit_adam_update(param: torch.Tensor, grad: torch.Tensor, m_codes: torch.Tensor,
                       m_absmax: torch.Tensor, v_codes: torch.Tensor, v_absmax: torch.Tensor,
                       bits: int, step: int, beta1: float, beta2: float, eps: float, lr: float,
                       weight_decay: float) -> None:
    """AdamW step with 8- or 4-bit block-quantized moments (:mod:`.lowbit_adam`)."""
    return _impl("lowbit_adam_update", param)(param, grad, m_codes, m_absmax, v_codes, v_absmax,
                                              bits, step, beta1, beta2, eps, lr, weight_decay)


__all__ = ["CODEBOOKS", "ENV_VAR", "MAX_INT16_BLOCK", "KernelBackendError", "TopKLayout",
           "absmax_blocks", "backend_for", "entries_per_block", "native_available", "packed_cols",
           "triton_available", *_OPS]
