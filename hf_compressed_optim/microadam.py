"""MicroAdam: Adam whose moments are rebuilt every step from a window of top-k compressed gradients.

Per parameter and step (Modoranu et al., NeurIPS 2024, practical algorithm):

1. ``a = g + Q^-1(e)``: add the dequantized 4-bit error-feedback buffer to the gradient;
2. keep the top-k entries of ``|a|`` per block (k = ceil(density * block length)) and write their
   (int16 block-relative index, bf16 value) pairs into ring row ``(t - 1) mod window_size``;
3. quantize the residual (``a`` with the selected entries zeroed) back into the 4-bit buffer;
4. rebuild ``m = c1 sum beta1^age V`` and ``v = c2 sum beta2^age V^2`` from the window, with bias
   correction by the step count t, and apply ``p <- p (1 - lr wd) - lr m / (sqrt(v) + eps)``.

With ``alpha > 0`` (the reference's "densify" variant) the step also applies
``alpha Q^-1(e)`` (the error buffer just written) and keeps ``(1 - alpha) Q^-1(e)`` in the buffer.

State per parameter of d elements: about ``0.5 + 4/quant_block_size + 4 window_size density``
bytes per element (0.96 at the defaults).
"""

from __future__ import annotations

import torch

from .kernels import dispatch as K
from .kernels.layout import MAX_INT16_BLOCK, TopKLayout
from .optimizer_base import CompressedOptimizer, as_float, local_tensor
from .validation import check_betas, check_float, check_int, check_lr

DEFAULT_TOPK_BLOCK = 16384


def _sr_seed(base: int, index: int, step: int) -> int:
    """Seed for stochastic rounding: same on every data-parallel rank, new per param and step."""
    return ((base * 0x9E3779B1 + index) * 0x85EBCA77 + step) % (1 << 62)


