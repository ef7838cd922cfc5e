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
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import efcp_window as W
from .kernels.layout import MAX_INT16_BLOCK
from .optimizer_base import CompressedOptimizer, as_float, local_tensor
from .sharded_state import is_sharded
from .validation import check_choice, check_float, check_int, check_lr

WD_MODES = ("decoupled_lr_scaled", "decoupled_unscaled", "l2")
COMPRESSORS = ("topk", "lowrank")
#: the largest window: the m x m algebra is O(m^3) per step, and the Triton SP kernel puts the
#: window rows on the second grid axis (at most 65535)
MAX_WINDOW = 8192
DEFAULT_TOPK_BLOCK = 16384


def common_defaults(*, lr, window_size, density, weight_decay, momentum, compressor, rank,
                    ef_bits, value_dtype, wd_mode, topk_block_size, quant_block_size,
                    m=None, k_init=None) -> dict:
    """Validated hyperparameters both optimizers share (ValueErrors name the argument).

    ``m`` and ``k_init`` are the reference implementation's names of ``window_size`` and
    ``density``; given, they win.
    """
    if m is not None:
        window_size = m
    if k_init is not None:
        density = k_init
    check_lr(lr)
    if isinstance(ef_bits, bool) or ef_bits not in W.EF_BITS:
        raise ValueError(f"ef_bits must be one of {list(W.EF_BITS)} (32: fp32 error buffer, 16: "
                         f"bf16, 4: the 4-bit block quantizer), got {ef_bits!r}")
    quant_block_size = check_int("quant_block_size", quant_block_size, 2, 1 << 20)
    if quant_block_size % 2:
        raise ValueError("quant_block_size must be an even integer in [2, 1048576] (two 4-bit "
                         f"codes share a byte), got {quant_block_size}")
    return dict(
        lr=lr,
        window_size=check_int("window_size", window_size, 1, MAX_WINDOW),
        density=check_float("density", density, 0.0, 1.0, lo_open=True),
        weight_decay=check_float("weight_decay", weight_decay, 0.0),
        momentum=check_float("momentum", momentum, 0.0, 1.0, hi_open=True),
        compressor=check_choice("compressor", compressor, COMPRESSORS),
        rank=check_int("rank", rank, 1, 1024),
        ef_bits=int(ef_bits),
        value_dtype=check_choice("value_dtype", value_dtype, tuple(W.VALUE_DTYPES)),
        wd_mode=check_choice("wd_mode", wd_mode, WD_MODES),
        topk_block_size=check_int("topk_block_size", topk_block_size, 1, MAX_INT16_BLOCK),
        quant_block_size=quant_block_size,
    )


