"""Memory-compressed optimizers for Hugging Face Trainer and Accelerate.

``import hf_compressed_optim`` registers the optimizer names (``optim="microadam"``) with
transformers; :func:`register` does it again idempotently, :func:`optimizer_cls_and_kwargs` is the
patch-free route for ``Trainer(optimizer_cls_and_kwargs=...)``. Set the environment variable
``HF_COMPRESSED_OPTIM_NO_REGISTER=1`` to skip the automatic registration.
"""

import os as _os
import warnings as _warnings

from .callbacks import OptimizerMemoryCallback, add_memory_callback
from .integrations.transformers import (
    CompressedTrainerMixin, RegistrationError, optimizer_cls_and_kwargs, register,
)
from .memory import optimizer_memory_report, optimizer_state_bytes
from .microadam import MicroAdam
# ---- shampoo exports (issue #3) ----
from .shampoo import Shampoo, Shampoo32bit
# ---- end shampoo exports ----
# ---- efcp exports (issue #4) ----
from .sparse_ggt import SparseGGT
from .sparse_mfac import SparseMFAC
# ---- end efcp exports ----
from .optim_args import parse_optim_args
from .optimizer_base import CompressedOptimizer

__version__ = "0.1.0"

__all__ = [
    "CompressedOptimizer", "CompressedTrainerMixin", "MicroAdam", "OptimizerMemoryCallback",
    "Shampoo", "Shampoo32bit",
    "SparseGGT", "SparseMFAC",
    "RegistrationError", "add_memory_callback", "optimizer_cls_and_kwargs",
    "optimizer_memory_report", "optimizer_state_bytes", "parse_optim_args", "register",
    "__version__",
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
