"""EFCP's options (Sparse M-FAC and Sparse GGT), declared once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..core.config import NONFINITE, OptimizerConfig, option
from ..kernels.layout import DEFAULT_TOPK_BLOCK, MAX_INT16_BLOCK

#: the largest window: the m x m algebra is O(m^3) per step, and the Triton SP kernel puts the
#: window rows on the second grid axis (at most 65535)
MAX_WINDOW = 8192
WD_MODES = ("decoupled_lr_scaled", "decoupled_unscaled", "l2")
#: lr_mode="adam": every tensor's step direction is rescaled to this RMS before ``lr`` multiplies
#: it, the typical RMS of an Adam update, so that AdamW's learning rate carries over
ADAM_UPDATE_RMS = 0.5


@dataclass(frozen=True)
class EFCPConfig(OptimizerConfig):
    """Options both EFCP optimizers share."""

    #: Trainer's adam_epsilon (1e-8) is not SparseGGT's eps: eps comes from optim_args only
    TRAINER_ADAM_ARGS: ClassVar[tuple[str, ...]] = ()

    lr: float = option(1e-3, "learning rate (float or one-element tensor)", lo=0.0,
                       tensor_ok=True)
    window_size: int = option(64, "compressed gradients in the ring (global; the paper: 1024, "
                              "45 B/param)", lo=1, hi=MAX_WINDOW, aliases=("m",))
    density: float = option(0.01, "fraction of entries kept per top-k block", lo=0.0, hi=1.0,
                            lo_open=True, aliases=("k_init",))
    weight_decay: float = option(0.0, "applied as wd_mode says", lo=0.0)
    momentum: float = option(0.0, "v = mu v + u (no dampening)", lo=0.0, hi=1.0, hi_open=True)
    compressor: str = option("topk", "block top-k, or PowerSGD low rank (tensors with >= 2 "
                             "dims; 1-D tensors stay dense)", choices=("topk", "lowrank"))
    rank: int = option(4, "rank of the low-rank compressor", lo=1, hi=1024)
    lr_mode: str = option("adam", "adam: each tensor's step is rescaled to an Adam-like RMS "
                          f"({ADAM_UPDATE_RMS}), so AdamW's lr carries over; raw: the papers' "
                          "p -= lr u", choices=("adam", "raw"))
    ef_bits: int = option(4, "error buffer: 32 fp32, 16 bf16, 4 the 4-bit block quantizer",
                          choices=(4, 16, 32))
    value_dtype: str = option("bf16", "window values (the rounding residual is fed back)",
                              choices=("bf16", "fp32"))
    wd_mode: str = option("decoupled_lr_scaled", "p *= 1 - lr wd; p *= 1 - wd (the EFCP "
                          "repository's); or l2: precondition c + wd p", choices=WD_MODES)
    topk_block_size: int = option(DEFAULT_TOPK_BLOCK, "elements per top-k block (int16 "
                                  "indices)", lo=1, hi=MAX_INT16_BLOCK)
    quant_block_size: int = option(64, "elements per bucket of the 4-bit error buffer", lo=2,
                                   hi=1 << 20, even=True)
    seed: int = option(0, "seed of the low-rank compressor's warm start (same on every rank)",
                       lo=0, hi=(1 << 62) - 1, group=False)
    nonfinite: str = option("skip", "an inf/NaN gradient: skip the whole step (counted) or "
                            "raise", choices=NONFINITE, group=False)


@dataclass(frozen=True)
class SparseMFACConfig(EFCPConfig):
    damp: float = option(1e-6, "damping lambda; off the window's span the step is lr/damp "
                         "times the compressed gradient (global)", lo=0.0, lo_open=True,
                         aliases=("lambda",))
    fix_scaling: bool = option(False, "normalise by min(t, m) instead of m while the window "
                               "fills (global)")


@dataclass(frozen=True)
class SparseGGTConfig(EFCPConfig):
    window_size: int = option(64, "compressed gradients in the ring (global; the paper: 100)",
                              lo=1, hi=MAX_WINDOW, aliases=("m",))
    eps: float = option(1e-5, "epsilon of (eps I + (G^T G)^(1/2))^-1; off the window's span "
                        "the step is lr/eps times the compressed gradient (global)", lo=0.0,
                        lo_open=True)
