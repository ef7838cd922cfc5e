"""Launching the multi-process test workers with torchrun (2 gloo ranks on CPU), and what their
results must show (shared by the tests and the soak runner, ``tests/soak.py``).

Ports and folders never collide between concurrent runs: ``--standalone`` makes torchrun bind its
rendezvous store to port 0 (the kernel picks a free one; the workers reuse the launcher's store),
gloo binds its own sockets to port 0, and every run writes into its own temporary folder. If a
launch still fails on a socket that could not be bound, it is retried and, failing again,
reported as an infrastructure collision, never as a result of the project; a run that wrote its
result is never treated as a collision.
"""

from __future__ import annotations

import math
import pathlib
import re
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKERS = pathlib.Path(__file__).resolve().parent / "distributed"

_KEYS = ("Error", "error:", "Traceback", "terminate", "what()", "Signal", "exitcode", "Exception")
#: what a launch that lost a port race prints (before any worker ran)
COLLISION_SIGNS = ("Address already in use", "EADDRINUSE", "failed to bind",
                   "server socket has failed to listen", "RendezvousConnectionError")
#: how often a launch that lost a port race is retried
COLLISION_RETRIES = 2

#: optim_args per optimizer for the Trainer workers (tiny windows, refresh often)
SHAMPOO_ARGS = "T1=1,T2=2,min_quant_size=0,quant_block_size=8"
TRAINER_OPTIM_ARGS = {
    "microadam": "window_size=3,density=0.1",
    "shampoo_4bit": SHAMPOO_ARGS,
    "shampoo_32bit": "T1=1,T2=2",
    "efcp_mfac": "window_size=4,density=0.1,ef_bits=4",
    "efcp_ggt": "window_size=4,density=0.1,eps=1e-3",
}


@dataclass
class Launch:
    """One finished torchrun launch."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    collisions: int  # launches retried because a port could not be bound

    @property
    def collided(self) -> bool:
        """The last attempt also failed on a port: no verdict on the project."""
        return self.returncode != 0 and is_collision(self.stderr)


def is_collision(stderr: str) -> bool:
    return any(s in stderr for s in COLLISION_SIGNS)


def torchrun_cmd(script, *args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(nproc), str(script), *args]


def launch(script, *args: str, timeout: int = 600, cwd=None, result=None, env=None) -> Launch:
    """Run ``script`` (or ``"-m", module``) on 2 local ranks; a failure that shows a port
    collision and left no ``result`` file is relaunched (at most ``COLLISION_RETRIES`` times)."""
    collisions = 0
    t0 = time.perf_counter()
    while True:
        try:
            proc = subprocess.run(torchrun_cmd(script, *args), capture_output=True, text=True,
                                  timeout=timeout, cwd=cwd, env=env)
            rc, out, err = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, out, err = 124, _text(e.stdout), _text(e.stderr) + f"\n[timed out after {timeout}s]"
        wrote = result is not None and pathlib.Path(result).exists()
        if rc == 0 or wrote or not is_collision(err) or collisions >= COLLISION_RETRIES:
            return Launch(rc, out, err, time.perf_counter() - t0, collisions)
        collisions += 1


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def explain(stderr: str, limit: int = 60) -> str:
    """The stderr lines that say why a launch failed."""
    lines = [line for line in stderr.splitlines()
             if any(k in line for k in _KEYS) and "Warning" not in line]
    return "\n".join(lines[:limit])


def exit_signals(stderr: str) -> list[int]:
    """Signals that ended ranks, from torchrun's failure report (``exitcode: -6`` = SIGABRT)."""
    return sorted({-int(m) for m in re.findall(r"exitcode\s*:?\s*(-\d+)", stderr)})


