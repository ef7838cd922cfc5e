"""Batched matrix functions behind Shampoo: Björck rectification, the warm-started QR subspace
refresh of an eigendecomposition, inverse p-th roots (eigen-based and coupled Schur–Newton).

Every function takes a stack of square matrices ``(B, n, n)`` (fp32 or fp64) and works on the
whole stack at once, so equal-size Shampoo blocks of a model cost one batched call instead of
one small call per block. Eigenvector matrices are stored with **rows** as eigenvectors
(``A = Uᵀ diag(s) U``), because the quantizer's blocks run along rows.
"""

from __future__ import annotations

import torch

#: rows per panel of :func:`sym_product` (only panels on and below the diagonal are multiplied)
SYM_PANEL = 128
#: zero rows appended to Y for the QR of orders that are multiples of 512 (see qr_subspace_refresh)
QR_PAD = 8


def panelled(device: torch.device) -> bool:
    """Whether :func:`sym_product` multiplies lower-triangle panels (CPU) or runs one GEMM."""
    return device.type == "cpu"


def sym_product(a: torch.Tensor, b: torch.Tensor, add: torch.Tensor | None = None,
                alpha: float = 1.0, beta: float = 1.0, out: torch.Tensor | None = None
                ) -> torch.Tensor:
    """``beta·add + alpha·(a @ b)`` for a result known to be symmetric (``a`` (B, n, k), ``b``
    (B, k, n); ``add`` (B, n, n) symmetric or None), e.g. ``V Vᵀ`` or ``Uᵀ (diag(s) U)``.

    Only the row panels' parts on and below the diagonal are multiplied (about half the flops
    of the full product) and mirrored above it, so the result is exactly symmetric; each
    computed entry is the full product's up to rounding (``add`` contributes its lower triangle).
    ``out`` may be ``add`` itself (updated in place); otherwise a new tensor.
    """
    n = a.shape[-2]
    if out is None:
        out = torch.empty((*a.shape[:-1], n), dtype=a.dtype, device=a.device)
    if add is not None and add is not out:
        out.copy_(add)
    if not panelled(a.device):
        # accelerators: one GEMM (many small panel launches would cost more than the flops
        # they save), then the same mirroring of the lower triangle
        if add is None:
            torch.matmul(a, b, out=out)
            if alpha != 1.0:
                out.mul_(alpha)
        else:
            _addmm(out, out, a, b, beta=beta, alpha=alpha)
        return out.copy_(torch.tril(out) + torch.tril(out, -1).mT)
    edges = list(range(0, n, SYM_PANEL)) + [n]
    for r0, r1 in zip(edges[:-1], edges[1:]):
        dst = out[..., r0:r1, :r1]
        if add is None:
            torch.matmul(a[..., r0:r1, :], b[..., :r1], out=dst)
            if alpha != 1.0:
                dst.mul_(alpha)
        else:
            _addmm(dst, dst, a[..., r0:r1, :], b[..., :r1], beta=beta, alpha=alpha)
    for r0, r1 in zip(edges[:-1], edges[1:]):
        out[..., :r0, r0:r1].copy_(out[..., r0:r1, :r0].mT)
        d = out[..., r0:r1, r0:r1]
        d.copy_(torch.tril(d) + torch.tril(d, -1).mT)
    return out


def _addmm(out: torch.Tensor, c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float,
           alpha: float) -> torch.Tensor:
    """``out = beta·c + alpha·(a @ b)`` in one GEMM (``out`` may be ``c``; stacks or matrices)."""
    if out.dim() == 2:
        return torch.addmm(c, a, b, beta=beta, alpha=alpha, out=out)
    return torch.baddbmm(c, a, b, beta=beta, alpha=alpha, out=out)


def bjorck(v: torch.Tensor, iters: int) -> torch.Tensor:
    """``iters`` Björck steps ``V <- 1.5 V - 0.5 V Vᵀ V`` towards the nearest orthogonal matrix.

    Each singular value follows ``s <- 1.5 s - 0.5 s^3``, which converges to 1 for s in (0, √3).
    ``V Vᵀ`` is a :func:`sym_product` and ``1.5 V - 0.5 (V Vᵀ) V`` one fused ``baddbmm``; ``v``
    itself is not modified.
    """
    if iters <= 0:
        return v
    gram = torch.empty_like(v)
    spare = None  # the buffer of two iterations ago (never the caller's v)
    for k in range(iters):
        sym_product(v, v.mT, out=gram)
        nxt = spare if spare is not None else torch.empty_like(v)
        _addmm(nxt, v, gram, v, beta=1.5, alpha=-0.5)
        spare = v if k > 0 else None
        v = nxt
    return v


