"""Shampoo's blocking of a parameter and the layout of its per-parameter state.

* A parameter is squeezed (size-1 dims dropped) and viewed as 2-D ``(first dim, rest)``; rank <= 1
  parameters get no preconditioner.
* Each side longer than ``max_order`` is cut into chunks of ``max_order`` (the last one shorter);
  the blocks are the grid of row chunks x column chunks, each with a left factor (order = its
  rows) and a right factor (order = its columns).
* A factor of order n is *quantized* (4-bit eigenvectors + 4-bit off-diagonal inverse root) when
  ``precond_bits == 4`` and ``n*n >= min_quant_size``; otherwise it is an fp32 factor (full
  statistic + full inverse root, the 32-bit baseline's storage).
* The state of all factors of one parameter lives in a few flat tensors (one per kind of data,
  factors concatenated in block order, left before right); :class:`Factor` records the offsets.
  The layout is a pure function of (shape, max_order, precond_bits, min_quant_size,
  quant_block_size), so it never has to be stored.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..kernels.codebook import absmax_blocks, packed_cols

#: flat state keys of quantized factors and of fp32 factors
QUANT_KEYS = ("eigvec_codes", "eigvec_absmax", "eigvals", "root_diag", "root_codes",
              "root_absmax")
FP32_KEYS = ("stat_fp32", "root_fp32")


@dataclass(frozen=True)
class Factor:
    """One Kronecker factor: its order, storage kind and slices into the flat state tensors."""

    order: int
    quantized: bool
    offsets: tuple[tuple[int, int], ...]  # (start, length) per key of QUANT_KEYS or FP32_KEYS

    @property
    def group_key(self) -> tuple[bool, int]:
        """Factors with equal keys are processed in one batched call."""
        return (self.quantized, self.order)

    def slice(self, flat, k: int):
        start, length = self.offsets[k]
        return flat[start:start + length]


@dataclass(frozen=True)
class Block:
    rows: tuple[int, int]
    cols: tuple[int, int]
    left: Factor
    right: Factor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows[1] - self.rows[0], self.cols[1] - self.cols[0])


@dataclass(frozen=True)
class ParamLayout:
    matrix_shape: tuple[int, int]
    blocks: tuple[Block, ...]
    quant_sizes: tuple[int, ...]  # total length per QUANT_KEYS entry
    fp32_sizes: tuple[int, ...]   # total length per FP32_KEYS entry

    @property
    def factors(self):
        for b in self.blocks:
            yield b.left
            yield b.right


def matrix_shape(shape) -> tuple[int, int] | None:
    """The 2-D view Shampoo preconditions, or None for tensors of squeezed rank <= 1."""
    dims = [int(d) for d in shape if int(d) != 1]
    if len(dims) < 2 or 0 in dims:
        return None
    rest = 1
    for d in dims[1:]:
        rest *= d
    return (dims[0], rest)


def chunks(size: int, max_order: int) -> list[tuple[int, int]]:
    return [(s, min(s + max_order, size)) for s in range(0, size, max_order)]


def quant_lengths(n: int, block: int) -> tuple[int, ...]:
    """Elements per QUANT_KEYS entry of one quantized factor of order n."""
    codes = n * packed_cols(n)
    absmax = n * absmax_blocks(n, block)
    return (codes, absmax, n, n, codes, absmax)


@functools.lru_cache(maxsize=4096)
def param_layout(shape: tuple[int, ...], max_order: int, precond_bits: int, min_quant_size: int,
                 quant_block_size: int) -> ParamLayout | None:
    """Blocks and state offsets of a parameter of ``shape`` (None: no preconditioner)."""
    mshape = matrix_shape(shape)
    if mshape is None:
        return None
    q_pos = [0] * len(QUANT_KEYS)
    f_pos = [0] * len(FP32_KEYS)

    def factor(n: int) -> Factor:
        if precond_bits == 4 and n * n >= min_quant_size:
            lengths = quant_lengths(n, quant_block_size)
            offs = tuple((q_pos[k], lengths[k]) for k in range(len(QUANT_KEYS)))
            for k in range(len(QUANT_KEYS)):
                q_pos[k] += lengths[k]
            return Factor(n, True, offs)
        offs = tuple((f_pos[k], n * n) for k in range(len(FP32_KEYS)))
        for k in range(len(FP32_KEYS)):
            f_pos[k] += n * n
        return Factor(n, False, offs)

    blocks = []
    for r in chunks(mshape[0], max_order):
        for c in chunks(mshape[1], max_order):
            left = factor(r[1] - r[0])
            right = factor(c[1] - c[0])
            blocks.append(Block(r, c, left, right))
    return ParamLayout(mshape, tuple(blocks), tuple(q_pos), tuple(f_pos))


def split_blocks(g2d, layout: ParamLayout) -> list:
    """Views of the blocks of the 2-D gradient, in layout order."""
    return [g2d[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]] for b in layout.blocks]


def group_indices(keys) -> dict:
    """{key: [positions with that key]} preserving first-seen order."""
    out: dict = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return out
