"""How the parameters an optimizer sees are distributed, behind one small adapter.

The optimizers never ask which engine runs them. The core (:mod:`hf_compressed_optim.core`)
asks :func:`engine_of` and uses three answers:

* ``reduce_group``: the ranks holding the other parts of the parameters, over which global
  quantities (EFCP's inner products, finite flags) are summed: the ZeRO-1 partition group
  (:mod:`.zero`), or the mesh dimension that shards FSDP2's DTensor parameters (:mod:`.fsdp2`);
* ``sharded_params``: DTensor row shards, whose state the core packs for distributed checkpoints;
* ``flat_partitions``: FSDP1 / DeepSpeed ZeRO hand the optimizer flat 1-D partitions, which have
  lost the matrix shape an optimizer with ``NEEDS_MATRIX_SHAPES`` (Shampoo) relies on.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from .fsdp2 import is_sharded

__all__ = ["Engine", "engine_of"]


@dataclass(frozen=True)
class Engine:
    """What the core needs to know about the engine that distributes the parameters."""

    name: str = "single process or DDP"
    reduce_group: Any = None
    sharded_params: bool = False
    flat_partitions: bool = False


def _flat_partition_engine(params: list) -> str | None:
    """``"FSDP1"`` / ``"DeepSpeed ZeRO..."`` when the parameters are flat partitions, else None."""
    if any(getattr(p, "_fsdp_flattened", False) and not hasattr(p, "placements")
           for p in params):
        return "FSDP1"
    if any(hasattr(p, "ds_id") or hasattr(p, "ds_tensor") for p in params):
        return "DeepSpeed ZeRO-3"
    if "deepspeed" in sys.modules and params and all(p.dim() == 1 for p in params) and \
            any(p.numel() > 1 for p in params):
        # ZeRO-1/2 replace each group's params by a single flat fp32 partition
        return "DeepSpeed ZeRO"
    return None


def engine_of(optimizer) -> Engine:
    """The engine of ``optimizer``: the one a wrapper declared (ZeRO-1 sets
    ``optimizer.declared_engine``), else what its parameters show."""
    declared = getattr(optimizer, "declared_engine", None)
    if declared is not None:
        return declared
    groups = optimizer.param_groups
    params = [p for g in groups for p in g["params"]]
    for p in params:
        if is_sharded(p):
            dims = [i for i, pl in enumerate(p.placements) if pl.is_shard()]
            group = p.device_mesh.get_group(dims[0]) if len(dims) == 1 else dist.group.WORLD
            return Engine("FSDP2", reduce_group=group, sharded_params=True)
    flat = _flat_partition_engine(params)
    if flat == "DeepSpeed ZeRO" and any(len(g["params"]) != 1 for g in groups if g["params"]):
        flat = None
    return Engine(flat, flat_partitions=True) if flat else Engine()
