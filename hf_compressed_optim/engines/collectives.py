"""The collectives the optimizers issue, made safe to follow by a process exit.

``dist.all_reduce`` returns when the result is ready, but gloo's worker thread may still hold
the tensor for a moment (its work object is released after the result is published; about a
third of small CPU all-reduces here). If Python drops its last reference first, torch keeps the
Python object alive for the C++ owner, and the worker thread must take the GIL to free it. When
that happens while the interpreter is finalizing (the step was the last thing a script did),
Python ends the worker thread inside a C++ destructor and the process aborts with
"terminate called without an active exception" (SIGABRT) after its work is done.

:func:`all_reduce` therefore returns only after the backend has let go of the tensor, so the
last reference is always Python's own; and at exit, :func:`destroy_gloo_group_at_exit` destroys
a gloo process group the script left alive, for the collectives this package did not issue.
"""

from __future__ import annotations

import atexit
import time

import torch
import torch.distributed as dist

__all__ = ["all_reduce", "wait_until_released", "destroy_gloo_group_at_exit"]

def destroy_gloo_group_at_exit() -> None:
    """At interpreter exit (``atexit``, before finalization), destroy a default process group
    that is still alive on gloo, so gloo's worker threads let go of the tensors of the last
    collectives while Python can still free them. :func:`all_reduce` covers the package's own
    collectives; this covers the ones around it (the Trainer's gathers, ``all_gather_object``,
    ``barrier``), which can otherwise abort the process after its work is done. NCCL groups are
    left alone. Registered once when the package is imported."""
    try:
        if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
            dist.destroy_process_group()
    except Exception:  # exiting anyway: never turn a clean exit into a traceback
        pass


atexit.register(destroy_gloo_group_at_exit)

#: how long to wait for the backend to release a tensor: a release takes microseconds, so this
#: only bounds a backend that keeps tensors for good (then nothing is gained by waiting)
RELEASE_TIMEOUT_S = 2.0


def wait_until_released(tensor: torch.Tensor, owners: int,
                        timeout: float = RELEASE_TIMEOUT_S) -> bool:
    """Wait until ``tensor`` has at most ``owners`` C++ references again (the count it had
    before a collective); True when it has. ``time.sleep(0)`` yields the GIL meanwhile."""
    deadline = time.monotonic() + timeout
    while tensor._use_count() > owners:
        if time.monotonic() > deadline:
            return False
        time.sleep(0)
    return True


def all_reduce(tensor: torch.Tensor, op=None, group=None) -> torch.Tensor:
    """``dist.all_reduce`` in place (sum unless ``op``), returning once the backend's worker
    threads no longer hold a CPU ``tensor`` (gloo). CUDA tensors are left to NCCL, whose
    watchdog keeps them until it polls the work: waiting for it would stall every step."""
    owners = tensor._use_count()
    dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, group=group)
    if tensor.device.type == "cpu":
        wait_until_released(tensor, owners)
    return tensor
