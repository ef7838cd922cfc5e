"""What every optimizer of the package shares: the typed options (:mod:`.config`), the step
template and state contract (:mod:`.optimizer`), the name registry (:mod:`.registry`) and the
memory accounting (:mod:`.memory`)."""

from .config import OptimizerConfig, option
from .memory import optimizer_memory_report, optimizer_state_bytes
from .optimizer import CompressedOptimizer, Job
from .registry import OPTIMIZERS, register_optimizer

__all__ = ["OPTIMIZERS", "CompressedOptimizer", "Job", "OptimizerConfig",
           "optimizer_memory_report", "optimizer_state_bytes", "option", "register_optimizer"]
