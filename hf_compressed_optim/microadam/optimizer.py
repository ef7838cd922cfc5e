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

from ..kernels import dispatch as K
from ..core.optimizer import CompressedOptimizer, Job, as_float
from ..kernels.layout import TopKLayout
from .config import MicroAdamConfig


def _sr_seed(base: int, index: int, step: int) -> int:
    """Seed for stochastic rounding: same on every data-parallel rank, new per param and step."""
    return ((base * 0x9E3779B1 + index) * 0x85EBCA77 + step) % (1 << 62)


class MicroAdam(CompressedOptimizer):
    """Memory-compressed Adam (about 1 byte of state per parameter instead of 8).

    ``MicroAdam(params, lr=1e-3, window_size=10, ...)`` or ``MicroAdam(params, config)``: the
    options, their defaults and ranges are those of :class:`MicroAdamConfig` (also accepted:
    ``m``/``k_init`` for ``window_size``/``density``, ``beta1``/``beta2``). Per-group ``lr`` and
    ``weight_decay`` are honoured.
    """

    Config = MicroAdamConfig
    STATE_CATEGORIES = {
        "window_indices": "window", "window_values": "window",
        "ef_codes": "error_feedback", "ef_min": "error_feedback", "ef_max": "error_feedback",
        "step": "counters", "nonfinite_skips": "counters",
    }

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
    def _init_state(cls, state: dict, p: torch.Tensor, group: dict, index: int = 0) -> None:
        """Create the state of the (local) tensor ``p``."""
        cls._init_geometry(state, group)
        state["step"] = torch.zeros((), dtype=torch.int64)
        state["nonfinite_skips"] = torch.zeros((), dtype=torch.int64)
        for key, shape in cls.state_shapes(state, p.numel()).items():
            state[key] = torch.zeros(shape, dtype=cls._STATE_DTYPES[key], device=p.device)

    # ------------------------------------------------------------------ step
    def _update(self, jobs: list[Job]) -> None:
        for job in jobs:
            self._update_one(job)

    def _update_one(self, job: Job) -> None:
        group, state, st, pl = job.group, self.state[job.param], job.state, job.local
        lr = as_float(group["lr"])
        t = int(state["step"]) + 1
        state["step"].fill_(t)
        n = pl.numel()
        if n == 0:
            return
        layout = self.layout_of(state, n)
        slot = (t - 1) % state["window_size"]
        K.error_feedback_compress(job.grad, st["ef_codes"], st["ef_min"], st["ef_max"],
                                  state["quant_block"], layout, st["window_indices"][slot],
                                  st["window_values"][slot])
        alpha = group.get("alpha", 0.0)
        dense = error = None
        if alpha > 0.0:
            error = K.dequantize4(st["ef_codes"], st["ef_min"], st["ef_max"], n,
                                  state["quant_block"])
            dense = error * alpha
        beta1, beta2 = group["betas"]
        sr_seed = (_sr_seed(self.config.seed, job.index, t)
                   if group["stochastic_rounding"] and pl.dtype == torch.bfloat16 else None)
        K.window_adam_update(pl, st["window_indices"], st["window_values"], layout, t,
                             beta1, beta2, group["eps"], lr, as_float(group["weight_decay"]),
                             sr_seed, dense)
        if error is not None:
            K.quantize4(error.mul_(1.0 - alpha), state["quant_block"], st["ef_codes"],
                        st["ef_min"], st["ef_max"], overwrite=True)
