"""Optimizer state of FSDP2 (DTensor) parameters in a form distributed checkpointing can save.

Under FSDP2 every rank holds a row block of each parameter and the optimizer state of that block.
Compressed state (packed 4-bit codes, top-k window rows, quantization scales) has no element-wise
correspondence with the parameter, and its size depends on the local block, which differs between
ranks when the rows do not split evenly. ``torch.distributed.checkpoint`` treats a plain tensor in
the state as replicated and keeps one copy, so a plain local tensor would be lost or mis-sized on
load.

Here each per-rank state tensor is stored as raw bytes in one row of a ``[shards, capacity]``
uint8 DTensor, placed ``Shard(0)`` on the mesh dimensions that shard the parameter
(``Replicate()`` on the others), where ``capacity`` is the byte size the state has for the largest
local block. A rank uses the first bytes of its row, viewed in the state's dtype and local shape:
no copy, and the kernels see an ordinary contiguous tensor. Bytes, because collectives do not
support every dtype (neither gloo nor NCCL all-gathers int16, which the top-k indices use). DCP save / load, resharding-free resume and the full (gathered) state dict then
work like for any DTensor state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

__all__ = ["is_sharded", "max_local_shape", "pack", "local_view", "pack_state", "local_views"]


def _dtensor_api():
    from torch.distributed.tensor import DTensor, Replicate, Shard

    return DTensor, Replicate, Shard


def is_sharded(p: torch.Tensor) -> bool:
    """True for a DTensor parameter sharded on at least one mesh dimension (FSDP2, TP)."""
    if not hasattr(p, "placements") or not hasattr(p, "device_mesh"):
        return False
    _, _, Shard = _dtensor_api()
    return any(isinstance(pl, Shard) for pl in p.placements)


def max_local_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The largest local block any rank holds (torch.chunk semantics: the first chunk)."""
    _, _, Shard = _dtensor_api()
    shape = list(p.shape)
    for mesh_dim, pl in enumerate(p.placements):
        if isinstance(pl, Shard):
            size = p.device_mesh.size(mesh_dim)
            d = pl.dim
            shape[d] = -(-shape[d] // size) if shape[d] > 0 else 0
    return tuple(shape)


def _state_placements(p: torch.Tensor):
    _, Replicate, Shard = _dtensor_api()
    return [Shard(0) if isinstance(pl, Shard) else Replicate() for pl in p.placements]


def _num_shards(p: torch.Tensor) -> int:
    _, _, Shard = _dtensor_api()
    return math.prod(p.device_mesh.size(i) for i, pl in enumerate(p.placements)
                     if isinstance(pl, Shard))


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1)
    return t.view(torch.uint8) if t.dtype != torch.uint8 else t


def pack(local: torch.Tensor, capacity: int, p: torch.Tensor) -> torch.Tensor:
    """``local`` (any shape and dtype, at most ``capacity`` bytes) as a ``[shards, capacity]``
    uint8 DTensor on p's mesh."""
    DTensor, _, _ = _dtensor_api()
    data = _as_bytes(local.contiguous())
    if data.numel() > capacity:
        raise ValueError(f"state of {data.numel()} bytes exceeds the capacity {capacity} "
                         "computed for the largest shard")
    row = torch.zeros((1, capacity), dtype=torch.uint8, device=local.device)
    row.view(-1)[:data.numel()].copy_(data)
    shards = _num_shards(p)
    return DTensor.from_local(row, p.device_mesh, _state_placements(p), run_check=False,
                              shape=torch.Size((shards, capacity)), stride=(capacity, 1))


def local_view(value: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
    """The rank's state in its local ``shape`` and ``dtype``: a view into the packed byte row
    (or ``value`` itself when it is a plain tensor)."""
    if not hasattr(value, "to_local"):
        return value
    row = value.to_local().view(-1)
    nbytes = math.prod(shape) * dtype.itemsize
    return row[:nbytes].view(dtype).view(tuple(shape))


def pack_state(state: dict, p: torch.Tensor, capacity_shapes: Mapping[str, tuple]) -> None:
    """Replace each state tensor named in ``capacity_shapes`` by its packed DTensor form.

    ``capacity_shapes`` maps key -> shape of that tensor for the largest local block.
    """
    for key, shape in capacity_shapes.items():
        state[key] = pack(state[key], math.prod(shape) * state[key].dtype.itemsize, p)


def local_views(state: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple],
                dtypes: Mapping[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """key -> local view for every key of ``shapes``."""
    return {key: local_view(state[key], shape, dtypes[key]) for key, shape in shapes.items()}
