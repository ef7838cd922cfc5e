"""Benchmarks of 4-bit Shampoo against its 32-bit baseline and torch AdamW.

Parts (``--part all`` runs the first three in this order; the others are named explicitly):

* ``memory``: preconditioner bytes per factor on the real layer shapes of TinyLlama-1.1B (hidden
  2048, intermediate 5632, 4 KV heads: q/o 2048x2048, k/v 256x2048, gate/up 5632x2048,
  down 2048x5632, max_order 1200), measured from the optimizer state, beside the paper's formula
  and the 32-bit baseline.
* ``convergence``: a small LLaMA trained from scratch on the offline corpus (English docstrings of
  Python's standard library, byte tokens) for a fixed step budget with AdamW, AdamW + 32-bit
  Shampoo and AdamW + 4-bit Shampoo at the same lr schedule; eval loss curves are plotted.
* ``steptime``: median optimizer-step time over full ``root_update_interval`` cycles, relative to
  torch AdamW on the same model (CPU; on a CUDA device the timing uses synchronisation and CUDA
  events).
* ``grafting``: the whole optimizer state (preconditioners + grafting optimizer) on the
  TinyLlama-1.1B layer shapes for ``first_order`` = adamw / adamw_8bit / adamw_4bit, as bytes per
  parameter and as a ratio to the fp32-grafted 4-bit Shampoo.
* ``lstsq``: steps to reach a loss target on a rotated, ill-conditioned matrix least-squares
  problem ``0.5 ||A (W - W*) B||^2`` (A, B with random eigenbases: a diagonal method cannot
  undo the conditioning), best over an lr grid, for AdamW, 32-bit Shampoo and 4-bit Shampoo over
  each grafting optimizer.
* ``cycle``: 4-bit against 32-bit Shampoo step time over whole T2 cycles (T1 = 10, T2 = 50) on
  four 2048 x 1024 matrices (8.4M parameters, random gradients), rounds interleaved.

    python -m recipes.benchmarks.shampoo --part all --json recipes/results/shampoo_cpu_2026-11-21.json
    python -m recipes.benchmarks.shampoo --quick        # a smoke run of every part
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import torch

from hf_compressed_optim import Shampoo, optimizer_state_bytes
from hf_compressed_optim.shampoo.blocks import param_layout

from .common import (TINYLLAMA, add_options, build_llama, llama_shapes, timed_step,
                     write_json)
from .convergence import clipped_step  # the step every benchmark run takes

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
TINYLLAMA_SHAPES = dict(zip((f"{p}_proj" for p in PROJECTIONS),
                            llama_shapes(**TINYLLAMA, parts=PROJECTIONS)))


def formula_bytes(n: int, block: int = 64) -> int:
    """Paper §10 per factor: eigenvector codes+absmax+eigenvalues plus root codes+absmax+diag."""
    return 2 * (n * ((n + 1) // 2) + 4 * n * math.ceil(n / block) + 4 * n)


# ---------------------------------------------------------------------------------- memory
def bench_memory(quick: bool) -> dict:
    shapes = {"q_proj": (2048, 2048)} if quick else TINYLLAMA_SHAPES
    out = {"layers": {}}
    tot4 = tot32 = tot_formula = 0
    for name, shape in shapes.items():
        row = {}
        for bits in (4, 32):
            p = torch.nn.Parameter(torch.zeros(shape))
            opt = Shampoo([p], precond_bits=bits, stat_update_interval=10 ** 6,
                          root_update_interval=10 ** 6)
            p.grad = torch.zeros(shape)
            opt.step()  # state creation only (no refresh within the interval)
            row[f"bits{bits}"] = optimizer_state_bytes(opt)["preconditioner"]
            del opt, p
        lay = param_layout(shape, 1200, 4, 4096, 64)
        orders = [f.order for f in lay.factors]
        row["factor_orders"] = sorted(set(orders))
        row["formula_4bit"] = sum(formula_bytes(n) for n in orders)
        row["paper_bound_4bit"] = sum(1.125 * n * n + 8 * n for n in orders)
        row["formula_32bit"] = sum(8 * n * n for n in orders)
        row["ratio_32_over_4"] = row["bits32"] / row["bits4"]
        row["params"] = shape[0] * shape[1]
        out["layers"][name] = row
        tot4 += row["bits4"]
        tot32 += row["bits32"]
        tot_formula += row["formula_4bit"]
    out["total_bits4"], out["total_bits32"] = tot4, tot32
    out["total_formula_4bit"] = tot_formula
    out["ratio_32_over_4"] = tot32 / tot4
    n_params = sum(r["params"] for r in out["layers"].values())
    out["bytes_per_param_bits4"] = tot4 / n_params
    out["bytes_per_param_bits32"] = tot32 / n_params
    for n in (1200, 848, 256, 64):
        out[f"per_factor_order_{n}"] = {"measured_formula": formula_bytes(n),
                                        "paper_1.125n2_8n": 1.125 * n * n + 8 * n,
                                        "bits32": 8 * n * n}
    return out


# ---------------------------------------------------------------------------------- grafting
GRAFTING = ("adamw", "adamw_8bit", "adamw_4bit")


def bench_grafting(quick: bool) -> dict:
    """Whole-state bytes per parameter of 4-bit Shampoo per grafting optimizer (and 32-bit
    Shampoo with fp32 AdamW) on the TinyLlama layer shapes."""
    shapes = {"q_proj": (2048, 2048)} if quick else TINYLLAMA_SHAPES
    n_params = sum(a * b for a, b in shapes.values())
    variants = {f"4bit+{fo}": dict(precond_bits=4, first_order=fo) for fo in GRAFTING}
    variants["32bit+adamw"] = dict(precond_bits=32, first_order="adamw")
    out = {"params": n_params, "shapes": {k: list(v) for k, v in shapes.items()}, "variants": {}}
    for name, kw in variants.items():
        total: dict = {}
        for shape in shapes.values():
            p = torch.nn.Parameter(torch.zeros(shape))
            opt = Shampoo([p], stat_update_interval=10 ** 6, root_update_interval=10 ** 6, **kw)
            p.grad = torch.zeros(shape)
            opt.step()  # state creation (and one first-order step)
            for k, v in optimizer_state_bytes(opt).items():
                total[k] = total.get(k, 0) + v
            del opt, p
        out["variants"][name] = {k: v / n_params for k, v in total.items()}
    base = out["variants"]["4bit+adamw"]["total"]
    for row in out["variants"].values():
        row["ratio_vs_4bit_fp32_grafting"] = row["total"] / base
    return out


# ---------------------------------------------------------------------------------- least squares
LSTSQ_KINDS = {
    "adamw": None,
    "shampoo_32bit": dict(precond_bits=32),
    "shampoo_4bit": dict(precond_bits=4),
    "shampoo_4bit+adamw_8bit": dict(precond_bits=4, first_order="adamw_8bit"),
    "shampoo_4bit+adamw_4bit": dict(precond_bits=4, first_order="adamw_4bit"),
}


def lstsq_problem(rows: int, cols: int, spread: float, seed: int = 0):
    """(A, B, W*): symmetric A (rows x rows) and B (cols x cols) with random orthogonal
    eigenvectors and eigenvalues log-spaced from 1 down to ``spread``, so the Hessian
    ``B² ⊗ A²`` of ``0.5 ||A (W - W*) B||²`` has condition number ``spread^-4``."""
    g = torch.Generator().manual_seed(seed)
    mats = []
    for n in (rows, cols):
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        ev = torch.logspace(0, math.log10(spread), n, dtype=torch.float64)
        mats.append(((q * ev) @ q.T).float())
    return mats[0], mats[1], torch.randn(rows, cols, generator=g)


def lstsq_steps(kind: str, lr: float, problem, target: float, max_steps: int, t1: int,
                t2: int) -> tuple[int | None, float]:
    """(first step whose loss is <= target x the initial loss, or None; final relative loss)."""
    a, b, w_star = problem
    w = torch.nn.Parameter(torch.zeros_like(w_star))
    kw = LSTSQ_KINDS[kind]
    opt = torch.optim.AdamW([w], lr=lr, weight_decay=0.0) if kw is None else \
        Shampoo([w], lr=lr, stat_update_interval=t1, root_update_interval=t2, **kw)
    first = None
    for t in range(1, max_steps + 1):
        r = a @ (w.detach() - w_star) @ b
        loss = 0.5 * float((r * r).sum())
        first = loss if first is None else first
        if loss <= target * first:
            return t, loss / first
        w.grad = a.T @ r @ b.T
        opt.step()
    return None, loss / first


def bench_lstsq(args) -> dict:
    problem = lstsq_problem(args.lstsq_rows, args.lstsq_cols, args.lstsq_spread)
    out = {"setup": dict(rows=args.lstsq_rows, cols=args.lstsq_cols, spread=args.lstsq_spread,
                         hessian_condition=args.lstsq_spread ** -4, target=args.lstsq_target,
                         max_steps=args.lstsq_max_steps, t1=args.lstsq_t1, t2=args.lstsq_t2,
                         lrs=args.lstsq_lrs), "runs": {}, "best": {}}
    for kind in LSTSQ_KINDS:
        runs = {}
        for lr in args.lstsq_lrs:
            runs[str(lr)] = lstsq_steps(kind, lr, problem, args.lstsq_target,
                                        args.lstsq_max_steps, args.lstsq_t1, args.lstsq_t2)
        out["runs"][kind] = runs
        reached = {lr: st for lr, (st, _) in runs.items() if st is not None}
        lr = min(reached, key=reached.get) if reached else None
        edge = lr in (str(args.lstsq_lrs[0]), str(args.lstsq_lrs[-1]))
        out["best"][kind] = {"steps": reached.get(lr), "lr": lr, "lr_at_grid_edge": edge}
        print(f"lstsq {kind:24s} steps {reached.get(lr)} at lr {lr}", flush=True)
    ref = {k: out["best"][k]["steps"] for k in ("shampoo_32bit", "adamw")}
    for kind, row in out["best"].items():
        for base, steps in ref.items():
            if row["steps"] and steps:
                row[f"ratio_vs_{base}"] = row["steps"] / steps
    return out


# ---------------------------------------------------------------------------------- T2 cycles
def bench_cycle(args) -> dict:
    """Seconds per T2 cycle of 4-bit and 32-bit Shampoo, interleaved cycle by cycle."""
    shapes = [(512, 256)] * 2 if args.quick else [(2048, 1024)] * 4
    opts = {}
    for bits in (32, 4):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        opts[bits] = Shampoo(params, lr=1e-4, precond_bits=bits, stat_update_interval=args.t1,
                             root_update_interval=args.t2)
    cycles: dict = {32: [], 4: []}
    cpu: dict = {32: [], 4: []}  # process CPU time: less sensitive to other jobs on the machine
    by_kind: dict = {32: {}, 4: {}}  # CPU seconds of each step, by what the step does
    for rnd in range(args.cycles + 1):  # the first round warms up (and builds the statistics)
        for bits, opt in opts.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.t2):
                s0 = time.process_time()
                opt.step()
                if rnd:
                    t = opt.state[opt.param_groups[0]["params"][0]]["step"]
                    by_kind[bits].setdefault(step_kind(opt, int(t)), []).append(
                        time.process_time() - s0)
            if rnd:
                cycles[bits].append(time.perf_counter() - t0)
                cpu[bits].append(time.process_time() - c0)
    med = {bits: statistics.median(c) for bits, c in cycles.items()}
    med_cpu = {bits: statistics.median(c) for bits, c in cpu.items()}
    kinds = {kind: {"median_step_cpu_s": {str(b): statistics.median(by_kind[b][kind])
                                          for b in (32, 4)},
                    "steps_per_cycle": len(by_kind[4][kind]) // args.cycles}
             for kind in by_kind[4]}
    for kind, row in kinds.items():
        row["ratio_4bit_vs_32bit"] = row["median_step_cpu_s"]["4"] / row["median_step_cpu_s"]["32"]
    out = {"params": sum(a * b for a, b in shapes), "t1": args.t1, "t2": args.t2,
           "threads": torch.get_num_threads(),
           "cycle_s": {str(b): c for b, c in cycles.items()},
           "median_cycle_s": {str(b): m for b, m in med.items()},
           "ratio_4bit_vs_32bit": med[4] / med[32],
           "cycle_cpu_s": {str(b): c for b, c in cpu.items()},
           "median_cycle_cpu_s": {str(b): m for b, m in med_cpu.items()},
           "ratio_4bit_vs_32bit_cpu": med_cpu[4] / med_cpu[32],
           "step_kinds": kinds}
    for kind, row in kinds.items():
        m = row["median_step_cpu_s"]
        print(f"  {kind:12s} x{row['steps_per_cycle']:<3d} 32-bit {m['32']:.3f} s, 4-bit "
              f"{m['4']:.3f} s per step ({row['ratio_4bit_vs_32bit']:.2f}x)", flush=True)
    print(f"cycle: 32-bit {med[32]:.2f} s, 4-bit {med[4]:.2f} s per {args.t2} steps "
          f"({out['ratio_4bit_vs_32bit']:.2f}x; CPU time {med_cpu[32]:.2f} / {med_cpu[4]:.2f} s, "
          f"{out['ratio_4bit_vs_32bit_cpu']:.2f}x)", flush=True)
    return out


def step_kind(opt: Shampoo, t: int) -> str:
    """What step ``t`` of ``opt``'s first group does: ``plain`` (precondition only), ``stats``
    (T1: statistics update, for 4-bit the eigen-refresh), ``roots`` (T2), ``stats+roots``."""
    stats, roots, _ = opt.schedule(opt.param_groups[0], t)
    return "+".join(k for k, on in (("stats", stats), ("roots", roots)) if on) or "plain"


# ---------------------------------------------------------------------------------- model/data
def small_llama(seed: int, hidden: int, layers: int) -> torch.nn.Module:
    """LLaMA with tied embeddings, MLP 8/3 hidden, one head (and KV head) per 64 dims."""
    heads = max(2, hidden // 64)
    return build_llama((hidden, layers, int(hidden * 8 / 3) // 16 * 16, heads, heads), seed,
                       tie=True)


def data(block: int, batch: int, steps: int, seed: int = 0):
    from hf_compressed_optim.offline_corpus import lm_datasets

    ds = lm_datasets(block_size=block)
    train = torch.tensor(ds["train"]["input_ids"])
    ev = torch.tensor(ds["eval"]["input_ids"])[:64]
    g = torch.Generator().manual_seed(seed)
    order = torch.randint(0, train.shape[0], (steps, batch), generator=g)
    return [train[i] for i in order], ev


def make_opt(kind: str, model, lr: float, t1: int, t2: int):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    bits = 4 if kind == "shampoo4" else 32
    return Shampoo(groups, lr=lr, precond_bits=bits, stat_update_interval=t1,
                   root_update_interval=t2)


@torch.no_grad()
def eval_loss(model, ev) -> float:
    model.eval()
    out = sum(model(input_ids=ev[i:i + 16], labels=ev[i:i + 16]).loss.item()
              for i in range(0, ev.shape[0], 16)) / math.ceil(ev.shape[0] / 16)
    model.train()
    return out


def train(kind, lr, args, batches, ev):
    model = small_llama(0, args.hidden, args.layers)
    opt = make_opt(kind, model, lr, args.t1, args.t2)
    warm = max(1, len(batches) // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 *
                                              (1 + math.cos(math.pi * min(1.0, s / len(batches)))))
    curve, train_losses = [], []
    for step, ids in enumerate(batches, 1):
        loss = model(input_ids=ids, labels=ids).loss
        train_losses.append(clipped_step(model, loss, opt, sched))
        if step % args.eval_every == 0 or step == len(batches):
            curve.append((step, eval_loss(model, ev)))
    return {"curve": curve, "final_eval": curve[-1][1],
            "final_train_avg10": statistics.fmean(train_losses[-10:]), "train": train_losses}


def bench_convergence(args) -> dict:
    batches, ev = data(args.block, args.batch, args.steps)
    out = {"setup": {k: getattr(args, k) for k in ("hidden", "layers", "block", "batch", "steps",
                                                   "t1", "t2", "lrs")}, "runs": {}}
    for kind in ("adamw", "shampoo32", "shampoo4"):
        for lr in args.lrs:
            t0 = time.time()
            res = train(kind, lr, args, batches, ev)
            res["seconds"] = time.time() - t0
            out["runs"][f"{kind}@{lr}"] = res
            print(f"{kind:10s} lr={lr:g}: final eval {res['final_eval']:.4f} "
                  f"({res['seconds']:.0f}s)", flush=True)
    best = {}
    for kind in ("adamw", "shampoo32", "shampoo4"):
        key = min((k for k in out["runs"] if k.startswith(kind + "@")),
                  key=lambda k: out["runs"][k]["final_eval"])
        best[kind] = key
    out["best"] = best
    e32 = out["runs"][best["shampoo32"]]["final_eval"]
    e4 = out["runs"][best["shampoo4"]]["final_eval"]
    out["rel_gap_4bit_vs_32bit"] = (e4 - e32) / e32
    out["rel_gap_4bit_vs_adamw"] = (e4 - out["runs"][best["adamw"]]["final_eval"]) / \
        out["runs"][best["adamw"]]["final_eval"]
    return out


def plot(conv: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = {"adamw": "AdamW", "shampoo32": "AdamW + 32-bit Shampoo",
             "shampoo4": "AdamW + 4-bit Shampoo"}
    for kind, key in conv["best"].items():
        steps, losses = zip(*conv["runs"][key]["curve"])
        ax.plot(steps, losses, label=f"{names[kind]} (lr {key.split('@')[1]})")
    s = conv["setup"]
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss (bytes, nats)")
    ax.set_title(f"LLaMA h={s['hidden']} L={s['layers']} on stdlib docstrings, "
                 f"T1={s['t1']} T2={s['t2']}")
    ax.set_ylim(top=min(3.5, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------- step time
def bench_steptime(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    ids = torch.randint(0, 256, (args.batch, args.block), device=device)
    out = {"device": str(device)}
    for kind in ("adamw", "shampoo32", "shampoo4"):
        model = small_llama(0, args.hidden, args.layers).to(device)
        opt = make_opt(kind, model, 1e-4, args.t1, args.t2)
        times = []
        for cycle in range(args.cycles + 1):  # the first cycle warms up
            for _ in range(args.t2):
                model(input_ids=ids, labels=ids).loss.backward()
                dt = timed_step(opt, device)
                opt.zero_grad(set_to_none=True)
                if cycle:
                    times.append(dt)
        cycle_means = [statistics.fmean(times[i:i + args.t2]) for i in range(0, len(times), args.t2)]
        out[kind] = {"mean_step_s_per_cycle": cycle_means,
                     "median_of_cycle_means_s": statistics.median(cycle_means),
                     "median_step_s": statistics.median(times), "max_step_s": max(times)}
        print(f"{kind:10s} mean step over a T2 cycle: "
              f"{out[kind]['median_of_cycle_means_s'] * 1e3:.2f} ms", flush=True)
    base = out["adamw"]["median_of_cycle_means_s"]
    for kind in ("shampoo32", "shampoo4"):
        out[kind]["ratio_vs_adamw"] = out[kind]["median_of_cycle_means_s"] / base
    out["ratio_4bit_vs_32bit"] = out["shampoo4"]["median_of_cycle_means_s"] / \
        out["shampoo32"]["median_of_cycle_means_s"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("all", "memory", "convergence", "steptime", "grafting",
                                       "lstsq", "cycle"), default="all")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run of the chosen parts")
    add_options(ap, {"--hidden": 192, "--layers": 3, "--block": 128, "--batch": 16,
                     "--steps": 300, "--eval_every": 25, "--threads": 0})
    ap.add_argument("--t1", type=int, default=10, help="stat_update_interval")
    ap.add_argument("--t2", type=int, default=50, help="root_update_interval")
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3])
    ap.add_argument("--cycles", type=int, default=3, help="T2 cycles timed in steptime")
    ap.add_argument("--cpu", action="store_true", help="time on CPU even if CUDA is available")
    ap.add_argument("--lstsq_rows", type=int, default=96)
    ap.add_argument("--lstsq_cols", type=int, default=64)
    ap.add_argument("--lstsq_spread", type=float, default=10 ** -1.5,
                    help="smallest eigenvalue of A and B (largest 1)")
    ap.add_argument("--lstsq_target", type=float, default=1e-3,
                    help="loss target as a fraction of the initial loss")
    ap.add_argument("--lstsq_max_steps", type=int, default=1000)
    ap.add_argument("--lstsq_t1", type=int, default=1)
    ap.add_argument("--lstsq_t2", type=int, default=10)
    ap.add_argument("--lstsq_lrs", type=float, nargs="+",
                    default=[0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default="recipes/results/shampoo_convergence.png")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.hidden, args.layers, args.steps, args.eval_every = 64, 1, 20, 10
        args.t1, args.t2, args.lrs, args.cycles, args.batch = 2, 5, [2e-3], 1, 4
        args.lstsq_rows, args.lstsq_cols, args.lstsq_max_steps = 64, 64, 60
        args.lstsq_lrs, args.lstsq_target = [0.3], 0.1
    result = {"machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    if args.part in ("all", "memory"):
        result["memory"] = bench_memory(args.quick)
        m = result["memory"]
        print(f"memory: 4-bit {m['total_bits4'] / 2**20:.1f} MiB vs 32-bit "
              f"{m['total_bits32'] / 2**20:.1f} MiB ({m['ratio_32_over_4']:.2f}x)", flush=True)
    if args.part in ("all", "convergence"):
        result["convergence"] = bench_convergence(args)
        if args.plot and not args.quick:
            plot(result["convergence"], args.plot)
    if args.part in ("all", "steptime"):
        result["steptime"] = bench_steptime(args)
    if args.part == "grafting":
        result["grafting"] = bench_grafting(args.quick)
        for name, row in result["grafting"]["variants"].items():
            print(f"grafting {name:18s} {row['total']:.3f} B/param "
                  f"({row['ratio_vs_4bit_fp32_grafting']:.3f}x)", flush=True)
    if args.part == "lstsq":
        result["lstsq"] = bench_lstsq(args)
    if args.part == "cycle":
        result["cycle"] = bench_cycle(args)
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
