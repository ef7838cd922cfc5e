"""The step shared by the EFCP optimizers: error-fed compression into one global window, then a
window preconditioner applied to the compressed accumulator.

Per step (EFCP spec section 2), with ``c`` the new compressed row (of the whole model):

1. every parameter with a gradient: ``a = e + g``, ``c_p = C(a)``, ``e = a - c_p``, ``c_p``
   written into ring slot ``count % m`` (parameters without a gradient write a zero slice);
2. the new row's inner products with every stored row (the SP pass, summed over parameters and
   passed through :meth:`EFCPOptimizer._all_reduce`) replace row/column ``slot`` of ``G G^T``;
3. the subclass solves the m x m problem for the coefficients ``z`` of ``P^-1 c = G^T z``
   directly (``c`` is the slot's own row, so no ``s c - ...`` difference that would cancel), and
   for the ``l2`` mode also ``(s, z')`` with ``P^-1 y = s y + G^T z'`` for ``y = wd p``;
4. every parameter: ``u_p = sum_i z_i row_i,p`` (one LCG pass, ``+ s wd p`` for ``l2``),
   optional momentum ``v = mu v + u`` (no dampening), weight decay, ``p <- p - lr u``.

If *any* gradient is non-finite the whole step is skipped (the preconditioner is global):
nothing enters the window or an error buffer.

With ``gradient_release=True`` stage 1 runs per parameter inside backward (its gradient is then
freed) and its inner products are kept per parameter; ``step()`` sums them in parameter order and
runs stages 2-4, so the result is bitwise the ordinary step's. The one difference: a non-finite
gradient is seen only when it arrives, so the parameters compressed before it in that backward
keep the step's gradient in their error buffers although the step is skipped (the warning says
so); their weights and the window count are untouched.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..core.optimizer import CompressedOptimizer, Job, as_float, local_tensor
from ..engines.fsdp2 import is_sharded
from . import window as W
from .config import ADAM_UPDATE_RMS, EFCPConfig


class EFCPOptimizer(CompressedOptimizer):
    """Base class; subclasses implement :meth:`_coefficients` (the m x m part of the
    preconditioner)."""

    Config = EFCPConfig
    GLOBAL_STEP = True
    STATE_CATEGORIES = {
        "window_indices": "window", "window_values": "window",
        "window_left": "window", "window_right": "window", "lowrank_q": "window",
        "ef": "error_feedback", "ef_codes": "error_feedback", "ef_min": "error_feedback",
        "ef_max": "error_feedback",
        "gram": "preconditioner",
        "momentum_buffer": "first_order",
        "step": "counters", "window_count": "counters", "nonfinite_skips": "counters",
    }
    #: hyperparameters of the one global preconditioner: equal in every group
    GLOBAL_HPARAMS: tuple[str, ...] = ("window_size",)
    #: gradient release: index -> (group, param, its inner products, zero gradient at lr 0)
    _released_rows: dict | None = None
    #: gradient release: parameters with a non-finite gradient in this backward
    _released_nonfinite: list | None = None

    def _init_state(self, state: dict, p: torch.Tensor, group: dict, index: int = 0) -> None:
        W.init_param_state(state, p, group, group["window_size"],
                           self.config.seed * 1_000_003 + index)

    def _coefficients(self, gram: torch.Tensor, slot: int, gy: torch.Tensor,
                      count: int) -> tuple[float, torch.Tensor]:
        """``(s, z)`` over the filled rows (``gram`` = G G^T, fp64) such that
        ``P^-1 (c + y) = G^T z + s y``, where ``c`` = row ``slot`` and ``gy`` = ``G y`` (zero
        outside the ``l2`` weight-decay mode, where ``y = wd p``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    def _anchor(self):
        """The parameter whose state holds the global tensors (spec section 13.5)."""
        for group in self.param_groups:
            if group["params"]:
                return group["params"][0]
        return None

    def _check_global_hparams(self) -> None:
        first = self.param_groups[0]
        for group in self.param_groups[1:]:
            for key in self.GLOBAL_HPARAMS:
                if group[key] != first[key]:
                    raise ValueError(
                        f"{key} must be the same in every parameter group ({type(self).__name__} "
                        f"has one global preconditioner), got {first[key]!r} and {group[key]!r}")

    # ------------------------------------------------------------------ step
    def _accept_step(self, work: list, flags: list[bool]) -> bool:
        """Whether the step runs: all gradients finite on every rank (the preconditioner is
        global, so a skipped step is skipped everywhere and nothing enters the window)."""
        anchor = self._anchor()
        if anchor is None:
            return False
        self._check_global_hparams()
        group = self.engine.reduce_group
        if not work and group is None:
            return False
        for _, g, p, _ in work:
            if g["compressor"] == "lowrank" and is_sharded(p):
                raise NotImplementedError(
                    f"{type(self).__name__}(compressor='lowrank') does not support sharded "
                    "DTensor (FSDP2) parameters: a low-rank factor of each rank's rows is not "
                    "the low-rank factor of the matrix. Use compressor='topk' under FSDP2.")
        astate = self.state[anchor]
        if not W.has_global_state(astate):
            W.init_global_state(astate, self.param_groups[0]["window_size"],
                                local_tensor(anchor).device)
        ok = all(flags)
        if group is not None:
            t = torch.tensor([int(ok)], dtype=torch.int32, device=local_tensor(anchor).device)
            ok = bool(self._all_reduce(t, dist.ReduceOp.MIN).item())
        if not ok:
            astate["nonfinite_skips"] += 1
            bad = [f"param {i} {tuple(p.shape)}" for (i, _, p, _), good in zip(work, flags)
                   if not good] or ["on another rank"]
            self._on_nonfinite([f"all {len(work)} (global preconditioner; non-finite: "
                                f"{', '.join(bad[:4])})"])
        return ok

    def _update(self, jobs: list[Job]) -> None:
        astate = self.state[self._anchor()]
        count = int(astate["window_count"])
        if count == 0 and self._is_template_step((j.group, j.grad) for j in jobs):
            return
        with_grad = {id(j.param) for j in jobs}
        # params with state but no gradient this step (they write a zero slice)
        idle = [p for g in self.param_groups for p in g["params"]
                if id(p) not in with_grad and self.state.get(p) and "step" in self.state[p]]
        views = {id(j.param): j.state for j in jobs}  # FSDP2: this rank's part of packed state
        views.update({id(p): self._local_state(p, self.state[p]) for p in idle})
        work = [(j.index, j.group, j.param, j.grad) for j in jobs]
        self._update_window(work, idle, astate, count, views)

    def _update_window(self, work, idle, astate, count: int, views: dict) -> None:
        gram = astate["gram"]
        slot = count % gram.shape[0]
        nrows = min(count + 1, gram.shape[0])
        # 1. error feedback + compression into the slot (the dense copies are dropped at once:
        # keeping them for the whole step would cost 4 bytes per parameter element)
        dots = torch.zeros(nrows, dtype=torch.float64, device=gram.device)
        for index, group, p, grad in work:
            dots += self._compress(views[id(p)], grad, slot, nrows, gram.device)
        for p in idle:
            W.clear_slot(views[id(p)], slot)
        self._finish_window(work, astate, count, views, dots)

    @staticmethod
    def _compress(state: dict, grad: torch.Tensor, slot: int, nrows: int, dev) -> torch.Tensor:
        """Stage 1 for one parameter: its slice of the new row; returns its inner products."""
        c = W.compress_into_slot(state, grad, slot)
        return W.slot_dots(state, slot, c, nrows, grad.numel()).to(dev)

    def _finish_window(self, work, astate, count: int, views: dict, dots: torch.Tensor) -> None:
        """Stages 2-4 once every parameter's slice of the new row is in the window."""
        gram = astate["gram"]
        slot = count % gram.shape[0]
        nrows = min(count + 1, gram.shape[0])
        dev = gram.device
        # 2. G (wd theta) for the l2 mode
        l2 = torch.zeros(nrows, dtype=torch.float64, device=dev)
        for (index, group, p, grad) in work:
            wd = as_float(group["weight_decay"])
            if group["wd_mode"] == "l2" and wd != 0.0:
                l2 += wd * W.dense_dots(views[id(p)], local_tensor(p).float(), nrows).to(dev)
        both = self._all_reduce(torch.stack((dots, l2)))
        dots, l2 = both[0], both[1]
        W.update_gram_(gram, slot, dots)
        # 3. the m x m problem
        s, coeffs = self._coefficients(gram[:nrows, :nrows], slot, l2, count)
        # 4. per-parameter update
        scales = self._adam_scales(work, views, coeffs, nrows, s)
        for index, group, p, grad in work:
            state = views[id(p)]
            state["step"] += 1
            pl = local_tensor(p)
            if pl.numel() == 0:
                continue
            u = self._direction(state, group, pl, coeffs, nrows, s, update_momentum=True)
            lr = as_float(group["lr"])
            wd = as_float(group["weight_decay"])
            mode = group["wd_mode"]
            if group["lr_mode"] == "adam":
                scale = scales[index] if scales is not None else self._rms_scale(u)
                # u is fresh unless it is the momentum buffer, which must not be rescaled
                u = u * scale if "momentum_buffer" in state else u.mul_(scale)
            decay = 1.0
            if wd != 0.0 and mode == "decoupled_lr_scaled":
                decay = 1.0 - lr * wd
            elif wd != 0.0 and mode == "decoupled_unscaled":
                decay = 1.0 - wd
            self._apply(pl, u, lr, decay)
        astate["window_count"] += 1

    # ------------------------------------------------------------------ gradient release
    def _release_one(self, index: int, group: dict, p: torch.Tensor, grad: torch.Tensor) -> None:
        """Stage 1 of one parameter inside backward; ``step()`` runs the rest."""
        rows = self._released_rows = self._released_rows or {}
        bad = self._released_nonfinite = self._released_nonfinite or []
        if bad:  # the step is lost already: only free the gradient
            return
        if not self._finite_flags([grad])[0]:
            bad.append(f"param {index} {tuple(p.shape)}")
            return
        self._check_global_hparams()
        astate = self.state[self._anchor()]
        if not W.has_global_state(astate):
            W.init_global_state(astate, self.param_groups[0]["window_size"],
                                local_tensor(p).device)
        state = self.state[p]
        if "step" not in state:
            self._create_state(state, p, group, index)
        if self.config.per_param_max_grad_norm > 0:
            self._clip_(p, grad, self.config.per_param_max_grad_norm)
        gram, count = astate["gram"], int(astate["window_count"])
        zero = as_float(group["lr"]) == 0.0 and not bool(grad.any())
        dots = self._compress(self._local_state(p, state), grad, count % gram.shape[0],
                              min(count + 1, gram.shape[0]), gram.device)
        rows[index] = (group, p, dots, zero)

    def _step_work(self, work: list) -> list[str]:
        if not self._released_rows and not self._released_nonfinite:
            return super()._step_work(work)
        for index, group, p, grad in work:  # gradients that did not arrive through backward
            self._release_one(index, group, p, grad)
        rows, bad = self._released_rows, self._released_nonfinite
        self._released_rows, self._released_nonfinite = None, None
        anchor = self._anchor()
        astate = self.state[anchor]
        if not W.has_global_state(astate):
            W.init_global_state(astate, self.param_groups[0]["window_size"],
                                local_tensor(anchor).device)
        if bad:
            astate["nonfinite_skips"] += 1
            self._on_nonfinite([
                f"all (global preconditioner; non-finite: {', '.join(bad[:4])}); with "
                f"gradient_release the error buffers of the {len(rows)} parameter(s) compressed "
                "earlier in this backward already hold this step's gradient"])
            return []
        count = int(astate["window_count"])
        if count == 0 and all(zero for _, _, _, zero in rows.values()):
            return []  # torch.distributed.checkpoint's state-materialising step
        order = sorted(rows)
        work = [(i, rows[i][0], rows[i][1], None) for i in order]
        with_grad = {id(p) for _, _, p, _ in work}
        idle = [p for g in self.param_groups for p in g["params"]
                if id(p) not in with_grad and self.state.get(p) and "step" in self.state[p]]
        views = {id(p): self._local_state(p, self.state[p]) for _, _, p, _ in work}
        views.update({id(p): self._local_state(p, self.state[p]) for p in idle})
        gram = astate["gram"]
        dots = torch.zeros(min(count + 1, gram.shape[0]), dtype=torch.float64,
                           device=gram.device)
        for i in order:  # the ordinary step's summation order: bitwise the same row
            dots += rows[i][2]
        for p in idle:
            W.clear_slot(views[id(p)], count % gram.shape[0])
        self._finish_window(work, astate, count, views, dots)
        return []

    @staticmethod
    def _direction(state: dict, group: dict, pl: torch.Tensor, coeffs: torch.Tensor, nrows: int,
                   s: float, update_momentum: bool) -> torch.Tensor:
        """The preconditioned direction ``u`` of one parameter (l2 term and momentum included);
        ``update_momentum=False`` leaves the momentum buffer as it is."""
        u = torch.empty(pl.numel(), dtype=torch.float32, device=pl.device)
        W.combine(state, coeffs, nrows, u, zero_first=True)
        wd = as_float(group["weight_decay"])
        if group["wd_mode"] == "l2" and wd != 0.0:
            u.add_(pl.reshape(-1).float(), alpha=s * wd)
        if "momentum_buffer" in state:
            buf = state["momentum_buffer"]
            if not update_momentum:
                return buf.mul(group["momentum"]).add_(u)
            buf.mul_(group["momentum"]).add_(u)
            u = buf
        return u

    @staticmethod
    def _rms_scale(u: torch.Tensor) -> torch.Tensor:
        """``ADAM_UPDATE_RMS / RMS(u)`` as a 0-d tensor (no host sync); 1 for a zero ``u``."""
        rms = torch.linalg.vector_norm(u) / u.numel() ** 0.5
        return torch.where(rms > 0, ADAM_UPDATE_RMS / rms, torch.ones_like(rms))

    def _adam_scales(self, work, views, coeffs, nrows: int, s: float):
        """FSDP2 (sharded parameters): each parameter's RMS over all its shards, in one
        all-reduce of one number per parameter (a first pass over the window; nothing kept).
        Otherwise None: the one pass rescales each parameter by its own RMS."""
        if not self.engine.sharded_params or not any(g["lr_mode"] == "adam" for _, g, _, _ in work):
            return None
        total = sum(len(g["params"]) for g in self.param_groups)
        dev = self.state[self._anchor()]["gram"].device
        sumsq = torch.zeros(total, dtype=torch.float64, device=dev)
        for index, group, p, grad in work:
            pl = local_tensor(p)
            if group["lr_mode"] == "adam" and pl.numel():
                u = self._direction(views[id(p)], group, pl, coeffs, nrows, s,
                                    update_momentum=False)
                sumsq[index] = u.double().square().sum().to(dev)
                del u
        sumsq = self._all_reduce(sumsq)
        numel = torch.tensor([p.numel() for g in self.param_groups for p in g["params"]],
                             dtype=torch.float64, device=dev)
        rms = torch.sqrt(sumsq / numel)
        return torch.where(rms > 0, ADAM_UPDATE_RMS / rms, torch.ones_like(rms)).float().tolist()

    @staticmethod
    def _apply(param: torch.Tensor, update: torch.Tensor, lr: float, decay: float) -> None:
        """``param <- param * decay - lr * update`` in fp32, one rounding to the param dtype."""
        upd = update.view(param.shape)
        if param.dtype == torch.float32:
            if decay != 1.0:
                param.mul_(decay)
            param.sub_(upd, alpha=lr)
            return
        new = param.float()
        if decay != 1.0:
            new.mul_(decay)
        new.sub_(upd, alpha=lr)
        param.copy_(new)
