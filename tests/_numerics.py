"""Test oracles: the two bf16 neighbours of an fp32 value; a least-squares fit any optimizer
must make progress on; a checkpoint round trip through ``torch.load(weights_only=True)``."""

from __future__ import annotations

import io

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


def reloaded(opt: torch.optim.Optimizer, params: list, make_optimizer
             ) -> tuple[torch.optim.Optimizer, list]:
    """A fresh optimizer (``make_optimizer(params)``) on copies of ``params``, loaded from
    ``opt``'s state dict saved with ``torch.save`` and read back with ``weights_only=True``."""
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in params]}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    params2 = [torch.nn.Parameter(t.clone()) for t in ckpt["params"]]
    opt2 = make_optimizer(params2)
    opt2.load_state_dict(ckpt["opt"])
    return opt2, params2


def random_steps(opt: torch.optim.Optimizer, params: list, steps: int, seed: int) -> None:
    """``steps`` optimizer steps on seeded random gradients (in each parameter's dtype)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step()
