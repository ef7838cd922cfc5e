"""Training throughput in the HF Trainer: samples/s of forward + backward + optimizer step for
each optimizer against AdamW (``adamw_torch``), with the process's peak resident memory.

What a user feels end to end, where the step-time benchmarks (``run speed``, ``step_ab``) time
``optimizer.step()`` alone. Each measurement is one fresh process (``python -m
recipes.benchmarks.throughput --child ...``) that builds the model and data with the main job's
own code (:mod:`recipes.finetune_llama`: its argument parser, model builder and offline corpus),
trains ``--warmup`` + ``--steps`` steps with ``Trainer(optim=...)`` and times the steps after the
warm-up with a callback (the time between the ends of consecutive steps: data, forward, backward,
gradient clipping, step, zero_grad). Rounds are interleaved (round r runs every optimizer once, so
drifts in machine speed hit all alike). The table's samples/s is batch x timed steps / the sum
over timed steps of each step's fastest round; next to it, the same with each step's median
round. Step i runs the same schedule in every round (Shampoo's refreshes included), so periodic
costs stay in both; a step slowed by another job on a shared machine (with two threads on two
busy cores a step can take 10-30x longer) drops out of the best-of-rounds figure when one round
ran it undisturbed. Next to it, samples per CPU-second of the process (``time.process_time``,
each step's least over rounds): with one thread (``--threads 1``) it hardly depends on what else
the machine runs. Each round's own mean and the median-round figures are kept in the JSON.

Models (byte vocabulary, random init, built from a ``LlamaConfig``; nothing downloaded):

* ``main``: the main job's model (hidden 192, 3 layers, 6 heads, MLP 512; 1.4M parameters) at
  its batch (16 x 128 tokens).
* ``100m``: hidden 768, 12 layers, 12 heads, MLP 2048 (85M parameters) at batch 4 x 128.
* ``tiny``: hidden 32, 1 layer (for the test: checks the pipeline, measures nothing useful).

Every optimizer runs with its defaults, as ``optim=<name>`` gives them, with the main job's
TrainingArguments (lr 3e-3, cosine schedule, max_grad_norm 1). The Trainer tells optimizers the
run's length (``max_steps``), and Shampoo sizes its automatic refresh intervals from it; a run of
a few steps would refresh its preconditioners every step, so the Shampoo runs are told the main
job's length instead (``optim_args="total_steps=300"``: statistics every T1 = 6 steps, inverse
roots every T2 = 30 and at every statistics update before step 30).

Threads: ``--threads`` per process, default all cores (``os.cpu_count()``), as a Trainer run uses
them; one process runs at a time. On a machine shared with other jobs use ``--threads 1`` and
compare the CPU-time column (BENCHMARKS.md: with two threads on two busy cores a step can take
10-30x longer at random). Peak memory: the resident-set high-water mark (``VmHWM``) reset
just before ``train()`` (see :mod:`recipes.benchmarks.process_memory`).

Examples::

    python -m recipes.benchmarks.throughput                       # both models, 3 rounds
    nice -n -10 python -m recipes.benchmarks.throughput --threads 1   # BENCHMARKS.md, 2026-12-07
    python -m recipes.benchmarks.throughput --model main --rounds 1 --optimizers adamw_torch microadam
    python -m recipes.benchmarks.throughput --from-json recipes/results/throughput_2026-12-07.json
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

from .common import (REPO, child_result, machine_info, md_table, print_saved, report_to_parent,
                     start_child, versions, write_json)
from .process_memory import reset_peak, rss_bytes, vm_hwm

OPTIMIZERS = ("adamw_torch", "microadam", "efcp_mfac", "efcp_ggt", "shampoo_4bit",
              "shampoo_32bit")
BASELINE = "adamw_torch"

#: model name -> main-job options (recipes/finetune_llama.py flags) and per-model defaults
MODELS = {
    "main": dict(flags=[], batch=16, block=128, warmup=6, steps=12,
                 what="the main job's model (recipes/finetune_llama.py defaults)"),
    "100m": dict(flags=["--hidden_size", "768", "--intermediate_size", "2048",
                        "--num_hidden_layers", "12", "--num_attention_heads", "12"],
                 batch=4, block=128, warmup=2, steps=6,
                 what="LLaMA hidden 768, 12 layers, 12 heads, MLP 2048, byte vocabulary"),
    "tiny": dict(flags=["--hidden_size", "32", "--intermediate_size", "64",
                        "--num_hidden_layers", "1", "--num_attention_heads", "2"],
                 batch=2, block=32, warmup=1, steps=2, what="tiny (pipeline check only)"),
}

#: the run length Shampoo sizes its automatic T1 / T2 from: the main job's max_steps
SHAMPOO_RUN_STEPS = 300


def optim_args_for(optim: str) -> str | None:
    return f"total_steps={SHAMPOO_RUN_STEPS}" if optim.startswith("shampoo") else None


# ------------------------------------------------------------------ one measurement (child)
def measure(model_name: str, optim: str, batch: int, block: int, warmup: int, steps: int,
            threads: int) -> dict:
    """Train ``warmup + steps`` steps of ``model_name`` with ``Trainer(optim=optim)`` in this
    process; samples/s over the last ``steps`` steps and the peak resident set during train()."""
    import torch

    torch.set_num_threads(threads)
    import transformers
    from transformers import Trainer, TrainerCallback

    import hf_compressed_optim as hco
    from hf_compressed_optim import offline_corpus

    from .. import finetune_llama as job

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []
            self.cpu_ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())
            self.cpu_ends.append(time.process_time())

    out_dir = tempfile.mkdtemp(prefix="throughput_")
    argv = MODELS[model_name]["flags"] + [
        "--optim", optim, "--max_steps", str(warmup + steps), "--block_size", str(block),
        "--per_device_train_batch_size", str(batch), "--output_dir", out_dir,
        "--logging_strategy", "no", "--use_cpu", "true"]
    if optim_args_for(optim):
        argv += ["--optim_args", optim_args_for(optim)]
    args, training_args = job.parse_args(argv)
    transformers.set_seed(training_args.seed)
    model, tokenize = job.build_model_and_tokenize(args, training_args.seed)
    data = offline_corpus.lm_datasets(block_size=args.block_size, seed=training_args.seed,
                                      tokenize=tokenize)
    clock = StepClock()
    trainer = Trainer(model=model, args=training_args, train_dataset=data["train"],
                      callbacks=[clock])
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    process_peak = vm_hwm()
    before = rss_bytes()
    reset = reset_peak()
    metrics = trainer.train().metrics
    peak = vm_hwm() or 0
    ends = clock.ends
    step_s = [b - a for a, b in zip(ends[warmup - 1:], ends[warmup:])]
    cpu = clock.cpu_ends
    step_cpu_s = [b - a for a, b in zip(cpu[warmup - 1:], cpu[warmup:])]
    opt = hco.unwrap_optimizer(trainer.optimizer)
    result = dict(
        model=model_name, optim=optim, optim_args=optim_args_for(optim),
        optimizer_class=type(opt).__name__, threads=torch.get_num_threads(),
        params=sum(p.numel() for p in model.parameters()), batch=batch, block=block,
        warmup=warmup, steps=len(step_s), step_seconds=step_s, step_cpu_seconds=step_cpu_s,
        samples_per_second=batch * len(step_s) / sum(step_s),
        trainer_train_samples_per_second=metrics.get("train_samples_per_second"),
        rss_before_train_bytes=before, peak_rss_bytes=peak,
        peak_method="VmHWM, reset before train()" if reset else "VmHWM (not reset)",
        process_peak_before_train_bytes=process_peak,
        state_bytes=hco.optimizer_state_bytes(trainer.optimizer)["total"],
        load_average=os.getloadavg(),  # after the run: how busy the machine was meanwhile
        package=os.path.dirname(hco.__file__))  # the checkout measured
    if hasattr(opt, "intervals"):  # Shampoo: the refresh intervals the timed steps ran with
        t1, t2, early = opt.intervals(opt.param_groups[0])
        result["shampoo_intervals"] = dict(T1=t1, T2=t2, early=early)
    return result


# ------------------------------------------------------------------ the parent
def summarize(runs: dict) -> dict:
    """Per optimizer: samples/s from each timed step's fastest round (``samples_per_second``)
    and from its median round (``samples_per_second_median``), their ratios to AdamW's, and the
    median over rounds of the peak RSS. Step i runs the same schedule in every round (Shampoo's
    refreshes included), so periodic costs stay in both figures; a step slowed by another job on
    a shared machine drops out of the best-of-rounds figure if one round ran it undisturbed
    (``timeit``'s reasoning: noise only adds time), and out of the median if most rounds did.
    ``samples_per_second_rounds``: each round's own figure (its mean step time)."""
    out = {}
    for optim, rounds in runs.items():
        ok = [r for r in rounds if "error" not in r]
        if not ok:
            out[optim] = dict(error=rounds[0].get("error", "no result") if rounds else "no run")
            continue
        n, batch = min(len(r["step_seconds"]) for r in ok), ok[0]["batch"]
        per_step = [[r["step_seconds"][i] for r in ok] for i in range(n)]
        best = [min(xs) for xs in per_step]
        med = [statistics.median(xs) for xs in per_step]
        out[optim] = dict(
            samples_per_second=batch * n / sum(best),
            samples_per_second_median=batch * n / sum(med), rounds=len(ok),
            best_step_seconds=best, median_step_seconds=med,
            samples_per_second_rounds=[r["samples_per_second"] for r in ok],
            peak_rss_bytes=statistics.median(r["peak_rss_bytes"] for r in ok),
            rss_before_train_bytes=statistics.median(r["rss_before_train_bytes"] for r in ok),
            state_bytes=ok[0]["state_bytes"], optimizer_class=ok[0]["optimizer_class"])
        if all("step_cpu_seconds" in r for r in ok):  # CPU seconds of the process per sample
            cpu = [min(r["step_cpu_seconds"][i] for r in ok) for i in range(n)]
            out[optim]["samples_per_cpu_second"] = batch * n / sum(cpu)
    for key, ratio in (("samples_per_second", "ratio_to_adamw"),
                       ("samples_per_second_median", "ratio_to_adamw_median"),
                       ("samples_per_cpu_second", "ratio_to_adamw_cpu")):
        base = out.get(BASELINE, {}).get(key)
        for r in out.values():
            if key in r:
                r[ratio] = r[key] / base if base else None
    return out


def tables(res: dict) -> str:
    lines = []
    for model_name, m in res["models"].items():
        s = m["settings"]
        lines.append(f"**{model_name}** ({m['params']:,} parameters; batch {s['batch']} x "
                     f"{s['block']} tokens; {s['warmup']} warm-up + {s['steps']} timed steps; "
                     f"{res['settings']['rounds']} rounds; {res['settings']['threads']} threads)")
        lines.append("")
        rows = []
        for optim, r in m["summary"].items():
            if "error" in r:
                rows.append((optim, r))
                continue
            cpu, cpu_ratio = r.get("samples_per_cpu_second"), r.get("ratio_to_adamw_cpu")
            rows.append([f"`{optim}`", f"{r['samples_per_second']:.2f}",
                         f"{r['ratio_to_adamw']:.2f}x",
                         f"{cpu:.2f}" if cpu is not None else "-",
                         f"{cpu_ratio:.2f}x" if cpu_ratio is not None else "-",
                         f"{r['peak_rss_bytes'] / 2**20:,.0f} MiB"])
        lines += md_table(["optimizer", "samples/s", "vs AdamW", "samples per CPU-second",
                           "vs AdamW (CPU)", "peak RSS"], "lrrrrr", rows)
        lines.append("")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="both", choices=["main", "100m", "both", "tiny"])
    ap.add_argument("--optimizers", nargs="*", default=list(OPTIMIZERS),
                    help="optim= names (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per run (default: main 12, 100m 6)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps first, >= 1 (default: main 6, 100m 2)")
    ap.add_argument("--batch", type=int, default=None, help="default: main 16, 100m 4")
    ap.add_argument("--block", type=int, default=None, help="tokens per sample (default 128)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads per process (default: all cores, %(default)s)")
    ap.add_argument("--out", default=None,
                    help="results JSON (default recipes/results/throughput_<date>.json)")
    ap.add_argument("--from-json", default=None, help="print the tables of a results file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--optim", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.warmup is not None and args.warmup < 1:
        ap.error("--warmup must be >= 1 (the first timed step starts where a warm-up step ends)")
    return args


def settings_for(model_name: str, args) -> dict:
    m = MODELS[model_name]
    pick = lambda v, key: m[key] if v is None else v  # noqa: E731
    return dict(batch=pick(args.batch, "batch"), block=pick(args.block, "block"),
                warmup=pick(args.warmup, "warmup"), steps=pick(args.steps, "steps"))


def main(argv=None) -> dict:

    args = parse_args(argv)
    if args.from_json:
        return print_saved(args.from_json, tables)
    if args.child:
        s = settings_for(args.model, args)
        return report_to_parent(measure(args.model, args.optim, s["batch"], s["block"],
                                        s["warmup"], s["steps"], args.threads))
    names = ["main", "100m"] if args.model == "both" else [args.model]
    today = str(datetime.date.today())
    out = args.out or os.path.join(REPO, "recipes", "results", f"throughput_{today}.json")
    res = dict(machine={**machine_info(), **versions(), "date": today},
               command=" ".join(["python -m recipes.benchmarks.throughput"] + (argv or
                                                                              sys.argv[1:])),
               settings=dict(rounds=args.rounds, threads=args.threads,
                             optimizers=args.optimizers, baseline=BASELINE,
                             shampoo_optim_args=f"total_steps={SHAMPOO_RUN_STEPS}"),
               models={})
    for model_name in names:
        s = settings_for(model_name, args)
        runs: dict = {o: [] for o in args.optimizers}
        for r in range(args.rounds):
            for optim in args.optimizers:
                t0 = time.perf_counter()
                child = [
                    "--child", "--model", model_name, "--optim", optim, "--threads",
                    str(args.threads)] + [f"--{k}={v}" for k, v in s.items()]
                result = child_result(start_child("recipes.benchmarks.throughput", child,
                                                  extra_env={"OMP_NUM_THREADS":
                                                             str(args.threads)}))
                runs[optim].append(result)
                what = (f"{result['samples_per_second']:.2f} samples/s, peak RSS "
                        f"{result['peak_rss_bytes'] / 2**20:,.0f} MiB" if "error" not in result
                        else f"failed: {result['error']}")
                print(f"[{model_name} round {r + 1}/{args.rounds}] {optim:14s} {what} "
                      f"({time.perf_counter() - t0:.0f}s)", flush=True)
        params = next((x["params"] for rs in runs.values() for x in rs if "params" in x), 0)
        res["models"][model_name] = dict(what=MODELS[model_name]["what"], params=params,
                                         settings=s, runs=runs, summary=summarize(runs))
        write_json(res, out)  # after each model, so a long run keeps what it measured
    print(tables(res))
    print(f"results: {out}")
    return res


if __name__ == "__main__":
    main()
