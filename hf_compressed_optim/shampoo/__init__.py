"""4-bit Shampoo and its 32-bit baseline; registers ``shampoo_4bit`` and ``shampoo_32bit``."""

from ..core.registry import register_optimizer
from .config import Shampoo32bitConfig, ShampooConfig
from .optimizer import Shampoo, Shampoo32bit

register_optimizer("shampoo_4bit", Shampoo)
register_optimizer("shampoo_32bit", Shampoo32bit)

__all__ = ["Shampoo", "Shampoo32bit", "Shampoo32bitConfig", "ShampooConfig"]
