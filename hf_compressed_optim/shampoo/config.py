"""4-bit Shampoo's options, declared once (constructor, ``optim_args``, README tables)."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import NONFINITE, OptimizerConfig, option
from ..kernels.codebook import CODEBOOKS

#: first-order optimizers 4-bit Shampoo grafts onto (``adamw_8bit`` / ``adamw_4bit``: AdamW with
#: block-quantized moments, see ``kernels/lowbit_adam.py``)
FIRST_ORDER = ("adamw", "adamw_8bit", "adamw_4bit", "sgd")
#: first_order -> bits of its quantized moments
LOWBIT_ADAMW = {"adamw_8bit": 8, "adamw_4bit": 4}


@dataclass(frozen=True)
class ShampooConfig(OptimizerConfig):
    lr: float = option(1e-3, "learning rate (float or one-element tensor)", lo=0.0,
                       tensor_ok=True)
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW's moment decays "
                                        "(first_order=adamw*)", lo=0.0, hi=1.0, hi_open=True,
                                        parts=("beta1", "beta2"))
    eps: float = option(1e-8, "AdamW's epsilon", lo=0.0, lo_open=True)
    weight_decay: float = option(0.0, "AdamW: decoupled p *= 1 - lr wd; SGD: coupled d += wd p",
                                 lo=0.0)
    first_order: str = option("adamw", "the optimizer fed with the grafted direction: AdamW with "
                              "fp32 moments (8 B/param), with 8-bit (2.03 B/param) or 4-bit "
                              "(1.06 B/param) block-quantized moments, or SGD with momentum",
                              choices=FIRST_ORDER)
    lowbit_min_size: int = option(4096, "first_order=adamw_8bit/4bit: (local) tensors with fewer "
                                  "elements keep fp32 moments", lo=0)
    momentum: float = option(0.9, "SGD's momentum (no dampening)", lo=0.0, hi=1.0, hi_open=True)
    nesterov: bool = option(False, "SGD's Nesterov momentum")
    precond_bits: int = option(4, "4: 4-bit eigenvectors and roots; 32: the fp32 baseline",
                               choices=(4, 32))
    stat_update_interval: int = option(0, "T1, steps between statistics updates; 0: automatic "
                                       "(T2 / 5, at most 100)", lo=0, aliases=("T1",))
    root_update_interval: int = option(0, "T2, steps between inverse-root refreshes; 0: automatic "
                                       "(total_steps / 10, at most 500; roots also refreshed at "
                                       "every statistics update before T2)", lo=0,
                                       aliases=("T2",))
    total_steps: int = option(0, "the run's length in steps (Trainer: max_steps), which sizes the "
                              "automatic T1 / T2; 0: unknown (T1 = 100, T2 = 500)", lo=0,
                              group=False)
    stat_decay: float = option(0.95, "beta of the statistics EMA; 1 accumulates", lo=0.0, hi=1.0)
    matrix_eps: float = option(1e-6, "relative ridge: eps * max eigenvalue", lo=0.0, hi=1.0,
                               lo_open=True)
    max_order: int = option(1200, "largest block side", lo=1, hi=1 << 16)
    quant_block_size: int = option(64, "elements per absmax block along an eigenvector", lo=2,
                                   hi=1 << 16, even=True)
    min_quant_size: int = option(4096, "factors with fewer elements (n^2) stay fp32", lo=0)
    codebook: str = option("linear2", "4-bit codebook (linear2: the paper's)", choices=CODEBOOKS)
    rectify_iters: tuple[int, int] = option((1, 4), "Bjorck steps before the statistics update "
                                            "and before the inverse root", lo=0, hi=100,
                                            parts=("rectify_t1", "rectify_t2"))
    inverse_root: str = option("eigen", "eigen (from the eigendecomposition) or the coupled "
                               "Schur-Newton iteration", choices=("eigen", "schur_newton"))
    start_step: int = option(1, "first step whose gradient is preconditioned", lo=1)
    nonfinite: str = option("skip", "a gradient with inf/NaN: skip that parameter (its "
                            "statistics too) or raise", choices=NONFINITE, group=False)

    def check(self) -> None:
        if self.nesterov and self.momentum == 0.0:
            raise ValueError("nesterov=True needs momentum in (0, 1), got momentum=0")


@dataclass(frozen=True)
class Shampoo32bitConfig(ShampooConfig):
    precond_bits: int = option(32, "fp32 statistics and roots (the paper's baseline)",
                               choices=(32,))
