"""Step time of two checkouts of this package, measured in alternating fresh processes.

Answers "did this change make the step slower?" on a noisy machine: both versions take turns
round by round, so drifts in machine speed hit them alike. Each process times one optimizer on
8.4M parameters (four 2048 x 1024 matrices, one thread): the median of 15 steps after 12
warm-up steps. ``--baseline`` is the root of the other checkout (e.g. made with
``git worktree add /tmp/base HEAD~3``); each process imports the package from its checkout
(``kernels/`` mapped as ``hf_compressed_optim.kernels``, as the install does).

    python -m recipes.benchmarks.step_ab --baseline /tmp/base --rounds 3
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


def child(name: str, root: str) -> float:
    sys.meta_path.insert(0, _CheckoutFinder(root))
    import torch

    import hf_compressed_optim as hco
    from hf_compressed_optim.kernels import layout

    assert hco.__file__.startswith(root) and layout.__file__.startswith(root)

    torch.set_num_threads(1)
    make = {"adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
            "microadam": lambda ps: hco.MicroAdam(ps, lr=1e-3),
            "efcp_mfac": lambda ps: hco.SparseMFAC(ps, lr=1e-4, window_size=32, damp=1e-2),
            "efcp_ggt": lambda ps: hco.SparseGGT(ps, lr=1e-4, window_size=32, eps=1e-3)}[name]
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(2048, 1024, generator=g) * 0.02) for _ in range(4)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    opt = make(params)
    for _ in range(12):
        opt.step()
    times = []
    for _ in range(15):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


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
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(child(args.child, args.root), flush=True)
        return {}
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
