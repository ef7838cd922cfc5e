"""4-bit Shampoo (Wang, Zhou, Li, Huang, NeurIPS 2024) and its 32-bit baseline.

Per matrix parameter ``W`` (conv weights viewed as ``(out, in·kh·kw)``, sides longer than
``max_order`` split into blocks), each block keeps a left and a right Kronecker factor:

* **4-bit** (``precond_bits=4``): the factor's statistic is held as fp32 eigenvalues plus a 4-bit
  codebook-quantized eigenvector matrix (blocks of ``quant_block_size`` along each eigenvector);
  the inverse 4th root as an fp32 diagonal plus a 4-bit off-diagonal part.
  Every ``stat_update_interval`` steps (T1): dequantize, rectify (``rectify_iters[0]`` Björck
  steps), ``A = β V diag(λ) Vᵀ + (1-β) G Gᵀ``, one QR subspace iteration warm-started at the old
  eigenvectors, Rayleigh quotients as eigenvalues, re-quantize.
  Every ``root_update_interval`` steps (T2): dequantize, rectify (``rectify_iters[1]`` steps),
  ``Â = V (Λ + ε·max λ·I)^(-1/4) Vᵀ`` (or coupled Schur–Newton), re-quantize diagonal-split.
* **32-bit** (``precond_bits=32``, the paper's baseline, Algorithm 4): fp32 statistics
  ``L = β L + (1-β) G Gᵀ`` on T1 steps and fp32 inverse roots on T2 steps, by ``eigh`` or by the
  coupled Schur–Newton iteration. Factors with ``n² < min_quant_size`` use this storage in 4-bit
  mode too.

Every step from ``start_step`` on: ``Ĝ = L̂ G R̂`` per block, rescaled to ``‖G‖_F`` over the whole
tensor (grafting), then fed to AdamW (decoupled weight decay) or SGD with momentum (coupled weight
decay, optional Nesterov). Rank ≤ 1 parameters get the first-order update on the raw gradient.

Equal-size factors of *all* parameters are stacked and processed by one batched call each
(Björck, QR, roots, quantization, dequantization of the roots; on CPU in sub-batches of at most
``CPU_STACK_BYTES`` per stack); the outer products and the preconditioning matmuls run per block,
written straight into their stack or into the merged direction. Symmetric products (``V Vᵀ``,
``Uᵀ diag(λ) U``, ``G Gᵀ``) multiply only their lower block triangle
(:func:`~.matrix_functions.sym_product`). The persistent state stays per parameter in
``self.state[p]`` as plain tensors; every temporary is freed by the end of ``step()``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from ..kernels import dispatch as K
from ..core.optimizer import CompressedOptimizer, Job, as_float
from ..kernels.codebook import absmax_blocks, packed_cols
from ..kernels.lowbit_adam import state_shapes as lowbit_state_shapes
from .blocks import FP32_KEYS, QUANT_KEYS, ParamLayout, group_indices, param_layout, split_blocks
from .config import LOWBIT_ADAMW, Shampoo32bitConfig, ShampooConfig
from .matrix_functions import (
    bjorck, compose, eigen_inverse_root, eigh_inverse_root, finite_per_matrix,
    qr_subspace_refresh, robust_batched, schur_newton_inverse_root, sym_product,
)

GRAFT_GUARD = 1e-12
#: On CPU, equal-size factors are processed in sub-batches of at most this many bytes per
#: (B, n, n) fp32 stack: CPU BLAS/LAPACK loop over a batch anyway, and larger temporaries come
#: from freshly mapped memory at every step (a page fault per 4 KiB on first touch), while
#: smaller ones are reused from the heap. One batch on other devices.
CPU_STACK_BYTES = 8 << 20


def sub_batches(idx: list[int], n: int, device: torch.device) -> list[list[int]]:
    """``idx`` cut into the sub-batches described at :data:`CPU_STACK_BYTES`."""
    if device.type != "cpu":
        return [idx]
    per = max(1, CPU_STACK_BYTES // (4 * n * n))
    return [idx[i:i + per] for i in range(0, len(idx), per)]
#: automatic intervals (T1 = T2 = 0): the paper's T1 = 100, T2 = 500 for long or unknown runs;
#: a run of ``total_steps`` gets T2 = total_steps / 10 and T1 = T2 / 5 when that is shorter
AUTO_T1, AUTO_T2 = 100, 500
AUTO_T2_PER_RUN, AUTO_T1_PER_T2 = 10, 5
#: Checkpoints written before ``state["codebook"]`` existed end ``state["layout"]`` with an index
#: into this order; frozen, so reordering or extending ``CODEBOOKS`` cannot change their meaning.
LEGACY_CODEBOOKS = ("linear2", "dynamic_tree")


@dataclass
class _Job:
    """One parameter's work in the current step."""

    index: int
    group: dict
    param: torch.Tensor      # local tensor
    grad: torch.Tensor       # local tensor
    state: dict
    t: int
    layout: ParamLayout | None
    codebook: str | None = None
    qblock: int | None = None
    direction: torch.Tensor | None = None
    blocks: list = field(default_factory=list)


