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
support every dtype (neither gloo nor NCCL all-gathers int16, which the top-k indices use). DCP
save / load, resharding-free resume and the full (gathered) state dict then
work like for any DTensor state.
"""

from __future__ import annotations

import math
import torch

__all__ = ["is_sharded", "possible_local_shapes", "pack", "local_view"]


def _dtensor_api():
    from torch.distributed.tensor import DTensor, Replicate, Shard

    return DTensor, Replicate, Shard


def is_sharded(p: torch.Tensor) -> bool:
    """True for a DTensor parameter sharded on at least one mesh dimension (FSDP2, TP)."""
    if not hasattr(p, "placements") or not hasattr(p, "device_mesh"):
        return False
    _, _, Shard = _dtensor_api()
    return any(isinstance(pl, Shard) for pl in p.placements)


def possible_local_shapes(p: torch.Tensor) -> list[tuple[int, ...]]:
    """Every local block shape some rank holds (torch.chunk semantics), largest first.

    State sizes are not always monotone in the block size (Shampoo keeps small factors in fp32),
    so capacities are the maximum over all of these, not the size for the largest block.
    """
    _, _, Shard = _dtensor_api()
    shapes = {tuple(int(d) for d in p.shape)}
    for mesh_dim, pl in enumerate(p.placements):
        if not isinstance(pl, Shard):
            continue
        size = p.device_mesh.size(mesh_dim)
        nxt = set()
        for shape in shapes:
            n = shape[pl.dim]
            chunk = -(-n // size) if n > 0 else 0
            for i in range(size):
                local = list(shape)
                local[pl.dim] = max(0, min(chunk, n - i * chunk))
                nxt.add(tuple(local))
        shapes = nxt
    return sorted(shapes, reverse=True)


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