class EFCPOptimizer(CompressedOptimizer):
    """Base class; subclasses implement :meth:`_coefficients` (the m x m part of the
    preconditioner)."""

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

    def __init__(self, params, defaults: dict, seed: int = 0, nonfinite: str = "skip"):
        self.seed = check_int("seed", seed, 0, (1 << 62) - 1)
        super().__init__(params, defaults, nonfinite=nonfinite)

    # ------------------------------------------------------------------ hooks
    def _reduce_group(self):
        """The process group whose ranks hold the other parts of the parameters, or None.

        ZeRO-1 (``shard_state``): the partition group set by ``ZeroShardedOptimizer``. FSDP2:
        the mesh dimension that shards the parameters (the default group for several).
        """
        group = getattr(self, "_partition_group", None)
        if group is not None:
            return group
        for g in self.param_groups:
            for p in g["params"]:
                if is_sharded(p):
                    dims = [i for i, pl in enumerate(p.placements) if pl.is_shard()]
                    return p.device_mesh.get_group(dims[0]) if len(dims) == 1 else \
                        dist.group.WORLD
        return None

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over the ranks holding other parts of the parameters.

        The global inner products (the new Gram row, ``G x``: O(m) numbers, never O(d)) are sums
        over parameters; with sharded parameters (FSDP2) or partitioned state (ZeRO-1) each rank
        sums its part and this all-reduce completes them, so every rank solves the same m x m
        problem as one process would.
        """
        group = self._reduce_group()
        if group is not None:
            dist.all_reduce(tensor, group=group)
        return tensor

    def _all_finite(self, flags: list[bool]) -> bool:
        """All gradients finite on every rank (a skipped step must be skipped everywhere)."""
        ok = all(flags)
        if getattr(self, "_partition_group", None) is not None:
            t = torch.tensor([int(ok)], dtype=torch.int32, device=self._device())
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self._partition_group)
            ok = bool(t.item())
        return ok

    def _device(self) -> torch.device:
        anchor = self._anchor()
        return local_tensor(anchor).device if anchor is not None else torch.device("cpu")

    def _init_state(self, state: dict, p: torch.Tensor, group: dict, seed: int = 0) -> None:
        W.init_param_state(state, p, group, group["window_size"], seed)

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
    @torch.no_grad()
    def step(self, closure=None):
        loss = self._run_closure(closure)
        anchor = self._anchor()
        if anchor is None:
            return loss
        self._check_global_hparams()
        work = self._grad_work()  # (index, group, param, local grad)
        with_grad = {id(p) for _, _, p, _ in work}
        # params with state but no gradient this step (they write a zero slice)
        idle = [p for g in self.param_groups for p in g["params"]
                if id(p) not in with_grad and self.state.get(p) and "step" in self.state[p]]
        if not work and self._reduce_group() is None:
            return loss
        for _, group, p, _ in work:
            if group["compressor"] == "lowrank" and is_sharded(p):
                raise NotImplementedError(
                    f"{type(self).__name__}(compressor='lowrank') does not support sharded "
                    "DTensor (FSDP2) parameters: a low-rank factor of each rank's rows is not "
                    "the low-rank factor of the matrix. Use compressor='topk' under FSDP2.")
        astate = self.state[anchor]
        window_size = self.param_groups[0]["window_size"]
        if not W.has_global_state(astate):
            W.init_global_state(astate, window_size, local_tensor(anchor).device)
        flags = self._finite_flags([w[3] for w in work], [w[2] for w in work])
        if not self._all_finite(flags):
            astate["nonfinite_skips"] += 1
            bad = [f"param {i} {tuple(p.shape)}" for (i, _, p, _), ok in zip(work, flags)
                   if not ok] or ["on another rank"]
            self._on_nonfinite([f"all {len(work)} (global preconditioner; non-finite: "
                                f"{', '.join(bad[:4])})"])
            return loss
        for index, group, p, _ in work:
            state = self.state[p]
            if "step" not in state:
                self._create_state(state, p, group, seed=self.seed * 1_000_003 + index)
        count = int(astate["window_count"])
        if count == 0 and self._is_template_step((g, grad) for _, g, _, grad in work):
            return loss
        views = {id(p): self._local_state(p, self.state[p])
                 for p in [w[2] for w in work] + idle}  # FSDP2: this rank's part of packed state
        self._update(work, idle, astate, count, views)
        return loss

    def _update(self, work, idle, astate, count: int, views: dict) -> None:
        gram = astate["gram"]
        m = gram.shape[0]
        slot = count % m
        nrows = min(count + 1, m)
        dev = gram.device
        # 1. error feedback + compression into the slot (the dense copies are dropped at once:
        # keeping them for the whole step would cost 4 bytes per parameter element)
        dots = torch.zeros(nrows, dtype=torch.float64, device=dev)
        for index, group, p, grad in work:
            state = views[id(p)]
            c = W.compress_into_slot(state, grad, slot)
            dots += W.slot_dots(state, slot, c, nrows).to(dev)
            del c
        for p in idle:
            W.clear_slot(views[id(p)], slot)
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
        for index, group, p, grad in work:
            state = views[id(p)]
            state["step"] += 1
            pl = local_tensor(p)
            if pl.numel() == 0:
                continue
            u = torch.zeros(pl.numel(), dtype=torch.float32, device=pl.device)
            W.combine(state, coeffs, nrows, u)
            lr = as_float(group["lr"])
            wd = as_float(group["weight_decay"])
            mode = group["wd_mode"]
            if mode == "l2" and wd != 0.0:
                u.add_(pl.reshape(-1).float(), alpha=s * wd)
            if "momentum_buffer" in state:
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(u)
                u = buf
            decay = 1.0
            if wd != 0.0 and mode == "decoupled_lr_scaled":
                decay = 1.0 - lr * wd
            elif wd != 0.0 and mode == "decoupled_unscaled":
                decay = 1.0 - wd
            self._apply(pl, u, lr, decay)
        astate["window_count"] += 1

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
