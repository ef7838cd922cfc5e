"""Turn the measurements (``results.json``) into Markdown tables, verdicts and PNG plots.

Everything here is a pure function of the results, so ``run.py report`` regenerates the report
without measuring anything, and the verdicts (which optimizer wins, loses, or is within noise)
follow from the numbers by fixed rules rather than by hand.
"""

from __future__ import annotations

import math
import os

OURS = ("microadam", "efcp_mfac", "efcp_ggt", "shampoo_4bit", "shampoo_32bit")
TASK_ORDER = ("text", "finetune", "digits")


def tasks_in(res: dict) -> list[str]:
    """The convergence tasks measured, in report order (phases may have been run separately)."""
    conv = res.get("convergence", {})
    return [t for t in TASK_ORDER if t in conv] + [t for t in conv if t not in TASK_ORDER]


def _mib(b: float) -> str:
    return f"{b / 2**20:.1f} MiB"


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.0f}k"


def diff_vs(conv: dict, name: str, base: str = "adamw_torch", key: str = "test_loss") -> dict:
    """Relative difference of ``name``'s mean to ``base``'s and whether it exceeds the noise:
    |difference| > 2 standard errors of the difference of the two seed means."""
    a, b = conv[name][key], conv[base][key]
    na, nb = len(a["values"]), len(b["values"])
    se = math.sqrt(a["std"] ** 2 / na + b["std"] ** 2 / nb)
    d = a["mean"] - b["mean"]
    return dict(diff=d, rel=d / abs(b["mean"]) if b["mean"] else float("nan"), se=se,
                significant=abs(d) > 2 * se and math.isfinite(d))


# ------------------------------------------------------------------ checks and verdicts
def acceptance(res: dict) -> list[tuple[str, bool, str]]:
    """The issue's three memory claims, checked on the measured numbers."""
    mem = res.get("memory")
    if not mem:
        return []
    size = mem["largest"]
    rows = mem["sizes"][size]["optimizers"]
    out = []
    if "microadam" in rows and "bytes_per_param" in rows["microadam"]:
        b = rows["microadam"]["bytes_per_param"]
        out.append(("MicroAdam state below 1 byte/parameter", b < 1.0,
                    f"{b:.3f} B/param at {_fmt_params(mem['sizes'][size]['params'])} parameters"))
    ef = mem.get("efcp_window")
    if ef:
        out.append(("EFCP window two orders of magnitude below dense M-FAC",
                    ef["ratio"] >= 100.0 * 0.95,
                    f"window {ef['sparse_window_bytes_per_param']:.3f} vs "
                    f"{ef['dense_window_bytes_per_param']:.1f} B/param at m = {ef['window']}: "
                    f"{ef['ratio']:.0f}x smaller"))
    sh = mem.get("shampoo_preconditioner")
    if sh:
        out.append(("4-bit Shampoo preconditioners at least 6x below 32-bit", sh["ratio"] >= 6.0,
                    f"{sh['bits4_bytes_per_param']:.3f} vs {sh['bits32_bytes_per_param']:.3f} "
                    f"B/param: {sh['ratio']:.2f}x smaller"))
    return out


