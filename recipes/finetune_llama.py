#!/usr/bin/env python
"""Fine-tune a small LLaMA-architecture model with a compressed optimizer through the HF Trainer.

The project's main job: it exercises the whole user path (``optim="microadam"`` in
``TrainingArguments``, the Trainer, optional LoRA, the memory report) with nothing downloaded.

* Model: built from a ``LlamaConfig`` (byte vocabulary, random init) unless
  ``--model_name_or_path`` names a local folder or hub id.
* Data: English docstrings of the Python standard library
  (:mod:`hf_compressed_optim.offline_corpus`), byte-encoded and packed into ``--block_size``
  blocks; a pretrained model's own tokenizer is used when one is found next to it.

Arguments: the model and data options below (:class:`ModelDataArguments`) plus every field of
transformers' ``TrainingArguments`` (``--gradient_checkpointing``, ``--report_to``, ``--bf16``,
``--save_steps``, ...), with this job's defaults set over TrainingArguments' own (``--help``
shows them). ``--save_steps N`` alone saves every N steps (the default 0 saves nothing).

Examples::

    python recipes/finetune_llama.py                          # MicroAdam, ~1 min on 2 CPU cores
    python recipes/finetune_llama.py --optim adamw_torch      # baseline
    python recipes/finetune_llama.py --lora --learning_rate 1e-2
    torchrun --nproc_per_node 2 recipes/finetune_llama.py --use_cpu   # DDP on gloo

Every rank must import ``hf_compressed_optim`` before ``TrainingArguments`` is built: the import
registers the optimizer names with transformers.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (HfArgumentParser, LlamaConfig, LlamaForCausalLM, Trainer,  # noqa: E402
                          TrainerCallback, TrainingArguments)

import hf_compressed_optim  # noqa: E402  (registers optim="microadam" and friends)
from hf_compressed_optim import find_zero_optimizer, offline_corpus  # noqa: E402


@dataclass
class ModelDataArguments:
    """The model and the data; everything else is a ``TrainingArguments`` field."""

    model_name_or_path: str | None = field(default=None, metadata={
        "help": "local folder or hub id; default: build a small LLaMA from a LlamaConfig"})
    hidden_size: int = field(default=192, metadata={"help": "model width (built model only)"})
    intermediate_size: int = field(default=512, metadata={"help": "MLP width (built model only)"})
    num_hidden_layers: int = field(default=3, metadata={"help": "layers (built model only)"})
    num_attention_heads: int = field(default=6, metadata={
        "help": "attention heads; must divide --hidden_size (built model only)"})
    lora: bool = field(default=False, metadata={
        "help": "train LoRA adapters on q/k/v/o projections (peft) instead of all weights"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (with --lora)"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (with --lora)"})
    block_size: int = field(default=128, metadata={"help": "sequence length"})
    max_train_blocks: int | None = field(default=None, metadata={"help": "cap the training set"})
    max_eval_blocks: int = field(default=128, metadata={"help": "cap the eval set"})
    save: bool = field(default=False, metadata={
        "help": "save the final model to --output_dir and a final Trainer checkpoint (model, "
                "optimizer, scheduler) to --output_dir/checkpoint-<max_steps>"})


#: This job's values of TrainingArguments fields (the rest keep transformers' defaults).
TRAINING_DEFAULTS = dict(
    output_dir="outputs/finetune_llama", optim="microadam", learning_rate=3e-3, warmup_steps=20,
    lr_scheduler_type="cosine", max_steps=300, per_device_train_batch_size=16,
    per_device_eval_batch_size=32, logging_steps=10, logging_first_step=True, save_steps=0,
    save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, seed=42,
    dataloader_num_workers=0, ddp_find_unused_parameters=False)


#: what --help says about the optimizers of this package (transformers' help names none of them)
OPTIM_HELP = (
    "the optimizer: this package's microadam (0.96 B/param of state), shampoo_4bit / "
    "shampoo_32bit (4-bit / fp32 Shampoo grafted onto AdamW), efcp_mfac (alias efcp) / efcp_ggt "
    "(sparse M-FAC / GGT), or any transformers name (adamw_torch, adamw_torch_fused, ...). All "
    "take AdamW's --learning_rate and --weight_decay (README: 'Switching from AdamW')")
OPTIM_ARGS_HELP = (
    "key=value pairs, comma-separated, for the chosen optimizer (e.g. 'window_size=20,"
    "density=0.02' for microadam; keys and ranges: README option tables); checked at start-up")


def accelerator_available() -> bool:
    """Whether torch sees a GPU or another accelerator (CUDA, ROCm, MPS, XPU)."""
    accel = getattr(torch, "accelerator", None)
    if accel is not None and hasattr(accel, "is_available"):
        return bool(accel.is_available())
    return torch.cuda.is_available()


def build_parser() -> HfArgumentParser:
    """The command line: model/data options and every TrainingArguments field, with this job's
    defaults (``--use_cpu`` defaults to true on a machine without an accelerator, so ``--bf16``
    and ``torchrun`` DDP run on CPU without it)."""
    parser = HfArgumentParser((ModelDataArguments, TrainingArguments),
                              description=__doc__.split("\n\n")[0])
    parser.set_defaults(**TRAINING_DEFAULTS, use_cpu=not accelerator_available())
    for action in parser._actions:
        if action.dest == "optim":
            action.help = OPTIM_HELP + " (default: %(default)s)"
        elif action.dest == "optim_args":
            action.help = OPTIM_ARGS_HELP + " (default: %(default)s)"
        elif action.dest == "use_cpu":
            action.help = ("train on CPU even if an accelerator is present (default: true when "
                           "none is: %(default)s); with torchrun it runs DDP over gloo")
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[ModelDataArguments, TrainingArguments]:
    """(model/data arguments, TrainingArguments) from the command line; the optimizer options are
    checked here, before any model or data work."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    # the Trainer writes every checkpoint, the final one (--save) too: it consolidates sharded
    # optimizer state (ZeRO-1, FSDP) on every rank before rank 0 saves
    if ns.save_strategy == "no" and (ns.save_steps or ns.save):
        ns.save_strategy = "steps"
    ns.save_steps = ns.save_steps or ns.max_steps
    return parser.parse_dict(vars(ns))


