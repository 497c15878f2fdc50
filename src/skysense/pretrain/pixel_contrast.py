"""Pixel-level contrast of SkySense's multi-granularity contrastive learning (Guo et al., 2024).

The two views are aligned crops of the same place and time window: after resampling both onto
the grid of their common ground (:func:`resample_to_overlap`), pixel ``(i, j)`` of one view sees
the same location as pixel ``(i, j)`` of the other. Each student pixel is trained to predict the
teacher's distribution at the same location in the other view, with DINO's centred and
sharpened cross-entropy (Caron et al., 2021) applied densely as in iBOT's patch loss (Zhou et
al., 2022, which contrasts patches within one view; here it is across views, as the paper says).
For time series the location is a space-time one; the caller averages frames first (see
:mod:`skysense.pretrain.objective`), so only space remains here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from skysense.pretrain.dino_loss import CenteredCrossEntropy, require_common_grid
from skysense.pretrain.heads import apply_per_view


def resample_to_overlap(maps: torch.Tensor, boxes: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear samples of ``maps`` (B, D, H, W) on a ``size`` grid covering each sample's box.

    ``boxes``: (B, 4) ``(x0, y0, x1, y1)`` as fractions (0..1) of the view's width and height,
    the part of the view shared with the other view; None means the whole view. Grid points are
    the centres of ``size`` equal cells of the box. Returns (B, D, size[0], size[1]).
    """
    b = maps.shape[0]
    if boxes is None:
        boxes = torch.tensor([0.0, 0.0, 1.0, 1.0], device=maps.device).expand(b, 4)
    if boxes.shape != (b, 4):
        raise ValueError(f"resample_to_overlap: boxes must be ({b}, 4), got {tuple(boxes.shape)}")
    boxes = boxes.to(maps.dtype)
    h, w = size
    ys = (torch.arange(h, device=maps.device, dtype=maps.dtype) + 0.5) / h
    xs = (torch.arange(w, device=maps.device, dtype=maps.dtype) + 0.5) / w
    gx = boxes[:, 0, None] + xs[None] * (boxes[:, 2] - boxes[:, 0])[:, None]  # (B, w)
    gy = boxes[:, 1, None] + ys[None] * (boxes[:, 3] - boxes[:, 1])[:, None]  # (B, h)
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # (B, h, w, 2)
    return F.grid_sample(maps, grid * 2 - 1, mode="bilinear", padding_mode="border", align_corners=False)


class PixelContrastLoss(nn.Module):
    """DINO cross-entropy between aligned pixels of different views, with its own teacher centre."""

    def __init__(
        self, out_dim: int, student_temperature: float = 0.1, teacher_temperature: float = 0.04,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.criterion = CenteredCrossEntropy(out_dim, student_temperature, teacher_temperature, center_momentum)

    def forward(
        self,
        student_maps: Sequence[torch.Tensor],
        teacher_maps: Sequence[torch.Tensor],
        student_head: nn.Module,
        teacher_head: nn.Module,
    ) -> torch.Tensor:
        """One (B, D, H, W) map per view, all on the common overlap grid -> scalar loss."""
        require_common_grid("PixelContrastLoss", student_maps, teacher_maps)
        student = [s.permute(0, 2, 3, 1).flatten(0, 2) for s in apply_per_view(student_head, student_maps)]
        with torch.no_grad():
            teacher = [t.permute(0, 2, 3, 1).flatten(0, 2) for t in apply_per_view(teacher_head, teacher_maps)]
        return self.criterion.cross_view(student, teacher)
