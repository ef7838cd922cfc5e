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

from .config import SparseMFACConfig
from .optimizer import EFCPOptimizer


def spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a^-1 b`` (b: [n, k]) for a symmetric positive definite ``a`` (Cholesky; LU if that
    fails)."""
    chol, info = torch.linalg.cholesky_ex(a)
    return torch.cholesky_solve(b, chol) if int(info) == 0 else torch.linalg.solve(a, b)


class SparseMFAC(EFCPOptimizer):
    """Sparse M-FAC with error feedback (Modoranu et al., ICML 2024).

    One preconditioner over all parameters of the optimizer; each parameter stores its slice of
    every window row (see :mod:`hf_compressed_optim.efcp.window`).

    ``SparseMFAC(params, lr=1e-3, damp=1e-6, ...)`` or ``SparseMFAC(params, config)``: options,
    defaults and ranges are those of :class:`SparseMFACConfig` (also ``m``, ``k_init``).
    Per-group ``lr``, ``weight_decay``, ``momentum``, ``density``, ``compressor`` ... are
    honoured; ``window_size``, ``damp`` and ``fix_scaling`` are global and must agree across
    groups.
    """

    Config = SparseMFACConfig
    GLOBAL_HPARAMS = ("window_size", "damp", "fix_scaling")

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