def verdicts(res: dict) -> list[str]:
    """Plain statements of where each of our optimizers loses (or wins) against AdamW / peers."""
    lines = []
    speed = res.get("speed")
    mem = res.get("memory")
    conv = res.get("convergence", {})
    names = [n for n in OURS if n in res.get("roster", {})]
    peers = [n for n, f in res.get("roster", {}).items() if f["family"] == "peer"]
    for name in names:
        parts = []
        if mem:
            rows = mem["sizes"][mem["largest"]]["optimizers"]
            b = rows.get(name, {}).get("bytes_per_param")
            if b is not None:
                parts.append(f"state {b:.2f} B/param ({b / rows['adamw_torch']['bytes_per_param']:.2f}x "
                             f"AdamW's)")
                worse_peers = [p for p in peers if rows.get(p, {}).get("bytes_per_param", 1e9) < b]
                if worse_peers:
                    parts.append("**more state than " + ", ".join(worse_peers) + "**")
        if speed:
            largest = speed["largest"]
            r = speed["sizes"][largest]["optimizers"].get(name, {}).get("ratio_to_adamw")
            if r is not None:
                word = "**slower**" if r > 1.1 else ("faster" if r < 0.9 else "as fast")
                parts.append(f"step {r:.2f}x AdamW's at "
                             f"{_fmt_params(speed['sizes'][largest]['params'])} params ({word})")
        for task in tasks_in(res):
            opt = conv[task]["optimizers"]
            if name not in opt or "test_loss" not in opt[name] or "adamw_torch" not in opt:
                continue
            d = diff_vs(opt, name)
            rel = f"{d['rel'] * 100:+.1f}% test loss"
            if d["significant"] and d["diff"] > 0:
                verdict = f"**{task}: worse than AdamW ({rel}, beyond noise)**"
            elif d["significant"]:
                verdict = f"{task}: better than AdamW ({rel}, beyond noise)"
            else:
                verdict = f"{task}: level with AdamW ({rel}, within noise)"
            vs_peers = {p: diff_vs(opt, name, p) for p in peers
                        if p in opt and "test_loss" in opt[p]}
            better_peers = [p for p, dp in vs_peers.items() if dp["significant"] and dp["diff"] > 0]
            if better_peers:
                verdict += f"; **{task}: loses to {', '.join(better_peers)}**"
            parts.append(verdict)
        lines.append(f"* `{name}`: " + "; ".join(parts) + ".")
    return lines


