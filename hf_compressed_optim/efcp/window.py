"""The compressed, error-fed sliding window shared by SparseMFAC and SparseGGT.

The preconditioners see one global window ``G`` (m rows, one compressed gradient of the whole
model per step), but every parameter keeps only *its slice* of every row, in its own
``optimizer.state[p]``:

* Top-K compressor: ``window_indices`` (int16 [m, k], block-relative, :class:`TopKLayout` with
  blocks of at most 32768 elements so every index fits int16 whatever the GPU) and
  ``window_values`` ([m, k], bf16 or fp32);
* low-rank compressor (tensors with >= 2 dims): ``window_left`` [m, rows, r] and
  ``window_right`` [m, cols, r] plus the warm-start ``lowrank_q`` [cols, r];
* the error buffer: ``ef`` (fp32, or bf16 with ``ef_bits=16``) or the 4-bit ``ef_codes`` /
  ``ef_min`` / ``ef_max`` of the foundation's quantizer (``ef_bits=4``).

Every inner product ``<row_i, x>`` is a sum over parameters of the per-parameter sparse dot
products, so the global quantities (the new Gram row, ``G x``) are m-vectors summed on the
host side (and, under data parallelism, all-reduced by the optimizer's ``_all_reduce`` hook).

The small global tensors live in the state of the *anchor* (the first parameter of the first
non-empty group): ``gram`` = G G^T (fp64 [m, m], updated one row/column per step) and
``window_count`` (how many rows were ever inserted; the ring slot is ``count % m``).

Error feedback per parameter and step (no learning rate inside, spec section 2):
``a = e + g;  c = C(a);  e <- a - c`` where ``c`` is what the window *stores* (after rounding to
the value dtype), so ``sum c + e = sum g`` holds up to the fp32 additions.
"""

from __future__ import annotations

import torch

from ..kernels import dispatch as K
from . import lowrank as LR
from ..kernels.layout import TopKLayout

TOPK_KEYS = ("window_indices", "window_values")
LOWRANK_KEYS = ("window_left", "window_right", "lowrank_q")
VALUE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# ---------------------------------------------------------------------------- global state
def init_global_state(state: dict, window_size: int, device) -> None:
    """The anchor's global tensors (created lazily at the first step)."""
    state["gram"] = torch.zeros((window_size, window_size), dtype=torch.float64, device=device)
    state["window_count"] = torch.zeros((), dtype=torch.int64)
    state.setdefault("nonfinite_skips", torch.zeros((), dtype=torch.int64))


def has_global_state(state: dict) -> bool:
    return "gram" in state


def update_gram_(gram: torch.Tensor, slot: int, new_row: torch.Tensor) -> None:
    """Row and column ``slot`` of G G^T after the slot's row was overwritten (one row per step)."""
    n = new_row.numel()
    gram[slot, :n] = new_row
    gram[:n, slot] = new_row


# ---------------------------------------------------------------------------- per parameter
def uses_lowrank(state: dict) -> bool:
    return "window_left" in state


