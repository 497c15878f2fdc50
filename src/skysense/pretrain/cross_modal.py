"""Cross-modal alignment of SkySense (Guo et al., 2024): HR, S2 and S1 features of one place.

The paper names a contrastive loss between the modalities' features; the form is CLIP's
(Radford et al., 2021): each modality's pooled feature is linearly projected (no bias) into a
shared space and L2-normalised, and for every pair of modalities present a symmetric InfoNCE
treats the same sample as the positive and the batch's other samples as negatives. The pairs'
losses are averaged.

Temperature: CLIP's learnable logit scale, initialised at ``1 / 0.07`` and clamped at 100; with
``learnable_temperature=False`` it stays at ``1 / temperature`` (a buffer, so it is saved but
not trained).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

MAX_LOGIT_SCALE = 100.0


class CrossModalAlignment(nn.Module):
    """Symmetric InfoNCE between every pair of modalities given: ``{name: (B, D_name)}``."""

    def __init__(
        self, dims: Mapping[str, int], embed_dim: int = 256, temperature: float = 0.07,
        learnable_temperature: bool = True,
    ) -> None:
        super().__init__()
        self.projections = nn.ModuleDict({m: nn.Linear(d, embed_dim, bias=False) for m, d in dims.items()})
        log_scale = torch.tensor(math.log(1.0 / temperature))
        if learnable_temperature:
            self.log_logit_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_logit_scale", log_scale)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean pairwise loss over the modalities given; zero when fewer than two are given."""
        unknown = set(features) - set(self.projections)
        if unknown:
            raise ValueError(f"CrossModalAlignment: unknown modalities {sorted(unknown)}; "
                             f"expected some of {sorted(self.projections)}")
        names = [m for m in self.projections if m in features]
        embedded = {m: F.normalize(self.projections[m](features[m]), dim=-1) for m in names}
        losses = [self.pair_loss(embedded[a], embedded[b]) for a, b in itertools.combinations(names, 2)]
        if not losses:
            return self.log_logit_scale.new_zeros(())
        return torch.stack(losses).mean()

    def pair_loss(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """CLIP's symmetric cross-entropy for unit vectors ``a``, ``b`` (B, E) of matching rows."""
        logits = self.logit_scale * a @ b.T
        labels = torch.arange(a.shape[0], device=a.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
