"""Image-level contrast of SkySense's multi-granularity contrastive learning (Guo et al., 2024).

Global average pooling of each view's feature map, then DINO's self-distillation (Caron et al.,
2021): the student's pooled vector of view ``a`` predicts the teacher's centred, sharpened
distribution of view ``b != a`` (the two cross terms of two views). SkySense's encoders have no
class token at the fusion output, so the pooled map stands in for DINO's ``[CLS]``.

:class:`InfoNCEImageContrastLoss` is the selectable alternative (``image_loss: infonce`` in
:class:`~skysense.pretrain.objective.PretrainObjectiveConfig`): the paper calls its objective
"multi-granularity *contrastive* learning" without publishing the image-level loss, and on
small data an InfoNCE loss with in-batch negatives (van den Oord et al., 2018; SimCLR, Chen et
al., 2020; MoCo v3, Chen et al., 2021) learns far faster than self-distillation, whose centring
and sharpening need many epochs to leave the uniform/collapsed start. The embedding is the
head's L2-normalised bottleneck (the prototype layer is not used). Two key sources:

* ``keys="teacher"`` (MoCo v3 without the predictor): the student's embedding of view ``a`` is
  the query, the EMA teacher's embeddings of view ``b != a`` over the batch are the keys; the
  positive is the same image. Gradient flows to the student only.
* ``keys="student"`` (SimCLR's NT-Xent): the 2B student embeddings of both views; each one's
  positive is the other view of its image, the other 2B - 2 are negatives; gradient flows
  through both sides. The teacher is not used by this term.

Under DDP/FSDP the keys are those of the whole global batch (:func:`skysense.distributed.gather_rows`;
gathered with gradients for student keys), so N processes compute the loss of one process
holding the whole batch. Local views (multi-crop) are queries only: each is contrasted with
both teacher views (teacher keys only).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from skysense.distributed import gather_rows
from skysense.pretrain.dino_loss import CenteredCrossEntropy
from skysense.pretrain.heads import apply_per_view


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
        student = apply_per_view(student_head, [m.mean((-2, -1)) for m in student_maps])
        with torch.no_grad():
            teacher = apply_per_view(teacher_head, [m.mean((-2, -1)) for m in teacher_maps])
        return self.criterion.cross_view(student, teacher)


class InfoNCEImageContrastLoss(nn.Module):
    """InfoNCE between globally pooled views with in-batch negatives (see the module docstring)."""

    def __init__(self, temperature: float = 0.2, keys: str = "teacher") -> None:
        super().__init__()
        if keys not in ("teacher", "student"):
            raise ValueError(f"InfoNCEImageContrastLoss: keys must be 'teacher' or 'student', got {keys!r}")
        if temperature <= 0:
            raise ValueError(f"InfoNCEImageContrastLoss: temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.keys = keys

    @staticmethod
    def embed(head: nn.Module, maps: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> (B, bottleneck) unit vectors: the head's MLP on the pooled map."""
        return F.normalize(head.mlp(maps.mean((-2, -1))), dim=-1)

    def forward(
        self,
        student_maps: Sequence[torch.Tensor],
        teacher_maps: Sequence[torch.Tensor],
        student_head: nn.Module,
        teacher_head: nn.Module,
    ) -> torch.Tensor:
        """One (B, D, H, W) map per view -> scalar loss.

        Two teacher views; two student views, then any local views (multi-crop; ``keys="teacher"``
        only). Student view ``a`` of the two is contrasted with teacher view ``1 - a``, a local view
        with both teacher views; the loss is the mean over these pairs (DINO's multi-crop pairing).
        """
        if len(teacher_maps) != 2 or len(student_maps) < 2:
            raise ValueError(f"InfoNCEImageContrastLoss: needs two teacher views and at least two student views, "
                             f"got {len(teacher_maps)} and {len(student_maps)}")
        if self.keys == "student" and len(student_maps) != 2:
            raise ValueError(f"InfoNCEImageContrastLoss: keys='student' takes exactly two views (no local views), "
                             f"got {len(student_maps)}")
        student = [self.embed(student_head, m) for m in student_maps]
        b = student[0].shape[0]
        if self.keys == "student":
            # Keys: both views of the whole global batch (gathered with gradients under DDP/FSDP).
            gathered = [gather_rows(z) for z in student]
            keys, first = [g[0] for g in gathered], gathered[0][1]
            n = keys[0].shape[0]
            queries, everything = torch.cat(student), torch.cat(keys)  # (2B, E), (2N, E)
            logits = queries @ everything.T / self.temperature
            rows = torch.arange(first, first + b, device=queries.device)
            own = torch.cat([rows, rows + n])
            itself = torch.zeros_like(logits, dtype=torch.bool)
            itself[torch.arange(2 * b, device=queries.device), own] = True
            logits = logits.masked_fill(itself, float("-inf"))
            target = torch.cat([own[b:], own[:b]])
            return F.cross_entropy(logits, target)
        with torch.no_grad():  # keys: the teacher's embeddings of the whole global batch
            teacher = [gather_rows(self.embed(teacher_head, m)) for m in teacher_maps]
        first = teacher[0][1]
        target = torch.arange(first, first + b, device=student[0].device)
        pairs = [F.cross_entropy(query @ teacher[k][0].T / self.temperature, target)
                 for a, query in enumerate(student) for k in range(2) if a != k]
        return torch.stack(pairs).mean()