class Shampoo(CompressedOptimizer):
    """Shampoo with 4-bit (or fp32) preconditioners feeding AdamW or SGD(M).

    ``Shampoo(params, lr=1e-3, precond_bits=4, ...)`` or ``Shampoo(params, config)``: the
    options, defaults and ranges are those of :class:`ShampooConfig` (also accepted: ``T1``/``T2``,
    ``beta1``/``beta2``, ``rectify_t1``/``rectify_t2`` for one component of ``rectify_iters``).
    Per-group ``lr``/``weight_decay`` are honoured. Rank <= 1 parameters get the first-order
    update on the raw gradient.
    """

    Config = ShampooConfig
    NEEDS_MATRIX_SHAPES = True
    STATE_CATEGORIES = {
        **{k: "preconditioner" for k in QUANT_KEYS + FP32_KEYS},
        "exp_avg": "first_order", "exp_avg_sq": "first_order", "momentum_buffer": "first_order",
        "exp_avg_codes": "first_order", "exp_avg_absmax": "first_order",
        "exp_avg_sq_codes": "first_order", "exp_avg_sq_absmax": "first_order",
        "step": "counters", "nonfinite_skips": "counters", "precond_failures": "counters",
        "layout": "counters",
    }

    def __init__(self, params, config: ShampooConfig | None = None, **options):
        self._warned: set[str] = set()
        super().__init__(params, config, **options)

    # ------------------------------------------------------------------ state
    def _init_state(self, state: dict, p: torch.Tensor, group: dict, index: int = 0) -> None:
        state["step"] = torch.zeros((), dtype=torch.int64)
        state["nonfinite_skips"] = torch.zeros((), dtype=torch.int64)
        bits = self._lowbit_bits(group, p)
        if bits:
            # zero codes with zero absmax: both moments dequantize to exactly 0
            for key, shape in lowbit_state_shapes(p.numel(), bits).items():
                state[key] = torch.zeros(shape, device=p.device,
                                         dtype=torch.uint8 if key.endswith("codes") else
                                         torch.float32)
        elif group["first_order"].startswith("adamw"):
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif group["momentum"] > 0:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        geometry = (group["max_order"], group["precond_bits"], group["min_quant_size"],
                    group["quant_block_size"])
        layout = param_layout(tuple(p.shape), *geometry)
        if layout is None:
            return
        state["layout"] = torch.tensor(geometry, dtype=torch.int64)
        state["codebook"] = group["codebook"]  # by name: an index would depend on CODEBOOKS' order
        state["precond_failures"] = torch.zeros((), dtype=torch.int64)
        dev = p.device
        for key, size in zip(QUANT_KEYS, layout.quant_sizes):
            dtype = torch.uint8 if key.endswith("codes") else torch.float32
            state[key] = torch.zeros(size, dtype=dtype, device=dev)
        for key, size in zip(FP32_KEYS, layout.fp32_sizes):
            state[key] = torch.zeros(size, dtype=torch.float32, device=dev)
        if dev.type == "meta":  # shapes only (sizing of FSDP2 state)
            return
        name, block, eps = group["codebook"], group["quant_block_size"], group["matrix_eps"]
        identity: dict[int, tuple] = {}
        for f in layout.factors:
            n = f.order
            eye = torch.eye(n, dtype=torch.float32, device=dev)
            if f.quantized:
                if n not in identity:
                    codes, absmax = K.codebook_quantize_rows(eye, name, block)
                    _, rcodes, rabsmax = K.codebook_quantize_offdiag(eye, name, block)
                    identity[n] = (codes, absmax, rcodes, rabsmax)
                codes, absmax, rcodes, rabsmax = identity[n]
                for k, src in ((0, codes), (1, absmax), (4, rcodes), (5, rabsmax)):
                    f.slice(state[QUANT_KEYS[k]], k).copy_(src.flatten())
                f.slice(state["eigvals"], 2).fill_(eps)
                f.slice(state["root_diag"], 3).fill_(1.0)
            else:
                f.slice(state["stat_fp32"], 0).copy_((eye * eps).flatten())
                f.slice(state["root_fp32"], 1).copy_(eye.flatten())

    @staticmethod
    def _lowbit_bits(group: dict, p: torch.Tensor) -> int | None:
        """Bits of the quantized AdamW moments of (local) tensor ``p``; None for fp32 moments or
        SGD. Decided per local tensor, so FSDP2 shards of one parameter may differ."""
        bits = LOWBIT_ADAMW.get(group["first_order"])
        return bits if bits and p.numel() >= group["lowbit_min_size"] else None

    @staticmethod
    def _param_layout(state: dict, p: torch.Tensor):
        """(block layout, codebook, quant block) fixed at initialisation (None for rank <= 1)."""
        geo = state.get("layout")
        if geo is None:
            return None, None, None
        max_order, bits, min_q, block, *legacy = (int(v) for v in geo.tolist())
        # older checkpoints: no "codebook" entry, a fifth layout entry indexing LEGACY_CODEBOOKS
        name = LEGACY_CODEBOOKS[legacy[0]] if legacy else state["codebook"]
        return param_layout(tuple(p.shape), max_order, bits, min_q, block), name, block

    # ------------------------------------------------------------------ step
    def _update(self, ready: list[Job]) -> None:
        jobs = []
        for job in ready:
            state, pl = job.state, job.local
            t = int(state["step"]) + 1
            state["step"].fill_(t)
            if pl.numel() == 0:
                continue
            layout, cb, block = self._param_layout(state, pl)
            jobs.append(_Job(job.index, job.group, pl, job.grad, state, t, layout, cb, block))
        shampoo_jobs = [j for j in jobs if j.layout is not None]
        if shampoo_jobs:
            plans = [(j, *self.schedule(j.group, j.t)) for j in shampoo_jobs]
            self._update_statistics([j for j, stats, _, _ in plans if stats])
            self._update_roots([j for j, _, roots, _ in plans if roots])
            self._precondition([j for j, _, _, pre in plans if pre])
        for job in jobs:
            self._first_order_update(job)

    def intervals(self, group: dict) -> tuple[int, int, bool]:
        """``(T1, T2, early)``: the group's intervals, automatic ones (0) resolved from
        ``total_steps``; ``early``: T2 is automatic, so roots are also refreshed at every
        statistics update before step T2 (preconditioning starts at step T1, not T2)."""
        total = self.config.total_steps
        t2 = group["root_update_interval"]
        early = t2 == 0
        if early:
            t2 = min(AUTO_T2, max(1, total // AUTO_T2_PER_RUN)) if total else AUTO_T2
        t1 = group["stat_update_interval"] or min(AUTO_T1, max(1, t2 // AUTO_T1_PER_T2))
        return t1, t2, early

    def schedule(self, group: dict, t: int) -> tuple[bool, bool, bool]:
        """Whether step ``t`` updates the statistics, refreshes the roots, preconditions."""
        t1, t2, early = self.intervals(group)
        stats = t % t1 == 0
        roots = t % t2 == 0 or (early and stats and t < t2)
        first_root = min(t1, t2) if early else t2
        return stats, roots, t >= max(group["start_step"], first_root)

    # ------------------------------------------------------------------ failures
    def _record_failures(self, owners: list[_Job], ok: torch.Tensor, what: str,
                         outcome: str = "their previous preconditioner is kept",
                         unit: str = "factor(s)") -> None:
        bad = [j for j, good in zip(owners, ok.tolist()) if not good]
        if not bad:
            return
        for j in bad:
            j.state["precond_failures"] += 1
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(
                f"Shampoo: the {what} failed or produced non-finite values for {len(bad)} "
                f"{unit} (e.g. param {bad[0].index} {tuple(bad[0].param.shape)}); {outcome}. "
                "This warning is shown once; state['precond_failures'] counts every occurrence.",
                RuntimeWarning, stacklevel=4)

    # ------------------------------------------------------------------ T1: statistics
    @staticmethod
    def _blocks_fp32(job: _Job) -> list[torch.Tensor]:
        if not job.blocks:
            g2 = job.grad.reshape(job.layout.matrix_shape)
            job.blocks = [b.float() for b in split_blocks(g2, job.layout)]
        return job.blocks

    def _update_statistics(self, jobs: list[_Job]) -> None:
        if not jobs:
            return
        factor_work = []  # (job, factor, G of the outer product G Gᵀ: the block or its transpose)
        for j in jobs:
            for blk, g in zip(j.layout.blocks, self._blocks_fp32(j)):
                factor_work.append((j, blk.left, g))
                factor_work.append((j, blk.right, g.mT))
        keys = [(f.quantized, f.order, j.group["stat_decay"], j.codebook, j.qblock,
                 j.group["rectify_iters"][0]) for j, f, _ in factor_work]
        for (quantized, n, beta, cb, block, t1), group in group_indices(keys).items():
            device = factor_work[group[0]][0].grad.device
            for idx in sub_batches(group, n, device) if quantized else [group]:
                owners = [factor_work[i][0] for i in idx]
                factors = [factor_work[i][1] for i in idx]
                # the outer products, each written straight into its slot of the stack
                # (symmetric: only the lower block triangle is multiplied)
                outer = torch.empty((len(idx), n, n), dtype=torch.float32, device=device)
                for k, i in enumerate(idx):
                    g = factor_work[i][2]
                    sym_product(g, g.mT, out=outer[k])
                if quantized:
                    self._refresh_eigen(owners, factors, outer, n, beta, cb, block, t1)
                    continue
                stats = [f.slice(j.state["stat_fp32"], 0).view(n, n)
                         for j, f in zip(owners, factors)]
                old = torch.stack(stats)
                new = old + outer if beta == 1.0 else beta * old + (1.0 - beta) * outer
                ok = finite_per_matrix(new)
                self._record_failures(owners, ok, "statistics update")
                for k, s in enumerate(stats):
                    if ok[k]:
                        s.copy_(new[k])

    def _refresh_eigen(self, owners, factors, outer, n, beta, cb, block, t1) -> None:
        """PU: rectify, mix in the outer products, one warm-started QR iteration, re-quantize."""
        pc, nb = packed_cols(n), absmax_blocks(n, block)
        views = [(f.slice(j.state["eigvec_codes"], 0).view(n, pc),
                  f.slice(j.state["eigvec_absmax"], 1).view(n, nb),
                  f.slice(j.state["eigvals"], 2)) for j, f in zip(owners, factors)]
        codes = torch.stack([v[0] for v in views])
        absmax = torch.stack([v[1] for v in views])
        lam = torch.stack([v[2] for v in views])
        u = bjorck(K.codebook_dequantize_rows(codes, absmax, n, cb, block), t1)
        # A = β Uᵀ diag(λ) U + (1-β) G Gᵀ (β = 1: the sum), exactly symmetric, in outer's memory
        weights = (1.0, 1.0) if beta == 1.0 else (beta, 1.0 - beta)
        a = compose(u, lam, add=outer, weight=weights[0], add_weight=weights[1])
        out, ok = robust_batched(qr_subspace_refresh, a, u)
        self._record_failures(owners, ok, "eigenvector (QR) update")
        if out is None or not bool(ok.any()):
            return
        new_lam, new_u = out
        keep = ok.nonzero().flatten()
        new_codes, new_absmax = K.codebook_quantize_rows(
            new_u if len(keep) == len(ok) else new_u[keep], cb, block)
        for k, i in enumerate(keep.tolist()):
            views[i][0].copy_(new_codes[k])
            views[i][1].copy_(new_absmax[k])
            views[i][2].copy_(new_lam[i])

    # ------------------------------------------------------------------ T2: inverse roots
    def _update_roots(self, jobs: list[_Job]) -> None:
        if not jobs:
            return
        work = [(j, f) for j in jobs for f in j.layout.factors]
        keys = [(f.quantized, f.order, j.group["matrix_eps"], j.group["inverse_root"],
                 j.codebook, j.qblock, tuple(j.group["rectify_iters"])) for j, f in work]
        for (quantized, n, eps, mode, cb, block, rect), idx in group_indices(keys).items():
            owners = [work[i][0] for i in idx]
            factors = [work[i][1] for i in idx]
            if quantized:
                for sub in sub_batches(list(range(len(idx))), n, owners[0].grad.device):
                    self._refresh_quantized_root([owners[k] for k in sub],
                                                 [factors[k] for k in sub],
                                                 n, eps, mode, cb, block, rect)
                continue
            stats = torch.stack([f.slice(j.state["stat_fp32"], 0).view(n, n)
                                 for j, f in zip(owners, factors)])
            if mode == "eigen":
                out, ok = robust_batched(lambda a: eigh_inverse_root(a, eps), stats)
            else:
                out, ok = robust_batched(lambda a: schur_newton_inverse_root(a, eps), stats)
            self._record_failures(owners, ok, "inverse-root computation")
            for k, (j, f) in enumerate(zip(owners, factors)):
                if ok[k]:
                    f.slice(j.state["root_fp32"], 1).copy_(out[0][k].flatten())

    def _refresh_quantized_root(self, owners, factors, n, eps, mode, cb, block, rect) -> None:
        """PIRU: rectify the eigenvectors, inverse 4th root, diagonal-split re-quantization."""
        pc, nb = packed_cols(n), absmax_blocks(n, block)
        codes = torch.stack([f.slice(j.state["eigvec_codes"], 0).view(n, pc)
                             for j, f in zip(owners, factors)])
        absmax = torch.stack([f.slice(j.state["eigvec_absmax"], 1).view(n, nb)
                              for j, f in zip(owners, factors)])
        lam = torch.stack([f.slice(j.state["eigvals"], 2) for j, f in zip(owners, factors)])
        u = K.codebook_dequantize_rows(codes, absmax, n, cb, block)
        if mode == "eigen":
            root = eigen_inverse_root(bjorck(u, rect[1]), lam, eps)
            out, ok = (root,), finite_per_matrix(root)
        else:
            a = compose(bjorck(u, rect[0]), lam)
            out, ok = robust_batched(lambda m: schur_newton_inverse_root(m, eps), a)
        self._record_failures(owners, ok, "inverse-root computation")
        if out is None or not bool(ok.any()):
            return
        keep = ok.nonzero().flatten()
        diag, rcodes, rabsmax = K.codebook_quantize_offdiag(
            out[0] if len(keep) == len(ok) else out[0][keep], cb, block)
        for k, i in enumerate(keep.tolist()):
            j, f = owners[i], factors[i]
            f.slice(j.state["root_diag"], 3).copy_(diag[k])
            f.slice(j.state["root_codes"], 4).copy_(rcodes[k].flatten())
            f.slice(j.state["root_absmax"], 5).copy_(rabsmax[k].flatten())

    # ------------------------------------------------------------------ every step
    @staticmethod
    def _root_stack(work):
        """fp32 inverse roots of ``work`` = [(job, factor)] of one order and storage: views of
        the fp32 roots, or quantized roots dequantized in one batch (B, n, n)."""
        j0, f0 = work[0]
        n = f0.order
        if not f0.quantized:
            return [f.slice(j.state["root_fp32"], 1).view(n, n) for j, f in work]
        cb, block = j0.codebook, j0.qblock
        pc, nb = packed_cols(n), absmax_blocks(n, block)
        diag = torch.stack([f.slice(j.state["root_diag"], 3) for j, f in work])
        codes = torch.stack([f.slice(j.state["root_codes"], 4).view(n, pc) for j, f in work])
        absmax = torch.stack([f.slice(j.state["root_absmax"], 5).view(n, nb) for j, f in work])
        return K.codebook_dequantize_offdiag(diag, codes, absmax, cb, block)

    def _precondition(self, jobs: list[_Job]) -> None:
        """``Ĝ = L̂ G R̂`` per block (roots batched by block shape and storage), written into the
        merged direction and grafted to ``‖G‖``. One host sync checks the grafts of all
        parameters."""
        if not jobs:
            return
        entries = [(j, b, g) for j in jobs for b, g in zip(j.layout.blocks, self._blocks_fp32(j))]
        for j in jobs:
            j.direction = torch.empty(j.layout.matrix_shape, dtype=torch.float32,
                                      device=j.grad.device)
        keys = [(g.shape, b.left.quantized, b.right.quantized, j.codebook, j.qblock)
                for j, b, g in entries]
        for group in group_indices(keys).values():
            b0 = entries[group[0]][1]
            quantized = b0.left if b0.left.quantized else b0.right
            for idx in (sub_batches(group, quantized.order, jobs[0].grad.device)
                        if quantized.quantized else [group]):
                left = self._root_stack([(entries[i][0], entries[i][1].left) for i in idx])
                right = self._root_stack([(entries[i][0], entries[i][1].right) for i in idx])
                for k, i in enumerate(idx):
                    j, b, g = entries[i]
                    torch.mm(torch.mm(left[k], g), right[k],
                             out=j.direction[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]])
        norms = torch.stack([torch.stack((torch.linalg.vector_norm(j.grad.float()),
                                          torch.linalg.vector_norm(j.direction))) for j in jobs])
        scales = norms[:, 0] / (norms[:, 1] + GRAFT_GUARD)
        fine = (torch.isfinite(norms).all(dim=1) & torch.isfinite(scales)).tolist()
        if not all(fine):
            scales = self._wide_graft(jobs, fine, scales)
        for k, j in enumerate(jobs):
            if j.direction is None:
                continue
            j.direction.mul_(scales[k])
            j.direction = j.direction.view(j.param.shape)

    def _wide_graft(self, jobs: list[_Job], fine: list[bool], scales: torch.Tensor
                    ) -> torch.Tensor:
        """Graft scales where the fp32 norms overflowed: a finite gradient's sum of squares does
        from ``‖G‖ ≈ 1.8e19`` on. Redone in float64 (only then, so ordinary steps keep their
        bits); a parameter whose grafted direction still is not finite (overflow inside
        ``L̂ G R̂``) takes its raw gradient this step, so no inf/NaN reaches parameters or state."""
        redo = [k for k, good in enumerate(fine) if not good]
        wide = torch.stack([torch.stack((
            torch.linalg.vector_norm(jobs[k].grad, dtype=torch.float64),
            torch.linalg.vector_norm(jobs[k].direction, dtype=torch.float64))) for k in redo])
        wide_scales = (wide[:, 0] / (wide[:, 1] + GRAFT_GUARD)).float()
        # fp32-finite ‖G‖ bounds every entry of the grafted direction
        ok = (torch.isfinite(wide[:, 1]) & torch.isfinite(wide[:, 0].float())
              & torch.isfinite(wide_scales)).cpu()
        owners = [jobs[k] for k in redo]
        self._record_failures(owners, ok, "preconditioned gradient (L̂ G R̂ or its norm)",
                              "their raw gradient is used for this step", "parameter(s)")
        scales = scales.clone()
        scales[torch.tensor(redo, device=scales.device)] = wide_scales
        for j, good in zip(owners, ok.tolist()):
            if not good:
                j.direction = None
        return scales

    # ------------------------------------------------------------------ first-order step
    def _first_order_update(self, job: _Job) -> None:
        group, state, p = job.group, job.state, job.param
        lr = as_float(group["lr"])
        wd = as_float(group["weight_decay"])
        d = job.direction if job.direction is not None else job.grad
        bits = self._lowbit_bits(group, p)
        if bits:
            beta1, beta2 = group["betas"]
            K.lowbit_adam_update(p, d, state["exp_avg_codes"], state["exp_avg_absmax"],
                                 state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], bits,
                                 job.t, beta1, beta2, group["eps"], lr, wd)
            return
        exact = p.dtype == torch.float32
        work = p if exact else p.float()
        d = d if d.dtype == work.dtype else d.to(work.dtype)
        if group["first_order"].startswith("adamw"):
            beta1, beta2 = group["betas"]
            m, v = state["exp_avg"], state["exp_avg_sq"]
            if not exact:
                m, v = m.float(), v.float()
            if wd != 0:
                work.mul_(1 - lr * wd)
            m.lerp_(d, 1 - beta1)
            v.mul_(beta2).addcmul_(d, d, value=1 - beta2)
            t = job.t
            step_size = lr / (1 - beta1 ** t)
            bc2_sqrt = (1 - beta2 ** t) ** 0.5
            denom = (v.sqrt() / bc2_sqrt).add_(group["eps"])
            work.addcdiv_(m, denom, value=-step_size)
            if not exact:
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
        else:
            if wd != 0:
                d = d.add(work, alpha=wd)
            mu = group["momentum"]
            if mu != 0:
                buf = state["momentum_buffer"]
                buf32 = buf if exact else buf.float()
                buf32.mul_(mu).add_(d)
                if not exact:
                    buf.copy_(buf32)
                d = d.add(buf32, alpha=mu) if group["nesterov"] else buf32
            work.add_(d, alpha=-lr)
        if not exact:
            p.copy_(work)


class Shampoo32bit(Shampoo):
    """The paper's 32-bit Shampoo baseline: :class:`Shampoo` with ``precond_bits=32``."""

    Config = Shampoo32bitConfig
