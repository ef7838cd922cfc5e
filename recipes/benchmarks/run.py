#!/usr/bin/env python
"""Side-by-side benchmark of every optimizer: memory, step time and convergence, with plots.

One command measures AdamW (foreach and fused), MicroAdam, Sparse M-FAC, Sparse GGT, 4-bit and
32-bit Shampoo and, where they import, bitsandbytes AdamW8bit and torchao AdamW8bit / AdamW4bit,
then writes ``results.json``, PNG plots and ``report.md`` into ``--out``::

    python -m recipes.benchmarks.run all --peers-path /path/to/peers \\
        --update-benchmarks BENCHMARKS.md           # the full report (about an hour on 2 CPU cores)
    python -m recipes.benchmarks.run all --quick    # smoke run, under 5 minutes on 2 CPU cores
    python -m recipes.benchmarks.run speed          # one phase; merged into an existing results.json
    python -m recipes.benchmarks.run report         # re-render tables and plots, measure nothing

Phases (subcommands): ``memory`` (state bytes per parameter at several model sizes, EFCP's window
against dense M-FAC, Shampoo's preconditioners, peak training memory), ``speed`` (optimizer step
time as a ratio to AdamW at several model sizes), ``convergence`` (a LLaMA on offline text and a
CNN on real digit images: per-optimizer lr sweep, then several seeds), ``report``, ``all``.
See ``measure.py`` and ``convergence.py`` for the exact protocols.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

from . import convergence, measure, report
from . import tasks as T
from .common import (REPO, add_peers_path, llama_param_count, machine_info, peer_versions,
                     report_to_parent, versions)
from .roster import BUDGET_OVERRIDES, build_roster, select

DEFAULT_OUT = os.path.join(REPO, "recipes", "results", "report")
MARK_BEGIN = "<!-- side-by-side report: begin (written by recipes/benchmarks/run.py) -->"
MARK_END = "<!-- side-by-side report: end -->"

#: Settings of the full report and of the ``--quick`` smoke run.
SETTINGS = {
    "full": dict(memory_sizes=["s", "m", "l"], peak_size="l", peak_steps=5, peak_batch=8,
                 peak_block=128, efcp_default_window=1024,
                 speed_sizes=["s", "m", "l", "xl"], speed_block=50, speed_rounds=3,
                 speed_warmup=10,
                 text=dict(size="s", block=64, batch=16, n_val=64, n_test=128, steps=300,
                           max_train_blocks=None),
                 finetune=dict(pretrain_steps=300, pretrain_lr=1e-3, steps=150),
                 digits=dict(batch=64, steps=300, max_train=None),
                 eval_every=25, seeds=3),
    "quick": dict(memory_sizes=["s"], peak_size="xs", peak_steps=2, peak_batch=2,
                  peak_block=32, efcp_default_window=256,
                  speed_sizes=["xs", "s"], speed_block=2, speed_rounds=2, speed_warmup=1,
                  text=dict(size="xs", block=32, batch=8, n_val=16, n_test=32, steps=30,
                            max_train_blocks=512),
                  finetune=dict(pretrain_steps=20, pretrain_lr=3e-3, steps=20),
                  digits=dict(batch=32, steps=30, max_train=512),
                  eval_every=10, seeds=2),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["all", "memory", "speed", "convergence", "report", "_peak"])
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes and budgets: checks the pipeline, measures nothing useful")
    ap.add_argument("--out", default=None,
                    help=f"output folder (default {os.path.relpath(DEFAULT_OUT, REPO)}; "
                         "with --quick a 'quick' subfolder of it)")
    ap.add_argument("--peers-path", default=os.environ.get("HCO_PEERS_PATH"),
                    help="folder made by `pip install --target` holding bitsandbytes / torchao")
    ap.add_argument("--no-peers", action="store_true", help="skip bitsandbytes and torchao")
    ap.add_argument("--optimizers", nargs="*", default=None,
                    help="a subset of the roster (and variants such as microadam_alpha0.25); "
                         "their figures replace theirs in results.json, the others stay")
    ap.add_argument("--tasks", nargs="*", default=["text", "finetune", "digits"],
                    choices=["text", "finetune", "digits"],
                    help="convergence tasks to (re)measure; the others keep their results")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per optimizer at its best lr")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--update-benchmarks", default=None, metavar="MARKDOWN",
                    help="also splice report.md into this file between the report markers")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    # internal: the peak-memory child process
    ap.add_argument("--optim", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--block", type=int, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def command_line(argv: list[str]) -> str:
    """The command as a reader would retype it: paths inside the repository relative to it,
    the peers folder (which lives outside) as a placeholder."""
    words = []
    for i, a in enumerate(argv):
        if i and argv[i - 1] == "--peers-path":
            a = "<peers-dir>"
        elif os.path.isabs(a):
            a = os.path.relpath(a, REPO) if a.startswith(REPO + os.sep) else os.path.basename(a)
        words.append(a)
    return " ".join(["python -m recipes.benchmarks.run"] + words)


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr,
                mininterval=1.0 if sys.stderr.isatty() else 30.0, dynamic_ncols=True)


# ------------------------------------------------------------------ phases
def phase_memory(cfg, roster, device, peers_path, quick, show) -> dict:
    sizes = {}
    bar = progress_bar(len(cfg["memory_sizes"]) * len(roster) + len(roster) + 2,
                       "memory", show)
    small = cfg["memory_sizes"][0]
    for size in cfg["memory_sizes"]:
        params = measure.params_with_grads(size, device)
        if size == small:
            small_params = params
        rows = {}
        for name, entry in roster.items():
            try:
                rows[name] = measure.state_bytes(entry, params)
            except Exception as err:
                rows[name] = dict(error=f"{type(err).__name__}: {err}"[:300])
            bar.update(1)
        sizes[size] = dict(params=sum(p.numel() for p in params), optimizers=rows)
    out = dict(sizes=sizes, largest=cfg["memory_sizes"][-1])
    ours = sizes[small]["optimizers"].get("efcp_mfac", {})
    if "by_category" in ours:  # against dense M-FAC, on the smallest size (dense is 4·m B/param)
        out["efcp_window"] = measure.efcp_window_comparison(
            small_params, ours, BUDGET_OVERRIDES["efcp_mfac"][0]["window_size"],
            cfg["efcp_default_window"])
    bar.update(2)
    big_rows = sizes[out["largest"]]["optimizers"]
    if "by_category" in big_rows.get("shampoo_4bit", {}) and \
            "by_category" in big_rows.get("shampoo_32bit", {}):
        b4 = big_rows["shampoo_4bit"]["by_category"]["preconditioner"]
        b32 = big_rows["shampoo_32bit"]["by_category"]["preconditioner"]
        out["shampoo_preconditioner"] = dict(bits4_bytes_per_param=b4,
                                             bits32_bytes_per_param=b32, ratio=b32 / b4)
    peak = measure.run_peak_children(list(roster), cfg["peak_size"], cfg["peak_steps"],
                                     cfg["peak_batch"], cfg["peak_block"], device, quick,
                                     peers_path, progress=bar)
    bar.close()
    methods = {r["method"] for r in peak.values() if "method" in r}
    out["peak"] = dict(size=cfg["peak_size"], params=llama_param_count(cfg["peak_size"]),
                       steps=cfg["peak_steps"], batch=cfg["peak_batch"], block=cfg["peak_block"],
                       method=", ".join(sorted(methods)) or "-", optimizers=peak)
    return out


def phase_speed(cfg, roster, device, show) -> dict:
    import torch

    sizes = {}
    per_size = len(roster) * (1 + cfg["speed_rounds"])
    bar = progress_bar(per_size * len(cfg["speed_sizes"]), "speed", show)
    for size in cfg["speed_sizes"]:
        params = measure.params_with_grads(size, device)
        sizes[size] = dict(params=sum(p.numel() for p in params),
                           optimizers=measure.step_times(roster, params, device,
                                                         cfg["speed_block"], cfg["speed_rounds"],
                                                         cfg["speed_warmup"], progress=bar))
        del params
    bar.close()
    return dict(sizes=sizes, largest=cfg["speed_sizes"][-1], block=cfg["speed_block"],
                rounds=cfg["speed_rounds"], warmup=cfg["speed_warmup"],
                threads=torch.get_num_threads())


def phase_convergence(cfg, roster, device, tasks_wanted, show) -> dict:
    out = {}
    for name in tasks_wanted:
        extra = {}
        t = cfg["text"]
        text_args = (t["size"], t["block"], t["batch"], t["n_val"], t["n_test"], device)
        if name == "text":
            task = T.TextTask(*text_args, max_train_blocks=t["max_train_blocks"])
            steps = t["steps"]
        elif name == "finetune":
            f = cfg["finetune"]
            base_task = T.TextTask(*text_args, max_train_blocks=t["max_train_blocks"],
                                   modules=T.base_modules(), name="pretrain")
            base_state, extra["pretrain"] = convergence.pretrain(
                base_task, f["pretrain_steps"], f["pretrain_lr"], cfg["eval_every"])
            task = T.TextTask(*text_args, max_train_blocks=t["max_train_blocks"],
                              modules=T.FINETUNE_MODULES, name="finetune", base_state=base_state,
                              what=f"pretrained with AdamW (lr {f['pretrain_lr']:g}, "
                                   f"{f['pretrain_steps']} steps) on the corpus without the "
                                   f"networking / e-mail / markup modules, then fine-tuned on "
                                   f"those modules' docstrings")
            steps = f["steps"]
        else:
            if not T.digits_available():
                print("convergence: scikit-learn is not installed, skipping the digits task "
                      "(pip install scikit-learn)", file=sys.stderr)
                continue
            t = cfg["digits"]
            task = T.DigitsTask(t["batch"], device, max_train=t["max_train"])
            steps = t["steps"]
        bar = progress_bar(convergence.sweep_runs(roster, name, cfg["seeds"]),
                           f"convergence {name}", show)
        res = convergence.run_task(task, roster, steps, cfg["seeds"], cfg["eval_every"],
                                   progress=bar, log=(lambda m: bar.write(m, file=sys.stderr)))
        bar.close()
        out[name] = dict(description=task.description, steps=steps, seeds=cfg["seeds"],
                         eval_every=cfg["eval_every"], optimizers=res, **extra)
    return out


def merge_optimizers(old, new):
    """``new`` over ``old``, keeping the entries of ``old["...optimizers"]`` that ``new`` did not
    measure: rerunning a few optimizers (``--optimizers``) keeps everyone else's figures."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    out = dict(old)
    for key, value in new.items():
        if key == "optimizers" and isinstance(old.get(key), dict):
            out[key] = {**old[key], **value}
        else:
            out[key] = merge_optimizers(old.get(key), value)
    return out


