"""What every multi-process test worker does at start and at the end."""

from __future__ import annotations

import faulthandler
import json
import os

import torch.distributed as dist


def start_watchdog() -> None:
    """A hung collective prints every thread's stack and exits instead of blocking the tests
    (``HCO_WORKER_TIMEOUT`` seconds, default 240)."""
    faulthandler.dump_traceback_later(float(os.environ.get("HCO_WORKER_TIMEOUT", 240)), exit=True)


def finish(result: dict, path) -> None:
    """Rank 0 writes ``result`` as JSON; every rank waits for the others, then returns and the
    process exits the ordinary way, through the interpreter's teardown, with the process group
    still alive (as many user scripts do). A crash at exit therefore fails the run (torchrun
    reports the rank's signal) instead of being skipped by ``os._exit``.
    """
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(result, f)
    dist.barrier()
