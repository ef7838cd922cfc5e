"""Benchmark Sparse M-FAC / Sparse GGT (EFCP): state bytes, convergence, step time.

Everything is measured in this run; nothing is taken from papers.

(a) **State bytes per parameter** (``optimizer_state_bytes`` after one step, each storage once)
    on real TinyLlama-1.1B layer shapes, at the paper's setting (m = 1024, density 1%) and at
    settings a LLaMA fine-tune can afford, against dense M-FAC (4 m bytes: an fp32 window; also
    measured at a small m with ``density=1.0``) and torch AdamW (8 bytes).
(b) **Convergence** on real text (``offline_corpus``: English docstrings of the Python stdlib,
    byte tokens) with a small LLaMA: every run sees the same batches in the same order for the
    same number of steps. Dense M-FAC / dense GGT are this package's classes at ``density=1.0``
    with fp32 window values (no compression, hence no error feedback), the sparse runs differ
    only in ``density`` (and ``value_dtype`` / ``ef_bits``), AdamW is the reference. Final loss =
    loss on the held-out split after the last step, plus the mean training loss of the last
    ``--tail`` steps. Loss curves are plotted.
(c) **Step time** vs torch AdamW (foreach) on the same parameters and gradients, interleaved;
    median and min of ``--repeats`` steps after ``--warmup``. The EFCP ring is prefilled
    (synthetic rows with the real layout, a valid SPD Gram matrix) so the time is that of a full
    window. On CUDA the timing uses events after a synchronize (that path has not been run here:
    no GPU was available).

Examples::

    python -m recipes.benchmarks.efcp --json recipes/results/efcp_cpu_2026-11-21.json --markdown
    python -m recipes.benchmarks.efcp --quick          # smoke run, under a minute
    python -m recipes.benchmarks.efcp --from-json recipes/results/efcp_cpu_2026-11-21.json --markdown
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import statistics
import sys
import time

import torch

import hf_compressed_optim as hco
from hf_compressed_optim import optimizer_state_bytes

from .common import (TINYLLAMA, add_options, build_llama, llama_shapes, machine_info,
                     make_params, md_table, timed_step, versions, write_json)

# ============================================================================ parameter sets
PARAM_SETS = {
    # one TinyLlama-1.1B decoder layer without gate/up (21.0M parameters)
    "tinyllama-attn+down": llama_shapes(**TINYLLAMA, parts=("q", "k", "v", "o", "down", "norm",
                                                            "norm")),
    # TinyLlama attention block (9.4M)
    "tinyllama-attn": llama_shapes(**TINYLLAMA, parts=("q", "k", "v", "o", "norm")),
    "quick": llama_shapes(hidden=128, intermediate=352, heads=4, kv_heads=2,
                          parts=("q", "k", "v", "o", "down", "norm")),
}


# ============================================================================ (a) memory
#: this deep dive measures the papers' semantics: raw lr (lr/damp), fp32 error buffer unless a
#: run says otherwise (the package's defaults since issue 16 are lr_mode="adam", ef_bits=4)
SparseMFAC = functools.partial(hco.SparseMFAC, lr_mode="raw", ef_bits=32)
SparseGGT = functools.partial(hco.SparseGGT, lr_mode="raw", ef_bits=32)

MEMORY_CONFIGS = [
    # label, class, kwargs
    ("S-MFAC m=1024 1% fp32 values, fp32 EF", SparseMFAC,
     dict(window_size=1024, density=0.01, value_dtype="fp32", ef_bits=32)),
    ("S-MFAC m=1024 1% bf16 values, fp32 EF", SparseMFAC,
     dict(window_size=1024, density=0.01)),
    ("S-MFAC m=1024 1% bf16 values, 4-bit EF", SparseMFAC,
     dict(window_size=1024, density=0.01, ef_bits=4)),
    ("S-GGT r=100 1% bf16 values, fp32 EF", SparseGGT, dict(window_size=100, density=0.01)),
    ("S-MFAC m=64 1% bf16, 4-bit EF (LLaMA-affordable)", SparseMFAC,
     dict(window_size=64, density=0.01, ef_bits=4)),
    ("S-MFAC m=128 1% bf16, 4-bit EF (LLaMA-affordable)", SparseMFAC,
     dict(window_size=128, density=0.01, ef_bits=4)),
    ("LR-MFAC m=64 rank 4 bf16, 4-bit EF", SparseMFAC,
     dict(window_size=64, compressor="lowrank", rank=4, ef_bits=4)),
    ("dense M-FAC m=16 (density 1, fp32 values)", SparseMFAC,
     dict(window_size=16, density=1.0, value_dtype="fp32")),
]


def memory_section(shapes, device, log, configs=MEMORY_CONFIGS):
    params = make_params(shapes, device)
    n = sum(p.numel() for p in params)
    rows = []
    adam = torch.optim.AdamW(params, lr=1e-3)
    adam.step()
    rows.append(dict(label="torch AdamW", bytes=optimizer_state_bytes(adam, by="key")["total"],
                     params=n))
    del adam
    for label, cls, kw in configs:
        opt = cls(params, lr=0.0, **kw)
        opt.step()  # lr = 0 with nonzero gradients: a real step, the parameters do not move
        cats = optimizer_state_bytes(opt)
        m = kw["window_size"]
        rows.append(dict(label=label, bytes=cats.pop("total"), by_category=cats, params=n,
                         window_size=m, dense_mfac_bytes_per_param=4 * m))
        log(f"  {label}: {rows[-1]['bytes'] / n:.2f} B/param")
        del opt
    for r in rows:
        r["bytes_per_param"] = r["bytes"] / r["params"]
        if "dense_mfac_bytes_per_param" in r:
            r["x_smaller_than_dense_mfac"] = r["dense_mfac_bytes_per_param"] / r["bytes_per_param"]
        r["x_adamw"] = r["bytes_per_param"] / 8.0
    return dict(param_set_numel=n, rows=rows)


# ============================================================================ (b) convergence
def small_llama(seed: int, hidden: int, layers: int) -> torch.nn.Module:
    """LLaMA with MLP 2.75 hidden, 4 heads and 2 KV heads."""
    return build_llama((hidden, layers, int(hidden * 2.75) // 8 * 8, 4, 2), seed)


CONVERGENCE_RUNS = {
    # name: (factory(params) -> optimizer, family)
    "AdamW": (lambda ps, a: torch.optim.AdamW(ps, lr=a.adamw_lr, weight_decay=0.0), "ref"),
    "dense M-FAC": (lambda ps, a: SparseMFAC(ps, lr=a.mfac_lr, damp=a.damp, window_size=a.m,
                                             density=1.0, value_dtype="fp32"), "mfac"),
    "S-MFAC 1%": (lambda ps, a: SparseMFAC(ps, lr=a.mfac_lr, damp=a.damp, window_size=a.m,
                                           density=0.01), "mfac"),
    "S-MFAC 1% 4-bit EF": (lambda ps, a: SparseMFAC(ps, lr=a.mfac_lr, damp=a.damp,
                                                    window_size=a.m, density=0.01, ef_bits=4),
                           "mfac"),
    "dense GGT": (lambda ps, a: SparseGGT(ps, lr=a.ggt_lr, eps=a.eps, window_size=a.m,
                                          density=1.0, value_dtype="fp32"), "ggt"),
    "S-GGT 1%": (lambda ps, a: SparseGGT(ps, lr=a.ggt_lr, eps=a.eps, window_size=a.m,
                                         density=0.01), "ggt"),
}


def convergence_section(args, log):
    from hf_compressed_optim.offline_corpus import lm_datasets

    data = lm_datasets(block_size=args.block_size, seed=0)
    train = torch.tensor(data["train"]["input_ids"])
    evals = torch.tensor(data["eval"]["input_ids"])[:args.eval_blocks]
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.cat([torch.randperm(len(train), generator=gen)
                       for _ in range(1 + args.steps * args.batch_size // len(train))])
    results = {}
    for name in args.runs:
        factory, family = CONVERGENCE_RUNS[name]
        model = small_llama(args.seed, args.hidden, args.layers)
        opt = factory(list(model.parameters()), args)
        losses = []
        t0 = time.perf_counter()
        opt_time = 0.0
        for step in range(args.steps):
            ids = train[order[step * args.batch_size:(step + 1) * args.batch_size]]
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            t1 = time.perf_counter()
            opt.step()
            opt_time += time.perf_counter() - t1
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if not torch.isfinite(loss):
                break
        with torch.no_grad():
            eval_loss = sum(model(input_ids=b, labels=b).loss.item()
                            for b in evals.split(args.batch_size)) / len(evals.split(args.batch_size))
        tail = losses[-args.tail:]
        state = optimizer_state_bytes(opt)["total"]
        results[name] = dict(family=family, losses=losses, eval_loss=eval_loss,
                             train_tail_mean=sum(tail) / len(tail), wall_s=time.perf_counter() - t0,
                             opt_step_ms=1e3 * opt_time / len(losses), state_bytes=state,
                             params=sum(p.numel() for p in model.parameters()))
        log(f"  {name}: eval {eval_loss:.4f}, train tail {results[name]['train_tail_mean']:.4f}, "
            f"{results[name]['wall_s']:.0f} s")
    for name, r in results.items():
        base = {"mfac": "dense M-FAC", "ggt": "dense GGT"}.get(r["family"])
        if base in results and name != base:
            r["eval_vs_dense_pct"] = 100 * (r["eval_loss"] / results[base]["eval_loss"] - 1)
            r["train_tail_vs_dense_pct"] = 100 * (r["train_tail_mean"] /
                                                  results[base]["train_tail_mean"] - 1)
    return results


def plot_convergence(results, path, smooth=20):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, family, title in ((axes[0], "mfac", "M-FAC"), (axes[1], "ggt", "GGT")):
        for name, r in results.items():
            if r["family"] not in (family, "ref"):
                continue
            x = torch.tensor(r["losses"])
            k = min(smooth, len(x))
            y = torch.nn.functional.avg_pool1d(x[None, None], k, 1)[0, 0] if k > 1 else x
            ax.plot(range(k, len(x) + 1), y.tolist(),
                    label=f"{name} (eval {r['eval_loss']:.3f})")
        ax.set_title(f"{title}: training loss ({smooth}-step mean)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("cross-entropy (nats / byte)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ============================================================================ (c) step time
def prefill(opt):
    """Make the ring look full: synthetic rows with the real layout, SPD Gram, count = m."""
    anchor = opt._anchor()
    astate = opt.state[anchor]
    m = astate["gram"].shape[0]
    gen = torch.Generator().manual_seed(0)
    for state in opt.state.values():
        if "window_values" in state:
            state["window_indices"].copy_(state["window_indices"][0].expand_as(
                state["window_indices"]))
            state["window_values"].copy_(torch.randn(state["window_values"].shape,
                                                     generator=gen).to(state["window_values"]) * 1e-3)
    g = torch.randn(m, m, generator=gen, dtype=torch.float64)
    astate["gram"].copy_((g @ g.T / m + torch.eye(m, dtype=torch.float64)).to(astate["gram"]))
    astate["window_count"].fill_(m)


def time_step(opt: torch.optim.Optimizer, device: torch.device, warmup: int, repeats: int) -> dict:
    """Median and min of ``repeats`` timed steps after ``warmup`` untimed ones."""
    for _ in range(warmup):
        opt.step()
    times = [timed_step(opt, device) for _ in range(repeats)]
    return dict(median_s=statistics.median(times), min_s=min(times), runs=len(times))


def timing_section(shapes, device, windows, warmup, repeats, log):
    params = make_params(shapes, device)
    out = {}
    adam = torch.optim.AdamW(params, lr=0.0, foreach=True)
    out["torch AdamW (foreach)"] = time_step(adam, device, warmup, repeats)
    log(f"  AdamW: {out['torch AdamW (foreach)']['median_s'] * 1e3:.1f} ms")
    del adam
    for m in windows:
        for label, cls, kw in ((f"S-MFAC m={m} 1%", SparseMFAC, {}),
                               (f"S-GGT m={m} 1%", SparseGGT, {})):
            opt = cls(params, lr=0.0, window_size=m, density=0.01, **kw)
            opt.step()
            prefill(opt)
            out[label] = time_step(opt, device, warmup, repeats)
            log(f"  {label}: {out[label]['median_s'] * 1e3:.1f} ms")
            del opt
    ref = out["torch AdamW (foreach)"]["median_s"]
    for r in out.values():
        r["x_adamw"] = r["median_s"] / ref
    return dict(param_set_numel=sum(p.numel() for p in params), device=str(device), rows=out)


# ============================================================================ reporting
def markdown(res: dict) -> str:
    """The tables of a run (or of its JSON)."""
    lines = []
    mem = res.get("memory")
    if mem:
        n = mem["param_set_numel"]

        def row(r: dict) -> list:
            c = r.get("by_category", {})
            per = {k: f"{c[k] / n:.2f}" if k in c else "-" for k in ("window", "error_feedback")}
            gram = f"{c['preconditioner'] / 2**20:.1f} MiB" if "preconditioner" in c else "-"
            dense = (f"{r['x_smaller_than_dense_mfac']:.0f}x (4m = "
                     f"{r['dense_mfac_bytes_per_param']})" if "x_smaller_than_dense_mfac" in r
                     else "-")
            return [r["label"], f"{r['bytes_per_param']:.2f}", per["window"],
                    per["error_feedback"], gram, dense, f"{r['x_adamw']:.2f}"]

        lines += [f"State bytes per parameter ({n / 1e6:.1f}M parameters, "
                  f"{res['args']['memory_set']}):", ""]
        lines += md_table(["optimizer / setting", "B/param", "window", "error feedback",
                           "m x m Gram", "x smaller than dense M-FAC (4m)", "x AdamW"],
                          "lllllll", [row(r) for r in mem["rows"]]) + [""]
    conv = res.get("convergence")
    if conv:
        a = res["args"]
        pct = lambda r, k: f"{r[k]:+.2f}%" if k in r else "-"  # noqa: E731
        lines += [f"Convergence ({a['steps']} steps, batch {a['batch_size']} x {a['block_size']} "
                  f"bytes, LLaMA hidden {a['hidden']}, {a['layers']} layers, m = {a['m']}):", ""]
        lines += md_table(["run", "eval loss", "vs dense", f"train loss (last {a['tail']})",
                           "vs dense", "optimizer step", "state bytes"], "lllllll",
                          [[name, f"{r['eval_loss']:.4f}", pct(r, "eval_vs_dense_pct"),
                            f"{r['train_tail_mean']:.4f}", pct(r, "train_tail_vs_dense_pct"),
                            f"{r['opt_step_ms']:.1f} ms", f"{r['state_bytes'] / 2**20:.1f} MiB"]
                           for name, r in conv.items()]) + [""]
    tim = res.get("timing")
    if tim:
        lines += [f"Step time ({tim['param_set_numel'] / 1e6:.1f}M parameters, {tim['device']}, "
                  "full ring):", ""]
        lines += md_table(["optimizer", "median", "min", "x AdamW"], "llll",
                          [[name, f"{r['median_s'] * 1e3:.1f} ms", f"{r['min_s'] * 1e3:.1f} ms",
                            f"{r['x_adamw']:.1f}"] for name, r in tim["rows"].items()]) + [""]
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny everything (smoke run)")
    ap.add_argument("--sections", default="memory,convergence,timing")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--memory-set", default="tinyllama-attn+down", choices=sorted(PARAM_SETS))
    ap.add_argument("--timing-set", default="tinyllama-attn", choices=sorted(PARAM_SETS))
    ap.add_argument("--timing-windows", default="64,1024")
    add_options(ap, {"--warmup": 1, "--repeats": 5, "--steps": 300, "--batch-size": 16,
                     "--block-size": 64, "--hidden": 128, "--layers": 2, "--adamw-lr": 3e-3,
                     "--mfac-lr": 0.03, "--damp": 1e-2, "--ggt-lr": 0.3, "--eps": 1e-3,
                     "--tail": 30, "--eval-blocks": 128})
    ap.add_argument("--m", type=int, default=32, help="window of the convergence runs")
    ap.add_argument("--runs", default=",".join(CONVERGENCE_RUNS))
    ap.add_argument("--seed", type=int, default=0, help="model init and batch order")
    ap.add_argument("--plot", default=None, help="PNG of the loss curves")
    ap.add_argument("--json", default=None)
    ap.add_argument("--from-json", default=None)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if args.quick:
        args.memory_set = args.timing_set = "quick"
        args.steps, args.eval_blocks, args.tail, args.repeats = 12, 16, 4, 2
        args.hidden, args.layers, args.m = 32, 1, 4
        args.timing_windows = "8"
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    def log(msg):
        return print(msg, file=sys.stderr, flush=True)
    if args.from_json:
        with open(args.from_json) as f:
            res = json.load(f)
    else:
        device = torch.device(args.device)
        sections = args.sections.split(",")
        res = dict(machine={**machine_info(), **versions(), "date": str(datetime.date.today())},
                   args=dict(vars(args)))
        if "memory" in sections:
            log("(a) memory")
            res["memory"] = memory_section(PARAM_SETS[args.memory_set], device, log,
                                           MEMORY_CONFIGS if not args.quick else
                                           [c for c in MEMORY_CONFIGS if c[2]["window_size"] <= 128])
        if "convergence" in sections:
            log("(b) convergence")
            res["convergence"] = convergence_section(args, log)
            if args.plot:
                plot_convergence(res["convergence"], args.plot)
        if "timing" in sections:
            log("(c) step time")
            res["timing"] = timing_section(PARAM_SETS[args.timing_set], device,
                                           [int(w) for w in args.timing_windows.split(",")],
                                           args.warmup, args.repeats, log)
        write_json(res, args.json)
    if args.markdown:
        print(markdown(res))
    return res


if __name__ == "__main__":
    main()