# ------------------------------------------------------------------ output
def _json_safe(obj):
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def render(res: dict, out_dir: str, update: str | None) -> str:
    """Plots + report.md in ``out_dir``; optionally splice the report into ``update``."""
    paths = report.write_plots(res, out_dir)
    rel = {k: os.path.relpath(v, out_dir) for k, v in paths.items()}
    text = report.markdown(res, rel)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(text)
    if update:
        rel = {k: os.path.relpath(v, os.path.dirname(os.path.abspath(update)))
               for k, v in paths.items()}
        body = report.markdown(res, rel)
        old = open(update).read() if os.path.exists(update) else ""
        block = f"{MARK_BEGIN}\n{body}{MARK_END}"
        if MARK_BEGIN in old and MARK_END in old:
            head, rest = old.split(MARK_BEGIN, 1)
            new = head + block + rest.split(MARK_END, 1)[1]
        else:
            new = old.rstrip() + "\n\n" + block + "\n"
        with open(update, "w") as f:
            f.write(new)
    return text


def main(argv=None) -> dict:
    args = parse_args(argv)
    add_peers_path(args.peers_path)
    import warnings

    warnings.filterwarnings("ignore", message=".*(lr_scheduler|TypedStorage|_stable_hash).*")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.phase == "_peak":
        r = measure.peak_child(args.optim, args.size, args.steps, args.batch, args.block, device,
                               args.quick)
        return report_to_parent(r)

    mode = "quick" if args.quick else "full"
    cfg = dict(SETTINGS[mode])
    if args.seeds:
        cfg["seeds"] = args.seeds
    out_dir = args.out or (os.path.join(DEFAULT_OUT, "quick") if args.quick else DEFAULT_OUT)
    os.makedirs(out_dir, exist_ok=True)
    results_path = os.path.join(out_dir, "results.json")
    res = json.load(open(results_path)) if os.path.exists(results_path) else {}
    if args.phase != "report":
        subset = bool(args.optimizers)
        roster = select(build_roster(include_peers=not args.no_peers, quick=args.quick,
                                     variants=subset), args.optimizers)
        pv = peer_versions() if not args.no_peers else {}
        show = not args.no_progress
        cmd = command_line(argv if argv is not None else sys.argv[1:])
        res["meta"] = dict(
            command=cmd, date=datetime.date.today().isoformat(), mode=mode, device=device,
            device_name=(torch.cuda.get_device_name() if device.startswith("cuda")
                         else "CPU"),
            machine=machine_info(), versions=versions(), settings=cfg,
            results_path=os.path.relpath(results_path, REPO),
            # a subset run keeps the other optimizers' figures, the peers' among them
            peers_missing=[] if subset else [k for k, v in pv.items()
                                             if v.startswith("unavailable")])
        # merged: figures of optimizers not measured in this run (variants, other phases) stay
        res["roster"] = {**res.get("roster", {}),
                         **{k: dict(family=e.family, note=e.note, lr_grid=e.lr_grid,
                                    same_math_as=e.same_math_as) for k, e in roster.items()}}
        res["meta"]["overrides"] = {k: v[1] for k, v in BUDGET_OVERRIDES.items()
                                    if k in res["roster"]}
        phases = {"memory": lambda: phase_memory(cfg, roster, device, args.peers_path,
                                                 args.quick, show),
                  "speed": lambda: phase_speed(cfg, roster, device, show),
                  "convergence": lambda: phase_convergence(cfg, roster, device, args.tasks,
                                                           show)}
        for phase, measure_phase in phases.items():
            if args.phase in ("all", phase):
                new = measure_phase()
                if phase == "convergence":  # per task: rerunning one task keeps the others
                    new = {**res.get(phase, {}), **new} if not subset else new
                    done = [f"convergence/{t}" for t in args.tasks]
                else:
                    done = [phase]
                res[phase] = merge_optimizers(res.get(phase, {}), new) if subset else new
                for key in done:
                    if subset:
                        key += f" [{', '.join(roster)}]"
                    res.setdefault("runs", {})[key] = dict(command=cmd, date=res["meta"]["date"])
                with open(results_path, "w") as f:  # after each phase: a crash loses one phase
                    json.dump(_json_safe(res), f, indent=1)
    elif not res:
        raise SystemExit(f"report: no {results_path}; run a measuring phase first")
    text = render(res, out_dir, args.update_benchmarks)
    print(text)
    return res


if __name__ == "__main__":
    main()
