"""Window and block planning for streaming inference, and the blending weights of windows.

Everything here is in pixels of the **output grid** (one embedding per pixel). Rows and columns
of windows form a fixed lattice over the whole scene: windows of ``window`` pixels every
``window - overlap`` pixels, the last one of each row or column moved back to end on the scene
edge (a scene smaller than one window gets one window reaching past its edge; the pixels
outside the scene are read as nodata and never written). With ``align`` > 1 every window starts on
a multiple of ``align`` (a map on the HR grid, whose windows must start on a fusion-grid pixel):
the lattice is laid over the grid rounded up to a multiple of ``align``, so the last window may
reach past the edge by less than ``align`` pixels. The output is written in square
**blocks** of ``block`` pixels, row-major; a block is finished once every window that overlaps
it has been added.

Three rules make the output independent of where a run was interrupted (so a resumed run gives
exactly the bytes of an uninterrupted one):

* every window has an **owner** block, the one holding its top-left pixel; because a window is
  never larger than a block, it overlaps at most its owner and the blocks to the right, below
  and below-right;
* windows are batched in fixed **groups**: the windows of one owner block and one lattice row,
  ``batch_size`` at a time from the left. A window is always computed in the same batch, so its
  features are bitwise the same whenever it is computed (batched matmuls are not
  batch-invariant);
* a block adds its windows owner by owner in the fixed order top-left, left, top, self
  (:data:`OWNER_ORDER`), each owner's groups in order.

Blending: each window's features are weighted by a separable cosine ramp over the ``overlap``
pixels of every side that has a neighbour (sides on the scene edge keep weight 1), and every
pixel is the weighted mean of the windows covering it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

OWNER_ORDER: tuple[tuple[int, int], ...] = ((-1, -1), (0, -1), (-1, 0), (0, 0))
"""Offsets (block rows, block columns) of the owners whose windows reach a block, in the order
they are added: top-left, left, top, the block itself."""


def window_starts(length: int, window: int, step: int) -> tuple[int, ...]:
    """Start of each window along an axis of ``length`` pixels (the last one ends on the edge)."""
    if length <= window:
        return (0,)
    starts = list(range(0, length - window, step))
    starts.append(length - window)
    return tuple(starts)


def aligned_starts(length: int, window: int, step: int, align: int = 1) -> tuple[int, ...]:
    """:func:`window_starts` over ``length`` rounded up to a multiple of ``align``: with ``window``
    and ``step`` multiples of it, every start is one (the last window may pass the edge by less
    than ``align``)."""
    return window_starts(-(-length // align) * align, window, step)


def cosine_ramp(length: int) -> np.ndarray:
    """Weights rising from near 0 to near 1 over ``length`` pixels: ``(1 - cos(pi (i + 0.5) / length)) / 2``."""
    i = np.arange(length, dtype=np.float64)
    return ((1.0 - np.cos(math.pi * (i + 0.5) / length)) / 2.0).astype(np.float32)


def edge_weights(size: int, overlap: int, ramp_start: bool, ramp_end: bool) -> np.ndarray:
    """1-D blending weights of one window side to side: ramps where a neighbour overlaps."""
    weights = np.ones(size, dtype=np.float32)
    ramp_len = min(overlap, size)
    if ramp_len == 0:
        return weights
    ramp = cosine_ramp(ramp_len)
    if ramp_start:
        weights[:ramp_len] = np.minimum(weights[:ramp_len], ramp)
    if ramp_end:
        weights[size - ramp_len:] = np.minimum(weights[size - ramp_len:], ramp[::-1])
    return weights


@dataclass(frozen=True)
class Group:
    """Windows computed together in one batch: lattice row ``row``, lattice columns ``cols``."""

    row: int
    cols: tuple[int, ...]


@dataclass(frozen=True)
class WindowPlan:
    """The window lattice, the output blocks and the batch groups of a scene.

    Attributes:
        height, width: output grid size in pixels.
        window: side of every window (it may reach past the edge of a scene smaller than it).
        overlap: pixels shared by neighbouring windows (before the last one is moved back).
        block: side of the square output blocks.
        batch_size: windows per group.
        align: every window starts on a multiple of it (module docstring).
    """

    height: int
    width: int
    window: int
    overlap: int
    block: int
    batch_size: int
    align: int = 1

    @classmethod
    def create(cls, height: int, width: int, window: int, overlap: int, block: int, batch_size: int,
               align: int = 1) -> "WindowPlan":
        """Plan a ``height`` x ``width`` output grid.

        Raises:
            ValueError: non-positive sizes, ``overlap`` not in ``[0, window)``, ``block``
                smaller than the window, or a window or step not a multiple of ``align`` (naming
                the values).
        """
        if height < 1 or width < 1:
            raise ValueError(f"output grid: expected at least 1 x 1 pixels, got {height} x {width}")
        if window < 1:
            raise ValueError(f"window: expected at least 1 output pixel, got {window}")
        if not 0 <= overlap < window:
            raise ValueError(f"overlap: expected 0 <= overlap < window ({window}), got {overlap}")
        if batch_size < 1:
            raise ValueError(f"batch size: expected at least 1, got {batch_size}")
        if block < window:
            raise ValueError(f"block: expected at least the window size ({window} output pixels), got {block}")
        if align < 1 or window % align or overlap % align:
            raise ValueError(f"window ({window}) and overlap ({overlap}): expected multiples of the alignment "
                             f"({align} output pixels)")
        return cls(height, width, window, overlap, block, batch_size, align)

    @cached_property
    def rows(self) -> tuple[int, ...]:
        """Start row of each lattice row of windows."""
        return aligned_starts(self.height, self.window, self.window - self.overlap, self.align)

    @cached_property
    def cols(self) -> tuple[int, ...]:
        """Start column of each lattice column of windows."""
        return aligned_starts(self.width, self.window, self.window - self.overlap, self.align)

    @property
    def block_rows(self) -> int:
        return -(-self.height // self.block)

    @property
    def block_cols(self) -> int:
        return -(-self.width // self.block)

    @property
    def num_blocks(self) -> int:
        return self.block_rows * self.block_cols

    @property
    def num_windows(self) -> int:
        return len(self.rows) * len(self.cols)

    def block_index(self, block_row: int, block_col: int) -> int:
        return block_row * self.block_cols + block_col

    def block_position(self, index: int) -> tuple[int, int]:
        return divmod(index, self.block_cols)

    def block_bounds(self, index: int) -> tuple[int, int, int, int]:
        """(row0, row1, col0, col1) of block ``index`` in output pixels (clipped to the grid)."""
        bi, bj = self.block_position(index)
        return (bi * self.block, min((bi + 1) * self.block, self.height),
                bj * self.block, min((bj + 1) * self.block, self.width))

    def window_bounds(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(row0, row1, col0, col1) of window (lattice ``row``, ``col``) in output pixels (may pass the edge)."""
        y0, x0 = self.rows[row], self.cols[col]
        return y0, y0 + self.window, x0, x0 + self.window

    def groups(self, block_row: int, block_col: int) -> list[Group]:
        """The batch groups of the windows owned by a block, in computing order (none off the grid)."""
        if not (0 <= block_row < self.block_rows and 0 <= block_col < self.block_cols):
            return []
        lo_r, hi_r = block_row * self.block, (block_row + 1) * self.block
        lo_c, hi_c = block_col * self.block, (block_col + 1) * self.block
        cols = [c for c, x in enumerate(self.cols) if lo_c <= x < hi_c]
        out = []
        for r, y in enumerate(self.rows):
            if lo_r <= y < hi_r:
                for k in range(0, len(cols), self.batch_size):
                    out.append(Group(r, tuple(cols[k:k + self.batch_size])))
        return out

    def overlaps(self, row: int, col: int, block: int) -> bool:
        """Whether window (``row``, ``col``) covers any pixel of block ``block``."""
        y0, y1, x0, x1 = self.window_bounds(row, col)
        b0, b1, c0, c1 = self.block_bounds(block)
        return y0 < b1 and b0 < y1 and x0 < c1 and c0 < x1

    def weights(self, row: int, col: int) -> np.ndarray:
        """(rows, cols) float32 blending weights of a window: cosine ramps toward neighbours."""
        y0, y1, x0, x1 = self.window_bounds(row, col)
        wy = edge_weights(y1 - y0, self.overlap, y0 > 0, y1 < self.height)
        wx = edge_weights(x1 - x0, self.overlap, x0 > 0, x1 < self.width)
        return wy[:, None] * wx[None, :]