def orthogonality_error(v: torch.Tensor) -> torch.Tensor:
    """``||V Vᵀ - I||_F`` per matrix of the stack."""
    eye = torch.eye(v.shape[-1], dtype=v.dtype, device=v.device)
    return torch.linalg.matrix_norm(v @ v.mT - eye)


def compose(u: torch.Tensor, s: torch.Tensor, add: torch.Tensor | None = None,
            weight: float = 1.0, add_weight: float = 1.0) -> torch.Tensor:
    """``Uᵀ diag(s) U`` for row-eigenvector matrices ``u`` (B, n, n) and values ``s`` (B, n),
    computed as the :func:`sym_product` ``Uᵀ (diag(s) U)`` (exactly symmetric).

    With ``add`` (B, n, n) symmetric: ``weight·Uᵀ diag(s) U + add_weight·add`` in the same
    products, written into ``add`` (e.g. the statistics EMA ``β·A + (1-β)·G Gᵀ`` in place).
    """
    su = u * s.unsqueeze(-1)
    if add is None:
        return sym_product(u.mT, su, alpha=weight)
    return sym_product(u.mT, su, add=add, alpha=weight, beta=add_weight, out=add)


def symmetrize(a: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a + a.mT)


def qr_subspace_refresh(a: torch.Tensor, u_prev: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """One subspace iteration warm-started at the previous eigenvectors.

    ``P = QR(A Uᵀ_prev)``; eigenvalue estimates are the Rayleigh quotients ``diag(Pᵀ A P)``.
    Returns (eigenvalues (B, n), new row-eigenvector matrix ``Pᵀ`` (B, n, n)).
    """
    n = a.shape[-1]
    # Orders that are multiples of 512 make a pathological leading dimension for LAPACK's QR
    # on CPU (1.5-2x slower than order + 8): there the QR runs on Y with QR_PAD zero rows
    # appended, whose Householder reflectors, Q's first n rows and R are those of Y (the zero
    # rows stay exactly zero; only the blocking, i.e. rounding, may differ).
    pad = QR_PAD if n % 512 == 0 and a.device.type == "cpu" else 0
    y = a.new_empty((*a.shape[:-2], n + pad, n))
    torch.matmul(a, u_prev.mT, out=y[..., :n, :])
    y[..., n:, :].zero_()
    # Q and R written column-major, so Q's transpose (rows: the new eigenvectors) is a
    # row-major tensor and LAPACK works on them without further copies
    qt = a.new_empty((*a.shape[:-2], n, n + pad))
    r = a.new_empty((*a.shape[:-2], n, n))
    torch.linalg.qr(y, out=(qt.mT, r.mT))
    del r
    pt = qt[..., :n] if not pad else qt[..., :n].contiguous()
    # y is free once the QR has copied it
    s = torch.matmul(pt, a, out=y[..., :n, :]).mul_(pt).sum(-1)
    return s, pt


def relative_ridge(lam_max: torch.Tensor, eps: float) -> torch.Tensor:
    """``eps * lam_max`` per matrix, never below the smallest normal fp32 (an all-zero
    statistic would otherwise give an infinite root)."""
    return (eps * lam_max.clamp_min(0)).clamp_min(torch.finfo(torch.float32).tiny)


def eigen_inverse_root(u: torch.Tensor, s: torch.Tensor, eps: float, p: int = 4
                       ) -> torch.Tensor:
    """``Uᵀ diag((s⁺ + eps·max(s))^(-1/p)) U`` (s⁺: negative estimates clamped to 0)."""
    s = s.clamp_min(0)
    ridge = relative_ridge(s.amax(dim=-1), eps)
    d = (s + ridge.unsqueeze(-1)).pow(-1.0 / p)
    return compose(u, d)


def eigh_inverse_root(a: torch.Tensor, eps: float, p: int = 4) -> torch.Tensor:
    """Exact ``(A + eps·λmax·I)^(-1/p)`` of symmetric ``a`` by ``eigh`` in float64 (the small
    eigenvalues that the root amplifies need it; A's negative eigenvalues, i.e. rounding noise,
    are clamped to 0). Returned in ``a``'s dtype."""
    lam, q = torch.linalg.eigh(symmetrize(a.double()))
    return eigen_inverse_root(q.mT, lam, eps, p).to(a.dtype)


def power_iteration_max_eig(a: torch.Tensor, iters: int = 10) -> torch.Tensor:
    """Largest eigenvalue estimate of symmetric PSD ``a`` (B, n, n) after ``iters`` steps."""
    n = a.shape[-1]
    v = torch.full((*a.shape[:-1], 1), n ** -0.5, dtype=a.dtype, device=a.device)
    for _ in range(iters):
        w = a @ v
        v = w / torch.linalg.vector_norm(w, dim=-2, keepdim=True).clamp_min(1e-30)
    return ((a @ v) * v).sum(dim=(-2, -1))


def schur_newton_inverse_root(a: torch.Tensor, eps: float, p: int = 4, iters: int = 50,
                              tol: float = 1e-6, power_iters: int = 10) -> torch.Tensor:
    """Coupled Newton (Schur–Newton) iteration for ``(A + eps·λmax·I)^(-1/p)``.

    With ``z = (1 + p) / (2 ||A||)``: ``X0 = z^(1/p) I``, ``M0 = z A``, then
    ``T = ((p + 1) I - M) / p``, ``X <- X T``, ``M <- T^p M`` (the invariant ``M = X^p A`` holds,
    so ``M -> I`` means ``X -> A^(-1/p)``). Per matrix the iteration stops after ``iters`` steps,
    when ``max|M - I| <= tol``, or when the error grows by more than 20% (the previous iterate
    is kept).
    """
    n = a.shape[-1]
    eye = torch.eye(n, dtype=a.dtype, device=a.device)
    a = symmetrize(a)
    lam_max = power_iteration_max_eig(a, power_iters)
    ridge = relative_ridge(lam_max, eps)
    a = a + ridge[:, None, None] * eye
    norm = lam_max.clamp_min(0) + ridge
    z = (1.0 + p) / (2.0 * norm)
    x = eye * z.pow(1.0 / p)[:, None, None]
    m = a * z[:, None, None]
    err = (m - eye).abs().amax(dim=(-2, -1))
    active = err > tol
    for _ in range(iters):
        if not bool(active.any()):
            break
        t = ((p + 1.0) * eye - m) / p
        x_new = x @ t
        m_new = torch.linalg.matrix_power(t, p) @ m
        err_new = (m_new - eye).abs().amax(dim=(-2, -1))
        accept = active & (err_new <= 1.2 * err)
        sel = accept[:, None, None]
        x = torch.where(sel, x_new, x)
        m = torch.where(sel, m_new, m)
        err = torch.where(accept, err_new, err)
        active = accept & (err_new > tol)
    return x


def finite_per_matrix(*tensors: torch.Tensor) -> torch.Tensor:
    """(B,) bool: every entry of matrix b of every tensor is finite."""
    ok = None
    for t in tensors:
        f = torch.isfinite(t).flatten(1).all(dim=1)
        ok = f if ok is None else ok & f
    return ok


def robust_batched(fn, *stacks: torch.Tensor):
    """``fn(*stacks)`` on the whole batch; if LAPACK raises, retry matrix by matrix in fp32 then
    fp64. Returns (outputs as a tuple of tensors with NaN where a matrix failed, ok mask (B,))."""
    batch = stacks[0].shape[0]
    try:
        out = fn(*stacks)
    except RuntimeError:
        out = None
    if out is not None:
        out = out if isinstance(out, tuple) else (out,)
        return out, finite_per_matrix(*out)
    pieces, oks = [], []
    for b in range(batch):
        res = None
        for dtype in (torch.float32, torch.float64):
            try:
                r = fn(*(s[b:b + 1].to(dtype) for s in stacks))
            except RuntimeError:
                continue
            r = r if isinstance(r, tuple) else (r,)
            if bool(finite_per_matrix(*r).all()):
                res = tuple(t.to(stacks[0].dtype) for t in r)
                break
        oks.append(res is not None)
        pieces.append(res)
    template = next((r for r in pieces if r is not None), None)
    if template is None:
        return None, torch.zeros(batch, dtype=torch.bool)
    outs = []
    for k in range(len(template)):
        outs.append(torch.cat([r[k] if r is not None else torch.full_like(template[k], float("nan"))
                               for r in pieces]))
    return tuple(outs), torch.tensor(oks)
