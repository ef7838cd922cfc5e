"""Optimizer-state sharding under DDP (ZeRO stage 1) for the optimizers of this package.

Each rank owns the state of a balanced subset of the parameters, updates only those and broadcasts
the new values, so optimizer memory per rank is divided by the world size and the parameters are
the same as without sharding. This is torch's :class:`~torch.distributed.optim.
ZeroRedundancyOptimizer` with the changes our optimizers and the Trainer need:

* checkpoints: the state is consolidated on rank 0 before the Trainer saves ``optimizer.pt`` (by
  :class:`ConsolidateOnSaveCallback`, installed among transformers' default callbacks by
  :func:`hf_compressed_optim.register`); ``state_dict()`` refuses stale or missing consolidation
  instead of silently saving old state;
* ``load_state_dict`` keeps packed and integer state dtypes (each rank keeps only its own part);
* the memory report shows the state this rank holds.

With ``stochastic_rounding`` the rounding seeds depend on a parameter's position in its optimizer,
which differs once the parameters are partitioned: sharded and unsharded runs then agree in
distribution, not bit for bit (without it they agree exactly). EFCP's global inner products are
summed over the ranks' partitions (the local optimizer's declared engine names the group),
so its preconditioner is the unsharded one.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer
from transformers import TrainerCallback

from ..core.memory import unwrap_optimizer
from . import Engine

__all__ = ["ZeroShardedOptimizer", "sharded", "ConsolidateOnSaveCallback",
           "install_default_callback", "find_zero_optimizer"]


class ZeroShardedOptimizer(ZeroRedundancyOptimizer):
    """``ZeroRedundancyOptimizer(params, optimizer_class, **defaults)`` with safe checkpoints."""

    def __init__(self, params, optimizer_class, process_group=None, **defaults):
        super().__init__(params, optimizer_class=optimizer_class, process_group=process_group,
                         **defaults)
        # optimizers with global quantities (EFCP's inner products) sum them over this group
        self.optim.declared_engine = Engine("ZeRO-1", reduce_group=self.process_group)
        self._steps_taken = 0
        self._loaded_state = False
        self._consolidated_at: int | None = None

    def step(self, closure=None, **kwargs):
        out = super().step(closure=closure, **kwargs)
        self._steps_taken += 1
        return out

    def consolidate_state_dict(self, to: int = 0) -> None:
        super().consolidate_state_dict(to)
        self._consolidated_at = self._steps_taken

    def state_dict(self) -> dict:
        if self._steps_taken == 0 and not self._loaded_state:
            # nothing to consolidate yet (accelerate's prepare() round-trips the state dict
            # right after construction): the param groups and an empty state
            return torch.optim.Optimizer.state_dict(self)
        if self.world_size > 1 and self._consolidated_at != self._steps_taken:
            when = ("never" if self._consolidated_at is None
                    else f"{self._steps_taken - self._consolidated_at} step(s) ago")
            raise RuntimeError(
                f"{type(self).__name__}.state_dict() needs the sharded state consolidated on this "
                f"rank after the last step (consolidated: {when}). Call "
                "consolidate_state_dict(to=<this rank>) on every rank first; with the Trainer, "
                "keep hf_compressed_optim's ConsolidateOnSaveCallback (added by "
                "hf_compressed_optim.register()) or add it with trainer.add_callback(...).")
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        if any(v is not None for v in state_dict["state"].values()):
            self._loaded_state = True
            self._consolidated_at = None
        super().load_state_dict(state_dict)
        # torch's base class also kept a copy of every entry, cast to the parameter dtype (a
        # 4x inflation of uint8 codes); only the local optimizer's exact copy is used
        self.state = defaultdict(dict)


def sharded(optimizer_class: type) -> type:
    """A class taking ``(params, **kwargs)`` like ``optimizer_class`` that shards its state
    (what Trainer's ``optimizer_cls_and_kwargs`` expects)."""

    def __init__(self, params, **kwargs):
        ZeroShardedOptimizer.__init__(self, params, optimizer_class, **kwargs)

    return type(f"ZeroSharded{optimizer_class.__name__}", (ZeroShardedOptimizer,),
                {"__init__": __init__, "__module__": __name__,
                 "__doc__": f"{optimizer_class.__name__} with its state sharded over DDP ranks."})


def find_zero_optimizer(optimizer) -> ZeroShardedOptimizer | None:
    """The ZeroShardedOptimizer inside accelerate/Trainer wrappers, if any."""
    inner = unwrap_optimizer(optimizer)  # stops at ZeRO: its local optimizer is ``.optim``
    return inner if isinstance(inner, ZeroShardedOptimizer) else None


class ConsolidateOnSaveCallback(TrainerCallback):
    """Consolidates sharded optimizer state on rank 0 right before the Trainer saves a checkpoint
    (it runs after ``DefaultFlowCallback`` has decided ``control.should_save``). A no-op for any
    other optimizer."""

    def _maybe_consolidate(self, control, optimizer):
        zero = find_zero_optimizer(optimizer)
        if zero is not None and control.should_save and dist.is_initialized():
            zero.consolidate_state_dict(to=0)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self._maybe_consolidate(control, optimizer)

    def on_epoch_end(self, args, state, control, optimizer=None, **kwargs):
        self._maybe_consolidate(control, optimizer)


def install_default_callback() -> bool:
    """Append :class:`ConsolidateOnSaveCallback` to transformers' default Trainer callbacks
    (after ``DefaultFlowCallback``). Idempotent; returns True when it was added now."""
    from transformers import trainer as trainer_module

    defaults = trainer_module.DEFAULT_CALLBACKS
    if any(cb is ConsolidateOnSaveCallback for cb in defaults):
        return False
    defaults.append(ConsolidateOnSaveCallback)
    return True

