"""Huge finite gradients (1e20, 1e30: squares overflow fp32) never make any optimizer's
parameters non-finite; torch's AdamW survives them too, so must we."""

from __future__ import annotations

import pytest
import torch

import hf_compressed_optim as hco

OPTIMIZERS = {
    "adamw_torch": lambda ps: torch.optim.AdamW(ps, lr=1e-3),  # the baseline users compare with
    "microadam": lambda ps: hco.MicroAdam(ps, lr=1e-3, density=0.1, window_size=3),
    "microadam_alpha": lambda ps: hco.MicroAdam(ps, lr=1e-3, density=0.1, window_size=3,
                                                alpha=0.5, weight_decay=0.1),
    "efcp_mfac": lambda ps: hco.SparseMFAC(ps, lr=1e-4, window_size=4, density=0.1),
    "efcp_mfac_ef4_l2": lambda ps: hco.SparseMFAC(ps, lr=1e-4, window_size=4, density=0.1,
                                                  ef_bits=4, wd_mode="l2", weight_decay=0.1),
    "efcp_ggt": lambda ps: hco.SparseGGT(ps, lr=1e-4, window_size=4, density=0.1, eps=1e-8),
    "shampoo_4bit": lambda ps: hco.Shampoo(ps, lr=1e-3, stat_update_interval=1,
                                           root_update_interval=2, min_quant_size=0),
    "shampoo_32bit": lambda ps: hco.Shampoo32bit(ps, lr=1e-3, stat_update_interval=1,
                                                 root_update_interval=2),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_huge_finite_gradients_keep_parameters_finite(name):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(40, 24)), torch.nn.Parameter(torch.randn(24))]
    opt = OPTIMIZERS[name](params)
    gen = torch.Generator().manual_seed(1)
    for scale in (1.0, 1.0, 1.0, 1e20, 1e20, 1e30, 1e30, 1.0, 1.0):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * scale
        opt.step()
        for p in params:
            assert torch.isfinite(p).all(), (name, scale)
