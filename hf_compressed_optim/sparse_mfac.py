"""Sparse M-FAC (EFCP): M-FAC's inverse empirical Fisher over a window of error-fed, Top-K (or
low-rank) compressed gradients of the whole model.

Update for the compressed accumulator ``x = c_t`` (EFCP spec section 3):

    u = (damp I + (1/n) G^T G)^-1 x = (1/damp) [x - G^T (n damp I + G G^T)^-1 G x]   (Woodbury)

with ``G`` the m x d window (rows not yet written are zero) and ``n = m`` (the reference, also
while the window fills) or ``n = min(t, m)`` with ``fix_scaling=True``. Since ``x = c`` is the
window's own row ``slot``, ``G c = (A - n damp I) e_slot`` with ``A = G G^T + n damp I``, and the
update is exactly ``u = n G^T A^-1 e_slot``: computed that way, nothing cancels (the Woodbury
form's ``x/damp - ...`` difference loses every digit once ``|c|^2 / (n damp)`` is large). The
m x m system is solved by Cholesky in fp64 from ``G G^T``, which is kept in fp64 and updated one
row/column per step; TF32 never enters (fp64 throughout).
"""

from __future__ import annotations

import torch

from .efcp_optimizer import DEFAULT_TOPK_BLOCK, EFCPOptimizer, common_defaults
from .validation import check_float


def spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a^-1 b`` (b: [n, k]) for a symmetric positive definite ``a`` (Cholesky; LU if that
    fails)."""
    chol, info = torch.linalg.cholesky_ex(a)
    return torch.cholesky_solve(b, chol) if int(info) == 0 else torch.linalg.solve(a, b)


class SparseMFAC(EFCPOptimizer):
    """Sparse M-FAC with error feedback (Modoranu et al., ICML 2024).

    One preconditioner over all parameters of the optimizer; each parameter stores its slice of
    every window row (see :mod:`hf_compressed_optim.efcp_window`).

    Args:
        params: parameters or groups (per-group ``lr``, ``weight_decay``, ``momentum``,
            ``density``, ``compressor`` ... honoured; ``window_size``, ``damp`` and
            ``fix_scaling`` are global and must agree across groups).
        lr: learning rate (float or one-element tensor), >= 0. Off the window's span the step is
            ``lr / damp`` times the compressed gradient.
        damp: damping lambda > 0.
        window_size: number of compressed gradients m in the ring, in [1, 8192] (``m``).
        density: fraction of entries kept per Top-K block, in (0, 1] (``k_init``).
        weight_decay: >= 0, applied as ``wd_mode`` says.
        momentum: mu in [0, 1): ``v = mu v + u`` (no dampening, as the Sparse M-FAC reference).
        compressor: ``"topk"`` (block Top-K) or ``"lowrank"`` (PowerSGD, rank ``rank``, warm
            started, for tensors with >= 2 dims; 1-D tensors stay dense).
        rank: rank of the low-rank compressor, in [1, 1024].
        ef_bits: error buffer storage: 32 (fp32), 16 (bf16) or 4 (4-bit block quantizer).
        value_dtype: ``"bf16"`` or ``"fp32"`` window values (the residual of the rounding is fed
            back, so bf16 loses nothing but delays it).
        wd_mode: ``"decoupled_lr_scaled"`` (``p *= 1 - lr wd``, the package's), or
            ``"decoupled_unscaled"`` (``p *= 1 - wd``, the EFCP repository's), or ``"l2"``
            (precondition ``c + wd p``).
        fix_scaling: normalise by ``min(t, m)`` instead of ``m`` while the window fills.
        topk_block_size: elements per Top-K block, in [1, 32768] (int16 block-relative indices).
        quant_block_size: elements per bucket of the 4-bit error buffer (even).
        seed: seed of the low-rank compressor's warm start (same on every rank).
        nonfinite: ``"skip"`` the whole step on an inf/NaN gradient (counted, warned) or
            ``"raise"``.
        m, k_init: aliases of ``window_size`` and ``density`` (reference names).
    """

    GLOBAL_HPARAMS = ("window_size", "damp", "fix_scaling")

    def __init__(self, params, lr=1e-3, damp=1e-6, window_size=1024, density=0.01,
                 weight_decay=0.0, momentum=0.0, compressor="topk", rank=4, ef_bits=32,
                 value_dtype="bf16", wd_mode="decoupled_lr_scaled", fix_scaling=False,
                 topk_block_size=DEFAULT_TOPK_BLOCK, quant_block_size=64, seed=0,
                 nonfinite="skip", *, m=None, k_init=None):
        defaults = common_defaults(
            lr=lr, window_size=window_size, density=density, weight_decay=weight_decay,
            momentum=momentum, compressor=compressor, rank=rank, ef_bits=ef_bits,
            value_dtype=value_dtype, wd_mode=wd_mode, topk_block_size=topk_block_size,
            quant_block_size=quant_block_size, m=m, k_init=k_init)
        defaults["damp"] = check_float("damp", damp, 0.0, lo_open=True)
        if not isinstance(fix_scaling, bool):
            raise ValueError(f"fix_scaling must be True or False, got {fix_scaling!r}")
        defaults["fix_scaling"] = fix_scaling
        super().__init__(params, defaults, seed=seed, nonfinite=nonfinite)

    def _coefficients(self, gram, slot, gy, count):
        group = self.param_groups[0]
        damp = group["damp"]
        m = group["window_size"]
        norm = min(count + 1, m) if group["fix_scaling"] else m
        a = gram.clone()
        a.diagonal().add_(norm * damp)
        rhs = torch.zeros((gram.shape[0], 2), dtype=gram.dtype, device=gram.device)
        rhs[slot, 0] = 1.0
        rhs[:, 1] = gy
        sol = spd_solve(a, rhs)
        # c: n A^-1 e_slot;  y (l2 mode): (1/damp) [y - G^T A^-1 G y]
        return 1.0 / damp, sol[:, 0].mul_(norm).sub_(sol[:, 1], alpha=1.0 / damp)
