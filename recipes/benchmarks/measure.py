"""Memory and speed measurements: state bytes, peak training memory, optimizer step time.

* **State bytes** are the storages an optimizer's ``state`` holds after two steps (each storage
  once; tensor subclasses such as torchao's quantized states through their inner tensors), on the
  parameters of a real LLaMA model with random gradients.
* **Peak training memory** comes from a fresh process per optimizer that trains the model for a
  few steps: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the resident-set high-water mark
  ``VmHWM``, reset just before the first step (see ``process_memory``), reported next to the
  resident set before training. A fresh process per optimizer keeps allocator caches of one
  optimizer out of another's figure.
* **Step time**: every optimizer steps on the same parameters and gradients; rounds are
  interleaved (each round times a block of consecutive steps of every optimizer in turn), so a
  change in machine load hits all of them alike. A block covers whole refresh cycles of the
  optimizers that do periodic work (Shampoo's T1/T2), so its mean is the amortised cost. The
  figure is the median over rounds of the block mean, as a ratio to ``adamw_torch``.
"""

from __future__ import annotations

import statistics
import time

import torch

import hf_compressed_optim as hco

from .common import build_llama, child_result, start_child, sync
from .process_memory import reset_peak, rss_bytes, vm_hwm
from .roster import Entry, build_roster

# a small fixed lr: memory and time do not depend on it, and parameters must stay finite
TIMING_LR = {"efcp_mfac": 1e-3, "efcp_ggt": 1e-3}
DEFAULT_LR = 1e-4


def params_with_grads(size: str, device, seed: int = 0) -> list[torch.nn.Parameter]:
    """The parameters of LLaMA ``size``, detached from the model, with random gradients."""
    model = build_llama(size, seed, device)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    params = []
    for p in model.parameters():
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)
        params.append(q)
    return params


def _make(entry: Entry, params):
    return entry.make(params, TIMING_LR.get(entry.name, DEFAULT_LR))


def state_bytes(entry: Entry, params) -> dict:
    """Bytes of state after two steps: total, by category (ours) and per parameter, and the
    bytes of tensors the step left alive outside the state (workspaces, caches)."""
    before = hco.core.memory.live_tensor_storages()
    opt = _make(entry, params)
    opt.step()
    opt.step()
    n = sum(p.numel() for p in params)
    cats = hco.optimizer_state_bytes(opt)
    total = cats.pop("total")
    out = dict(params=n, bytes=total, bytes_per_param=total / n,
               by_category={k: v / n for k, v in cats.items()},
               unaccounted_bytes_per_param=hco.core.memory.unaccounted_tensor_bytes(opt, before) / n)
    del opt
    return out


def efcp_window_comparison(params, ours: dict, window: int, default_window: int) -> dict:
    """EFCP's sparse window (``ours``: its ``state_bytes`` row, measured at ``window``) against
    dense M-FAC at the same window, and the sparse window at the package default size.

    Dense M-FAC holds m fp32 gradients, 4·m B/param, and nothing else. This package's
    ``SparseMFAC(density=1, value_dtype='fp32')`` is measured as a cross-check: it also keeps the
    int16 indices a dense implementation would not.
    """
    def mfac(**kw):
        return Entry("efcp_mfac", "ours", lambda ps, lr: hco.SparseMFAC(ps, lr=lr, **kw), "")

    dense = state_bytes(mfac(window_size=window, density=1.0, value_dtype="fp32"), params)
    default = state_bytes(mfac(window_size=default_window), params)
    sparse = ours["by_category"]["window"]
    return dict(window=window, params=dense["params"],
                sparse_window_bytes_per_param=sparse,
                dense_window_bytes_per_param=4.0 * window,
                measured_dense_window_bytes_per_param=dense["by_category"]["window"],
                sparse_total_bytes_per_param=ours["bytes_per_param"],
                ratio=4.0 * window / sparse,
                default_window=dict(window=default_window, params=default["params"],
                                    sparse_window_bytes_per_param=default["by_category"]["window"]))


def step_times(roster: dict[str, Entry], params, device, block: int, rounds: int,
               warmup: int, progress=None) -> dict:
    """Median over ``rounds`` of the mean step time over ``block`` consecutive steps."""
    device = torch.device(device)
    opts, out = {}, {}
    for name, entry in roster.items():
        try:
            opt = _make(entry, params)
            t0 = time.perf_counter()
            for _ in range(warmup):
                opt.step()
            sync(device)
            out[name] = dict(warmup_s=time.perf_counter() - t0, block_means_s=[])
            opts[name] = opt
        except Exception as err:  # a peer that does not run here: say so, keep going
            out[name] = dict(error=f"{type(err).__name__}: {err}"[:300])
        if progress:
            progress.update(1)
    for _ in range(rounds):
        for name, opt in opts.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(block):
                opt.step()
            sync(device)
            out[name]["block_means_s"].append((time.perf_counter() - t0) / block)
            if progress:
                progress.update(1)
    for name in opts:
        r = out[name]
        r["median_s"] = statistics.median(r["block_means_s"])
        r["spread"] = (max(r["block_means_s"]) - min(r["block_means_s"])) / r["median_s"]
    base = out.get("adamw_torch", {}).get("median_s")
    for r in out.values():
        if base and "median_s" in r:
            r["ratio_to_adamw"] = r["median_s"] / base
    del opts
    return out


# ------------------------------------------------------------------ peak memory (child process)
def peak_child(name: str, size: str, steps: int, batch: int, block: int, device: str,
               quick: bool) -> dict:
    """Runs in a fresh process: train LLaMA ``size`` with ``name`` for ``steps`` steps."""
    device = torch.device(device)
    entry = build_roster(include_peers=True, quick=quick)[name]
    model = build_llama(size, 0, device)
    n = sum(p.numel() for p in model.parameters())
    opt = _make(entry, model.parameters())
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, block), generator=gen).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = rss_bytes()
        reset = reset_peak()
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    if device.type == "cuda":
        peak, method = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    else:
        peak = vm_hwm() or 0
        method = "VmHWM, reset before training" if reset else "VmHWM (not reset)"
    return dict(params=n, before_bytes=before, peak_bytes=peak, growth_bytes=peak - before,
                state_bytes=hco.optimizer_state_bytes(opt)["total"], method=method,
                loss=float(loss))


def run_peak_children(names: list[str], size: str, steps: int, batch: int, block: int,
                      device: str, quick: bool, peers_path: str | None, progress=None) -> dict:
    """One child process per optimizer (sequential, so they do not compete for memory)."""
    out = {}
    for name in names:
        args = ["_peak", "--optim", name, "--size", size, "--steps", str(steps), "--batch",
                str(batch), "--block", str(block), "--device", str(device)]
        out[name] = child_result(start_child("recipes.benchmarks.run",
                                             args + (["--quick"] if quick else []), peers_path))
        if progress:
            progress.update(1)
    base = out.get("adamw_torch", {})
    for r in out.values():
        if "peak_bytes" in r and "peak_bytes" in base:
            r["peak_ratio_to_adamw"] = r["peak_bytes"] / base["peak_bytes"]
            r["growth_ratio_to_adamw"] = r["growth_bytes"] / max(base["growth_bytes"], 1)
    return out
