"""Gradient release: peak process memory with and without it, each case in a fresh process.

Two measurements (CPU: the resident-set high-water mark ``VmHWM``, reset just before training;
see :mod:`recipes.benchmarks.process_memory`):

* ``grads``: a stack of ``--layers`` 2048x2048 fp32 linear layers at batch 1, so the gradients
  (16.8 MB per layer) dwarf the activations. MicroAdam with and without ``gradient_release``,
  ``--repeats`` fresh processes each (medians); the saving is reported as a fraction of the
  gradient bytes.
* ``llama``: TinyLlama-1.1B's shape (22 layers, hidden 2048, MLP 5632, 32/4 heads, vocab 32000),
  built from a config with random bf16 weights, ``--steps`` steps at batch 1 x ``--seq`` tokens:
  AdamW (Trainer's default ``adamw_torch_fused``), MicroAdam, MicroAdam + gradient release and
  torchao's AdamW4bit (when it imports and runs on this machine). Peak bytes per parameter above
  the bare process (Python, torch, the package: measured before the model is built) are
  projected to LLaMA-2 7B's 6.74 B parameters. One process per case, run once (heavy on CPU).

Examples::

    python -m recipes.benchmarks.release --part grads
    python -m recipes.benchmarks.release --part llama --peers-path /tmp/peers --steps 3
    python -m recipes.benchmarks.release --from-json recipes/results/release_cpu_2026-12-02.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import sys
import time

import torch

from .common import (add_peers_path, child_result, machine_info, md_table, print_saved,
                     report_to_parent, start_child, versions, write_json)
from .process_memory import reset_peak, rss_bytes, vm_hwm

#: TinyLlama-1.1B's shape: (hidden, layers, intermediate, heads, kv_heads), vocabulary
LLAMA_1B = ((2048, 22, 5632, 32, 4), 32000)
LLAMA2_7B_PARAMS = 6_738_415_616
GRAD_CASES = ("microadam", "microadam_release")
LLAMA_CASES = ("adamw_torch_fused", "microadam", "microadam_release", "adamw_torch_4bit")
LABELS = {"adamw_torch_fused": "AdamW (torch, fused; Trainer's default)",
          "microadam": "MicroAdam", "microadam_release": "MicroAdam + gradient release",
          "adamw_torch_4bit": "torchao AdamW4bit"}


def make_optimizer(case: str, params, lr: float = 1e-5):
    import hf_compressed_optim as hco

    if case == "adamw_torch_fused":
        return torch.optim.AdamW(params, lr=lr, fused=True)
    if case == "adamw_torch_4bit":
        from torchao.optim import AdamW4bit

        return AdamW4bit(params, lr=lr)
    return hco.MicroAdam(params, lr=lr, gradient_release=case.endswith("_release"))


def state_bytes(opt) -> int | None:
    import hf_compressed_optim as hco

    try:
        return int(hco.optimizer_state_bytes(opt)["total"])
    except Exception:
        return None


# ------------------------------------------------------------------ child processes
def child(case: str, model: str, steps: int, layers: int, seq: int) -> dict:
    """Runs in a fresh process: build the model, then ``steps`` steps of ``case``."""
    import hf_compressed_optim  # noqa: F401  (imported before the baseline is measured)

    gc.collect()
    bare = rss_bytes()
    if model == "grads":
        net = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048, bias=False)
                                    for _ in range(layers)])
        x = torch.randn(1, 2048)

        def loss_fn():
            return net(x).pow(2).mean()
    else:
        from .common import build_llama

        shape, vocab = LLAMA_1B
        torch.set_default_dtype(torch.bfloat16)
        net = build_llama(shape, 0, vocab=vocab, max_positions=max(seq, 64))
        torch.set_default_dtype(torch.float32)
        ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(0))

        def loss_fn():
            return net(input_ids=ids, labels=ids).loss
    params = [p for p in net.parameters()]
    n = sum(p.numel() for p in params)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    opt = make_optimizer(case, params)
    gc.collect()
    before = rss_bytes()
    reset = reset_peak()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    peak = vm_hwm() or 0
    return dict(case=case, params=n, param_bytes=param_bytes, grad_bytes=param_bytes,
                bare_bytes=bare, before_bytes=before, peak_bytes=peak,
                growth_bytes=peak - before, state_bytes=state_bytes(opt), loss=float(loss),
                step_seconds=times, method="VmHWM reset before training" if reset else
                "VmHWM (not reset)")


def run_child(case: str, model: str, args, mmap_threshold: int) -> dict:
    argv = ["_child", "--case", case, "--model", model, "--steps", str(args.steps),
            "--layers", str(args.layers), "--seq", str(args.seq)]
    env = {"MALLOC_MMAP_THRESHOLD_": str(mmap_threshold)} if mmap_threshold else {}
    return child_result(start_child("recipes.benchmarks.release", argv, args.peers_path, env))


# ------------------------------------------------------------------ the two measurements
def measure_grads(args, mmap_threshold: int) -> dict:
    runs = {case: [] for case in GRAD_CASES}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        for case in GRAD_CASES:
            runs[case].append(run_child(case, "grads", args, mmap_threshold))
            print(case, runs[case][-1], file=sys.stderr, flush=True)
    out = {}
    for case, rs in runs.items():
        good = [r for r in rs if "peak_bytes" in r]
        if not good:
            out[case] = rs[0]
            continue
        out[case] = dict(good[0], growth_bytes=statistics.median(r["growth_bytes"] for r in good),
                         peak_bytes=statistics.median(r["peak_bytes"] for r in good),
                         growth_runs=[r["growth_bytes"] for r in good])
    plain, rel = out["microadam"], out["microadam_release"]
    if "growth_bytes" in plain and "growth_bytes" in rel:
        saved = plain["growth_bytes"] - rel["growth_bytes"]
        out["saving"] = dict(bytes=saved, fraction_of_grad_bytes=saved / plain["grad_bytes"])
    return out


def measure_llama(args) -> dict:
    out = {}
    for case in LLAMA_CASES:
        r = run_child(case, "llama", args, args.mmap_threshold)
        if "peak_bytes" in r:
            r["bytes_per_param"] = (r["peak_bytes"] - r["bare_bytes"]) / r["params"]
            r["projected_7b_bytes"] = r["bytes_per_param"] * LLAMA2_7B_PARAMS
        out[case] = r
        print(case, r, file=sys.stderr, flush=True)
    return out


# ------------------------------------------------------------------ report
def _gb(b) -> str:
    return f"{b / 1e9:.2f}"


def _grads_table(res: dict, key: str) -> list[str]:
    grads = res.get(key)
    if not grads:
        return []
    args = res["args"]
    alloc = ("glibc's default allocator settings" if key.endswith("glibc_default") else
             f"MALLOC_MMAP_THRESHOLD_={args['mmap_threshold']}")
    grad_mb = next((r["grad_bytes"] for r in grads.values() if "grad_bytes" in r), 0) / 1e6
    lines = [f"Stack of {args['layers']} x 2048x2048 fp32 layers (no bias), batch 1, "
             f"{args['steps']} steps, {alloc}; gradients {grad_mb:.1f} MB; median of "
             f"{args['repeats']} fresh processes each.", ""]
    rows = [(LABELS[c], f"{grads[c]['growth_bytes'] / 1e6:.1f}",
             " / ".join(f"{g / 1e6:.0f}" for g in grads[c]["growth_runs"]),
             f"{grads[c]['peak_bytes'] / 1e6:.1f}") if "growth_bytes" in grads[c]
            else (LABELS[c], grads[c]) for c in GRAD_CASES]
    lines += md_table(["optimizer", "peak growth in training (MB)", "runs (MB)",
                       "peak RSS (MB)"], "lrrr", rows)
    if "saving" in grads:
        s = grads["saving"]
        lines += ["", f"Saving: {s['bytes'] / 1e6:.1f} MB = "
                  f"{100 * s['fraction_of_grad_bytes']:.0f}% of the gradient bytes.", ""]
    return lines


def markdown(res: dict) -> str:
    lines = []
    for key in ("grads", "grads_glibc_default"):
        lines += _grads_table(res, key)
    llama = res.get("llama")
    if llama:
        n = next((r["params"] for r in llama.values() if "params" in r), 0)
        lines += [f"LLaMA {n / 1e9:.2f} B parameters (TinyLlama-1.1B's shape), bf16 weights, "
                  f"batch 1 x {res['args']['seq']} tokens, {res['args']['steps']} steps, one "
                  "fresh process each. Bytes/param: (peak - bare process) / parameters; "
                  "projection: bytes/param x 6.74 B (LLaMA-2 7B).", ""]
        rows = []
        for c in LLAMA_CASES:
            r = llama.get(c)
            if r is None:
                continue
            if "peak_bytes" not in r:
                rows.append((LABELS[c], r))
                continue
            rows.append((LABELS[c], _gb(r["peak_bytes"]), _gb(r["peak_bytes"] - r["bare_bytes"]),
                         "" if r["state_bytes"] is None else _gb(r["state_bytes"]),
                         f"{r['bytes_per_param']:.2f}", _gb(r["projected_7b_bytes"]),
                         f"{statistics.median(r['step_seconds'][1:] or r['step_seconds']):.0f}"))
        lines += md_table(["optimizer", "peak RSS (GB)", "above bare process (GB)",
                           "state (GB)", "bytes/param", "LLaMA-2 7B projection (GB)",
                           "step (s)"], "lrrrrrr", rows)
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("grads", "llama", "all"), default="grads")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peers-path", default=None)
    p.add_argument("--mmap-threshold", type=int, default=1 << 20,
                   help="MALLOC_MMAP_THRESHOLD_ of the children (0: glibc's default); with "
                   "--part grads, glibc's default is measured as well")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--from-json", default=None, help="print the tables of a saved run")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        p = argparse.ArgumentParser()
        for flag in ("--case", "--model"):
            p.add_argument(flag)
        for flag in ("--steps", "--layers", "--seq"):
            p.add_argument(flag, type=int)
        a = p.parse_args(argv[1:])
        return report_to_parent(child(a.case, a.model, a.steps, a.layers, a.seq))
    args = parse_args(argv)
    if args.from_json:
        return print_saved(args.from_json, markdown)
    add_peers_path(args.peers_path)
    res = dict(command="python -m recipes.benchmarks.release " + " ".join(argv),
               date=datetime.date.today().isoformat(), machine=machine_info(),
               versions=versions(), args=vars(args))
    if args.part in ("grads", "all"):
        res["grads"] = measure_grads(args, args.mmap_threshold)
        if args.mmap_threshold:
            res["grads_glibc_default"] = measure_grads(args, 0)
    if args.part in ("llama", "all"):
        res["llama"] = measure_llama(args)
    write_json(res, args.json)
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
