"""Trainer callback that logs how many bytes the optimizer state really takes.

Trainer runs the reporting integrations (TensorBoard, W&B, ...) *before* user callbacks, so a
metric a user callback adds in ``on_log`` arrives too late for them. :func:`add_memory_callback`
therefore inserts the callback at the **front** of ``trainer.callback_handler.callbacks``. Trainer
also appends the log entry to ``state.log_history`` before ``on_log`` runs, so the callback adds
its metrics to that entry as well.
"""

from __future__ import annotations

import warnings

from transformers import TrainerCallback

from ..core.memory import optimizer_memory_report

__all__ = ["OptimizerMemoryCallback", "add_memory_callback"]


class OptimizerMemoryCallback(TrainerCallback):
    """Adds ``optimizer_state_bytes``, ``optimizer_state_bytes/<category>`` and
    ``optimizer_state_bytes_per_param`` to every log.

    Bytes are those of the storages of the state tensors this process holds (local shards under
    FSDP2); see :func:`hf_compressed_optim.memory.optimizer_memory_report`.

    Attributes:
        train_begin_report: the report at ``on_train_begin`` (state is created lazily, so usually
            0 bytes for a fresh run and the full size after a resume).
        last_report: the most recent report.
    """

    def __init__(self):
        self.train_begin_report: dict[str, float] | None = None
        self.last_report: dict[str, float] | None = None
        self._warned = False

    def _report(self, optimizer) -> dict[str, float] | None:
        if optimizer is None:
            return None
        try:
            report = optimizer_memory_report(optimizer)
        except Exception as err:  # never break training over a metric
            if not self._warned:
                warnings.warn(f"OptimizerMemoryCallback: could not measure the optimizer state "
                              f"({type(err).__name__}: {err})", RuntimeWarning, stacklevel=2)
                self._warned = True
            return None
        self.last_report = report
        return report

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.train_begin_report = self._report(optimizer)

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        if logs is None:
            return
        report = self._report(optimizer)
        if report is None:
            return
        logs.update(report)
        # Trainer.log appended {**logs, "step": global_step} to the history before on_log ran
        history = getattr(state, "log_history", None)
        if history:
            entry = history[-1]
            if entry is not logs and entry.get("step") == state.global_step and \
                    all(k in entry for k in logs if k not in report):
                for k, v in report.items():
                    entry.setdefault(k, v)


def add_memory_callback(trainer, callback: OptimizerMemoryCallback | None = None
                        ) -> OptimizerMemoryCallback:
    """Put an :class:`OptimizerMemoryCallback` first in ``trainer``'s callbacks and return it.

    Idempotent: an existing instance is moved to the front instead of adding a second one.
    """
    handler = getattr(trainer, "callback_handler", None)
    if handler is None or not hasattr(handler, "callbacks"):
        raise TypeError("add_memory_callback needs a transformers Trainer (no callback_handler)")
    callbacks = handler.callbacks
    existing = [cb for cb in callbacks if isinstance(cb, OptimizerMemoryCallback)]
    if callback is None:
        callback = existing[0] if existing else OptimizerMemoryCallback()
    for cb in existing:
        callbacks.remove(cb)
    if callback in callbacks:
        callbacks.remove(callback)
    callbacks.insert(0, callback)
    return callback
