"""Windows over the spatial entries of a sample or batch: crops, padding, sliding-window inference.

Every spatial entry is cut consistently. Positions and sizes are given on the **reference grid**,
the grid of the dense targets: HR pixels when the sample has ``hr``, else S2 (or S1) pixels. An
entry whose grid is finer or coarser by an integer factor is cut at the scaled position (HR with
S2 at 1/32: an S2 pixel per 32 HR pixels), so positions must fall on the coarsest grid; an error
names the entry otherwise. The last two axes of a spatial entry are always (H, W), in a sample
(``s2`` (T, C, h, w)) as in a batch (``s2`` (B, T, C, h, w)), so the same code serves both.

:func:`sliding_window` runs a model over overlapping windows of a large tile and averages the
logits where windows overlap (the ``slide`` mode of mmsegmentation): windows start every
``stride`` pixels and the last one is moved back to end at the border, so every pixel is covered
and no window is padded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Any

import torch

from skysense.data.sample import IGNORE_INDEX

IMAGE_KEYS = ("hr", "hr_post", "s2", "s1", "planet")
"""Spatial inputs (padded with 0, the mean after normalisation)."""
TARGET_KEYS = ("mask", "mask_post", "change")
"""Spatial targets (padded with ``IGNORE_INDEX``)."""
VALID_KEYS = ("valid_s2", "valid_s1")
"""Per-pixel validity maps (padded with False)."""
SPATIAL_KEYS = IMAGE_KEYS + TARGET_KEYS + VALID_KEYS


def reference_size(sample: Mapping[str, Any]) -> tuple[int, int]:
    """(H, W) of the reference grid: ``hr``, else ``s2``, else ``s1``, else ``mask``."""
    for key in ("hr", "s2", "s1", "mask"):
        value = sample.get(key)
        if isinstance(value, torch.Tensor):
            return int(value.shape[-2]), int(value.shape[-1])
    raise ValueError(f"no spatial entry (hr, s2, s1, mask) in the sample; keys {sorted(sample)}")


def scales(sample: Mapping[str, Any]) -> dict[str, Fraction]:
    """Size of each spatial entry's grid relative to the reference grid (1, 1/32, ...)."""
    ref = reference_size(sample)
    found = {}
    for key in SPATIAL_KEYS:
        value = sample.get(key)
        if not isinstance(value, torch.Tensor):
            continue
        fy, fx = Fraction(int(value.shape[-2]), ref[0]), Fraction(int(value.shape[-1]), ref[1])
        if fy != fx:
            raise ValueError(f"{key}: grid {tuple(value.shape[-2:])} is not a uniform scaling of the reference "
                             f"grid {ref}")
        found[key] = fy
    return found


def _scaled(value: int, factor: Fraction, key: str, what: str) -> int:
    scaled = value * factor
    if scaled.denominator != 1:
        raise ValueError(f"{key}: window {what} {value} does not fall on its grid (scale {factor}); use multiples "
                         f"of {factor.denominator}")
    return int(scaled)


def crop(sample: Mapping[str, Any], top: int, left: int, height: int, width: int) -> dict[str, Any]:
    """A copy of ``sample`` with every spatial entry cut to the window (reference-grid pixels)."""
    out = dict(sample)
    for key, factor in scales(sample).items():
        y, x = _scaled(top, factor, key, "top"), _scaled(left, factor, key, "left")
        h, w = _scaled(height, factor, key, "height"), _scaled(width, factor, key, "width")
        out[key] = sample[key][..., y:y + h, x:x + w]
    return out


def pad_to(sample: Mapping[str, Any], height: int, width: int) -> dict[str, Any]:
    """A copy padded at the bottom/right to at least ``height`` x ``width`` on the reference grid.

    Images get 0 (the band mean once normalised), targets ``IGNORE_INDEX``, validity maps False.
    """
    ref = reference_size(sample)
    if ref[0] >= height and ref[1] >= width:
        return dict(sample)
    out = dict(sample)
    for key, factor in scales(sample).items():
        value = sample[key]
        dy = _scaled(max(0, height - ref[0]), factor, key, "padding")
        dx = _scaled(max(0, width - ref[1]), factor, key, "padding")
        fill = IGNORE_INDEX if key in TARGET_KEYS else (False if key in VALID_KEYS else 0.0)
        padded = value.new_full(value.shape[:-2] + (value.shape[-2] + dy, value.shape[-1] + dx), fill)
        padded[..., : value.shape[-2], : value.shape[-1]] = value
        out[key] = padded
    return out


def window_starts(size: int, window: int, stride: int, align: int = 1) -> list[int]:
    """Start positions of windows of ``window`` pixels every ``stride`` covering ``size`` pixels.

    Starts are multiples of ``align``; the last window is moved back to end at the border (to
    the nearest aligned start, so it may then reach past ``window`` by less than ``align``).
    """
    if window < 1 or stride < 1:
        raise ValueError(f"sliding window: window and stride must be >= 1, got {window} and {stride}")
    if size <= window:
        return [0]
    starts = list(range(0, size - window, stride))
    last = (size - window) // align * align
    if not starts or starts[-1] != last:
        starts.append(last)
    return [s // align * align for s in starts]


def grid_alignment(sample: Mapping[str, Any]) -> int:
    """Smallest step on the reference grid that lands on every entry's grid (32 for HR with S2)."""
    align = 1
    for factor in scales(sample).values():
        if factor < 1:
            align = max(align, factor.denominator)
    return align


def sliding_window(
    predict: Callable[[dict[str, Any]], dict[str, torch.Tensor]],
    batch: Mapping[str, Any],
    window: int,
    stride: int,
) -> dict[str, torch.Tensor]:
    """Logits of a whole tile from overlapping windows, averaged where they overlap.

    Args:
        predict: maps a (cropped) batch to ``{key: (B, K, h, w)}`` logits on the window's
            reference grid.
        batch: a batch (or sample with a batch axis) whose spatial entries cover the tile.
        window: window side, reference-grid pixels.
        stride: step between windows (``< window`` for overlap).

    Returns:
        ``{key: (B, K, H, W)}`` float32 logits for the whole tile.
    """
    height, width = reference_size(batch)
    align = grid_alignment(batch)
    ys = window_starts(height, window, stride, align)
    xs = window_starts(width, window, stride, align)
    sums: dict[str, torch.Tensor] = {}
    count: torch.Tensor | None = None  # on the logits' device, made with the first window's
    for y in ys:
        for x in xs:
            h = height - y if y == ys[-1] else window
            w = width - x if x == xs[-1] else window
            out = predict(crop(batch, y, x, h, w))
            if not out:
                raise ValueError("sliding_window: predict returned no logits")
            for key, logits in out.items():
                if key not in sums:
                    sums[key] = logits.new_zeros(logits.shape[:-2] + (height, width), dtype=torch.float32)
                sums[key][..., y:y + h, x:x + w] += logits.float()
                if count is None:
                    count = logits.new_zeros((height, width), dtype=torch.float32)
            count[y:y + h, x:x + w] += 1
    return {key: value / count for key, value in sums.items()}
