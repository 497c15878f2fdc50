"""Self-distillation cross-entropy with teacher centring and sharpening (DINO, Caron et al., 2021).

Shared by the pixel, object and image levels of SkySense's multi-granularity contrast (Guo et
al., 2024), each with its own centre. Temperatures and centre momentum are DINO's defaults (the
SkySense paper does not publish them); the teacher temperature is fixed (no warm-up). The centre
is the mean teacher output of the global batch: under data parallelism it is all-reduced across
processes, so one process and several with the same global batch keep the same centre.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class CenteredCrossEntropy(nn.Module):
    """``-sum softmax((t - c) / tau_t) * log_softmax(s / tau_s)``, averaged over rows.

    ``center`` (1, K) follows an EMA of the teacher's mean scores (:meth:`update_center`).
    """

    def __init__(
        self, out_dim: int, student_temperature: float = 0.1, teacher_temperature: float = 0.04,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_scores: torch.Tensor, teacher_scores: torch.Tensor) -> torch.Tensor:
        """``student_scores``, ``teacher_scores``: (N, K) -> scalar; no gradient to the teacher."""
        target = torch.softmax((teacher_scores.detach() - self.center) / self.teacher_temperature, dim=-1)
        log_p = F.log_softmax(student_scores / self.student_temperature, dim=-1)
        return -(target * log_p).sum(-1).mean()

    @torch.no_grad()
    def update_center(self, teacher_scores: torch.Tensor) -> None:
        """``c <- m c + (1 - m) mean(teacher_scores)`` over the rows of (N, K) scores.

        Under torch.distributed the mean is over every process's rows (equal counts assumed), so
        N processes give the same centre as one process with the whole batch.
        """
        mean = teacher_scores.detach().float().mean(0, keepdim=True)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(mean, alpha=1.0 - self.center_momentum)

    def cross_view(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        """Mean loss over every pair of different views (student view a, teacher view b != a).

        In training mode the centre is then updated with all the teacher's scores.
        """
        pairs = [self(s, t) for a, s in enumerate(student) for b, t in enumerate(teacher) if a != b]
        if not pairs:
            raise ValueError("cross_view: needs at least two views")
        if self.training:
            self.update_center(torch.cat(teacher))
        return torch.stack(pairs).mean()


def require_common_grid(loss: str, student_maps: Sequence[torch.Tensor], teacher_maps: Sequence[torch.Tensor]) -> None:
    """Dense losses compare pixel (i, j) across views: every map must have the same shape."""
    shapes = {tuple(m.shape) for m in list(student_maps) + list(teacher_maps)}
    if len(shapes) != 1:
        raise ValueError(f"{loss}: views must share one overlap grid, got shapes {sorted(shapes)}")
