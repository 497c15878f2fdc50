"""Image-level contrast of SkySense's multi-granularity contrastive learning (Guo et al., 2024).

Global average pooling of each view's feature map, then DINO's self-distillation (Caron et al.,
2021): the student's pooled vector of view ``a`` predicts the teacher's centred, sharpened
distribution of view ``b != a`` (the two cross terms of two views). SkySense's encoders have no
class token at the fusion output, so the pooled map stands in for DINO's ``[CLS]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from skysense.pretrain.dino_loss import CenteredCrossEntropy


class ImageContrastLoss(nn.Module):
    """DINO cross-entropy between globally pooled views, with its own teacher centre."""

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
        """One (B, D, H, W) map per view (views may differ in size) -> scalar loss."""
        student = [student_head(m.mean((-2, -1))) for m in student_maps]
        with torch.no_grad():
            teacher = [teacher_head(m.mean((-2, -1))) for m in teacher_maps]
        return self.criterion.cross_view(student, teacher)
