"""Integrations with the Hugging Face stack (transformers Trainer, accelerate, peft)."""

from .callbacks import OptimizerMemoryCallback, add_memory_callback
from .release import GradientReleaseCallback
from .transformers import (
    HANDLERS, CompressedTrainerMixin, OptimizerContext, RegistrationError, add_optimizer,
    config_handler, is_registered, optimizer_cls_and_kwargs, register,
)

__all__ = [
    "HANDLERS", "CompressedTrainerMixin", "GradientReleaseCallback", "OptimizerContext",
    "OptimizerMemoryCallback",
    "RegistrationError", "add_memory_callback", "add_optimizer", "config_handler",
    "is_registered", "optimizer_cls_and_kwargs", "register",
]
