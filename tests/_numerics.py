"""Test oracles: the two bf16 neighbours of an fp32 value; a least-squares fit any optimizer
must make progress on."""

from __future__ import annotations

import torch

_LOW16 = 0xFFFF
_HIGH16 = -65536  # 0xFFFF0000 as int32


def bf16_floor(x: torch.Tensor) -> torch.Tensor:
    """Largest bf16 value <= x (x fp32, finite), by bit manipulation."""
    bits = x.float().contiguous().view(torch.int32)
    trunc = bits & _HIGH16  # toward zero
    need = (bits < 0) & ((bits & _LOW16) != 0)  # negative with dropped bits: grow magnitude
    return torch.where(need, trunc + 0x10000, trunc).view(torch.float32).to(torch.bfloat16)


def bf16_ceil(x: torch.Tensor) -> torch.Tensor:
    """Smallest bf16 value >= x."""
    return -bf16_floor(-x.float())


def bf16_half_ulp(x: torch.Tensor) -> torch.Tensor:
    """Half the bf16 spacing at |x| (fp32): the most round-to-nearest can move a value of that
    magnitude (bf16 keeps 8 significant bits)."""
    e = torch.frexp(x.float().abs().clamp_min(2.0 ** -126)).exponent
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), e - 9)


def fit_losses(opt: torch.optim.Optimizer, w: torch.Tensor, target: torch.Tensor,
               steps: int) -> list[float]:
    """Losses of ``steps`` optimizer steps on ``mean((w - target)^2)`` (w of any float dtype)."""
    losses = []
    for _ in range(steps):
        loss = ((w.float() - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
