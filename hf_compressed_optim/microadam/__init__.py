"""MicroAdam: its optimizer, its options; registers ``optim="microadam"``."""

from ..core.registry import register_optimizer
from .config import MicroAdamConfig
from .optimizer import MicroAdam

register_optimizer("microadam", MicroAdam)

__all__ = ["MicroAdam", "MicroAdamConfig"]
