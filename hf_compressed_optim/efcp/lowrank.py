"""PowerSGD-style rank-r compression of one gradient matrix, and the algebra of its window.

One warm-started power iteration per step (EFCP spec section 7.1): with the error-fed
accumulator ``A`` (rows x cols) and the persistent ``Q`` (cols x r) of the previous step,

    P = orthonormalise(A Q),   Q <- A^T P,   c = P Q^T,

so ``c`` is the projection of ``A`` onto the column space of ``P``; the residual ``A - c`` goes
back to the error buffer. The window stores the factors ``L = P`` (m x rows x r) and ``R = Q``
(m x cols x r) instead of the dense rows, and the inner products the preconditioners need are
computed from them:

    <L_a R_a^T, L_b R_b^T>_F = sum((L_a^T L_b) * (R_a^T R_b)),   <L R^T, X>_F = sum(L * (X R)).

1-D tensors are not compressed (the optimizers store them as dense rows).
"""

from __future__ import annotations

import math

import torch

#: Gram-Schmidt treats a column whose norm is below this as zero (reference value)
ORTHO_EPS = 1e-8


def matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int] | None:
    """(rows, cols) of the matrix view of a tensor with >= 2 dims, None for 0-/1-D tensors."""
    if len(shape) < 2:
        return None
    return int(shape[0]), int(math.prod(shape[1:]))


def effective_rank(shape: tuple[int, int], rank: int) -> int:
    return max(1, min(rank, shape[0], shape[1]))


def initial_q(cols: int, rank: int, seed: int, device) -> torch.Tensor:
    """Deterministic warm start (the same on every data-parallel rank): fp32 [cols, rank]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((cols, rank), generator=g).to(device)


def orthonormalise_(p: torch.Tensor, eps: float = ORTHO_EPS) -> torch.Tensor:
    """Modified Gram-Schmidt on the columns of ``p`` (in place); near-zero columns become 0."""
    for j in range(p.shape[1]):
        col = p[:, j]
        for i in range(j):
            col.sub_(p[:, i] * torch.dot(p[:, i], col))
        norm = col.norm()
        col.div_(norm) if float(norm) > eps else col.zero_()
    return p


def power_step(acc: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, Q_new) for the fp32 matrix ``acc``; ``q`` (fp32, cols x r) is updated in place."""
    p = orthonormalise_(acc @ q)
    torch.matmul(acc.T, p, out=q)
    return p, q


def factor_dots(left: torch.Tensor, right: torch.Tensor, new_left: torch.Tensor,
                new_right: torch.Tensor, nrows: int) -> torch.Tensor:
    """fp64 [nrows]: <L_i R_i^T, L_new R_new^T> for the first ``nrows`` window entries."""
    if nrows == 0:
        return torch.zeros(0, dtype=torch.float64, device=left.device)
    lt = torch.einsum("iar,as->irs", left[:nrows].double(), new_left.double())
    rt = torch.einsum("ibr,bs->irs", right[:nrows].double(), new_right.double())
    return (lt * rt).sum(dim=(1, 2))


def dense_dots(left: torch.Tensor, right: torch.Tensor, x: torch.Tensor,
               nrows: int) -> torch.Tensor:
    """fp64 [nrows]: <L_i R_i^T, X> for a dense matrix ``x`` (rows x cols)."""
    if nrows == 0:
        return torch.zeros(0, dtype=torch.float64, device=left.device)
    xr = torch.einsum("ab,ibr->iar", x.double(), right[:nrows].double())
    return (left[:nrows].double() * xr).sum(dim=(1, 2))


def combine_(left: torch.Tensor, right: torch.Tensor, coeffs: torch.Tensor, nrows: int,
             out: torch.Tensor) -> None:
    """In place: ``out`` (fp32 rows x cols) += sum_i coeffs[i] L_i R_i^T."""
    if nrows == 0:
        return
    c = coeffs[:nrows].to(device=out.device, dtype=torch.float32)
    scaled = left[:nrows].float() * c[:, None, None]
    out.add_(torch.einsum("iar,ibr->ab", scaled, right[:nrows].float()))
