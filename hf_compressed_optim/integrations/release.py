"""Gradient release under the stock ``Trainer`` (``optim_args="gradient_release=true"``).

The Trainer needs no change: during ``training_step``'s backward the optimizer's hooks step and
free every gradient; Trainer's ``optimizer.step()`` then finishes the step, ``lr_scheduler.step()``
sets the next lr (read by the next backward's hooks), ``zero_grad`` finds nothing to free, and
checkpoints save ``optimizer.state_dict()`` as usual. :class:`GradientReleaseCallback` (among
transformers' default callbacks after ``import hf_compressed_optim``) handles what the Trainer
does around the step:

* ``gradient_accumulation_steps > 1`` and ``fp16`` (a loss-scaled gradient would be applied
  before unscaling) raise a ``ValueError`` at ``on_train_begin``, before the first step;
* ``max_grad_norm > 0`` (Trainer's default is 1.0) warns once: global-norm clipping needs every
  gradient before any step, so it does nothing here; ``per_param_max_grad_norm`` clips each
  parameter's gradient instead;
* the logged ``grad_norm`` (Trainer measures the already-freed gradients: 0) becomes the norm of
  the gradients the step released.
"""

from __future__ import annotations

import warnings

from transformers import TrainerCallback

from ..core.memory import unwrap_optimizer
from ..core.release import ACCUMULATION_HINT

__all__ = ["GradientReleaseCallback", "check_trainer_args", "install_release_callback"]


def check_trainer_args(args, name: str = "the optimizer") -> None:
    """Refuse the ``TrainingArguments`` gradient release cannot follow; warn about clipping."""
    steps = getattr(args, "gradient_accumulation_steps", 1)
    if steps > 1:
        raise ValueError(f"optim_args gradient_release=true ({name}) cannot be combined with "
                         f"gradient accumulation (gradient_accumulation_steps={steps}). "
                         + ACCUMULATION_HINT)
    if getattr(args, "fp16", False):
        raise ValueError(f"optim_args gradient_release=true ({name}) cannot be combined with "
                         "fp16=True: the loss scaler unscales and checks gradients in "
                         "optimizer.step(), after the released steps already used them. Use "
                         "bf16=True (no loss scaling) or drop gradient_release.")
    max_norm = getattr(args, "max_grad_norm", 0.0) or 0.0
    if max_norm > 0:
        warnings.warn(
            f"max_grad_norm={max_norm} (Trainer's default is 1.0) does nothing with "
            f"gradient_release: each gradient is applied and freed during backward, before a "
            "global norm over all of them exists. Set max_grad_norm=0 to silence this, or clip "
            f"per parameter with optim_args per_param_max_grad_norm={max_norm}. The logged "
            "grad_norm is the norm of the released gradients.", UserWarning, stacklevel=2)


class GradientReleaseCallback(TrainerCallback):
    """Checks the Trainer's arguments at ``on_train_begin`` and logs the released gradients'
    norm as ``grad_norm``. A no-op for optimizers without gradient release."""

    @staticmethod
    def _released(optimizer):
        inner = unwrap_optimizer(optimizer)
        return inner if getattr(inner, "gradient_release", False) else None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        inner = self._released(optimizer)
        if inner is not None:
            check_trainer_args(args, type(inner).__name__)

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        inner = self._released(optimizer)
        norm = getattr(inner, "released_grad_norm", None)
        if logs is None or norm is None or "grad_norm" not in logs:
            return
        logs["grad_norm"] = float(norm)
        # Trainer.log appended {**logs, "step": global_step} to the history before on_log ran
        history = getattr(state, "log_history", None)
        if history and history[-1] is not logs and history[-1].get("step") == state.global_step \
                and "grad_norm" in history[-1]:
            history[-1]["grad_norm"] = logs["grad_norm"]


def install_release_callback() -> bool:
    """Append :class:`GradientReleaseCallback` to transformers' default Trainer callbacks.
    Idempotent; returns True when it was added now."""
    from transformers import trainer as trainer_module

    defaults = trainer_module.DEFAULT_CALLBACKS
    if any(cb is GradientReleaseCallback for cb in defaults):
        return False
    defaults.append(GradientReleaseCallback)
    return True
