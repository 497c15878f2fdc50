"""Projection head for self-distillation, after DINO (Caron et al., 2021) and DINOv2.

MLP -> bottleneck -> L2 normalisation -> weight-normalised prototype layer. DINO wraps the last
layer in ``weight_norm`` and freezes its gain at 1; that is the same as normalising each
prototype row to unit length at every call, which is what :class:`DINOHead` does (one parameter
instead of a frozen gain and a direction, and nothing special for ``deepcopy`` or EMA).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class DINOHead(nn.Module):
    """``in_dim -> hidden_dim (x layers-1, GELU) -> bottleneck_dim -> L2 norm -> out_dim`` scores.

    Works on vectors ``(N, in_dim) -> (N, out_dim)`` and on dense maps
    ``(B, in_dim, H, W) -> (B, out_dim, H, W)``, applied to every pixel independently.
    """

    def __init__(
        self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, layers: int = 3
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"DINOHead: layers must be >= 1, got {layers}")
        widths = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        blocks: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            blocks.append(nn.Linear(a, b))
            if i < layers - 1:
                blocks.append(nn.GELU())
        self.mlp = nn.Sequential(*blocks)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.trunc_normal_(self.prototypes, std=0.02)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            return self.channels_last(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if x.ndim != 2:
            raise ValueError(f"DINOHead: expected (N, D) or (B, D, H, W), got shape {tuple(x.shape)}")
        return self.channels_last(x)

    def channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """Scores for features in the last dimension: (..., in_dim) -> (..., out_dim).

        The features go through the MLP as the rows of one matrix: on a strided input of more
        than two dimensions, F.linear without weight gradients (the EMA teacher's heads)
        would broadcast each weight over a batched matmul, one copy per leading index.
        """
        rows = x.reshape(-1, x.shape[-1])
        z = F.normalize(self.mlp(rows), dim=-1)
        return F.linear(z, F.normalize(self.prototypes, dim=-1)).reshape(*x.shape[:-1], -1)


def apply_per_view(head: nn.Module, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``[head(x) for x in inputs]``, computed in one call on the inputs stacked along the batch
    when they share every other dimension (the views of a step do): the same outputs from one
    matrix product per layer instead of one per view."""
    if len(inputs) > 1 and all(x.shape[1:] == inputs[0].shape[1:] for x in inputs):
        return list(head(torch.cat(list(inputs))).split([x.shape[0] for x in inputs]))
    return [head(x) for x in inputs]
