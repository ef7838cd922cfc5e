"""Optimizer-state accounting: bytes actually held by state tensors, by category.

Storage sizes are summed once per storage (views are not double counted); DTensor state counts
its local shard, so each rank reports what it holds; tensor subclasses count their inner tensors.
:func:`unaccounted_tensor_bytes` checks that the report is the whole bill: what else stays alive.
"""

from __future__ import annotations

import gc
import warnings

import torch

from .optimizer import local_tensor


def unwrap_optimizer(optimizer):
    """The innermost optimizer (accelerate's AcceleratedOptimizer and similar wrappers)."""
    seen = set()
    while hasattr(optimizer, "optimizer") and id(optimizer) not in seen:
        seen.add(id(optimizer))
        optimizer = optimizer.optimizer
    return optimizer


def state_holder(optimizer):
    """The optimizer whose ``state`` holds this rank's tensors: the innermost one, or the local
    optimizer of a ZeRO-sharded one (whose own ``state`` is only a stale copy)."""
    opt = unwrap_optimizer(optimizer)
    local = getattr(opt, "optim", None)
    if isinstance(local, torch.optim.Optimizer) and hasattr(opt, "consolidate_state_dict"):
        return local
    return opt


def _leaf_tensors(t: torch.Tensor):
    """Plain tensors holding the data of ``t``: a DTensor's local shard; tensor subclasses
    (e.g. torchao's quantized optimizer states) flattened into their inner tensors."""
    t = local_tensor(t)
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.Tensor and \
            not isinstance(t, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from _leaf_tensors(getattr(t, name))
    else:
        yield t


def optimizer_state_bytes(optimizer, by: str = "category") -> dict[str, int]:
    """{"total": bytes, <group>: bytes, ...} over every tensor in ``optimizer.state``.

    ``by="category"`` groups by the optimizer's ``STATE_CATEGORIES`` (unknown keys: "other"),
    ``by="key"`` by state key (e.g. ``exp_avg``), which works for any optimizer.
    """
    if by not in ("category", "key"):
        raise ValueError(f"by must be 'category' or 'key', got {by!r}")
    opt = state_holder(optimizer)
    categories = getattr(opt, "STATE_CATEGORIES", {})
    seen: set[tuple] = set()
    out: dict[str, int] = {"total": 0}
    for state in opt.state.values():
        for key, value in state.items():
            if not torch.is_tensor(value):
                continue
            group = categories.get(key, "other") if by == "category" else key
            for t in _leaf_tensors(value):
                storage = t.untyped_storage()
                ident = (storage.data_ptr(), t.device, storage.nbytes())
                if ident in seen:
                    continue
                seen.add(ident)
                out[group] = out.get(group, 0) + storage.nbytes()
                out["total"] += storage.nbytes()
    return out


def trainable_parameter_count(optimizer) -> int:
    """Number of (local) parameter elements the optimizer updates."""
    opt = unwrap_optimizer(optimizer)
    seen = set()
    total = 0
    for group in opt.param_groups:
        for p in group["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                total += local_tensor(p).numel()
    return total


def optimizer_memory_report(optimizer) -> dict[str, float]:
    """State bytes (total and per category) and bytes per trainable parameter."""
    by_cat = optimizer_state_bytes(optimizer)
    n = trainable_parameter_count(optimizer)
    report: dict[str, float] = {"optimizer_state_bytes": by_cat.pop("total")}
    for cat, b in sorted(by_cat.items()):
        report[f"optimizer_state_bytes/{cat}"] = b
    report["optimizer_state_bytes_per_param"] = report["optimizer_state_bytes"] / n if n else 0.0
    return report


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def live_tensor_storages() -> set[tuple[int, int]]:
    """``(data_ptr, nbytes)`` of every tensor storage Python can reach, module-level caches
    included (after a garbage-collection pass); DTensors count their local shard."""
    from torch._subclasses.fake_tensor import FakeTensor

    gc.collect()
    out = set()
    with warnings.catch_warnings():  # isinstance() touches deprecated torch.distributed names
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if not isinstance(obj, torch.Tensor) or obj.is_meta or isinstance(obj, FakeTensor):
                continue
            try:
                key = _storage_key(local_tensor(obj))
            except (RuntimeError, NotImplementedError):  # functional tensors (torch.compile),
                continue                                   # wrapper subclasses: no data
            if key[0] and key[1]:
                out.add(key)
    return out


def unaccounted_tensor_bytes(optimizer, before: set[tuple[int, int]]) -> int:
    """Bytes of tensors alive now that were not alive at ``before`` (a
    :func:`live_tensor_storages` snapshot) and are neither the optimizer's parameters, their
    gradients nor its state: memory that :func:`optimizer_memory_report` would not show.

    Call it after ``step()``; this package's optimizers keep it under 1% of the parameters'
    bytes (no workspace outlives a step)."""
    opt = state_holder(optimizer)
    owned = [t for g in unwrap_optimizer(optimizer).param_groups for p in g["params"]
             for t in (p, p.grad) if t is not None]
    owned += [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    # quantized-state subclasses: their inner tensors
    known = {_storage_key(leaf) for t in owned for leaf in _leaf_tensors(t)}
    return sum(nbytes for _, nbytes in live_tensor_storages() - before - known)
