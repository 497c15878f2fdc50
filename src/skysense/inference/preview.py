"""False-colour preview of an embedding raster: its first three principal components as RGB.

The raster is read block by block, twice, at a fixed pixel spacing that keeps the preview's
longer side at most ``max_side`` pixels (memory does not grow with the scene): the first pass
sums the mean and covariance of the sampled embeddings, the second projects them onto the
three leading eigenvectors. Each component is stretched between its 2nd and 98th percentile
to 0-255. Nodata pixels are transparent (RGBA PNG).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning

from skysense.weights import atomic_write

ReadBlock = Callable[[tuple[int, int, int, int]], np.ndarray]


def preview_step(height: int, width: int, max_side: int) -> int:
    """Pixel spacing of the preview samples: the smallest keeping both sides within ``max_side``."""
    return max(1, -(-max(height, width) // max_side))


def _samples(read_block: ReadBlock, bounds: tuple[int, int, int, int], step: int) -> tuple[np.ndarray, slice, slice]:
    """Embeddings (C, h', w') at the global sample lattice inside one block, and where they go."""
    r0, r1, c0, c1 = bounds
    first_r, first_c = -(-r0 // step) * step, -(-c0 // step) * step
    data = read_block(bounds)[:, first_r - r0::step, first_c - c0::step]
    rows = slice(first_r // step, first_r // step + data.shape[1])
    cols = slice(first_c // step, first_c // step + data.shape[2])
    return data, rows, cols


def pca_preview(read_block: ReadBlock, blocks: Sequence[tuple[int, int, int, int]], height: int, width: int,
                out: Path, max_side: int = 512) -> np.ndarray:
    """Write the RGBA preview PNG of a (C, height, width) raster read by ``read_block``.

    Args:
        read_block: returns (C, h, w) float32 of (row0, row1, col0, col1), NaN for nodata.
        blocks: bounds of blocks tiling the raster.
        out: the PNG to write (atomically).

    Returns:
        (4, h', w') uint8: what was written.
    """
    step = preview_step(height, width, max_side)
    count, total, outer = 0, None, None
    for bounds in blocks:
        data, _, _ = _samples(read_block, bounds, step)
        x = data.reshape(data.shape[0], -1).T.astype(np.float64)
        x = x[np.isfinite(x).all(axis=1)]
        if total is None:
            total, outer = np.zeros(data.shape[0]), np.zeros((data.shape[0], data.shape[0]))
        count += len(x)
        total += x.sum(axis=0)
        outer += x.T @ x
    ph, pw = -(-height // step), -(-width // step)
    components = np.zeros((3, ph, pw), dtype=np.float32)
    alpha = np.zeros((ph, pw), dtype=bool)
    if count > 1:
        mean = total / count
        cov = outer / count - np.outer(mean, mean)
        _, vectors = np.linalg.eigh(cov)
        basis = vectors[:, ::-1][:, :3]
        for bounds in blocks:
            data, rows, cols = _samples(read_block, bounds, step)
            x = data.reshape(data.shape[0], -1).T.astype(np.float64)
            ok = np.isfinite(x).all(axis=1)
            proj = np.zeros((x.shape[0], basis.shape[1]))
            proj[ok] = (x[ok] - mean) @ basis
            shape = data.shape[1:]
            components[: basis.shape[1], rows, cols] = proj.T.reshape(basis.shape[1], *shape)
            alpha[rows, cols] = ok.reshape(shape)
    rgba = np.zeros((4, ph, pw), dtype=np.uint8)
    for i in range(3):
        values = components[i][alpha]
        if values.size:
            lo, hi = np.percentile(values, [2, 98])
            scaled = (components[i] - lo) / max(hi - lo, 1e-12)
            rgba[i] = np.where(alpha, np.clip(scaled * 255.0 + 0.5, 0, 255), 0).astype(np.uint8)
    rgba[3] = np.where(alpha, 255, 0).astype(np.uint8)

    def write(path: Path) -> None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path, "w", driver="PNG", width=pw, height=ph, count=4, dtype="uint8") as dst:
                dst.write(rgba)

    atomic_write(out, write)
    for extra in out.parent.glob(f".{out.name}.*.aux.xml"):
        extra.unlink(missing_ok=True)
    return rgba
