"""Memory-compressed optimizers for Hugging Face Trainer and Accelerate.

``import hf_compressed_optim`` registers the optimizer names (``optim="microadam"``) with
transformers; :func:`register` does it again idempotently, :func:`optimizer_cls_and_kwargs` is the
patch-free route for ``Trainer(optimizer_cls_and_kwargs=...)``.
"""

from . import kernels
from .memory import optimizer_memory_report, optimizer_state_bytes
from .microadam import MicroAdam
from .optimizer_base import CompressedOptimizer

__version__ = "0.1.0"

__all__ = [
    "CompressedOptimizer", "MicroAdam", "kernels", "optimizer_memory_report",
    "optimizer_state_bytes", "__version__",
]