# ------------------------------------------------------------------ markdown
def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    return "\n".join(["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def memory_section(res: dict, img: str) -> str:
    mem = res["memory"]
    sizes = list(mem["sizes"])
    # variants measured only for convergence have no memory rows
    names = [n for n in res["roster"] if any(n in mem["sizes"][s]["optimizers"] for s in sizes)]
    rows = []
    for n in names:
        row = [f"`{n}`"]
        for s in sizes:
            r = mem["sizes"][s]["optimizers"].get(n, {})
            row.append(f"{r['bytes_per_param']:.3f}" if "bytes_per_param" in r else "–")
        rows.append(row)
    header = ["optimizer"] + [f"{s} ({_fmt_params(mem['sizes'][s]['params'])})" for s in sizes]
    out = ["### Optimizer-state bytes per parameter",
           "",
           "LLaMA models of each size, state after two steps (AdamW: 8 = two fp32 moments).",
           "",
           _table(header, rows)]
    cat_rows = []
    largest = mem["sizes"][mem["largest"]]["optimizers"]
    for n in names:
        cats = largest.get(n, {}).get("by_category") or {}
        if set(cats) - {"other"}:
            cat_rows.append([f"`{n}`", ", ".join(f"{k} {v:.3f}" for k, v in sorted(cats.items())
                                                if v > 0)])
    if cat_rows:
        out += ["", f"Where the bytes go (B/param by category, size `{mem['largest']}`):", "",
                _table(["optimizer", "categories"], cat_rows, "ll")]
    hidden = [(n, largest[n]["unaccounted_bytes_per_param"]) for n in names
              if "unaccounted_bytes_per_param" in largest.get(n, {})]
    if hidden:
        out += ["", f"**The whole bill** (size `{mem['largest']}`): bytes per parameter of tensors "
                "still alive after the step outside the parameters, their gradients and the "
                "optimizer state (workspaces, caches; a walk of every live tensor): " +
                ", ".join(f"`{n}` {b:.3f}" for n, b in hidden) + "."]
    ef, sh = mem.get("efcp_window"), mem.get("shampoo_preconditioner")
    if ef:
        out += ["", f"**EFCP window vs dense M-FAC** (same window m = {ef['window']}): sparse "
                f"window {ef['sparse_window_bytes_per_param']:.3f} B/param (measured) vs dense "
                f"M-FAC's m fp32 gradients, 4·m = {ef['dense_window_bytes_per_param']:.0f} B/param: "
                f"**{ef['ratio']:.0f}x smaller**. (This package's `SparseMFAC(density=1, "
                f"value_dtype='fp32')`, measured as a cross-check, holds "
                f"{ef['measured_dense_window_bytes_per_param']:.0f} B/param of window: it also "
                f"keeps int16 indices a dense implementation would not.) Whole state: "
                f"{ef['sparse_total_bytes_per_param']:.2f} B/param."]
        if "default_window" in ef:
            d = ef["default_window"]
            out += ["", f"At the package default m = {d['window']}: sparse window measured "
                    f"{d['sparse_window_bytes_per_param']:.2f} B/param; dense M-FAC would hold "
                    f"4·m = {4 * d['window']} B/param (not instantiated: "
                    f"{4 * d['window'] * d['params'] / 2**30:.1f} GiB here), "
                    f"{4 * d['window'] / d['sparse_window_bytes_per_param']:.0f}x more."]
    if sh:
        out += ["", f"**Shampoo preconditioners** (size `{mem['largest']}`): 4-bit "
                f"{sh['bits4_bytes_per_param']:.3f} vs 32-bit {sh['bits32_bytes_per_param']:.3f} "
                f"B/param, **{sh['ratio']:.2f}x smaller**."]
    pk = mem.get("peak")
    if pk:
        prow = []
        for n in names:
            r = pk["optimizers"].get(n, {})
            if "peak_bytes" in r:
                prow.append([f"`{n}`", _mib(r["before_bytes"]), _mib(r["peak_bytes"]),
                             _mib(r["growth_bytes"]), _mib(r["state_bytes"]),
                             f"{r.get('peak_ratio_to_adamw', float('nan')):.3f}"])
            elif "error" in r:
                prow.append([f"`{n}`", "failed: " + r["error"][:80], "", "", "", ""])
        out += ["", "### Peak training memory",
                "",
                f"A fresh process per optimizer trains LLaMA `{pk['size']}` "
                f"({_fmt_params(pk['params'])} params) for {pk['steps']} steps (batch "
                f"{pk['batch']} x {pk['block']} tokens). Method: {pk['method']}. *Before* = model, "
                f"data and libraries; *growth* = gradients, optimizer state, activations and "
                f"allocator slack.", "",
                _table(["optimizer", "before", "peak", "growth", "state", "peak / AdamW"], prow)]
    out += ["", f"![memory]({img})"]
    return "\n".join(out)


def speed_section(res: dict, img: str) -> str:
    sp = res["speed"]
    sizes = list(sp["sizes"])
    rows = []
    for n in res["roster"]:
        if not any(n in sp["sizes"][s]["optimizers"] for s in sizes):
            continue
        row = [f"`{n}`"]
        for s in sizes:
            r = sp["sizes"][s]["optimizers"].get(n, {})
            if "ratio_to_adamw" in r:
                row.append(f"{r['ratio_to_adamw']:.2f} ({r['median_s'] * 1e3:.2f} ms)")
            else:
                row.append("failed" if "error" in r else "–")
        rows.append(row)
    header = ["optimizer"] + [f"{s} ({_fmt_params(sp['sizes'][s]['params'])})" for s in sizes]
    return "\n".join([
        "### Optimizer step time, ratio to `adamw_torch` (ms per step)", "",
        f"Same parameters and random gradients for every optimizer; rounds interleaved; median over "
        f"{sp['rounds']} rounds of the mean over {sp['block']} consecutive steps (after "
        f"{sp['warmup']} warm-up steps, which include torch.compile for torchao), so Shampoo's "
        f"periodic work is amortised. Optimizer step only (no forward/backward); "
        f"{sp['threads']} CPU threads." if res["meta"]["device"] == "cpu" else
        f"Same method on {res['meta']['device_name']}.", "",
        _table(header, rows), "", f"![step time]({img})"])


def convergence_section(res: dict, task: str, img: str) -> str:
    c = res["convergence"][task]
    opt = c["optimizers"]
    acc = task == "digits"
    rows = []
    for n, r in opt.items():
        if "error" in r:
            rows.append([f"`{n}`", "failed: " + r["error"][:80]] + [""] * (4 + acc))
            continue
        sweep = ", ".join(f"{s['lr']:g}: " + ("diverged" if s["diverged"] else
                                                 f"{s['val_loss']:.4f}") for s in r["sweep"])
        if len(r["sweep"]) > 1 and r["best_lr"] in (r["sweep"][0]["lr"], r["sweep"][-1]["lr"]):
            sweep += " (best at the grid's edge)"
        tl = r["test_loss"]
        row = [f"`{n}`", f"{r['best_lr']:g}", sweep, f"{tl['mean']:.4f} ± {tl['std']:.4f}"]
        if acc:
            ta = r["test_accuracy"]
            row.append(f"{ta['mean'] * 100:.2f} ± {ta['std'] * 100:.2f}%")
        if n != "adamw_torch" and "adamw_torch" in opt and "test_loss" in opt["adamw_torch"]:
            d = diff_vs(opt, n)
            row.append(f"{d['rel'] * 100:+.2f}%" + ("" if d["significant"] else " (noise)"))
        else:
            row.append("–")
        row.append(f"{r['seconds']:.1f}")
        rows.append(row)
    header = ["optimizer", "best lr", "sweep (val loss, seed 0)", "test loss"] + \
        (["test accuracy"] if acc else []) + ["vs AdamW", "s/run"]
    base = ""
    if "pretrain" in c:
        base = (f" The base model reaches validation loss {c['pretrain']['val_loss']:.4f} on its "
                f"own (pretraining) split.")
    return "\n".join([
        f"### Convergence: {task}", "", c["description"] + f"; {c['steps']} steps, "
        f"{c['seeds']} seeds at the best lr." + base, "",
        _table(header, rows, "lrlr" + "r" * (len(header) - 4)), "",
        "*vs AdamW*: relative difference of the seed-mean test loss; *(noise)* marks a "
        "difference smaller than two standard errors.", "", f"![{task}]({img})"])


def markdown(res: dict, images: dict[str, str]) -> str:
    meta = res["meta"]
    runs = {(r["command"], r["date"]) for r in res.get("runs", {}).values()}
    made = "; ".join(f"`{c}` on {d}" for c, d in sorted(runs)) or \
        f"`{meta['command']}` on {meta['date']}"
    lines = ["## Side-by-side report (issue #6)", "",
             f"Generated by {made}; device: "
             f"**{meta['device_name']}**; {meta['machine']['cpu']} "
             f"({meta['machine']['cpu_count']} cores); " +
             ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ". "
             "Every number and plot in this section comes from " +
             ("that one run" if len(runs) <= 1 else "those runs") +
             f" (`{meta['results_path']}`).", ""]
    if meta["device"] == "cpu":
        lines += ["**CPU only: no GPU was available for this run, so there are no CUDA figures.** "
                  "Step-time ratios on a CPU say how much work a step does, not how a GPU run "
                  "will feel.", ""]
    lines += ["Optimizers: " + "; ".join(f"`{n}` = {f['note']}" for n, f in res["roster"].items())
              + ". Weight decay 0 for all.", ""]
    if meta.get("overrides"):
        lines += ["Budget settings that differ from the defaults: " +
                  "; ".join(f"`{k}`: {v}" for k, v in meta["overrides"].items()) + ".", ""]
    missing = meta.get("peers_missing")
    if missing:
        lines += [f"Peers not measured (not importable here): {', '.join(missing)}.", ""]
    checks = acceptance(res)
    if checks:
        lines += ["### Memory claims", ""] + [
            f"* {'✅' if ok else '❌'} {label}: {detail}." for label, ok, detail in checks] + [""]
    v = verdicts(res)
    if v:
        lines += ["### Where each of our optimizers stands (AdamW = `adamw_torch`)", ""] + v + [""]
    if "memory" in res:
        lines += [memory_section(res, images["memory"]), ""]
    if "speed" in res:
        lines += [speed_section(res, images["speed"]), ""]
    for task in tasks_in(res):
        lines += [convergence_section(res, task, images[f"convergence_{task}"]), ""]
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------ plots
def _color(res, name):
    """AdamW in black, everyone else from one palette, by roster position (same in every plot)."""
    import matplotlib.pyplot as plt

    return "black" if name == "adamw_torch" else plt.cm.tab10(list(res["roster"]).index(name) % 10)


def plot_memory(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mem = res["memory"]
    rows = mem["sizes"][mem["largest"]]["optimizers"]
    names = [n for n in res["roster"] if "bytes_per_param" in rows.get(n, {})]
    pk = (mem.get("peak") or {}).get("optimizers", {})
    pnames = [n for n in names if "peak_bytes" in pk.get(n, {})]
    fig, axes = plt.subplots(1, 2 if pnames else 1, figsize=(13 if pnames else 7, 4.5),
                             squeeze=False)
    ax = axes[0][0]
    vals = [rows[n]["bytes_per_param"] for n in names]
    bars = ax.bar(range(len(names)), vals, color=[_color(res, n) for n in names])
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("optimizer state, bytes / parameter")
    ax.set_title(f"state after 2 steps, LLaMA {mem['largest']} "
                 f"({_fmt_params(mem['sizes'][mem['largest']]['params'])} params)")
    if pnames:
        ax = axes[0][1]
        before = [pk[n]["before_bytes"] / 2**20 for n in pnames]
        growth = [pk[n]["growth_bytes"] / 2**20 for n in pnames]
        ax.bar(range(len(pnames)), before, color="lightgrey", label="before training")
        bars = ax.bar(range(len(pnames)), growth, bottom=before,
                      color=[_color(res, n) for n in pnames],
                      label="growth during training")
        ax.bar_label(bars, labels=[f"{b + g:.0f}" for b, g in zip(before, growth)], fontsize=8)
        ax.set_xticks(range(len(pnames)), pnames, rotation=40, ha="right", fontsize=8)
        ax.set_ylabel("MiB")
        ax.set_title(f"peak training memory ({mem['peak']['method']})", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_speed(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sp = res["speed"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n in res["roster"]:
        pts = [(sp["sizes"][s]["params"], sp["sizes"][s]["optimizers"][n]["ratio_to_adamw"])
               for s in sp["sizes"] if "ratio_to_adamw" in sp["sizes"][s]["optimizers"].get(n, {})]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=n, color=_color(res, n),
                    linestyle="-" if res["roster"][n]["family"] != "peer" else "--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("step time / adamw_torch step time")
    ax.set_title(f"optimizer step time vs model size ({res['meta']['device_name']})", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_convergence(res: dict, task: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = res["convergence"][task]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, r in c["optimizers"].items():
        if "runs" not in r:
            continue
        curves = [run["curve"] for run in r["runs"] if not run["diverged"]]
        if not curves:
            continue
        steps = [s for s, _ in curves[0]]
        cols = list(zip(*[[v for _, v in cur] for cur in curves]))
        mean = [sum(col) / len(col) for col in cols]
        ax.plot(steps, mean, label=f"{n} (lr {r['best_lr']:g})", color=_color(res, n),
                linestyle="-" if res["roster"][n]["family"] != "peer" else "--")
        ax.fill_between(steps, [min(col) for col in cols], [max(col) for col in cols],
                        color=_color(res, n), alpha=0.15)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    finals = [r["val_loss"]["mean"] for r in c["optimizers"].values() if "val_loss" in r
              and math.isfinite(r["val_loss"]["mean"])]
    if finals:  # zoom on the end of training, where the optimizers differ
        lo, hi = min(finals), max(finals)
        ax.set_ylim(lo - 0.1 * (hi - lo + 0.05), hi + 2.0 * (hi - lo + 0.05))
    ax.set_title(f"{task}: mean over {c['seeds']} seeds at each optimizer's best lr "
                 f"(band: min-max)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(res: dict, out_dir: str) -> dict[str, str]:
    """Draw every plot the results allow; name -> file path."""
    paths = {}
    if "memory" in res:
        paths["memory"] = os.path.join(out_dir, "memory.png")
        plot_memory(res, paths["memory"])
    if "speed" in res:
        paths["speed"] = os.path.join(out_dir, "step_time.png")
        plot_speed(res, paths["speed"])
    for task in tasks_in(res):
        paths[f"convergence_{task}"] = os.path.join(out_dir, f"convergence_{task}.png")
        plot_convergence(res, task, paths[f"convergence_{task}"])
    return paths
