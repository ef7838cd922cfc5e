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
a gloo process group the script left alive and then waits until gloo's worker threads are idle
(:func:`wait_for_gloo_workers`), for the collectives this package did not issue.

``dist.destroy_process_group()`` alone does not end those threads: it only unregisters the
group, and the threads live as long as the C++ group object: a ``DeviceMesh`` (so every
FSDP2 / DTensor parameter) keeps it, and after DDP, ZeRO or an import of
``torch.distributed.checkpoint`` the threads stay even once those objects are gone (torch
2.13). A release that is still pending when the interpreter finalizes aborts the process as
above, however the script ended.
"""

from __future__ import annotations

import atexit
import os
import platform
import time

import torch
import torch.distributed as dist

__all__ = ["all_reduce", "wait_until_released", "wait_for_gloo_workers",
           "destroy_gloo_group_at_exit"]

def destroy_gloo_group_at_exit() -> None:
    """At interpreter exit (``atexit``, before finalization): destroy a default process group
    that is still alive on gloo, then wait until gloo's worker threads are idle
    (:func:`wait_for_gloo_workers`), so they let go of the tensors of the last collectives while
    Python can still free them. :func:`all_reduce` covers the package's own collectives; this
    covers the ones around it (the Trainer's gathers, ``all_gather_object``, ``barrier``, FSDP2's
    all-gathers and reduce-scatters, DDP's bucket all-reduces), which can otherwise abort the
    process after its work is done, also when the script destroyed its group itself (the
    threads outlive ``destroy_process_group`` while anything references the group). NCCL groups
    are left alone. Registered once when the package is imported."""
    try:
        if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
            dist.destroy_process_group()
    except Exception:  # exiting anyway: never turn a clean exit into a traceback
        pass
    try:
        wait_for_gloo_workers()
    except Exception:
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


#: gloo's worker threads are named so (``c10::setThreadName`` in ``ProcessGroupGloo::runLoop``)
GLOO_WORKER_THREAD_NAME = "pt_gloo_runloop"
#: the number of the ``futex`` system call as ``/proc/<pid>/task/<tid>/syscall`` shows it
_FUTEX_SYSCALL = {"x86_64": "202", "aarch64": "98", "arm64": "98"}.get(platform.machine())


def _gloo_worker_tids() -> list[str] | None:
    """Thread ids of this process's gloo worker threads (every group's); None without /proc."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    out = []
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() == GLOO_WORKER_THREAD_NAME:
                    out.append(tid)
        except OSError:  # the thread ended meanwhile
            pass
    return out


def _worker_idle(tid: str) -> bool:
    """The worker waits for new work: blocked in ``futex`` with no timeout (the condition
    variable of its empty queue). A worker releasing a finished collective's tensors is running,
    or waits for the GIL, which Python waits for with a timeout: neither counts as idle."""
    try:
        with open(f"/proc/self/task/{tid}/syscall") as f:
            fields = f.read().split()
    except (FileNotFoundError, ProcessLookupError):  # the thread ended
        return True
    return len(fields) >= 5 and fields[0] == _FUTEX_SYSCALL and int(fields[4], 16) == 0


def wait_for_gloo_workers(timeout: float = RELEASE_TIMEOUT_S, polls: int = 3) -> bool | None:
    """Wait until every gloo worker thread of the process has been idle for ``polls``
    consecutive checks, yielding the GIL between checks (a worker that still holds the tensors
    of a finished collective needs the GIL to free them). True once idle (or no worker thread
    is left), False on ``timeout`` (a collective still running, e.g. a peer gone), None where
    threads cannot be inspected (no readable ``/proc``, or an architecture whose futex system call
    number is not listed here): nothing is waited for.

    Call it after a script's last collective when the process is about to exit; the package
    calls it at exit (:func:`destroy_gloo_group_at_exit`). Linux only; costs a few ms."""
    deadline = time.monotonic() + timeout
    streak = 0
    while True:
        tids = _gloo_worker_tids() if _FUTEX_SYSCALL else None
        if tids is None:
            return None
        if not tids:
            return True
        try:
            idle = all(_worker_idle(t) for t in tids)
        except OSError:  # the syscall file is not readable here (ptrace restrictions)
            return None
        streak = streak + 1 if idle else 0
        if streak >= polls:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)  # releases the GIL to a worker waiting for it
