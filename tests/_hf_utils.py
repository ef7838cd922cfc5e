"""Tiny models and data for the Trainer / accelerate tests (CPU, no downloads)."""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import sys

import torch

from hf_compressed_optim.core.memory import unwrap_optimizer as inner_optimizer  # noqa: F401


def tiny_llama_config(hidden_size: int = 32, intermediate_size: int = 64):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden_size, num_hidden_layers=2, vocab_size=256,
                       intermediate_size=intermediate_size, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64)


def tiny_llama(seed: int = 0, **config_kwargs):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**config_kwargs))


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_lora_llama(seed: int = 0):
    """``tiny_llama`` with rank-8 LoRA adapters on every linear layer (needs peft)."""
    import peft

    return peft.get_peft_model(tiny_llama(seed=seed), peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=LORA_TARGETS))


def token_ids(n: int = 64, length: int = 16, seed: int = 0) -> list[list[int]]:
    """Learnable sequences: arithmetic progressions mod 256 with a few strides."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, 256, (n,), generator=g).tolist()
    strides = torch.randint(1, 4, (n,), generator=g).tolist()
    return [[(s + i * st) % 256 for i in range(length)] for s, st in zip(starts, strides)]


def lm_dataset(n: int = 64, length: int = 16, seed: int = 0):
    from datasets import Dataset

    ids = token_ids(n, length, seed)
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def training_args(output_dir, **overrides):
    from transformers import TrainingArguments

    kwargs = dict(output_dir=str(output_dir), use_cpu=True, report_to=[], seed=0,
                  per_device_train_batch_size=8, logging_steps=1, save_strategy="no",
                  lr_scheduler_type="constant", disable_tqdm=True, dataloader_num_workers=0)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


MICROADAM_STATE_DTYPES = {
    "step": torch.int64,
    "nonfinite_skips": torch.int64,
    "window_indices": torch.int16,
    "window_values": torch.bfloat16,
    "ef_codes": torch.uint8,
    "ef_min": torch.bfloat16,
    "ef_max": torch.bfloat16,
}


def state_dtype_errors(optimizer) -> list[str]:
    """Differences between MicroAdam's expected state dtypes and what ``optimizer`` holds."""
    opt = inner_optimizer(optimizer)
    errors = []
    if not opt.state:
        return ["optimizer has no state"]
    for i, state in enumerate(opt.state.values()):
        for key, dtype in MICROADAM_STATE_DTYPES.items():
            value = state.get(key)
            if not torch.is_tensor(value):
                errors.append(f"state {i}: {key} missing or not a tensor ({type(value).__name__})")
            elif value.dtype != dtype:
                errors.append(f"state {i}: {key} is {value.dtype}, expected {dtype}")
    return errors


def mean(xs) -> float:
    return sum(xs) / len(xs)


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def train_and_resume(tmp_path, checkpoint: int, **common):
    """Train uninterrupted (saving checkpoints), then resume a fresh model from
    ``checkpoint-<checkpoint>``. Returns (full trainer, resumed trainer, saved optimizer state)."""
    from transformers import Trainer

    data = lm_dataset(32)
    full = Trainer(model=tiny_llama(seed=0), train_dataset=data,
                   args=training_args(tmp_path / "full", save_strategy="steps", **common))
    full.train()
    ckpt = tmp_path / "full" / f"checkpoint-{checkpoint}"
    saved = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    resumed = Trainer(model=tiny_llama(seed=1), train_dataset=data,
                      args=training_args(tmp_path / "resumed", **common))
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert losses(resumed) == losses(full)
    return full, resumed, saved


def train_lora(tmp_path, margin: float, **args):
    """Train the tiny LoRA LLaMA with the Trainer; assert the loss fell by ``margin``.
    Returns (trainer, the unwrapped optimizer, the trainable parameters)."""
    from transformers import Trainer

    model = tiny_lora_llama()
    trainer = Trainer(model=model, args=training_args(tmp_path, **args),
                      train_dataset=lm_dataset(64))
    trainer.train()
    loss = losses(trainer)
    assert mean(loss[-5:]) < mean(loss[:5]) - margin, loss
    trainable = [p for p in model.parameters() if p.requires_grad]
    return trainer, inner_optimizer(trainer.optimizer), trainable


RECIPES = pathlib.Path(__file__).resolve().parents[1] / "recipes"


def load_recipe(name: str):
    """Import ``recipes.<name>`` (e.g. ``"finetune_llama"``, ``"benchmarks.efcp"``) from this
    checkout, whatever the working directory (the repository root need not be on sys.path)."""
    if "recipes" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "recipes", RECIPES / "__init__.py", submodule_search_locations=[str(RECIPES)])
        sys.modules["recipes"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["recipes"])
    return importlib.import_module(f"recipes.{name}")
