"""Launching the multi-process test workers with torchrun (2 gloo ranks on CPU)."""

from __future__ import annotations

import subprocess
import sys

_KEYS = ("Error", "error:", "Traceback", "terminate", "what()", "Signal", "exitcode", "Exception")


def torchrun(script, *args: str, timeout: int = 600, log=None,
             cwd=None) -> subprocess.CompletedProcess:
    """Run ``script`` (or ``"-m", module``) on 2 local ranks from ``cwd``; on failure raise with
    the lines that explain it (the whole stderr is written to ``log`` when given)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if log is not None:
        with open(log, "w") as f:
            f.write(proc.stderr)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines()
                 if any(k in line for k in _KEYS) and "Warning" not in line]
        raise AssertionError(f"torchrun {script} failed (rc {proc.returncode}):\n"
                             + "\n".join(lines[:60]))
    return proc
