"""Sparse GGT (EFCP): full-matrix AdaGrad restricted to a window of error-fed, compressed
gradients.

Update for the compressed accumulator ``x = c_t`` (EFCP spec section 6):

    u = (eps I + (G^T G)^(1/2))^-1 x        (G: the r x d window, one row per gradient)

computed through the eigen-decomposition of the r x r Gram matrix ``G G^T = V diag(s^2) V^T``
(fp64, updated one row/column per step). The compressed accumulator ``x = c`` is the window's own
row ``slot``, so it lies in the window's span and

    u = G^T V diag(1 / (s + eps)) V^T e_slot

exactly, for every eigenvalue, without a cut-off: a cut-off would give tiny singular values the
off-span step ``1/eps`` where ``1/(s + eps)`` is right. A direction with ``s = 0`` contributes
``G^T v = 0``. Only the ``l2`` weight-decay term ``y = wd p`` (off the span in general) takes the
general form ``u_y = y / eps - G^T V diag(1 / (eps s (s + eps))) V^T (G y)``, which divides by
``s`` and so drops eigenvalues at or below ``max * r * 1e-13``. No momentum or decay of old rows
by default, as the Sparse GGT reference (beta1 = 0, beta2 = 1).
"""

from __future__ import annotations

import torch

from .config import SparseGGTConfig
from .optimizer import EFCPOptimizer

#: relative eigenvalue cut-off of the r x r Gram matrix (times r)
EIG_RTOL = 1e-13


class SparseGGT(EFCPOptimizer):
    """Sparse GGT with error feedback (Modoranu et al., ICML 2024).

    Options are those of :class:`SparseGGTConfig`: SparseMFAC's without ``damp`` and
    ``fix_scaling``, with ``eps`` (global, like ``window_size``). There is no normalisation by
    the window size, so nothing changes while the window fills
    (unwritten rows are zero and contribute nothing).
    """

    Config = SparseGGTConfig
    GLOBAL_HPARAMS = ("window_size", "eps")

    def _coefficients(self, gram, slot, gy, count):
        eps = self.param_groups[0]["eps"]
        evals, vecs = torch.linalg.eigh(gram)
        s = evals.clamp_min(0.0).sqrt()
        coeffs = vecs @ (vecs[slot] / (s + eps))
        keep = evals > max(float(evals.max()), 0.0) * gram.shape[0] * EIG_RTOL
        if bool(keep.any()) and bool(gy.any()):
            sk, v = s[keep], vecs[:, keep]
            coeffs.sub_(v @ ((v.T @ gy) / (eps * sk * (sk + eps))))
        return 1.0 / eps, coeffs