def torchrun(script, *args: str, timeout: int = 600, log=None, cwd=None, result=None):
    """:func:`launch`; on failure raise with the lines that explain it (the whole stderr is
    written to ``log`` when given). A collision says so: it is not the project's failure."""
    run = launch(script, *args, timeout=timeout, cwd=cwd, result=result)
    if log is not None:
        with open(log, "w") as f:
            f.write(run.stderr)
    if run.collided:
        raise AssertionError(f"torchrun {script}: infrastructure port collision after "
                             f"{run.collisions + 1} launches (no verdict on the project):\n"
                             + explain(run.stderr))
    if run.returncode != 0:
        raise AssertionError(f"torchrun {script} failed (rc {run.returncode}, signals "
                             f"{exit_signals(run.stderr)}):\n" + explain(run.stderr))
    return run


# ------------------------------------------------------------------ what results must show
def fsdp2_problems(res: dict, optim: str) -> list[str]:
    """Where an ``fsdp2_worker.py`` result departs from what FSDP2 must give (empty: none)."""
    out = []

    def need(ok, what):
        if not ok:
            out.append(what)

    need(res["world_size"] == 2, f"world size {res['world_size']} (silent single-process run)")
    if optim in ("microadam", "efcp_mfac", "efcp_ggt", "adamw"):
        # no compression: sharded training equals one process (EFCP all-reduces its inner
        # products over the shards; Shampoo preconditions row blocks, so differs by design)
        need(res["dense_max_diff"] < 1e-5, f"dense vs one process {res['dense_max_diff']}")
    need(res["template_step_changed_params"] is False, "the DCP template step changed params")
    need(res["resume_max_diff"] == 0.0, f"restored run differs by {res['resume_max_diff']}")
    need(res["dtypes_after_load"] == res["dtypes_before"],
         f"state dtypes {res['dtypes_before']} -> {res['dtypes_after_load']}")
    mp = res["mixed_precision"]
    need(mp["param_dtypes"] == ["torch.float32"], f"master dtypes {mp['param_dtypes']}")
    need(math.isfinite(mp["last"]) and mp["last"] < mp["first"],
         f"mixed precision loss {mp['first']} -> {mp['last']}")
    if optim == "adamw":  # torch's optimizer: no packed state, no skip policy
        return out
    shapes = dict(res["full_state_shapes"])
    gram = shapes.pop("gram", None)  # EFCP's m x m matrix: identical on every rank, replicated
    need(gram in (None, [4, 4]), f"gram shape {gram}")
    need(all(s[0] == 2 for s in shapes.values() if s), f"full state lacks a rank: {shapes}")
    need(res["nonfinite_skips_per_rank"] == [1, 1],
         f"NaN skips per rank {res['nonfinite_skips_per_rank']}")
    need(res["skipped_param_unchanged_per_rank"] == [1, 1],
         f"skipped param unchanged per rank {res['skipped_param_unchanged_per_rank']}")
    return out


def trainer_problems(res: dict, sharded: bool = False) -> list[str]:
    """Where a ``ddp_trainer_worker.py`` result departs from DDP's guarantees."""
    out = []
    if res["world_size"] != 2 or res["distributed_type"] != "DistributedType.MULTI_CPU":
        out.append(f"launched as {res['world_size']} x {res['distributed_type']}")
    if not res["params_identical_across_ranks"]:
        out.append("ranks hold different parameters")
    if not sharded and not res["state_identical_across_ranks"]:
        out.append("ranks hold different optimizer state")
    if res["resumed_global_step"] != 6:
        out.append(f"resumed to step {res['resumed_global_step']}")
    if res["resume_max_diff"] != 0.0:
        out.append(f"resumed run differs by {res['resume_max_diff']}")
    if sharded:
        per_rank = res["state_bytes_per_rank"]
        if not min(per_rank) > 0 or max(per_rank) >= 0.8 * sum(per_rank):
            out.append(f"state not split over the ranks: {per_rank} bytes")
    return out


def recipe_problems(res: dict) -> list[str]:
    """Where the main job's ``finetune_results.json`` departs from a 2-rank run that trained."""
    out = []
    if res["world_size"] != 2:
        out.append(f"world size {res['world_size']}")
    losses = [res["eval_loss_before"], res["eval_loss_after"], res["train_loss_mean"]]
    if not all(isinstance(v, float) and math.isfinite(v) for v in losses):
        out.append(f"non-finite losses {losses}")
    return out
