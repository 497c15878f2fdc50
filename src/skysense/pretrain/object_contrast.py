"""Object-level contrast of SkySense's multi-granularity contrastive learning (Guo et al., 2024).

The paper clusters each image's pixel features into N_C clusters with Sinkhorn-Knopp and
contrasts the cluster centres. Unpublished, so chosen here:

* What is clustered: the teacher's pixel features on the views' common overlap grid, averaged
  over the two views, so one assignment holds for both views and centre ``k`` of one view is
  matched with centre ``k`` of the other.
* How: a few rounds of balanced k-means on the unit sphere; each round assigns the pixels to
  the current centroids with Sinkhorn-Knopp (SwAV, Caron et al., 2020: equal cluster sizes,
  soft assignment) and moves each centroid to the normalised mean of its pixels. Centroids start
  at ``N_C`` pixels evenly spaced in raster order, so the result is deterministic.
* Pooling: student and teacher centres are the assignment-weighted means of their own pixel
  features, with the same (teacher-derived, gradient-free) assignment.
* Loss: DINO's centred, sharpened cross-entropy (Caron et al., 2021) between the student's
  centre ``k`` of view ``a`` and the teacher's centre ``k`` of view ``b != a``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from skysense.pretrain.dino_loss import CenteredCrossEntropy, require_common_grid
from skysense.pretrain.heads import apply_per_view
from skysense.sinkhorn import sinkhorn_knopp

# Column sums are H*W / N_C, so an absolute tolerance would be out of float32's reach for large maps.
RELATIVE_TOLERANCE = 1e-4


class ObjectContrastLoss(nn.Module):
    """Sinkhorn clustering of teacher pixels into ``num_clusters`` objects; DINO loss on centres."""

    def __init__(
        self, out_dim: int, num_clusters: int = 8, rounds: int = 3, epsilon: float = 0.05,
        sinkhorn_iterations: int = 1000, student_temperature: float = 0.1, teacher_temperature: float = 0.04,
        center_momentum: float = 0.9, sinkhorn_stop_early: bool = True,
    ) -> None:
        super().__init__()
        self.num_clusters = num_clusters
        self.rounds = rounds
        self.epsilon = epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        # False: exactly sinkhorn_iterations rounds, no convergence test read back to the host.
        self.sinkhorn_stop_early = sinkhorn_stop_early
        self.criterion = CenteredCrossEntropy(out_dim, student_temperature, teacher_temperature, center_momentum)

    @torch.no_grad()
    def assign(self, maps: torch.Tensor) -> torch.Tensor:
        """Balanced soft clustering of each image's pixels: (B, D, H, W) -> (B, H*W, N_C).

        Rows sum to 1; each column sums to ``H*W / N_C`` to a relative ``1e-4`` (or as close as
        ``sinkhorn_iterations`` rounds get; without ``sinkhorn_stop_early``, as close as exactly
        that many rounds get).
        """
        return self.assign_together([maps])[0]

    @torch.no_grad()
    def assign_together(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """:meth:`assign` of several sources' maps (B_i, D_i, H, W) with the same number of
        pixels: each source keeps its own features and centroids, and the Sinkhorn-Knopp
        problems of all of them are solved together (one call per clustering round instead of
        one per source). The rounds stop once every problem meets the tolerance, so a source
        may get a few more rounds than alone: the same assignment within the tolerance."""
        pixels = [F.normalize(m.detach().float().flatten(2).transpose(1, 2), dim=-1) for m in maps]  # (B, N, D)
        n = pixels[0].shape[1]
        if any(p.shape[1] != n for p in pixels):
            raise ValueError(f"ObjectContrastLoss.assign_together: maps need the same number of pixels, got "
                             f"{[p.shape[1] for p in pixels]}")
        start = torch.linspace(0, n - 1, self.num_clusters, device=pixels[0].device).round().long()
        centroids = [p[:, start] for p in pixels]
        sizes = [p.shape[0] for p in pixels]
        for round_ in range(self.rounds + 1):
            if round_:  # each centroid to the normalised mean of its pixels
                centroids = [F.normalize(a.transpose(1, 2) @ p, dim=-1) for a, p in zip(assignments, pixels)]
            # Cosine similarities: within 1, so Sinkhorn-Knopp may run in its scaling domain.
            scores = torch.cat([p @ c.transpose(1, 2) for p, c in zip(pixels, centroids)])  # (sum B, N, N_C)
            tolerance = RELATIVE_TOLERANCE * n / self.num_clusters if self.sinkhorn_stop_early else None
            q = sinkhorn_knopp(scores, self.epsilon, self.sinkhorn_iterations, tolerance=tolerance, score_bound=1.0)
            assignments = list(q.split(sizes))
        return assignments

    @staticmethod
    def pool(maps: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
        """Cluster centres: (B, D, H, W) with (B, H*W, N_C) -> (B * N_C, D)."""
        weights = assignment.to(maps.dtype)
        weights = weights / weights.sum(1, keepdim=True).clamp_min(1e-12)
        return torch.einsum("bdn,bnk->bkd", maps.flatten(2), weights).flatten(0, 1)

    def forward(
        self,
        student_maps: Sequence[torch.Tensor],
        teacher_maps: Sequence[torch.Tensor],
        student_head: nn.Module,
        teacher_head: nn.Module,
        assignment: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One (B, D, H, W) map per view, all on the common overlap grid -> scalar loss.

        ``assignment``: :meth:`assign` of :func:`teacher_average` of ``teacher_maps``, when the
        caller computed it (e.g. with other sources, :meth:`assign_together`)."""
        require_common_grid("ObjectContrastLoss", student_maps, teacher_maps)
        if assignment is None:
            assignment = self.assign(teacher_average(teacher_maps))
        student = apply_per_view(student_head, [self.pool(m, assignment) for m in student_maps])
        with torch.no_grad():
            teacher = apply_per_view(teacher_head, [self.pool(m, assignment) for m in teacher_maps])
        return self.criterion.cross_view(student, teacher)


def teacher_average(teacher_maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """The map the views' shared clustering is computed on: the teacher's views averaged."""
    return torch.stack(list(teacher_maps)).mean(0)
