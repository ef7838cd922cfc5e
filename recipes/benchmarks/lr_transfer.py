"""Does AdamW's learning rate carry over? A learning-rate sweep per optimizer on one small task.

Every optimizer is built exactly as ``TrainingArguments(optim=name, learning_rate=lr,
max_steps=steps)`` builds it (:func:`hf_compressed_optim.optimizer_cls_and_kwargs`, package
defaults, no ``optim_args``), trained with the same warmup + cosine schedule and seed, and scored
by its final training loss (mean of the last steps). For each optimizer the report gives its best
loss over the sweep and its loss at the lr that is best for AdamW: the ratio is what a user who
switches only ``optim=`` gets. ``tests/test_lr_transfer.py`` runs the small default in seconds.

    python -m recipes.benchmarks.lr_transfer                         # tiny MLP, seconds
    python -m recipes.benchmarks.lr_transfer --task llama --steps 150  # small LLaMA on text
"""

from __future__ import annotations

import argparse
import math
import time
from types import SimpleNamespace

import torch

import hf_compressed_optim as hco

#: the optimizers of the package by optim= name, and the baseline
NAMES = ("adamw", "microadam", "shampoo_4bit", "shampoo_32bit", "efcp_mfac", "efcp_ggt")
#: a wide log grid, a factor sqrt(10) apart: 1e-4 ... 1
WIDE_GRID = tuple(10 ** (e / 2) for e in range(-8, 1))


def make_optimizer(name: str, params, lr: float, steps: int) -> torch.optim.Optimizer:
    """``name`` as the Trainer builds it from ``TrainingArguments(learning_rate=lr,
    max_steps=steps)`` with no ``optim_args`` (AdamW: ``torch.optim.AdamW`` with its
    TrainingArguments defaults)."""
    args = SimpleNamespace(learning_rate=lr, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                           weight_decay=0.0, optim_args=None, max_steps=steps)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    cls, kwargs = hco.optimizer_cls_and_kwargs(name, args)
    return cls(params, **kwargs)


def warmup_cosine(step: int, steps: int, warmup: int) -> float:
    """The main job's schedule (linear warmup, cosine decay to 0), as a factor of lr."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


class MLPTask:
    """A student MLP fitting a fixed random teacher MLP (minibatches of a fixed set)."""

    def __init__(self, seed: int = 0, dim: int = 32, hidden: int = 64, out: int = 8,
                 samples: int = 512, batch: int = 64):
        gen = torch.Generator().manual_seed(seed)
        teacher = [torch.randn(dim, hidden, generator=gen) / dim ** 0.5,
                   torch.randn(hidden, out, generator=gen) / hidden ** 0.5]
        self.x = torch.randn(samples, dim, generator=gen)
        self.y = torch.tanh(self.x @ teacher[0]) @ teacher[1]
        self.shapes = (dim, hidden, out)
        self.batch, self.seed = batch, seed

    def model(self) -> torch.nn.Module:
        torch.manual_seed(self.seed + 1)
        dim, hidden, out = self.shapes
        return torch.nn.Sequential(torch.nn.Linear(dim, hidden, bias=False), torch.nn.Tanh(),
                                   torch.nn.Linear(hidden, hidden, bias=False), torch.nn.Tanh(),
                                   torch.nn.Linear(hidden, out, bias=False))

    def loss(self, model: torch.nn.Module, step: int) -> torch.Tensor:
        n = self.x.shape[0]
        idx = torch.arange(step * self.batch, (step + 1) * self.batch) % n
        return torch.nn.functional.mse_loss(model(self.x[idx]), self.y[idx])


class LlamaTextTask:
    """The main job's model family (small LLaMA, byte vocabulary) on the offline corpus."""

    def __init__(self, seed: int = 0, batch: int = 16, block: int = 128):
        from hf_compressed_optim import offline_corpus

        data = offline_corpus.lm_datasets(block_size=block, seed=seed)["train"]
        self.ids = torch.tensor(data["input_ids"])
        self.batch, self.seed = batch, seed

    def model(self) -> torch.nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(self.seed + 1)
        cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                          max_position_embeddings=128, tie_word_embeddings=False,
                          bos_token_id=None, eos_token_id=None, pad_token_id=None)
        return LlamaForCausalLM(cfg)

    def loss(self, model: torch.nn.Module, step: int) -> torch.Tensor:
        n = self.ids.shape[0]
        idx = torch.arange(step * self.batch, (step + 1) * self.batch) % n
        batch = self.ids[idx]
        return model(input_ids=batch, labels=batch).loss


def train(task, name: str, lr: float, steps: int, tail: int = 5) -> float:
    """Final training loss (mean of the last ``tail`` steps; inf if it diverged)."""
    model = task.model()
    opt = make_optimizer(name, [p for p in model.parameters() if p.requires_grad], lr, steps)
    warmup = max(1, steps // 15)
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * warmup_cosine(step, steps, warmup)
        loss = task.loss(model, step)
        if not torch.isfinite(loss):
            return math.inf
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return sum(losses[-tail:]) / tail


def sweep(task, names=NAMES, grid=WIDE_GRID, steps: int = 60) -> dict:
    """``{name: {lr: final loss}}`` and, per name, its loss at AdamW's best lr vs its own best."""
    losses = {name: {lr: train(task, name, lr, steps) for lr in grid} for name in names}
    adam_lr = min(grid, key=lambda lr: losses["adamw"][lr])
    summary = {}
    for name in names:
        best_lr = min(grid, key=lambda lr: losses[name][lr])
        best, at_adam = losses[name][best_lr], losses[name][adam_lr]
        summary[name] = dict(best_lr=best_lr, best=best, at_adam_lr=at_adam,
                             ratio=at_adam / best if best > 0 else math.inf)
    return dict(adam_lr=adam_lr, losses=losses, summary=summary)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("mlp", "llama"), default="mlp")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--optimizers", nargs="+", default=list(NAMES))
    parser.add_argument("--grid", type=float, nargs="+", default=list(WIDE_GRID))
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    task = MLPTask() if args.task == "mlp" else LlamaTextTask()
    names = list(dict.fromkeys(["adamw", *args.optimizers]))
    t0 = time.perf_counter()
    out = sweep(task, names, args.grid, args.steps)
    print(f"task {args.task}, {args.steps} steps, lr grid {[f'{lr:.3g}' for lr in args.grid]}; "
          f"AdamW's best lr {out['adam_lr']:.3g} ({time.perf_counter() - t0:.0f} s)")
    print("| optimizer | best lr | best loss | loss at AdamW's best lr | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for name, s in out["summary"].items():
        print(f"| `{name}` | {s['best_lr']:.3g} | {s['best']:.4g} | {s['at_adam_lr']:.4g} | "
              f"{s['ratio']:.3f} |")
    for name in names:
        print(name, " ".join(f"{lr:.3g}:{loss:.4g}" for lr, loss in out["losses"][name].items()))
    return out


if __name__ == "__main__":
    main()
