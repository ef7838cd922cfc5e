"""Convergence: same model, data, schedule and step budget for every optimizer.

Protocol, per task and optimizer:

1. **Sweep**: one run (seed 0) per learning rate of the optimizer's grid; the lr with the lowest
   final *validation* loss wins (a run whose loss becomes non-finite is marked diverged and cannot
   win).
2. **Seeds**: the winning lr is rerun with seeds 1 … S-1 (model initialisation and batch order;
   the data split never changes), so each optimizer has S runs at its best lr.
3. **Report**: mean and standard deviation over seeds of the final *test* loss (and accuracy for
   the classifier), and validation-loss curves.

Every run: linear warm-up over the first 10% of steps then cosine decay to zero
(``transformers.get_cosine_schedule_with_warmup``), gradient-norm clipping at 1.0, no weight
decay, fp32.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
from transformers import get_cosine_schedule_with_warmup

from .roster import Entry, build_roster


def clipped_step(model, loss, opt, sched, max_norm: float = 1.0) -> float:
    """One training step as every benchmark run takes it: backward, clip, step, schedule."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def train_run(task, entry: Entry, lr: float, seed: int, steps: int, eval_every: int,
              model=None) -> dict:
    model = task.model(seed) if model is None else model
    opt = entry.make(list(model.parameters()), lr)
    sched = get_cosine_schedule_with_warmup(opt, max(1, steps // 10), steps)
    curve = [(0, task.evaluate(model, "val")["loss"])]
    train_losses, diverged = [], False
    t0 = time.perf_counter()
    for step, idx in enumerate(task.batches(steps, seed), start=1):
        loss = task.loss(model, "train", idx)
        if not torch.isfinite(loss):
            diverged = True
            break
        train_losses.append(clipped_step(model, loss, opt, sched))
        if step % eval_every == 0 or step == steps:
            val = task.evaluate(model, "val")["loss"]
            curve.append((step, val))
            if not math.isfinite(val):
                diverged = True
                break
    seconds = time.perf_counter() - t0
    out = dict(lr=lr, seed=seed, curve=curve, seconds=seconds, diverged=diverged,
               train_loss_first=train_losses[0] if train_losses else float("nan"),
               train_loss_last=statistics.fmean(train_losses[-10:]) if train_losses
               else float("nan"))
    if diverged:
        out.update(val={"loss": float("inf")}, test={"loss": float("inf")})
    else:
        out.update(val=task.evaluate(model, "val"), test=task.evaluate(model, "test"))
    return out


def pretrain(task, steps: int, lr: float, eval_every: int) -> tuple[dict, dict]:
    """AdamW from scratch on ``task`` (seed 0): the shared starting point of fine-tuning runs."""
    entry = build_roster(include_peers=False)["adamw_torch"]
    model = task.model(0)
    run = train_run(task, entry, lr, 0, steps, eval_every, model=model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, dict(lr=lr, steps=steps, val_loss=run["val"]["loss"], curve=run["curve"])


def _summary(values: list[float]) -> dict:
    finite = [v for v in values if math.isfinite(v)]
    return dict(mean=statistics.fmean(finite) if finite else float("inf"),
                std=statistics.stdev(finite) if len(finite) > 1 else 0.0,
                values=values)


def run_task(task, roster: dict[str, Entry], steps: int, seeds: int, eval_every: int,
             progress=None, log=print) -> dict:
    """Sweep then seeds, for every optimizer that is not the same math as another one."""
    results = {}
    for name, entry in roster.items():
        if entry.same_math_as:
            continue
        try:
            sweep = []
            for lr in entry.lr_grid[task.name]:
                sweep.append(train_run(task, entry, lr, 0, steps, eval_every))
                if progress:
                    progress.update(1)
            best = min(sweep, key=lambda r: r["val"]["loss"])
            runs = [best] + [train_run(task, entry, best["lr"], s, steps, eval_every)
                             for s in range(1, seeds)]
            if progress:
                progress.update(seeds - 1)
        except Exception as err:  # a peer that does not run here: say so, keep going
            results[name] = dict(error=f"{type(err).__name__}: {err}"[:300])
            log(f"  {name}: FAILED {results[name]['error']}")
            continue
        r = dict(best_lr=best["lr"],
                 sweep=[dict(lr=s["lr"], val_loss=s["val"]["loss"], diverged=s["diverged"])
                        for s in sweep],
                 runs=runs,
                 test_loss=_summary([x["test"]["loss"] for x in runs]),
                 val_loss=_summary([x["val"]["loss"] for x in runs]),
                 seconds=statistics.fmean(x["seconds"] for x in runs))
        if task.metric == "accuracy":
            r["test_accuracy"] = _summary([x["test"].get("accuracy", float("nan"))
                                           for x in runs])
        results[name] = r
        log(f"  {task.name:6s} {name:18s} best lr {best['lr']:g}  test loss "
            f"{r['test_loss']['mean']:.4f} ± {r['test_loss']['std']:.4f}")
    return results


def sweep_runs(roster: dict[str, Entry], task_name: str, seeds: int) -> int:
    """How many training runs ``run_task`` will make (for the progress bar)."""
    return sum(len(e.lr_grid[task_name]) + seeds - 1 for e in roster.values()
               if not e.same_math_as)
