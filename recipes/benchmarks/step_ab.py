"""Step time of two checkouts of this package, measured in alternating fresh processes.

Answers "did this change make the step slower?" on a noisy machine: both versions take turns
round by round, so drifts in machine speed hit them alike. Each process times one optimizer on
8.4M parameters (four 2048 x 1024 matrices, one thread): the median of 15 steps after 12
warm-up steps. ``--baseline`` is the root of the other checkout (e.g. made with
``git worktree add /tmp/base HEAD~3``); each process imports the package from its checkout
(``kernels/`` mapped as ``hf_compressed_optim.kernels``, as the install does).

    python -m recipes.benchmarks.step_ab --baseline /tmp/base --rounds 3

``--ratios`` instead times every optimizer against torch AdamW(foreach) in ONE process per
checkout, rounds interleaved (each round: a block of steps of each optimizer in turn), and
reports the median over rounds of each optimizer's step time as a ratio to AdamW's, by wall
clock and by the process's CPU time (which other jobs on the machine disturb less); with
``--baseline`` the baseline checkout's process runs too, alternating with the candidate's:

    python -m recipes.benchmarks.step_ab --ratios --baseline /tmp/base --rounds 7
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from .common import REPO

OPTIMIZERS = ("adamw", "microadam", "efcp_mfac", "efcp_ggt")


class _CheckoutFinder:
    """Imports ``hf_compressed_optim`` from one checkout, ahead of whatever is installed (its
    ``kernels`` through the package's link, or, in checkouts before the link, from the top-level
    ``kernels/`` package as the install mapped it)."""

    def __init__(self, root: str):
        self.dirs = {"hf_compressed_optim": os.path.join(root, "hf_compressed_optim")}
        if os.path.exists(os.path.join(root, "kernels", "__init__.py")):
            self.dirs["hf_compressed_optim.kernels"] = os.path.join(root, "kernels")

    def find_spec(self, fullname, path=None, target=None):
        import importlib.util

        where = self.dirs.get(fullname)
        if where is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, os.path.join(where, "__init__.py"), submodule_search_locations=[where])


def _factories(root: str) -> dict:
    sys.meta_path.insert(0, _CheckoutFinder(root))
    import torch

    import hf_compressed_optim as hco
    from hf_compressed_optim.kernels import layout

    assert hco.__file__.startswith(root) and layout.__file__.startswith(root)

    torch.set_num_threads(1)
    return {"adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
            "microadam": lambda ps: hco.MicroAdam(ps, lr=1e-3),
            "efcp_mfac": lambda ps: hco.SparseMFAC(ps, lr=1e-4, window_size=32, damp=1e-2),
            "efcp_ggt": lambda ps: hco.SparseGGT(ps, lr=1e-4, window_size=32, eps=1e-3)}


def _model(seed: int = 0) -> list:
    """Four 2048 x 1024 matrices (8.4M parameters) with gradients."""
    import torch

    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(2048, 1024, generator=g) * 0.02) for _ in range(4)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return params


def child(name: str, root: str) -> float:
    opt = _factories(root)[name](_model())
    for _ in range(12):
        opt.step()
    times = []
    for _ in range(15):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


#: kernel ops whose CPU time ``--ratios`` also reports per step (module, function)
#: (the native loops of the CPU backend and the twins; a native op whose inputs it does not take
#: runs its twin inside, counted in both; ops a checkout lacks are skipped)
BREAKDOWN_OPS = (("quant4", "dequantize4"), ("quant4", "quantize4"), ("topk", "block_topk"),
                 ("topk", "gather_block_values"), ("topk", "scatter_block_values"),
                 ("window_adam", "window_adam_update"), ("sparse_rows", "sparse_rows_dot"),
                 ("sparse_rows", "sparse_rows_combine"),
                 ("error_feedback", "error_feedback_compress_native"),
                 ("window_adam", "window_adam_update_native"),
                 ("sparse_rows", "sparse_rows_dot_native"),
                 ("sparse_rows", "sparse_rows_dot_slot_native"),
                 ("sparse_rows", "sparse_rows_combine_native"))


def _time_ops(spent: dict) -> None:
    """Wrap the kernel twins so that the CPU seconds spent in each add up in ``spent`` (the
    dispatcher and the composed twins look them up per call, so the wrappers see every call)."""
    import importlib

    for mod_name, fn in BREAKDOWN_OPS:
        mod = importlib.import_module(f"hf_compressed_optim.kernels.{mod_name}")
        inner = getattr(mod, fn, None)
        if inner is None:
            continue

        def timed(*a, _inner=inner, _fn=fn, **kw):
            t0 = time.process_time()
            try:
                return _inner(*a, **kw)
            finally:
                spent[_fn] = spent.get(_fn, 0.0) + time.process_time() - t0
        setattr(mod, fn, timed)


def child_ratios(root: str, names: list[str], rounds: int, block: int) -> dict:
    """Median over interleaved rounds of each optimizer's mean step time (wall and CPU), ms,
    and the CPU ms per step spent in each kernel twin (nested calls count in both)."""
    factories = _factories(root)
    spent: dict = {}
    _time_ops(spent)
    ops: dict = {n: {} for n in names}
    opts = {n: factories[n](_model()) for n in names}
    for opt in opts.values():  # warm-up: windows filled, allocator settled
        for _ in range(12):
            opt.step()
    wall: dict = {n: [] for n in names}
    cpu: dict = {n: [] for n in names}
    for _ in range(rounds):
        for n, opt in opts.items():
            spent.clear()
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(block):
                opt.step()
            wall[n].append((time.perf_counter() - w0) / block * 1e3)
            cpu[n].append((time.process_time() - c0) / block * 1e3)
            for fn, sec in spent.items():
                ops[n].setdefault(fn, []).append(sec / block * 1e3)
    return {n: dict(wall_ms=statistics.median(wall[n]), cpu_ms=statistics.median(cpu[n]),
                    wall_rounds=wall[n], cpu_rounds=cpu[n],
                    ops_cpu_ms={fn: statistics.median(v) for fn, v in ops[n].items()})
            for n in names}


#: glibc malloc settings of the ``--ratios`` children (``--default-malloc``: none). With glibc's
#: dynamic thresholds an 8 MiB temporary is sometimes reused and sometimes a fresh, page-faulting
#: mapping, depending on what else the process freed: AdamW's step measured 17 ms in one process
#: and 33-36 ms in every round of another. Fixed at 32 MiB (the dynamic threshold's ceiling),
#: every optimizer's temporaries are reused, as they are in a long run once the threshold rose.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}


def run_ratios(root: str, names: list[str], rounds: int, block: int,
               default_malloc: bool = False) -> dict:
    env = dict(os.environ) if default_malloc else {**os.environ, **STEADY_MALLOC}
    out = subprocess.run([sys.executable, "-m", "recipes.benchmarks.step_ab", "--child-ratios",
                          ",".join(names), "--root", root, "--rounds", str(rounds),
                          "--block", str(block)], cwd=REPO, capture_output=True, text=True,
                         timeout=3600, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ratios(args) -> dict:
    names = ["adamw"] + [n for n in args.optimizers if n != "adamw"]
    roots = [("candidate", args.candidate)] + ([("baseline", args.baseline)]
                                               if args.baseline else [])
    res = {which: run_ratios(os.path.abspath(root), names, args.rounds, args.block,
                             args.default_malloc)
           for which, root in roots}
    for which, r in res.items():
        base = r["adamw"]
        for n in names:
            r[n]["ratio_wall"] = r[n]["wall_ms"] / base["wall_ms"]
            r[n]["ratio_cpu"] = r[n]["cpu_ms"] / base["cpu_ms"]
            # the median of each round's own ratio: AdamW ran next to it in that round, so
            # slow phases of a shared machine cancel better than in the ratio of medians
            r[n]["ratio_cpu_paired"] = statistics.median(
                c / a for c, a in zip(r[n]["cpu_rounds"], base["cpu_rounds"]))
            print(f"{which:9s} {n:10s} wall {r[n]['wall_ms']:7.1f} ms ({r[n]['ratio_wall']:.2f}x)"
                  f"  cpu {r[n]['cpu_ms']:7.1f} ms ({r[n]['ratio_cpu']:.2f}x, per round "
                  f"{r[n]['ratio_cpu_paired']:.2f}x)  "
                  + ", ".join(f"{fn} {ms:.1f}" for fn, ms in r[n]["ops_cpu_ms"].items()))
    print(json.dumps(res))
    return res


def run(root: str, name: str) -> float:
    """One fresh process importing the package from checkout ``root``."""
    out = subprocess.run([sys.executable, "-m", "recipes.benchmarks.step_ab", "--child", name,
                          "--root", root], cwd=REPO, capture_output=True, text=True, timeout=900,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", help="root of the checkout to compare against")
    ap.add_argument("--candidate", default=REPO, help="root of the checkout under test")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--optimizers", nargs="*", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    ap.add_argument("--ratios", action="store_true",
                    help="every optimizer against AdamW in one process, rounds interleaved")
    ap.add_argument("--block", type=int, default=3, help="steps per optimizer per round (--ratios)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="(--ratios) leave glibc's malloc thresholds dynamic (see STEADY_MALLOC)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-ratios", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(child(args.child, args.root), flush=True)
        return {}
    if args.child_ratios:
        print(json.dumps(child_ratios(args.root, args.child_ratios.split(","), args.rounds,
                                      args.block)), flush=True)
        return {}
    if args.ratios:
        return ratios(args)
    if not args.baseline:
        ap.error("--baseline is required")
    ms: dict = {n: {"baseline": [], "candidate": []} for n in args.optimizers}
    for _ in range(args.rounds):
        for name in args.optimizers:
            for which, root in (("baseline", args.baseline), ("candidate", args.candidate)):
                ms[name][which].append(run(os.path.abspath(root), name))
    for name, r in ms.items():
        b, c = statistics.median(r["baseline"]), statistics.median(r["candidate"])
        print(f"{name:10s} baseline {b:7.1f} ms  candidate {c:7.1f} ms  ratio {c / b:.2f}  "
              f"(rounds: {[round(x) for x in r['baseline']]} / {[round(x) for x in r['candidate']]})")
    print(json.dumps(ms))
    return ms


if __name__ == "__main__":
    main()
