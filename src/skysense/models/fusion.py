"""Multi-modal temporal fusion: one short transformer sequence per spatial location.

At every location of the fusion grid the sequence is ``[extra token, HR, S2 frames, S1 frames]``
(authors' order). Tokens arrive at the HR encoder's last-stage width, get the learnable
day-of-year encoding (added before the input projection, as in the released weights), are
projected to the fusion width, and pass through pre-norm transformer blocks. The extra token's
output is the fused feature of that location. Missing frames are excluded by a key-padding mask.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from skysense.config import FusionConfig
from skysense.models.layers import TransformerBlock, drop_path_rates


class PixelShuffleProjection(nn.Module):
    """1x1 conv ``in_dim -> scale^2 * out_dim`` then PixelShuffle(scale) (the authors' UPHead).

    Brings ViT features (B, in_dim, h, w) onto the HR last-stage grid: (B, out_dim, s*h, s*w).
    """

    def __init__(self, in_dim: int, out_dim: int, scale: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim * scale * scale, kernel_size=1)
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(x))


class FusionTransformer(nn.Module):
    """Fuses per-location token sequences into one feature per location.

    Parameters: ``day_of_year`` (365, C_in) table (the authors' ``ctpe``), ``input_proj``
    C_in -> D (``porj_linear``), ``extra_token`` (1, 1, D) (``cls_token``), ``blocks``.
    """

    def __init__(self, config: FusionConfig, input_dim: int) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.day_of_year = nn.Parameter(torch.zeros(config.day_of_year_slots, input_dim))
        self.input_proj = nn.Linear(input_dim, dim)
        self.extra_token = nn.Parameter(torch.zeros(1, 1, dim))
        rates = drop_path_rates(config.drop_path_rate, config.depth)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, config.num_heads, config.mlp_ratio, rates[i], config.norm_eps)
            for i in range(config.depth)
        )
        nn.init.trunc_normal_(self.day_of_year, std=0.02)
        nn.init.trunc_normal_(self.extra_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def date_offsets(self, day_of_year: torch.Tensor) -> torch.Tensor:
        """Day-of-year encodings already projected to the fusion width: (B, T) -> (B, T, D).

        Adding ``W p`` after the projection equals projecting ``x + p``, at a fraction of the cost
        (one row per frame instead of one per frame and location).
        """
        slot = (day_of_year.long() - 1).clamp(0, self.config.day_of_year_slots - 1)
        return F.linear(self.day_of_year[slot], self.input_proj.weight)

    def forward(
        self,
        tokens: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]],
    ) -> torch.Tensor:
        """Fuse per-modality frame features.

        Args:
            tokens: one entry per present modality, in sequence order, each
                ``(features, day_of_year, valid)`` with ``features`` (B, T, C_in, H, W),
                ``day_of_year`` (B, T) integers in 1..366 or None (no date encoding),
                ``valid`` (B, T) bool, or None when every frame is valid.

        Returns:
            (B, D, H, W): the extra token's output at every location.
        """
        b, _, _, h, w = tokens[0][0].shape
        dim = self.config.embed_dim
        sequence = [self.extra_token.expand(b, h * w, 1, dim)]
        for features, day_of_year, _ in tokens:
            # Locations and frames as the rows of one matrix: a strided 4-D input would make
            # F.linear, where no gradient flows to the weight (the EMA teacher), broadcast the
            # weight over a batched matmul, one (C_in, D) copy per location: at huge with 3
            # samples and two views, 1536 x 2816 x 1024 in bf16, 8.9 GB per modality.
            rows = features.permute(0, 3, 4, 1, 2).reshape(-1, features.shape[2])
            x = self.input_proj(rows).reshape(b, h * w, features.shape[1], dim)
            if day_of_year is not None:
                x = x + self.date_offsets(day_of_year)[:, None]
            sequence.append(x)
        x = torch.cat(sequence, dim=2).reshape(b * h * w, -1, dim)
        mask = None
        if any(frame_valid is not None for _, _, frame_valid in tokens):
            ones = functools.partial(torch.ones, dtype=torch.bool, device=x.device)
            key_valid = torch.cat([ones(b, 1)] + [ones(b, f.shape[1]) if v is None else v for f, _, v in tokens], dim=1)
            # Every sample's mask is shared by all its locations. Reading whether all are valid
            # is a host sync on a GPU; without any mask given, it is known without one.
            if not bool(key_valid.all()):
                mask = key_valid[:, None, :].expand(b, h * w, -1).reshape(b * h * w, -1)
        for block in self.blocks:
            x = block(x, mask)
        return x[:, 0].reshape(b, h, w, dim).permute(0, 3, 1, 2).contiguous()
