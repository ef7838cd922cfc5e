"""The optimizers the report compares, built the same way for every phase.

Each entry is keyed by its ``TrainingArguments(optim=...)`` name, so a row of the report maps to
the one-line choice a user makes. Hyperparameters other than the learning rate are the
package defaults, except where a step budget of a few hundred steps forces a change; those
changes are listed in ``BUDGET_OVERRIDES`` and printed in the report.

Peers (bitsandbytes, torchao) are used when they import (see ``common.add_peers_path``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

import hf_compressed_optim as hco

#: Non-default hyperparameters used by every phase, and why.
BUDGET_OVERRIDES = {
    "efcp_mfac": (dict(window_size=32, damp=1e-2, lr_mode="raw", ef_bits=32),
                  "window 32 (a 1024-gradient window never fills in a few hundred steps); damp "
                  "1e-2 from the issue-4 sweep; the papers' raw lr and fp32 error buffer (the "
                  "defaults before issue 16, which these figures were measured with)"),
    "efcp_ggt": (dict(window_size=32, eps=1e-3, lr_mode="raw", ef_bits=32),
                 "window 32, eps 1e-3 from the issue-4 sweep; raw lr and fp32 error buffer as "
                 "efcp_mfac"),
    "shampoo_4bit": (dict(stat_update_interval=10, root_update_interval=50),
                     "T1 = 10, T2 = 50 instead of 100 / 500, so that preconditioners are "
                     "refreshed several times within the step budget"),
    "shampoo_32bit": (dict(stat_update_interval=10, root_update_interval=50),
                      "same T1 / T2 as shampoo_4bit"),
}


@dataclass
class Entry:
    """One optimizer of the report."""

    name: str
    family: str          # "adamw", "ours" or "peer": how the report groups and colours it
    make: Callable       # (params, lr) -> torch.optim.Optimizer
    note: str
    # learning-rate grids per task ("text", "digits"): a small log grid around a sensible centre
    lr_grid: dict = field(default_factory=dict)
    # convergence runs skip entries that are the same algorithm as another one (fused AdamW)
    same_math_as: str | None = None


# Learning-rate grids per task: points a factor ~3 apart, centred where a first sweep put each
# optimizer's best; a fourth point where an AdamW-like optimizer's best sat on the edge (a best lr
# still at the edge of its grid is flagged in the report).
ADAM_GRID = {"text": [3e-4, 1e-3, 3e-3], "finetune": [3e-4, 1e-3, 3e-3, 1e-2],
             "digits": [1e-3, 3e-3, 1e-2, 3e-2]}
GRIDS = {
    "microadam": {"text": [1e-3, 3e-3, 1e-2], "finetune": [3e-4, 1e-3, 3e-3],
                  "digits": [3e-3, 1e-2, 3e-2]},
    "efcp_mfac": {"text": [0.01, 0.03, 0.1], "finetune": [0.01, 0.03, 0.1],
                  "digits": [0.01, 0.03, 0.1]},
    "efcp_ggt": {"text": [0.1, 0.3, 1.0], "finetune": [0.3, 1.0, 3.0],
                 "digits": [0.3, 1.0, 3.0]},
}
QUICK_GRID = {"text": [3e-3, 1e-2], "finetune": [1e-3, 3e-3], "digits": [1e-3, 3e-3]}
QUICK_GRIDS = {
    "microadam": {"text": [1e-2, 3e-2], "finetune": [3e-3, 1e-2], "digits": [3e-3, 1e-2]},
    "efcp_mfac": {"text": [0.01, 0.03], "finetune": [0.01, 0.03], "digits": [0.01, 0.03]},
    "efcp_ggt": {"text": [0.1, 0.3], "finetune": [0.1, 0.3], "digits": [0.1, 0.3]},
}


def _ours(name: str, cls, note: str, grid: dict, kwargs: dict | None = None) -> Entry:
    """An optimizer of this package; ``kwargs`` default to its :data:`BUDGET_OVERRIDES`."""
    kwargs = BUDGET_OVERRIDES.get(name, ({}, ""))[0] if kwargs is None else kwargs
    return Entry(name, "ours", lambda ps, lr: cls(ps, lr=lr, **kwargs), note, grid)


#: Variants measured only when named with ``--optimizers``: option studies, not default choices.
#: name -> (the roster entry whose class, grid and budget overrides they share, extra options,
#: note)
VARIANTS = {
    **{f"microadam_alpha{a:g}": ("microadam", dict(alpha=a),
                                 f"MicroAdam with alpha={a:g} (densify: the update also applies "
                                 f"alpha·Q⁻¹(e))") for a in (0.25, 0.5)},
    **{f"shampoo_4bit+adamw_{b}bit": ("shampoo_4bit", dict(first_order=f"adamw_{b}bit"),
                                      f"Shampoo, 4-bit preconditioners, grafting onto AdamW with "
                                      f"{b}-bit moments") for b in (8, 4)},
}


def build_roster(include_peers: bool = True, quick: bool = False,
                 variants: bool = False) -> dict[str, Entry]:
    """name -> Entry, in report order: AdamW baselines, this package, then the peers found
    (with ``variants``, the :data:`VARIANTS` after this package's optimizers)."""
    adam_grid = QUICK_GRID if quick else ADAM_GRID
    grids = QUICK_GRIDS if quick else GRIDS
    roster = {
        "adamw_torch": Entry("adamw_torch", "adamw",
                             lambda ps, lr: torch.optim.AdamW(ps, lr=lr, foreach=True,
                                                              weight_decay=0.0),
                             "torch.optim.AdamW(foreach=True)", adam_grid),
        "adamw_torch_fused": Entry("adamw_torch_fused", "adamw",
                                   lambda ps, lr: torch.optim.AdamW(ps, lr=lr, fused=True,
                                                                    weight_decay=0.0),
                                   "torch.optim.AdamW(fused=True)", adam_grid,
                                   same_math_as="adamw_torch"),
        "microadam": _ours("microadam", hco.MicroAdam,
                           "MicroAdam (window 10, density 1%, 4-bit EF)", grids["microadam"]),
        "efcp_mfac": _ours("efcp_mfac", hco.SparseMFAC,
                           "Sparse M-FAC (window 32, density 1%, bf16 values, fp32 EF)",
                           grids["efcp_mfac"]),
        "efcp_ggt": _ours("efcp_ggt", hco.SparseGGT,
                          "Sparse GGT (window 32, density 1%, bf16 values, fp32 EF)",
                          grids["efcp_ggt"]),
        "shampoo_4bit": _ours("shampoo_4bit", hco.Shampoo,
                              "Shampoo, 4-bit preconditioners, AdamW grafting", adam_grid),
        "shampoo_32bit": _ours("shampoo_32bit", hco.Shampoo32bit,
                               "Shampoo, fp32 preconditioners, AdamW grafting", adam_grid),
    }
    if variants:
        classes = {"microadam": hco.MicroAdam, "shampoo_4bit": hco.Shampoo}
        for name, (base, extra, note) in VARIANTS.items():
            kwargs = {**BUDGET_OVERRIDES.get(base, ({}, ""))[0], **extra}
            roster[name] = _ours(name, classes[base], note, roster[base].lr_grid, kwargs)
    if not include_peers:
        return roster
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import bitsandbytes as bnb

            roster["adamw_bnb_8bit"] = Entry(
                "adamw_bnb_8bit", "peer",
                lambda ps, lr: bnb.optim.AdamW8bit(ps, lr=lr, weight_decay=0.0),
                f"bitsandbytes {bnb.__version__} AdamW8bit", adam_grid)
        except Exception:
            pass
        try:
            import torchao
            from torchao.optim import AdamW4bit, AdamW8bit

            roster["adamw_torch_8bit"] = Entry(
                "adamw_torch_8bit", "peer",
                lambda ps, lr: AdamW8bit(ps, lr=lr, weight_decay=0.0),
                f"torchao {torchao.__version__} AdamW8bit", adam_grid)
            roster["adamw_torch_4bit"] = Entry(
                "adamw_torch_4bit", "peer",
                lambda ps, lr: AdamW4bit(ps, lr=lr, weight_decay=0.0),
                f"torchao {torchao.__version__} AdamW4bit", adam_grid)
        except Exception:
            pass
    return roster


def select(roster: dict[str, Entry], names: list[str] | None) -> dict[str, Entry]:
    """The entries named (in roster order); an unknown name is an error, not a silent skip."""
    if not names:
        return roster
    unknown = [n for n in names if n not in roster]
    if unknown:
        raise SystemExit(f"--optimizers: unknown or unavailable {unknown}; available: "
                         f"{list(roster)}")
    return {k: v for k, v in roster.items() if k in names}
