"""Geo-context prototype learning of SkySense (Guo et al., 2024).

Per pixel, the teacher's fused feature is assigned to its region's prototypes with
Sinkhorn-Knopp (:meth:`GeoContextPrototypes.assign`, SwAV-style balanced codes, Caron et al.,
2020). The student predicts that assignment: a softmax over the cosine similarities of its own
fused feature to the same region's prototypes, divided by a temperature (SwAV's 0.1; the paper
does not publish it), trained with cross-entropy. Prototypes get no gradient: after the
optimiser step :meth:`GeoPrototypeLoss.update_prototypes` moves them towards the teacher
features assigned to them (EMA; momentum unpublished, 0.99 by default).

Each view's student pixels predict the same view's teacher assignment (the teacher is a
different, slowly moving network, so this is not trivial, unlike SwAV's single network which
needs swapped views). Both views are of one place, so they share ``lat``/``lon``.

Under torch.distributed (DDP or FSDP, several processes) both the assignment and the EMA are
global, as SwAV's distributed Sinkhorn: the balance of each region's prototypes holds over the
global batch, and the EMA target sums every process's features, so every process applies the
same update and N processes sharing a global batch match one process holding it all.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from skysense.distributed import is_distributed
from skysense.models.geo_context import ASSIGN_TOLERANCE, GeoContextPrototypes


class GeoPrototypeLoss(nn.Module):
    """Cross-entropy of student prototype scores against the teacher's Sinkhorn assignment.

    The last forward's teacher features, regions and assignment are kept (detached) for
    :meth:`update_prototypes`, which consumes them.
    """

    def __init__(self, temperature: float = 0.1, epsilon: float = 0.05, momentum: float = 0.99,
                 sinkhorn_iterations: int = 100, sinkhorn_stop_early: bool = True) -> None:
        super().__init__()
        self.temperature = temperature
        self.epsilon = epsilon
        self.momentum = momentum
        self.sinkhorn_iterations = sinkhorn_iterations
        # False: exactly sinkhorn_iterations rounds, no convergence test read back to the host.
        self.sinkhorn_stop_early = sinkhorn_stop_early
        # (features, regions, assignment, bound on the regions present) of the last forward.
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None

    def forward(
        self,
        student_maps: Sequence[torch.Tensor],
        teacher_maps: Sequence[torch.Tensor],
        lat: torch.Tensor,
        lon: torch.Tensor,
        prototypes: GeoContextPrototypes,
    ) -> torch.Tensor:
        """One fused (B, D, H, W) map per view; ``lat``, ``lon``: (B,) degrees -> scalar loss."""
        regions = prototypes.regions(lat, lon)  # (B,)
        # Each sample lies in one region: the global batch's samples bound the regions present.
        bound = len(regions) * (dist.get_world_size() if is_distributed() else 1)
        bank = F.normalize(prototypes.prototypes[regions].float(), dim=-1)  # (B, P, D)
        losses, kept_features, kept_regions, kept_assignments = [], [], [], []
        for student, teacher in zip(student_maps, teacher_maps, strict=True):
            b, _, h, w = teacher.shape
            pixels = teacher.detach().flatten(2).transpose(1, 2).flatten(0, 1)  # (B*H*W, D)
            pixel_regions = regions.repeat_interleave(h * w)
            tolerance = ASSIGN_TOLERANCE if self.sinkhorn_stop_early else None
            assignment = prototypes.assign(pixels, pixel_regions, self.epsilon, distributed=True, bound=bound,
                                           iterations=self.sinkhorn_iterations, tolerance=tolerance)  # (B*H*W, P)
            queries = F.normalize(student.flatten(2).transpose(1, 2).float(), dim=-1)  # (B, H*W, D)
            scores = (queries @ bank.transpose(1, 2)).flatten(0, 1) / self.temperature
            losses.append(-(assignment * F.log_softmax(scores, dim=-1)).sum(-1).mean())
            kept_features.append(pixels)
            kept_regions.append(pixel_regions)
            kept_assignments.append(assignment)
        self._pending = (torch.cat(kept_features), torch.cat(kept_regions), torch.cat(kept_assignments), bound)
        return torch.stack(losses).mean()

    @torch.no_grad()
    def update_prototypes(self, prototypes: GeoContextPrototypes) -> None:
        """EMA of the prototypes towards the last forward's teacher features; call after the step."""
        if self._pending is None:
            raise RuntimeError("GeoPrototypeLoss.update_prototypes: no forward since the last update")
        features, regions, assignment, bound = self._pending
        prototypes.ema_update(features, regions, assignment, self.momentum, distributed=True, bound=bound)
        self._pending = None
