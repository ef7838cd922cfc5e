"""EFCP: Sparse M-FAC and Sparse GGT over one error-fed compressed window; registers
``efcp_mfac`` (alias ``efcp``) and ``efcp_ggt``."""

from ..core.registry import register_optimizer
from .config import EFCPConfig, SparseGGTConfig, SparseMFACConfig
from .ggt import SparseGGT
from .mfac import SparseMFAC

register_optimizer("efcp_mfac", SparseMFAC)
register_optimizer("efcp", SparseMFAC)
register_optimizer("efcp_ggt", SparseGGT)

__all__ = ["EFCPConfig", "SparseGGT", "SparseGGTConfig", "SparseMFAC", "SparseMFACConfig"]
