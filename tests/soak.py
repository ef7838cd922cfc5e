"""Soak test of the multi-process paths: every (path, optimizer) pair launched N times under
torchrun (2 gloo ranks on CPU), ``--jobs`` launches at once, then a table of exit codes and
result mismatches. A run passes only when its ranks exit 0 *and* its result shows what the path
guarantees; a run that did its work and then died at exit is counted apart ("exit crash")::

    python tests/soak.py --runs 50 --paths fsdp2 --optims efcp_mfac efcp_ggt
    python tests/soak.py --runs 5            # every path x every optimizer

Paths (the workers of tests/distributed/ and the main job, with the checks the tests use):

* ``ddp``: DDP through the Trainer (``ddp_trainer_worker.py``): ranks hold identical parameters
  and state; a resume from the step-3 checkpoint continues exactly;
* ``zero1``: the same with ``optim_args shard_state=true`` (ZeRO-1): ranks agree on parameters,
  the state is split between them, the resume is exact;
* ``fsdp2``: raw ``fully_shard`` with a DCP save / restore into a fresh optimizer, then training
  on (``fsdp2_worker.py``): restored run bit-identical, both ranks' state in the full state dict;
* ``trainer``: the main job, ``recipes/finetune_llama.py``, under torchrun.

``adamw`` (torch's AdamW, ``adamw_torch`` in the Trainer) is the control; ``zero1`` does not
apply to it (``shard_state`` is this package's option). Each run gets its own temporary folder
(kept on failure) and torchrun's port-0 rendezvous; see ``_dist_utils`` for collisions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _dist_utils import (  # noqa: E402
    ROOT, TRAINER_OPTIM_ARGS, WORKERS, exit_signals, explain, fsdp2_problems, launch,
    recipe_problems, trainer_problems,
)

OPTIMIZERS = ("microadam", "shampoo_4bit", "shampoo_32bit", "efcp_mfac", "efcp_ggt", "adamw")
PATHS = ("ddp", "zero1", "fsdp2", "trainer")
VERDICTS = ("ok", "exit crash", "mismatch", "failed", "timeout", "collision")

RECIPE_SIZE = ("--hidden_size", "32", "--intermediate_size", "64", "--num_hidden_layers", "1",
               "--num_attention_heads", "2", "--block_size", "32", "--per_device_train_batch_size",
               "2", "--max_train_blocks", "64", "--max_eval_blocks", "8", "--warmup_steps", "0",
               "--max_steps", "4")


def _trainer_optim(optim: str, shard: bool = False) -> list[str]:
    if optim == "adamw":
        return ["--optim", "adamw_torch"]
    args = TRAINER_OPTIM_ARGS[optim] + (",shard_state=true" if shard else "")
    return ["--optim", optim, "--optim_args", args]


def plan(path: str, optim: str, run_dir: str):
    """``(script, args, result file, checker)`` of one run, or None where the pair does not
    apply. ``checker(result dict) -> list of problems``."""
    if path in ("ddp", "zero1"):
        if path == "zero1" and optim == "adamw":
            return None
        shard = path == "zero1"
        return (WORKERS / "ddp_trainer_worker.py",
                [*_trainer_optim(optim, shard), "--out_dir", run_dir],
                os.path.join(run_dir, "result.json"),
                lambda res: trainer_problems(res, sharded=shard))
    if path == "fsdp2":
        out = os.path.join(run_dir, "result.json")
        return (WORKERS / "fsdp2_worker.py",
                ["--optim", optim, "--ckpt", os.path.join(run_dir, "ckpt"), "--out", out], out,
                lambda res: fsdp2_problems(res, optim))
    if path == "trainer":
        return (ROOT / "recipes" / "finetune_llama.py",
                ["--use_cpu", *_trainer_optim(optim), *RECIPE_SIZE, "--output_dir", run_dir],
                os.path.join(run_dir, "finetune_results.json"), recipe_problems)
    raise ValueError(f"unknown path {path!r}; choose from {PATHS}")


def verdict(returncode: int, stderr: str, collided: bool, result, problems: list[str]) -> str:
    """One run's verdict. A result that departs from the guarantees is a ``mismatch`` whatever
    the exit code; a correct result with a non-zero exit is an ``exit crash`` (the job did its
    work, then died: what a scheduler or CI still sees as a failure)."""
    if result is not None:
        if problems:
            return "mismatch"
        if returncode != 0 or "terminate called" in stderr:
            return "exit crash"
        return "ok"
    if collided:
        return "collision"
    return "timeout" if returncode == 124 else "failed"


@dataclass
class Run:
    path: str
    optim: str
    index: int
    verdict: str
    returncode: int
    seconds: float
    collisions: int
    signals: list[int] = field(default_factory=list)
    detail: str = ""
    folder: str = ""


def run_one(path: str, optim: str, index: int, timeout: int, keep: bool) -> Run:
    run_dir = tempfile.mkdtemp(prefix=f"hco-soak-{path}-{optim}-{index}-")
    script, args, result_file, checker = plan(path, optim, run_dir)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = launch(script, *args, timeout=timeout, cwd=str(ROOT), result=result_file, env=env)
    result, problems = None, []
    if os.path.exists(result_file):
        try:
            with open(result_file) as f:
                result = json.load(f)
            problems = checker(result)
        except (ValueError, KeyError, TypeError) as e:  # a truncated or malformed result
            result, problems = {}, [f"unreadable result: {e!r}"]
    v = verdict(out.returncode, out.stderr, out.collided, result, problems)
    with open(os.path.join(run_dir, "stderr.txt"), "w") as f:
        f.write(out.stderr)
    detail = "; ".join(problems) if problems else ("" if v == "ok" else explain(out.stderr, 6))
    if v == "ok" and not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir = ""
    return Run(path, optim, index, v, out.returncode, out.seconds, out.collisions,
               exit_signals(out.stderr), detail, run_dir)


def soak(paths, optims, runs: int, jobs: int = 2, timeout: int = 600, keep: bool = False,
         log=print) -> list[Run]:
    """Every applicable (path, optimizer) pair ``runs`` times, ``jobs`` launches at once."""
    todo = [(p, o, i) for i in range(runs) for p in paths for o in optims
            if plan(p, o, "") is not None]
    done: list[Run] = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run_one, p, o, i, timeout, keep) for p, o, i in todo]
        for n, fut in enumerate(futures, 1):
            r = fut.result()
            done.append(r)
            extra = f" signals {r.signals}" if r.signals else ""
            extra += f" ({r.collisions} port collision retries)" if r.collisions else ""
            log(f"[{n}/{len(todo)}] {r.path:7s} {r.optim:13s} #{r.index:<3d} {r.verdict:10s} "
                f"rc {r.returncode:3d} {r.seconds:6.1f}s{extra}"
                + (f"\n    {r.detail}\n    kept: {r.folder}" if r.verdict != "ok" else ""))
    return done


def summary(done: list[Run]) -> str:
    """The markdown table: one row per (path, optimizer)."""
    rows = ["| path | optimizer | runs | ok | exit crash | mismatch | failed/timeout | "
            "port collisions (retried) | median s |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    pairs = sorted({(r.path, r.optim) for r in done},
                   key=lambda k: (PATHS.index(k[0]), OPTIMIZERS.index(k[1])))
    for path, optim in pairs:
        rs = [r for r in done if (r.path, r.optim) == (path, optim)]
        count = {v: sum(r.verdict == v for r in rs) for v in VERDICTS}
        rows.append(f"| {path} | {optim} | {len(rs)} | {count['ok']} | {count['exit crash']} | "
                    f"{count['mismatch']} | {count['failed'] + count['timeout']} | "
                    f"{count['collision']} ({sum(r.collisions for r in rs)}) | "
                    f"{statistics.median(r.seconds for r in rs):.1f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="runs per (path, optimizer)")
    ap.add_argument("--jobs", type=int, default=2, help="launches at once")
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    ap.add_argument("--optims", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    ap.add_argument("--timeout", type=int, default=600, help="seconds per launch")
    ap.add_argument("--keep", action="store_true", help="keep the folders of passing runs")
    ap.add_argument("--json", default=None, help="write every run's record here")
    args = ap.parse_args(argv)
    t0 = time.time()
    done = soak(args.paths, args.optims, args.runs, args.jobs, args.timeout, args.keep,
                log=lambda s: print(s, flush=True))
    print(f"\n{len(done)} runs, {args.jobs} at once, {time.time() - t0:.0f}s wall\n")
    print(summary(done))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ for r in done], f, indent=1)
    return 0 if all(r.verdict == "ok" for r in done) else 1


if __name__ == "__main__":
    sys.exit(main())