# ------------------------------------------------------------------------------------ model
def build_model_and_tokenize(args: ModelDataArguments, seed: int) -> tuple:
    """(model, tokenize) where tokenize maps corpus text to token ids for this model."""
    if args.model_name_or_path:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path)
        try:
            tok = AutoTokenizer.from_pretrained(args.model_name_or_path)
        except Exception:  # no tokenizer files: byte ids (right for byte-level vocabularies)
            tok = None
        if tok is not None:
            return model, lambda text: tok(text, add_special_tokens=False)["input_ids"]
        if model.config.vocab_size < offline_corpus.VOCAB_SIZE:
            raise ValueError(f"{args.model_name_or_path} has no tokenizer and a vocabulary of "
                             f"{model.config.vocab_size} < 256 byte ids")
        return model, offline_corpus.encode
    heads = args.num_attention_heads
    if args.hidden_size % heads:
        raise ValueError("--hidden_size must be a multiple of --num_attention_heads")
    config = LlamaConfig(
        vocab_size=offline_corpus.VOCAB_SIZE, hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size, num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max(args.block_size, 128), tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(seed)  # the same initial weights on every rank and run
    return LlamaForCausalLM(config), offline_corpus.encode


def apply_lora(model: torch.nn.Module, args: ModelDataArguments) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters on the attention projections."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


# ------------------------------------------------------------------------------------ logging
class LossPrinter(TrainerCallback):
    """One compact line per logging step on the main process; keeps the losses for the summary."""

    def __init__(self):
        self.history: list[tuple[int, float]] = []
        self._t0 = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        self.history.append((state.global_step, float(logs["loss"])))
        if state.is_world_process_zero:
            lr = logs.get("learning_rate", float("nan"))
            print(f"step {state.global_step:5d}/{state.max_steps}  loss {logs['loss']:.4f}  "
                  f"lr {lr:.2e}  {time.perf_counter() - self._t0:6.1f}s", flush=True)


def format_memory_report(report: dict, n_trainable: int) -> str:
    total = report["optimizer_state_bytes"]
    lines = [f"optimizer state: {total:,} bytes = {total / 2**20:.3f} MiB for {n_trainable:,} "
             f"trainable params -> {report['optimizer_state_bytes_per_param']:.4f} B/param "
             "(AdamW fp32: 8)"]
    for key, value in report.items():
        if key.startswith("optimizer_state_bytes/"):
            cat = key.split("/", 1)[1]
            lines.append(f"  {cat:16s} {value:>14,} B  {value / max(n_trainable, 1):.4f} B/param")
    return "\n".join(lines)


def state_scope(trainer, world_size: int) -> str:
    """What the memory figures below cover on this rank."""
    if world_size <= 1:
        return ""
    if find_zero_optimizer(trainer.optimizer) is not None:
        return f" (per rank: this rank's 1/{world_size} share of the ZeRO-1 sharded state)"
    if trainer.is_fsdp_enabled:
        return " (per rank: this rank's FSDP shard of the state)"
    return " (per rank: DDP keeps a full copy on each)"


# ------------------------------------------------------------------------------------ main
@torch.no_grad()
def param_fingerprint(model) -> list[float]:
    """(sum, sum of squares) of all parameters in float64: equal fingerprints after a resumed
    and an uninterrupted run mean the resume continued exactly (FSDP2 shards are gathered)."""
    total = sq = 0.0
    for p in model.parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        t = t.detach().double()
        total += float(t.sum())
        sq += float((t * t).sum())
    return [total, sq]


def main(argv: list[str] | None = None) -> dict:
    """Train, evaluate before and after, print the memory report; return (and write) results."""
    args, training_args = parse_args(argv)
    transformers.set_seed(training_args.seed)
    model, tokenize = build_model_and_tokenize(args, training_args.seed)
    if args.lora:
        model = apply_lora(model, args)
    data = offline_corpus.lm_datasets(block_size=args.block_size, seed=training_args.seed,
                                      tokenize=tokenize)
    train_ds, eval_ds = data["train"], data["eval"]
    if args.max_train_blocks:
        train_ds = train_ds.select(range(min(args.max_train_blocks, len(train_ds))))
    if args.max_eval_blocks:
        eval_ds = eval_ds.select(range(min(args.max_eval_blocks, len(eval_ds))))
    optim = getattr(training_args.optim, "value", training_args.optim)
    printer = LossPrinter()
    trainer = Trainer(model=model, args=training_args, train_dataset=train_ds,
                      eval_dataset=eval_ds, callbacks=[printer])
    # Trainer's own PrinterCallback would print every log dict again; ours is compact
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    hf_compressed_optim.add_memory_callback(trainer)  # first, so loggers see the metrics
    main_process = trainer.is_world_process_zero()

    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    if main_process:
        print(f"model: {type(model).__name__} {n_total:,} params ({n_trainable:,} trainable"
              f"{', LoRA' if args.lora else ''}); data: {len(train_ds)} train / {len(eval_ds)} "
              f"eval blocks of {args.block_size} tokens; optim={optim} "
              f"optim_args={training_args.optim_args!r} lr={training_args.learning_rate} "
              f"world_size={training_args.world_size} device={training_args.device}", flush=True)

    t0 = time.perf_counter()
    eval_before = trainer.evaluate()["eval_loss"]
    if main_process:
        print(f"eval loss before: {eval_before:.4f} (uniform over 256 bytes: "
              f"{math.log(offline_corpus.VOCAB_SIZE):.4f})", flush=True)
    train_out = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    eval_after = trainer.evaluate()["eval_loss"]
    elapsed = time.perf_counter() - t0

    report = hf_compressed_optim.optimizer_memory_report(trainer.optimizer)
    n_opt = hf_compressed_optim.trainable_parameter_count(trainer.optimizer)
    optimizer = hf_compressed_optim.unwrap_optimizer(trainer.optimizer)
    results = {
        "optim": optim, "optim_args": training_args.optim_args,
        "optimizer_class": type(optimizer).__name__,
        "lora": args.lora, "params_total": n_total, "params_trainable": n_trainable,
        "world_size": training_args.world_size, "max_steps": training_args.max_steps,
        "eval_loss_before": eval_before, "eval_loss_after": eval_after,
        "train_loss_first": printer.history[0][1] if printer.history else None,
        "train_loss_last": printer.history[-1][1] if printer.history else None,
        "train_loss_mean": train_out.training_loss, "loss_history": printer.history,
        "seconds": elapsed, "memory": report,
        "param_fingerprint": param_fingerprint(model),
    }
    if main_process:
        print(f"eval loss after:  {eval_after:.4f}  (before {eval_before:.4f}); "
              f"train+eval {elapsed:.1f}s", flush=True)
        print(f"[{type(optimizer).__name__}]{state_scope(trainer, training_args.world_size)} "
              + format_memory_report(report, n_opt), flush=True)
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(os.path.join(training_args.output_dir, "finetune_results.json"), "w") as f:
            json.dump(results, f, indent=2)
    if args.save:  # the optimizer state is in the final checkpoint the Trainer wrote
        trainer.save_model(training_args.output_dir)
        trainer.save_state()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # an orderly shutdown: exiting with a live gloo/NCCL process group can abort
        # ("terminate called without an active exception") while threads are torn down
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
