"""The ``optim=`` names of the package: each algorithm's subpackage registers its own."""

from __future__ import annotations

__all__ = ["OPTIMIZERS", "register_optimizer"]

#: ``optim`` name -> optimizer class (its ``Config`` declares the options)
OPTIMIZERS: dict[str, type] = {}


def register_optimizer(name: str, cls: type) -> None:
    """Declare ``optim=name``; the Trainer integration picks it up (also after registration)."""
    OPTIMIZERS[name.lower()] = cls
    from ..integrations import transformers as hf  # late: the integration imports this module

    hf.on_new_optimizer(name.lower())
