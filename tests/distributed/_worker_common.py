"""What every multi-process test worker does at start and at the end."""

from __future__ import annotations

import faulthandler
import json
import os
import sys

import torch.distributed as dist


def start_watchdog() -> None:
    """A hung collective prints every thread's stack and exits instead of blocking the tests
    (``HCO_WORKER_TIMEOUT`` seconds, default 240)."""
    faulthandler.dump_traceback_later(float(os.environ.get("HCO_WORKER_TIMEOUT", 240)), exit=True)


def finish(result: dict, path) -> None:
    """Rank 0 writes ``result`` as JSON; then every rank exits at once.

    Exiting here skips interpreter teardown: releasing Trainer / DDP / gloo objects after the
    last collective intermittently hangs or aborts ("terminate called without an active
    exception", torch 2.13 on CPU) after every result is already written.
    """
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(result, f)
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
