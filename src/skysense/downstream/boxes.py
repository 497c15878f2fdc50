"""Detection boxes through the sample transforms: oriented to horizontal, crops and flips.

Boxes are in pixels of ``hr`` (:mod:`skysense.data.sample`): ``(N, 4)`` x0, y0, x1, y1 or
``(N, 8)`` corners x1, y1, ..., x4, y4 (DOTA, DIOR-R, FAIR1M). Horizontal detection takes the
axis-aligned hull of oriented boxes, as DOTA's horizontal-box task (Task 2) defines its ground
truth from the same annotations.

A crop moves every box into the window's coordinates. A horizontal box is clipped to the window
and dropped when left narrower or lower than ``min_size`` pixels (what remains of an object cut
by the border is kept, as mmdetection's ``RandomCrop`` does); an oriented box is kept whole when
its centre lies in the window and dropped otherwise (as mmrotate's ``RRandomCrop`` does). Flips
mirror every coordinate. Padding at the bottom/right
(:func:`skysense.downstream.sliding_window.pad_to`) leaves boxes where they are.

Detection over windows of a larger scene (:meth:`skysense.downstream.detection.DetectionModel.detect`)
needs to know which detections a window edge cuts (:func:`cut_by_window`: the box reaches an edge
that lies inside the scene) and how much of one box lies inside another (:func:`box_coverage`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

DETECTION_TARGETS = ("boxes", "labels", "difficult")
MIN_BOX_SIZE = 1.0
"""Boxes narrower or lower than this (pixels) after a crop are dropped."""


def horizontal_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """``(N, 4)`` x0, y0, x1, y1: unchanged, or the axis-aligned hull of ``(N, 8)`` corners."""
    if boxes.ndim != 2 or boxes.shape[1] not in (4, 8):
        raise ValueError(f"boxes: expected (N, 4) or (N, 8), got shape {tuple(boxes.shape)}")
    if boxes.shape[1] == 4:
        return boxes
    xs, ys = boxes[:, 0::2], boxes[:, 1::2]
    return torch.stack([xs.amin(1), ys.amin(1), xs.amax(1), ys.amax(1)], dim=1)


def with_horizontal_boxes(sample: Mapping[str, Any]) -> dict[str, Any]:
    """A copy whose ``boxes`` (if any) are horizontal (:func:`horizontal_boxes`)."""
    out = dict(sample)
    if isinstance(sample.get("boxes"), torch.Tensor):
        out["boxes"] = horizontal_boxes(sample["boxes"])
    return out


def crop_boxes(sample: Mapping[str, Any], top: int, left: int, height: int, width: int,
               min_size: float = MIN_BOX_SIZE) -> dict[str, Any]:
    """A copy whose boxes (with their labels and flags) are cut to the window (module docstring);
    oriented (N, 8) boxes are moved, not clipped, and kept when their centre lies in the window."""
    boxes = sample.get("boxes")
    if not isinstance(boxes, torch.Tensor):
        return dict(sample)
    if boxes.ndim != 2 or boxes.shape[1] not in (4, 8):
        raise ValueError(f"boxes: expected (N, 4) or (N, 8), got shape {tuple(boxes.shape)}")
    if boxes.shape[1] == 8:
        moved = boxes - boxes.new_tensor([left, top] * 4)
        cx, cy = moved[:, 0::2].mean(1), moved[:, 1::2].mean(1)
        keep = (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)
    else:
        shift = boxes.new_tensor([left, top, left, top])
        limit = boxes.new_tensor([width, height, width, height])
        moved = torch.minimum((boxes - shift).clamp_min(0), limit)
        keep = ((moved[:, 2] - moved[:, 0]) >= min_size) & ((moved[:, 3] - moved[:, 1]) >= min_size)
    out = dict(sample)
    out["boxes"] = moved[keep]
    for key in DETECTION_TARGETS[1:]:
        if isinstance(sample.get(key), torch.Tensor):
            out[key] = sample[key][keep]
    return out


def box_coverage(part: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """(N, M): the fraction of each horizontal box ``part`` (N, 4) inside each box ``whole`` (M, 4);
    0 for a part of no area."""
    for name, value in (("part", part), ("whole", whole)):
        if value.ndim != 2 or value.shape[1] != 4:
            raise ValueError(f"box_coverage: {name}: expected (N, 4) boxes, got shape {tuple(value.shape)}")
    low = torch.maximum(part[:, None, :2], whole[None, :, :2])
    high = torch.minimum(part[:, None, 2:], whole[None, :, 2:])
    inter = (high - low).clamp_min(0).prod(-1)
    area = ((part[:, 2:] - part[:, :2]).clamp_min(0).prod(-1))[:, None]
    return torch.where(area > 0, inter / area.clamp_min(1e-12), torch.zeros_like(inter))


def cut_by_window(hulls: torch.Tensor, window: tuple[int, int, int, int], scene: tuple[int, int],
                  margin: float) -> torch.Tensor:
    """(N,) bool: which horizontal ``hulls`` (N, 4), in the pixels of a window at (x, y) of size
    (w, h) = ``window`` of a scene of (height, width) = ``scene``, come within ``margin`` pixels of
    a window edge that lies inside the scene: objects the window may show only in part."""
    x, y, w, h = window
    height, width = scene
    cut = torch.zeros(hulls.shape[0], dtype=torch.bool, device=hulls.device)
    if x > 0:
        cut |= hulls[:, 0] <= margin
    if y > 0:
        cut |= hulls[:, 1] <= margin
    if x + w < width:
        cut |= hulls[:, 2] >= w - margin
    if y + h < height:
        cut |= hulls[:, 3] >= h - margin
    return cut


def flip_boxes(boxes: torch.Tensor, height: int, width: int, horizontal: bool, vertical: bool) -> torch.Tensor:
    """Boxes ((N, 4) or (N, 8) corners) of an image of ``height`` x ``width`` pixels after its flips."""
    if boxes.ndim != 2 or boxes.shape[1] not in (4, 8):
        raise ValueError(f"boxes: expected (N, 4) or (N, 8), got shape {tuple(boxes.shape)}")
    if boxes.shape[1] == 8:
        out = boxes.clone()
        if horizontal:
            out[:, 0::2] = width - boxes[:, 0::2]
        if vertical:
            out[:, 1::2] = height - boxes[:, 1::2]
        return out
    x0, y0, x1, y1 = boxes.unbind(1)
    if horizontal:
        x0, x1 = width - x1, width - x0
    if vertical:
        y0, y1 = height - y1, height - y0
    return torch.stack([x0, y0, x1, y1], dim=1)
