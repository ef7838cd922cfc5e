"""Geometry shared by the block top-k kernels and the window they fill.

A flat tensor of ``numel`` elements is cut into ``num_full`` blocks of ``block`` elements plus a
tail of ``tail`` elements. Each full block keeps ``k_full`` entries, the tail keeps ``k_tail``.
A window row is laid out ``[block 0: k_full | block 1: k_full | ... | tail: k_tail]`` and stores
indices *relative to their block*, so int16 suffices whenever ``block <= 32768``.

The block size is a fixed number chosen by the caller, never derived from a GPU property, so a
given model and hyperparameters select the same entries on every device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


MAX_INT16_BLOCK = 32768  # largest block whose relative indices (0 .. block-1) fit in int16
#: elements per top-k block unless set: fixed, so results do not depend on the GPU
DEFAULT_TOPK_BLOCK = 16384


def entries_per_block(length: int, density: float) -> int:
    """ceil(density * length), at least 1 for a non-empty block; robust to float noise."""
    if length <= 0:
        return 0
    return max(1, min(length, math.ceil(round(density * length, 9))))


@dataclass(frozen=True)
class TopKLayout:
    numel: int
    block: int
    k_full: int
    k_tail: int

    @classmethod
    def create(cls, numel: int, block: int, density: float) -> "TopKLayout":
        block = max(1, min(block, numel)) if numel > 0 else block
        num_full = numel // block if numel > 0 else 0
        tail = numel - num_full * block
        return cls(numel, block, entries_per_block(block, density) if num_full else 0,
                   entries_per_block(tail, density))

    @property
    def num_full(self) -> int:
        return self.numel // self.block if self.numel > 0 else 0

    @property
    def tail(self) -> int:
        return self.numel - self.num_full * self.block

    @property
    def k(self) -> int:
        """Entries per window row."""
        return self.num_full * self.k_full + self.k_tail
