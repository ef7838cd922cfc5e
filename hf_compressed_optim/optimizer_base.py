"""Machinery every optimizer of this package shares (the "HF-safe optimizer contract").

* ``load_state_dict`` keeps integer, packed and bf16 state exactly: torch's loader casts every
  state tensor to the parameter's dtype, which corrupts int16 indices and inflates uint8 codes.
* Non-finite gradients are detected for all parameters with one host synchronisation per step and
  never reach the state: the parameter is skipped (counted, warned) or an error is raised.
* DTensor parameters (FSDP2) are handled on their local shards.
"""

from __future__ import annotations

import warnings
from itertools import chain

import torch

from .sharded_state import is_sharded
from .validation import check_choice

NONFINITE_POLICIES = ("skip", "raise")


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, the tensor itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def as_float(value) -> float:
    """A group's ``lr``/``weight_decay`` as a Python float (tensors allowed)."""
    return float(value.item()) if torch.is_tensor(value) else float(value)


class CompressedOptimizer(torch.optim.Optimizer):
    """Base class: dtype-preserving checkpoints and the non-finite gradient policy."""

    #: maps a state key to the category the memory report shows it under
    STATE_CATEGORIES: dict[str, str] = {}

    def __init__(self, params, defaults: dict, nonfinite: str = "skip"):
        self.nonfinite = check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        super().__init__(params, defaults)

    # -------------------------------------------------------------- checkpoints
    def load_state_dict(self, state_dict: dict) -> None:
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                          chain.from_iterable(g["params"] for g in self.param_groups)))
        for key, incoming_state in saved_state.items():
            param = id_map.get(key)
            if param is None or param not in self.state:
                continue
            loaded = self.state[param]
            for name, incoming in incoming_state.items():
                current = loaded.get(name)
                if torch.is_tensor(incoming) and torch.is_tensor(current) and \
                        current.dtype != incoming.dtype:
                    loaded[name] = incoming.to(device=current.device)

    # -------------------------------------------------------------- non-finite gradients
    def _finite_flags(self, grads: list[torch.Tensor], params: list[torch.Tensor] | None = None
                      ) -> list[bool]:
        """One bool per gradient: all entries finite. A single host sync for the whole step.

        With ``params`` given and some of them sharded DTensors (FSDP2), the flags are combined
        over all ranks (one small all-reduce), so a non-finite entry in any shard skips the
        parameter on every rank: the shards never disagree on whether a step happened.
        """
        if not grads:
            return []
        if params is not None and any(is_sharded(p) for p in params):
            return self._global_finite_flags(grads)
        by_device: dict[torch.device, list[int]] = {}
        for i, g in enumerate(grads):
            by_device.setdefault(g.device, []).append(i)
        flags = [True] * len(grads)
        for idx in by_device.values():
            # min and max propagate NaN and expose inf: one cheap reduction, no temporary
            stats = torch.stack([torch.stack(torch.aminmax(grads[i])).float() if grads[i].numel()
                                 else torch.zeros(2, device=grads[i].device) for i in idx])
            for i, ok in zip(idx, torch.isfinite(stats).all(dim=1).tolist()):
                flags[i] = bool(ok)
        return flags

    def _global_finite_flags(self, grads: list[torch.Tensor]) -> list[bool]:
        import torch.distributed as dist

        device = grads[0].device
        ok = torch.stack([torch.isfinite(g).all() if g.numel() else
                          torch.ones((), dtype=torch.bool, device=g.device)
                          for g in grads]).to(device=device, dtype=torch.int32)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return [bool(v) for v in ok.tolist()]

    def _on_nonfinite(self, names: list[str]) -> None:
        if self.nonfinite == "raise":
            raise FloatingPointError(
                f"{type(self).__name__}: non-finite gradient (inf/NaN) for {', '.join(names)}; "
                "the optimizer state was left unchanged (pass nonfinite='skip' to skip instead)")
        warnings.warn(
            f"{type(self).__name__}: skipped the update of {len(names)} parameter(s) with "
            f"non-finite gradients ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}); "
            "their state is unchanged. Total skips so far: "
            f"{self.nonfinite_skips}", RuntimeWarning, stacklevel=3)

    @property
    def nonfinite_skips(self) -> int:
        """How many parameter updates were skipped because of non-finite gradients."""
        return sum(int(s.get("nonfinite_skips", 0)) for s in self.state.values())
