"""MicroAdam's options, declared once (constructor, ``optim_args``, README table)."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import NONFINITE, OptimizerConfig, option
from ..kernels.layout import DEFAULT_TOPK_BLOCK, MAX_INT16_BLOCK


@dataclass(frozen=True)
class MicroAdamConfig(OptimizerConfig):
    lr: float = option(1e-3, "learning rate (float or one-element tensor)", lo=0.0,
                       tensor_ok=True)
    betas: tuple[float, float] = option((0.9, 0.999), "Adam's moment decays", lo=0.0, hi=1.0,
                                        hi_open=True, parts=("beta1", "beta2"))
    eps: float = option(1e-8, "added outside the square root", lo=0.0, lo_open=True)
    weight_decay: float = option(0.0, "decoupled (AdamW-style, lr-scaled) weight decay", lo=0.0)
    window_size: int = option(10, "compressed gradients kept (m in the paper)", lo=1, hi=4096,
                              aliases=("m",))
    density: float = option(0.01, "fraction of entries kept per top-k block", lo=0.0, hi=1.0,
                            lo_open=True, aliases=("k_init",))
    quant_block_size: int = option(64, "elements per min/max bucket of the 4-bit error buffer "
                                   "(two 4-bit codes share a byte)", lo=2, hi=1 << 20, even=True)
    topk_block_size: int = option(DEFAULT_TOPK_BLOCK, "elements per top-k block (fixed, so "
                                  "results do not depend on the GPU; int16 indices)", lo=1,
                                  hi=MAX_INT16_BLOCK)
    stochastic_rounding: bool = option(False, "round bf16 parameter updates stochastically "
                                       "(seeds identical on every data-parallel rank)")
    alpha: float = option(0.0, "the reference's densify variant: also apply alpha*Q^-1(e) and "
                          "keep (1-alpha)*Q^-1(e) in the buffer", lo=0.0, hi=1.0, hi_open=True)
    seed: int = option(0, "base seed of the stochastic rounding", lo=0, hi=(1 << 62) - 1,
                       group=False)
    nonfinite: str = option("skip", "a gradient with inf/NaN: skip that parameter (counted) or "
                            "raise FloatingPointError; state is never touched", choices=NONFINITE,
                            group=False)
