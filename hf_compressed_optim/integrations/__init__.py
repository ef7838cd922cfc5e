"""Integrations with the Hugging Face stack (transformers Trainer, accelerate, peft)."""

from .transformers import (
    HANDLERS, CompressedTrainerMixin, OptimizerContext, RegistrationError, add_optimizer,
    is_registered, optimizer_cls_and_kwargs, register, schema_handler,
)

__all__ = [
    "HANDLERS", "CompressedTrainerMixin", "OptimizerContext", "RegistrationError",
    "add_optimizer", "is_registered", "optimizer_cls_and_kwargs", "register", "schema_handler",
]
