"""Benchmark MicroAdam against AdamW and the 8-/4-bit peers: state bytes, step time, peak memory.

Everything is measured in this run; nothing is taken from papers.

(a) **State bytes per parameter**: one step of every optimizer on the same parameter set with
    real LLaMA layer shapes, then the bytes of the storages its state holds (each storage once;
    tensor subclasses such as torchao's quantized states are counted through their inner tensors).
(b) **Step time**: the optimizers step in turn on the same parameters and gradients (interleaved,
    so drift in machine load hits all of them alike); the first ``--warmup`` steps (state
    allocation, torch.compile) are excluded; median and min of ``--repeats`` steps. Reported as a
    ratio to torch AdamW (foreach), and as "roofline GB/s": the bytes a single fused pass must
    move per parameter (peers_and_targets.md section 5 accounting) times the parameter count,
    divided by the time. On CUDA the ratio to fused AdamW is the headline.
(c) **Peak memory of a Trainer run**: a fresh subprocess per optimizer trains a LLaMA model for a
    few steps with ``Trainer(optim=...)``. On CPU the peak is the process's resident-set high-water
    mark ``VmHWM`` (``/proc/self/status``), reset to the current resident set just before
    ``train()`` (``/proc/self/clear_refs``), so it is the peak *during training*; it is reported
    next to the resident set before training (Python, torch, model, data). ``ru_maxrss`` is not
    used: Linux carries the parent's high-water mark into a child across fork/exec, so a child of
    this (large) benchmark process would report the parent's peak. On CUDA
    ``torch.cuda.max_memory_allocated`` is reported as well.

Peers (bitsandbytes, torchao) are used when importable. ``--peers-path DIR`` (or the environment
variable ``HCO_PEERS_PATH``) adds a directory made with ``pip install --target DIR`` to the import
path of this benchmark only, so the peers need not be installed where they change what
``import transformers`` loads for everyone else.

Examples::

    python -m recipes.benchmarks.microadam --json bench.json --markdown
    python -m recipes.benchmarks.microadam --quick               # smoke run, a few seconds
    python -m recipes.benchmarks.microadam --from-json bench.json --markdown   # tables only
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import statistics
import sys
import time
import warnings

import torch

import hf_compressed_optim as hco
from hf_compressed_optim import MicroAdam
from hf_compressed_optim.kernels import dispatch as K
from hf_compressed_optim.kernels.layout import TopKLayout

from .common import (TINYLLAMA, add_peers_path, build_llama, child_result, llama_shapes,
                     machine_info, make_params, md_table, peer_versions, print_saved,
                     report_to_parent, start_child, sync, versions, write_json)
from .process_memory import reset_peak, rss_bytes, vm_hwm

# ============================================================================ parameter sets
PARAM_SETS = {
    # two decoder layers of TinyLlama-1.1B (hidden 2048, MLP 5632, 32 heads, 4 KV heads): 88.1M
    "tinyllama-1.1b-2layers": dict(**TINYLLAMA, layers=2),
    # small stand-in with the same structure for --quick
    "quick": dict(hidden=128, intermediate=352, heads=4, kv_heads=2, layers=2),
}

TRAINER_MODELS = {
    # (hidden, layers, MLP, heads, KV heads) of the LLaMA (byte vocabulary) trained in (c)
    "llama-85m": (768, 12, 2048, 12, 12),
    "quick": (64, 1, 128, 2, 2),
}


# ============================================================================ optimizers
def optimizer_factories(device: torch.device, include_peers: bool,
                        include_compiled_peers: bool) -> dict[str, dict]:
    """name -> {"make": params -> optimizer, "roofline": B/param/step or None, "note": str}."""
    f: dict[str, dict] = {
        "adamw_foreach": dict(make=lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
                              kind="adamw", note="torch.optim.AdamW(foreach=True)"),
        "adamw_fused": dict(make=lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
                            kind="adamw", note="torch.optim.AdamW(fused=True)"),
        "microadam": dict(make=lambda ps: MicroAdam(ps, lr=1e-3), kind="microadam",
                          note="hf_compressed_optim.MicroAdam (window 10, density 0.01, q 64)"),
    }
    if not include_peers:
        return f
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes as bnb
        f["bnb_adamw8bit"] = dict(make=lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3), kind="8bit",
                                  note=f"bitsandbytes {bnb.__version__} AdamW8bit")
    except Exception:
        pass
    if include_compiled_peers:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import torchao
                from torchao.optim import AdamW4bit, AdamW8bit
            f["torchao_adamw8bit"] = dict(make=lambda ps: AdamW8bit(ps, lr=1e-3), kind="8bit",
                                          note=f"torchao {torchao.__version__} AdamW8bit")
            f["torchao_adamw4bit"] = dict(make=lambda ps: AdamW4bit(ps, lr=1e-3), kind="4bit",
                                          note=f"torchao {torchao.__version__} AdamW4bit")
        except Exception:
            pass
    return f


def roofline_bytes_per_param(kind: str, params, pbytes: int = 4, gbytes: int = 4,
                             window: int = 10, density: float = 0.01, q: int = 64) -> float:
    """Bytes one fused pass must read + write per parameter (peers_and_targets.md section 5).

    MicroAdam: read g, the 4-bit EF (0.5), its bf16 min/max (4/q), the window (m*k*4) and p; write
    EF, min/max, one window row (k*4) and p; k is the real entries-per-row fraction of the layout.
    """
    if kind == "adamw":
        return (pbytes + gbytes + 8) + (pbytes + 8)
    if kind == "8bit":  # block 256, one fp32 absmax per block per state
        return (pbytes + gbytes + 2 + 8 / 256) + (pbytes + 2 + 8 / 256)
    if kind == "4bit":  # group 128, fp32 scale
        return (pbytes + gbytes + 1 + 8 / 128) + (pbytes + 1 + 8 / 128)
    if kind == "microadam":
        n = sum(p.numel() for p in params)
        k = sum(TopKLayout.create(p.numel(), 16384, density).k for p in params) / n
        return (gbytes + 0.5 + 4 / q + window * k * 4 + pbytes) + (0.5 + 4 / q + k * 4 + pbytes)
    raise ValueError(kind)


# ============================================================================ (a) + (b)
def run_optimizers(params, factories, device, warmup: int, repeats: int, log) -> dict:
    """State bytes after the first step, then interleaved timed steps (median, min)."""
    n = sum(p.numel() for p in params)
    opts, results = {}, {}
    for name, spec in factories.items():
        try:
            opt = spec["make"](params)
            t0 = time.perf_counter()
            opt.step()
            sync(device)
            first = time.perf_counter() - t0
            sb = hco.optimizer_state_bytes(opt, by="key")
            results[name] = dict(note=spec["note"], first_step_s=first, state_bytes=sb["total"],
                                 state_bytes_by_key={k: v for k, v in sb.items() if k != "total"},
                                 bytes_per_param=sb["total"] / n,
                                 roofline_bytes_per_param=roofline_bytes_per_param(
                                     spec["kind"], params))
            if hasattr(opt, "STATE_CATEGORIES"):  # cross-check with the package's own counter
                results[name]["package_report"] = hco.optimizer_memory_report(opt)
            opts[name] = opt
            log(f"  {name:18s} first step {first:7.2f}s  state {sb['total'] / n:.4f} B/param")
        except Exception as err:  # a peer that does not run here: say so, keep going
            results[name] = dict(note=spec["note"], error=f"{type(err).__name__}: {err}"[:300])
            log(f"  {name:18s} FAILED: {results[name]['error']}")
    times: dict[str, list[float]] = {k: [] for k in opts}
    for rep in range(warmup - 1 + repeats):  # the first step above was warm-up step 1
        for name, opt in opts.items():
            sync(device)
            t0 = time.perf_counter()
            opt.step()
            sync(device)
            if rep >= warmup - 1:
                times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        r = results[name]
        r["step_times_s"] = ts
        r["step_median_s"] = statistics.median(ts)
        r["step_min_s"] = min(ts)
        r["roofline_GBps"] = r["roofline_bytes_per_param"] * n / r["step_median_s"] / 1e9
    for base in ("adamw_foreach", "adamw_fused"):
        if base in times:
            for name in times:
                results[name][f"ratio_to_{base}"] = (results[name]["step_median_s"]
                                                      / results[base]["step_median_s"])
    del opts
    return results


PROFILED_KERNELS = ("error_feedback_compress", "window_adam_update", "dequantize4", "quantize4",
                    "block_topk", "gather_block_values", "scatter_block_values")


def profile_microadam(params, device, repeats: int, op_table: bool = True) -> dict:
    """Where a MicroAdam step spends its time, split by kernel.

    The kernel functions (the PyTorch twins in their ``kernels/`` modules) are wrapped with
    timers for ``repeats`` real optimizer steps (they call each other through module
    attributes, so nested calls are seen too). Each
    kernel gets its inclusive time and its exclusive ("self") time; the step's time outside all
    kernels (Python, the finiteness check, book-keeping) is reported as "outside kernels".
    Optionally the top aten operators of one more step (torch.profiler, self CPU time).
    """
    opt = MicroAdam(params, lr=1e-3)
    for _ in range(3):
        opt.step()
    # on CUDA the dispatcher calls the Triton versions (``<name>_triton``): time whichever runs
    suffix = "_triton" if device.type == "cuda" and K.backend_for(params[0]) == "triton" else ""
    where = {name: (K._OPS[name][0], K._OPS[name][1] + suffix) for name in PROFILED_KERNELS}
    originals = {name: getattr(module, attr) for name, (module, attr) in where.items()}
    incl = {name: 0.0 for name in originals}
    excl = dict(incl)
    stack: list[list[float]] = []  # per active call: [child time]

    def wrap(name, fn):
        def timed(*a, **kw):
            sync(device)
            stack.append([0.0])
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                sync(device)
                dt = time.perf_counter() - t0
                child = stack.pop()[0]
                incl[name] += dt
                excl[name] += dt - child
                if stack:
                    stack[-1][0] += dt
        return timed

    steps, per_rep = [], []
    try:
        for name, fn in originals.items():
            setattr(where[name][0], where[name][1], wrap(name, fn))
        for _ in range(repeats):
            before = dict(excl)
            sync(device)
            t0 = time.perf_counter()
            opt.step()
            sync(device)
            steps.append(time.perf_counter() - t0)
            per_rep.append({k: excl[k] - before[k] for k in excl})
    finally:
        for name, fn in originals.items():
            setattr(where[name][0], where[name][1], fn)
    step_med = statistics.median(steps)
    parts = {k: statistics.median(r[k] for r in per_rep) for k in originals}
    parts["outside kernels"] = max(0.0, step_med - sum(parts.values()))
    out = dict(step_median_s=step_med, repeats=repeats, module="kernels" + (" (Triton)" if suffix else ""),
               self_time_s=parts, share={k: v / step_med for k, v in parts.items()},
               inclusive_time_s={k: v / repeats for k, v in incl.items()})
    if op_table and device.type == "cpu":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            opt.step()
        rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in rows) or 1.0
        out["top_ops"] = [dict(op=e.key, calls=e.count, self_ms=e.self_cpu_time_total / 1e3,
                               share=e.self_cpu_time_total / total) for e in rows[:12]]
    return out


# ============================================================================ (c) Trainer peak
def trainer_child(optim: str, model_key: str, steps: int, batch: int, seed: int) -> dict:
    """Runs in a fresh process: train a LLaMA with Trainer(optim=...), report memory peaks."""
    from transformers import Trainer, TrainingArguments

    from hf_compressed_optim import offline_corpus

    use_cuda = torch.cuda.is_available()
    model = build_llama(TRAINER_MODELS[model_key], seed, max_positions=128)
    n_params = sum(p.numel() for p in model.parameters())
    data = offline_corpus.lm_datasets(block_size=128, seed=seed, max_blocks=64)["train"]
    targs = TrainingArguments(output_dir="/tmp/hco_bench_trainer", optim=optim, max_steps=steps,
                              per_device_train_batch_size=batch, learning_rate=1e-4,
                              save_strategy="no", report_to=[], disable_tqdm=True,
                              logging_steps=10_000, use_cpu=not use_cuda, seed=seed,
                              dataloader_num_workers=0)
    trainer = Trainer(model=model, args=targs, train_dataset=data)
    if use_cuda:
        torch.cuda.reset_peak_memory_stats()
    reset = reset_peak()
    rss_before = rss_bytes()
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    peak = vm_hwm()
    method = ("VmHWM of the process (/proc/self/status), reset just before train()" if reset
              else "VmHWM of the process (/proc/self/status), NOT reset: includes setup")
    if peak is None:  # not Linux: whole-process peak
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * \
            (1 if sys.platform == "darwin" else 1024)
        method = "resource.getrusage(RUSAGE_SELF).ru_maxrss (whole process, incl. setup)"
    opt = hco.unwrap_optimizer(trainer.optimizer)
    res = dict(optim=optim, optimizer_class=f"{type(opt).__module__}.{type(opt).__name__}",
               params=n_params, steps=steps, batch=batch, seconds=seconds,
               train_loss=out.training_loss, state_bytes=hco.optimizer_state_bytes(opt)["total"],
               rss_before_train_bytes=rss_before, peak_rss_bytes=peak, method=method)
    if use_cuda:
        res.update(cuda_peak_allocated_bytes=torch.cuda.max_memory_allocated(),
                   method="torch.cuda.max_memory_allocated")
    return res


def run_trainer_children(optims: list[str], model_key: str, steps: int, batch: int, seed: int,
                         parallel: bool, peers_path: str | None, log) -> dict:
    """(c) for each optimizer in a fresh process (all at once with ``parallel``)."""
    procs = {}
    for o in optims:
        procs[o] = start_child("recipes.benchmarks.microadam", [
            "--_trainer-child", o, "--_trainer-model", model_key, "--_trainer-steps", str(steps),
            "--_trainer-batch", str(batch), "--seed", str(seed)], peers_path)
        if not parallel:
            procs[o] = child_result(procs[o])
    results = {o: p if isinstance(p, dict) else child_result(p) for o, p in procs.items()}
    for o, r in results.items():
        if "error" in r:
            log(f"  {o:20s} FAILED: {r['error']}")
        else:
            log(f"  {o:20s} peak RSS {r['peak_rss_bytes'] / 2**20:8.1f} MiB (before train "
                f"{r['rss_before_train_bytes'] / 2**20:.1f} MiB), state "
                f"{r['state_bytes'] / 2**20:.1f} MiB, {r['seconds']:.1f}s")
    base = results.get("adamw_torch", {})
    for r in results.values():
        if "peak_rss_bytes" in r and "peak_rss_bytes" in base:
            r["peak_rss_over_adamw_torch"] = r["peak_rss_bytes"] / base["peak_rss_bytes"]
            r["train_growth_bytes"] = r["peak_rss_bytes"] - r["rss_before_train_bytes"]
    return results


# ============================================================================ report
def to_markdown(res: dict) -> str:
    """The tables of a run (or of its JSON)."""
    ps, nan = res["param_set"], float("nan")
    lines = [f"Parameter set `{ps['name']}`: {ps['numel']:,} parameters in {ps['tensors']} "
             f"tensors, {res['device']}, fp32 params and grads.\n"]
    lines += md_table(
        ["optimizer", "state B/param", "step median (ms)", "step min (ms)", "× AdamW foreach",
         "× AdamW fused", "roofline B/param", "roofline GB/s"], "lrrrrrrr",
        [(name, r) if "error" in r else
         [name, f"{r['bytes_per_param']:.4f}", f"{r['step_median_s'] * 1e3:.1f}",
          f"{r['step_min_s'] * 1e3:.1f}", f"{r.get('ratio_to_adamw_foreach', nan):.2f}",
          f"{r.get('ratio_to_adamw_fused', nan):.2f}", f"{r['roofline_bytes_per_param']:.2f}",
          f"{r['roofline_GBps']:.1f}"] for name, r in res["optimizers"].items()])
    prof = res.get("profile")
    if prof:
        lines.append(f"\nMicroAdam step on the same set ({prof['step_median_s'] * 1e3:.0f} ms "
                     f"median of {prof['repeats']} profiled steps), self time of each kernel in "
                     f"`{prof.get('module', 'kernels.reference')}`:\n")
        lines += md_table(["kernel (self time)", "ms", "share of step"], "lrr",
                          [[k, f"{v * 1e3:.1f}", f"{prof['share'][k] * 100:.0f}%"] for k, v in
                           sorted(prof["self_time_s"].items(), key=lambda kv: -kv[1])])
        if prof.get("top_ops"):
            lines.append("\nTop aten operators of one step (torch.profiler, self CPU time):\n")
            lines += md_table(["op", "calls", "self ms", "share"], "lrrr",
                              [[o["op"], o["calls"], f"{o['self_ms']:.1f}",
                                f"{o['share'] * 100:.0f}%"] for o in prof["top_ops"]])
    if res.get("trainer"):
        t = next((v for v in res["trainer"].values() if "params" in v), None)
        if t:
            lines.append(f"\nTrainer peak memory: LLaMA `{res['trainer_model']}` "
                         f"({t['params']:,} params), {t['steps']} steps, batch {t['batch']}x128, "
                         f"fresh process per optimizer; {t['method']}.\n")
        mib = 2 ** 20
        lines += md_table(
            ["optim=", "optimizer", "state MiB", "RSS before train (MiB)", "peak RSS (MiB)",
             "peak − before (MiB)", "peak / adamw_torch"], "llrrrrr",
            [(name, r) if "error" in r else
             [name, r["optimizer_class"], f"{r['state_bytes'] / mib:.1f}",
              f"{r['rss_before_train_bytes'] / mib:.0f}", f"{r['peak_rss_bytes'] / mib:.0f}",
              f"{(r['peak_rss_bytes'] - r['rss_before_train_bytes']) / mib:.0f}",
              f"{r.get('peak_rss_over_adamw_torch', nan):.3f}"]
             for name, r in res["trainer"].items()])
    return "\n".join(lines)


# ============================================================================ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (smoke run)")
    p.add_argument("--param-set", choices=sorted(PARAM_SETS), default=None)
    p.add_argument("--repeats", type=int, default=None, help="timed steps per optimizer")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps per optimizer")
    p.add_argument("--no-peers", action="store_true", help="skip bitsandbytes and torchao")
    p.add_argument("--no-compiled-peers", action="store_true",
                   help="skip torchao (torch.compile per shape: minutes on CPU)")
    p.add_argument("--peers-path", default=os.environ.get("HCO_PEERS_PATH"),
                   help="directory from `pip install --target` holding bitsandbytes/torchao")
    p.add_argument("--no-profile", action="store_true", help="skip the per-kernel split")
    p.add_argument("--no-trainer", action="store_true", help="skip the Trainer peak-memory part")
    p.add_argument("--trainer-steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--cpu", action="store_true", help="stay on CPU even if CUDA is available")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--markdown", action="store_true", help="print markdown tables at the end")
    p.add_argument("--from-json", default=None, help="only print tables from an earlier run")
    # internal: one Trainer measurement in a fresh process
    p.add_argument("--_trainer-child", dest="trainer_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_trainer-model", dest="trainer_model", default="quick",
                   help=argparse.SUPPRESS)
    p.add_argument("--_trainer-steps", dest="trainer_child_steps", type=int, default=3,
                   help=argparse.SUPPRESS)
    p.add_argument("--_trainer-batch", dest="trainer_batch", type=int, default=1,
                   help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.trainer_child:
        return report_to_parent(trainer_child(args.trainer_child, args.trainer_model,
                                              args.trainer_child_steps, args.trainer_batch,
                                              args.seed))
    if args.from_json:
        return print_saved(args.from_json, to_markdown)

    def log(msg: str) -> None:
        print(msg, flush=True)

    add_peers_path(args.peers_path)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    set_name = args.param_set or ("quick" if args.quick else "tinyllama-1.1b-2layers")
    repeats = args.repeats or (3 if args.quick else 7)
    if args.threads or args.quick:  # one thread: tiny tensors, less sensitive to a busy machine
        torch.set_num_threads(args.threads or 1)
    shapes = llama_shapes(**PARAM_SETS[set_name], final_norm=True)
    params = make_params(shapes, device, args.seed)
    n = sum(p.numel() for p in params)
    res = dict(date=datetime.date.today().isoformat(), command=" ".join([sys.executable] +
               sys.argv), device=str(device), machine={**machine_info(), **versions()},
               peers=peer_versions() if not args.no_peers else "skipped (--no-peers)",
               param_set=dict(name=set_name, numel=n, tensors=len(shapes),
                              config=PARAM_SETS[set_name]),
               warmup=args.warmup, repeats=repeats, load_average_start=os.getloadavg())
    log(f"device {device}, {torch.get_num_threads()} threads; parameter set {set_name}: "
        f"{n:,} params in {len(shapes)} tensors")

    log("(a)+(b) state bytes and step time")
    factories = optimizer_factories(device, not args.no_peers,
                                    not args.no_compiled_peers and not args.quick)
    res["optimizers"] = run_optimizers(params, factories, device, args.warmup, repeats, log)
    for name, r in res["optimizers"].items():
        if "step_median_s" in r:
            log(f"  {name:18s} median {r['step_median_s'] * 1e3:9.1f} ms  "
                f"x foreach {r.get('ratio_to_adamw_foreach', float('nan')):5.2f}  "
                f"x fused {r.get('ratio_to_adamw_fused', float('nan')):5.2f}  "
                f"{r['roofline_GBps']:.1f} roofline-GB/s")
    micro = res["optimizers"].get("microadam", {})
    target = "adamw_fused" if device.type == "cuda" else "adamw_foreach"
    ratio = micro.get(f"ratio_to_{target}")
    res["target"] = dict(baseline=target, limit=2.0, ratio=ratio,
                         met=None if ratio is None else ratio <= 2.0)

    if not args.no_profile:
        log("MicroAdam step split by reference kernel")
        res["profile"] = profile_microadam(params, device, 1 if args.quick else 5,
                                           op_table=not args.quick)
        for k, v in res["profile"]["self_time_s"].items():
            log(f"  {k:26s} {v * 1e3:9.1f} ms  {res['profile']['share'][k] * 100:4.0f}%")
    del params

    if not args.no_trainer:
        log("(c) Trainer peak memory, one fresh process per optimizer")
        optims = ["adamw_torch", "adamw_torch_fused", "microadam"]
        peers = res["peers"] if isinstance(res["peers"], dict) else {}
        if not args.quick and not str(peers.get("bitsandbytes", "unavailable")).startswith(
                "unavailable"):
            optims.append("adamw_bnb_8bit")
        if args.quick:
            optims = ["adamw_torch", "microadam"]
        model_key = "quick" if args.quick else "llama-85m"
        res["trainer_model"] = model_key
        res["trainer"] = run_trainer_children(
            optims, model_key, args.trainer_steps or (2 if args.quick else 3), 1, args.seed,
            parallel=args.quick, peers_path=args.peers_path if not args.no_peers else None,
            log=log)

    res["load_average_end"] = os.getloadavg()  # other jobs on the machine distort timings
    if device.type != "cuda":
        res["gpu"] = "pending: no CUDA device in this run"
    if args.json:
        write_json(res, args.json, indent=2)
        log(f"wrote {args.json}")
    if args.markdown:
        print(to_markdown(res))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
