"""Hyperparameter checks that fail early with a message naming the argument and its range."""

from __future__ import annotations

import math
import numbers


def _fmt(lo, hi, lo_open, hi_open) -> str:
    return f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def check_float(name: str, value, lo: float = -math.inf, hi: float = math.inf, *,
                lo_open: bool = False, hi_open: bool = False) -> float:
    """Return ``value`` as float if it is a real number in the interval, else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number in {_fmt(lo, hi, lo_open, hi_open)}, "
                         f"got {value!r}")
    v = float(value)
    if v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
        raise ValueError(f"{name} must be in {_fmt(lo, hi, lo_open, hi_open)}, got {value!r}")
    return v


def check_int(name: str, value, lo: int, hi: int | float = math.inf) -> int:
    """Return ``value`` as int if it is an integer in [lo, hi], else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    if value < lo or value > hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_lr(value) -> float:
    """lr may be a float or a one-element tensor (torch schedulers keep tensors)."""
    try:
        import torch

        if torch.is_tensor(value):
            if value.numel() != 1:
                raise ValueError(f"lr must be a float or a one-element tensor, got shape "
                                 f"{tuple(value.shape)}")
            check_float("lr", float(value), 0.0)
            return value
    except ImportError:  # pragma: no cover
        pass
    return check_float("lr", value, 0.0)


def check_betas(betas) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), each in [0, 1), got {betas!r}")
    return (check_float("betas[0]", betas[0], 0.0, 1.0, hi_open=True),
            check_float("betas[1]", betas[1], 0.0, 1.0, hi_open=True))
