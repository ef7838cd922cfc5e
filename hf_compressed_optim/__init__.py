"""Memory-compressed optimizers for Hugging Face Trainer and Accelerate.

``import hf_compressed_optim`` registers the optimizer names (``optim="microadam"``) with
transformers; :func:`register` does it again idempotently, :func:`optimizer_cls_and_kwargs` is the
patch-free route for ``Trainer(optimizer_cls_and_kwargs=...)``. Set the environment variable
``HF_COMPRESSED_OPTIM_NO_REGISTER=1`` to skip the automatic registration. Layout: see the
README's Architecture section.
"""

import os as _os
import warnings as _warnings

# the algorithms register their optim names on import, in this order (transformers' choices)
from .microadam import MicroAdam, MicroAdamConfig
from .shampoo import Shampoo, Shampoo32bit, Shampoo32bitConfig, ShampooConfig
from .efcp import SparseGGT, SparseGGTConfig, SparseMFAC, SparseMFACConfig

from .core import CompressedOptimizer, OptimizerConfig, optimizer_memory_report
from .core import optimizer_state_bytes
from .core.memory import trainable_parameter_count, unwrap_optimizer
from .engines.zero import find_zero_optimizer
from .integrations.callbacks import OptimizerMemoryCallback, add_memory_callback
from .integrations.transformers import (
    CompressedTrainerMixin, RegistrationError, optimizer_cls_and_kwargs, register,
)

__version__ = "0.1.0"

__all__ = [
    "CompressedOptimizer", "CompressedTrainerMixin", "MicroAdam", "MicroAdamConfig",
    "OptimizerConfig", "OptimizerMemoryCallback", "RegistrationError", "Shampoo", "Shampoo32bit",
    "Shampoo32bitConfig", "ShampooConfig", "SparseGGT", "SparseGGTConfig", "SparseMFAC",
    "SparseMFACConfig", "__version__", "add_memory_callback", "find_zero_optimizer",
    "optimizer_cls_and_kwargs", "optimizer_memory_report",
    "optimizer_state_bytes", "register", "trainable_parameter_count", "unwrap_optimizer",
]

if _os.environ.get("HF_COMPRESSED_OPTIM_NO_REGISTER", "").strip().lower() not in \
        ("1", "true", "yes"):
    try:
        register()
    except Exception as _err:  # never break the import: the patch-free routes still work
        _warnings.warn(f"hf_compressed_optim could not register its optimizer names with "
                       f"transformers ({type(_err).__name__}: {_err}). optim='microadam' will not "
                       "validate; use hf_compressed_optim.optimizer_cls_and_kwargs(...) with "
                       "Trainer(optimizer_cls_and_kwargs=...) instead.", RuntimeWarning,
                       stacklevel=2)