class MicroAdam(CompressedOptimizer):
    """Memory-compressed Adam (about 1 byte of state per parameter instead of 8).

    Args:
        params: parameters or parameter groups (per-group ``lr`` and ``weight_decay`` honoured).
        lr: learning rate (float or one-element tensor), >= 0.
        betas: Adam's (beta1, beta2), each in [0, 1).
        eps: added outside the square root, > 0.
        weight_decay: decoupled (AdamW-style, lr-scaled) weight decay applied before the update.
        window_size: number of compressed gradients kept (``m`` in the paper).
        density: fraction of entries kept per top-k block (``k_init`` in the reference).
        quant_block_size: elements per min/max bucket of the 4-bit error buffer (even).
        topk_block_size: elements per top-k block; fixed, so results do not depend on the GPU;
            at most 32768 so that block-relative indices fit int16.
        alpha: in [0, 1); the reference's "densify" variant: each step also applies
            ``alpha * Q^-1(e)`` (the fresh error buffer, unnormalised, times lr) and keeps
            ``(1 - alpha) * Q^-1(e)`` in the buffer. 0 (default) is plain MicroAdam.
        stochastic_rounding: round bf16 parameter updates stochastically (deterministic seeds,
            identical on every data-parallel rank).
        seed: base seed of the stochastic rounding.
        nonfinite: ``"skip"`` (default) skips the update of a parameter whose gradient has inf/NaN
            and counts it; ``"raise"`` raises ``FloatingPointError``. State is never touched.
        m, k_init: aliases of ``window_size`` and ``density`` (names of the reference package).
    """

    STATE_CATEGORIES = {
        "window_indices": "window", "window_values": "window",
        "ef_codes": "error_feedback", "ef_min": "error_feedback", "ef_max": "error_feedback",
        "step": "counters", "nonfinite_skips": "counters",
    }

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 window_size=10, density=0.01, quant_block_size=64,
                 topk_block_size=DEFAULT_TOPK_BLOCK, stochastic_rounding=False, seed=0,
                 nonfinite="skip", *, alpha=0.0, m=None, k_init=None):
        if m is not None:
            window_size = m
        if k_init is not None:
            density = k_init
        check_lr(lr)
        betas = check_betas(betas)
        eps = check_float("eps", eps, 0.0, lo_open=True)
        weight_decay = check_float("weight_decay", weight_decay, 0.0)
        window_size = check_int("window_size", window_size, 1, 4096)
        density = check_float("density", density, 0.0, 1.0, lo_open=True)
        quant_block_size = check_int("quant_block_size", quant_block_size, 2, 1 << 20)
        if quant_block_size % 2:
            raise ValueError("quant_block_size must be an even integer in [2, 1048576] (two 4-bit "
                             f"codes share a byte), got {quant_block_size}")
        topk_block_size = check_int("topk_block_size", topk_block_size, 1, MAX_INT16_BLOCK)
        alpha = check_float("alpha", alpha, 0.0, 1.0, hi_open=True)
        if not isinstance(stochastic_rounding, bool):
            raise ValueError(f"stochastic_rounding must be True or False, got "
                             f"{stochastic_rounding!r}")
        seed = check_int("seed", seed, 0, (1 << 62) - 1)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        window_size=window_size, density=density,
                        quant_block_size=quant_block_size, topk_block_size=topk_block_size,
                        alpha=alpha, stochastic_rounding=stochastic_rounding)
        self.seed = seed
        super().__init__(params, defaults, nonfinite=nonfinite)

    # ------------------------------------------------------------------ state
    @staticmethod
    def _init_geometry(state: dict, group: dict) -> None:
        """Hyperparameters that fix the state's shapes, frozen at initialisation so later
        changes of the group cannot desynchronise them. The same on every rank (FSDP2 shards
        differ in size, so per-shard sizes are derived, not stored)."""
        state["window_size"] = group["window_size"]
        state["density"] = group["density"]
        state["topk_block"] = group["topk_block_size"]
        state["quant_block"] = group["quant_block_size"]

    @staticmethod
    def layout_of(state: dict, numel: int) -> TopKLayout:
        return TopKLayout.create(numel, state["topk_block"], state["density"])

    @classmethod
    def state_shapes(cls, state: dict, numel: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the per-element state of a (local) tensor of ``numel`` elements."""
        k = cls.layout_of(state, numel).k
        buckets = -(-numel // state["quant_block"])
        window = (state["window_size"], k)
        return {"window_indices": window, "window_values": window,
                "ef_codes": ((numel + 1) // 2,), "ef_min": (buckets,), "ef_max": (buckets,)}

    _STATE_DTYPES = {"window_indices": torch.int16, "window_values": torch.bfloat16,
                     "ef_codes": torch.uint8, "ef_min": torch.bfloat16, "ef_max": torch.bfloat16}

    @classmethod
    def _init_state(cls, state: dict, p: torch.Tensor, group: dict) -> None:
        """Create the state of the (local) tensor ``p``."""
        cls._init_geometry(state, group)
        state["step"] = torch.zeros((), dtype=torch.int64)
        state["nonfinite_skips"] = torch.zeros((), dtype=torch.int64)
        for key, shape in cls.state_shapes(state, p.numel()).items():
            state[key] = torch.zeros(shape, dtype=cls._STATE_DTYPES[key], device=p.device)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = self._run_closure(closure)
        work = self._grad_work()
        flags = self._finite_flags([w[3] for w in work], [w[2] for w in work])
        skipped = []
        for (index, group, p, grad), finite in zip(work, flags):
            state = self.state[p]
            fresh = not state
            if fresh:
                self._create_state(state, p, group)
            if not finite:
                state["nonfinite_skips"] += 1
                skipped.append(f"param {index} {tuple(p.shape)}")
                continue
            self._update(index, group, p, grad, state, fresh)
        if skipped:
            self._on_nonfinite(skipped)
        return loss

    def _update(self, index, group, p, grad, state, fresh) -> None:
        pl = local_tensor(p)
        if fresh and self._is_template_step([(group, grad)]):
            return
        lr = as_float(group["lr"])
        t = int(state["step"]) + 1
        state["step"].fill_(t)
        n = pl.numel()
        if n == 0:
            return
        layout = self.layout_of(state, n)
        st = self._local_state(p, state)
        slot = (t - 1) % state["window_size"]
        K.error_feedback_compress(grad, st["ef_codes"], st["ef_min"], st["ef_max"],
                                  state["quant_block"], layout, st["window_indices"][slot],
                                  st["window_values"][slot])
        alpha = group.get("alpha", 0.0)
        dense = error = None
        if alpha > 0.0:
            error = K.dequantize4(st["ef_codes"], st["ef_min"], st["ef_max"], n,
                                  state["quant_block"])
            dense = error * alpha
        beta1, beta2 = group["betas"]
        sr_seed = (_sr_seed(self.seed, index, t)
                   if group["stochastic_rounding"] and pl.dtype == torch.bfloat16 else None)
        K.window_adam_update(pl, st["window_indices"], st["window_values"], layout, t,
                             beta1, beta2, group["eps"], lr, as_float(group["weight_decay"]),
                             sr_seed, dense)
        if error is not None:
            K.quantize4(error.mul_(1.0 - alpha), state["quant_block"], st["ef_codes"],
                        st["ef_min"], st["ef_max"])