def init_param_state(state: dict, p: torch.Tensor, group: dict, window_size: int,
                     seed: int) -> None:
    """Lazily create the window slice, the error buffer and the counters of parameter ``p``."""
    n = p.numel()
    dev = p.device
    vdtype = VALUE_DTYPES[group["value_dtype"]]
    state["step"] = torch.zeros((), dtype=torch.int64)
    state.setdefault("nonfinite_skips", torch.zeros((), dtype=torch.int64))
    shape = LR.matrix_shape(p.shape)
    if group["compressor"] == "lowrank" and shape is not None and n > 0:
        rows, cols = shape
        r = LR.effective_rank(shape, group["rank"])
        state["window_left"] = torch.zeros((window_size, rows, r), dtype=vdtype, device=dev)
        state["window_right"] = torch.zeros((window_size, cols, r), dtype=vdtype, device=dev)
        state["lowrank_q"] = LR.initial_q(cols, r, seed, dev)
    else:
        # Top-K (1-D tensors under the low-rank compressor are kept dense: density 1)
        density = group["density"] if group["compressor"] == "topk" else 1.0
        layout = TopKLayout.create(n, group["topk_block_size"], density)
        state["window_indices"] = torch.zeros((window_size, layout.k), dtype=torch.int16,
                                              device=dev)
        state["window_values"] = torch.zeros((window_size, layout.k), dtype=vdtype, device=dev)
        # requested block and density, not the per-tensor layout: FSDP2 shards of one parameter
        # differ in size, so the layout is derived from the local numel when needed
        state["topk_block"] = group["topk_block_size"]
        state["density"] = density
    bits = group["ef_bits"]
    if bits == 4:
        q = group["quant_block_size"]
        state["ef_codes"] = torch.zeros(((n + 1) // 2,), dtype=torch.uint8, device=dev)
        state["ef_min"] = torch.zeros((-(-n // q),), dtype=torch.bfloat16, device=dev)
        state["ef_max"] = torch.zeros((-(-n // q),), dtype=torch.bfloat16, device=dev)
        state["quant_block"] = q
    else:
        state["ef"] = torch.zeros((n,), dtype=torch.float32 if bits == 32 else torch.bfloat16,
                                  device=dev)
    if group["momentum"] > 0:
        state["momentum_buffer"] = torch.zeros((n,), dtype=torch.float32, device=dev)


def layout_of(state: dict, numel: int) -> TopKLayout:
    return TopKLayout.create(numel, state["topk_block"], state["density"])


def load_error(state: dict, numel: int) -> torch.Tensor:
    """The error buffer as a fresh fp32 flat tensor."""
    if "ef_codes" in state:
        return K.dequantize4(state["ef_codes"], state["ef_min"], state["ef_max"], numel,
                             state["quant_block"])
    return state["ef"].to(torch.float32, copy=True)


def store_error(state: dict, residual: torch.Tensor) -> None:
    """Store ``residual`` (fp32 flat scratch, consumed) as the new error buffer."""
    if "ef_codes" in state:
        K.quantize4(residual, state["quant_block"], state["ef_codes"], state["ef_min"],
                    state["ef_max"], overwrite=True)
    else:
        state["ef"].copy_(residual)


def compress_into_slot(state: dict, grad: torch.Tensor, slot: int) -> torch.Tensor:
    """Error feedback + compression of one parameter into ring row ``slot``.

    Returns the compressed accumulator ``c`` as a dense fp32 flat tensor (what the window row
    now holds), or None for top-k with the 4-bit error (:func:`slot_dots` then reads the row
    from the window, without a dense copy); the error buffer becomes ``a - c``.
    """
    n = grad.numel()
    if "ef_codes" in state and not uses_lowrank(state):
        # top-k with the 4-bit error: MicroAdam's compression op, keeping the stored values'
        # rounding in the error (one pass per block on the native and fused backends)
        layout = layout_of(state, n)
        idx, vals = state["window_indices"][slot], state["window_values"][slot]
        K.error_feedback_compress(grad, state["ef_codes"], state["ef_min"], state["ef_max"],
                                  state["quant_block"], layout, idx, vals, keep_rounding=True)
        return None  # the row is in the window: slot_dots reads it there
    acc = load_error(state, n).add_(grad.reshape(-1))
    if uses_lowrank(state):
        rows = state["window_left"].shape[1]
        mat = acc.view(rows, -1)
        p, q = LR.power_step(mat, state["lowrank_q"])
        state["window_left"][slot].copy_(p)
        state["window_right"][slot].copy_(q)
        c = state["window_left"][slot].float() @ state["window_right"][slot].float().T
        c = c.reshape(-1)
        acc.sub_(c)
    else:
        layout = layout_of(state, n)
        idx = K.block_topk(acc, layout)
        picked = K.gather_block_values(acc, idx, layout)  # fp32 values of a at idx
        state["window_indices"][slot].copy_(idx)
        state["window_values"][slot].copy_(picked)
        c = torch.zeros_like(acc)
        if layout.k:
            kept = state["window_values"][slot].float()  # as stored (e.g. rounded to bf16)
            K.scatter_block_values(c, idx, kept, layout)
            # a - c changes only the kept entries (a - 0 == a elsewhere, bit for bit): subtract
            # there instead of in a dense pass
            K.scatter_block_values(acc, idx, picked.sub_(kept), layout)
    store_error(state, acc)
    return c


def clear_slot(state: dict, slot: int) -> None:
    """A parameter without a gradient this step contributes a zero slice to the new row."""
    if uses_lowrank(state):
        state["window_left"][slot].zero_()
        state["window_right"][slot].zero_()
    elif "window_values" in state:
        state["window_values"][slot].zero_()


def slot_dots(state: dict, slot: int, c: torch.Tensor | None, nrows: int,
              numel: int) -> torch.Tensor:
    """fp64 [nrows]: <row_i, c> of this parameter's slice (``numel`` elements), ``c`` being the
    slot's own row (None: read it from the window)."""
    if uses_lowrank(state):
        return LR.factor_dots(state["window_left"], state["window_right"],
                              state["window_left"][slot].float(),
                              state["window_right"][slot].float(), nrows)
    layout = layout_of(state, numel)
    if c is None:
        return K.sparse_rows_dot_slot(state["window_indices"], state["window_values"], layout,
                                      slot, nrows)
    return K.sparse_rows_dot(state["window_indices"], state["window_values"], layout, c, nrows)


def dense_dots(state: dict, x: torch.Tensor, nrows: int) -> torch.Tensor:
    """fp64 [nrows]: <row_i, x> for a dense tensor ``x`` of the parameter's shape."""
    if uses_lowrank(state):
        rows = state["window_left"].shape[1]
        return LR.dense_dots(state["window_left"], state["window_right"],
                             x.reshape(rows, -1), nrows)
    layout = layout_of(state, x.numel())
    return K.sparse_rows_dot(state["window_indices"], state["window_values"], layout,
                             x.reshape(-1), nrows)


def combine(state: dict, coeffs: torch.Tensor, nrows: int, out: torch.Tensor,
            zero_first: bool = False) -> None:
    """``out`` (fp32 flat, contiguous) += sum_i coeffs[i] row_i of this parameter's slice;
    ``zero_first``: ``out`` may be uninitialised and is zeroed first (the native loop clears
    each block while it is in cache instead of in a separate pass)."""
    if uses_lowrank(state):
        if zero_first:
            out.zero_()
        rows = state["window_left"].shape[1]
        LR.combine_(state["window_left"], state["window_right"], coeffs, nrows,
                    out.view(rows, -1))
        return
    layout = layout_of(state, out.numel())
    K.sparse_rows_combine(state["window_indices"], state["window_values"], layout, coeffs, out,
                          nrows, zero_first)
