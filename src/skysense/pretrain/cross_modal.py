"""Cross-modal alignment of SkySense (Guo et al., 2024): HR, S2 and S1 features of one place.

The paper names a contrastive loss between the modalities' features; the form is CLIP's
(Radford et al., 2021): each modality's pooled feature is linearly projected (no bias) into a
shared space and L2-normalised, and for every pair of modalities present a symmetric InfoNCE
treats the same sample as the positive and the batch's other samples as negatives. The pairs'
losses are averaged. Under torch.distributed the negatives are the global batch's (every
process's embeddings, gathered with gradients), so N processes sharing a global batch give the
loss and gradients of one process holding it all.

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

from skysense.distributed import gather_rows

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
        gathered = {m: gather_rows(e) for m, e in embedded.items()}
        losses = [self.pair_loss(embedded[a], embedded[b], gathered[a][0], gathered[b][0], gathered[a][1])
                  for a, b in itertools.combinations(names, 2)]
        if not losses:
            return self.log_logit_scale.new_zeros(())
        return torch.stack(losses).mean()

    def pair_loss(self, a: torch.Tensor, b: torch.Tensor, all_a: torch.Tensor | None = None,
                  all_b: torch.Tensor | None = None, first: int = 0) -> torch.Tensor:
        """CLIP's symmetric cross-entropy for unit vectors ``a``, ``b`` (B, E) of matching rows.

        ``all_a``, ``all_b`` (M, E): the whole batch, of which ``a``, ``b`` are rows
        ``first..first + B - 1`` (default: ``a``, ``b`` themselves); the others are negatives.
        """
        all_a = a if all_a is None else all_a
        all_b = b if all_b is None else all_b
        labels = torch.arange(first, first + a.shape[0], device=a.device)
        a_to_b = self.logit_scale * a @ all_b.T
        b_to_a = self.logit_scale * b @ all_a.T
        return (F.cross_entropy(a_to_b, labels) + F.cross_entropy(b_to_a, labels)) / 2
