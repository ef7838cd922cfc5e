"""Recognise the flat 1-D parameter partitions of FSDP1 and DeepSpeed ZeRO.

Under FSDP1 the optimizer sees one flat 1-D shard per wrapped unit (``use_orig_params=False``) or
1-D views of the original parameters, some of size 0 (``use_orig_params=True``); DeepSpeed ZeRO
hands the client optimizer one flat fp32 partition per parameter group. Vector methods (MicroAdam,
EFCP) work on these unchanged; matrix methods (Shampoo) cannot: the 2-D structure is gone.
"""

from __future__ import annotations

import sys

__all__ = ["flat_partition_engine"]


def flat_partition_engine(param_groups) -> str | None:
    """``"FSDP1"`` / ``"DeepSpeed ZeRO"`` when the parameters are such flat partitions, else None."""
    params = [p for g in param_groups for p in g["params"]]
    if any(getattr(p, "_fsdp_flattened", False) and not hasattr(p, "placements")
           for p in params):
        return "FSDP1"
    if any(hasattr(p, "ds_id") or hasattr(p, "ds_tensor") for p in params):
        return "DeepSpeed ZeRO-3"
    if "deepspeed" in sys.modules and params and all(
            len(g["params"]) == 1 and g["params"][0].dim() == 1 for g in param_groups
            if g["params"]) and any(p.numel() > 1 for p in params):
        # ZeRO-1/2 replace each group's params by a single flat fp32 partition
        return "DeepSpeed ZeRO"
    return None
