"""Vision Transformer for Sentinel-2 and Sentinel-1 frames (patch 4, any input size).

Semantics of the authors' mmseg-0.30 ViT: a patch embedding without norm (inputs zero-padded at
the bottom/right to a multiple of the patch), a class token prepended before the position
embedding is added, pre-norm blocks, and no final norm. The position embedding is stored for a
``pos_grid x pos_grid`` token grid; any other grid resizes its patch part bicubically
(``align_corners=False``, no antialiasing) while the class slot is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from skysense.config import ViTConfig
from skysense.models.layers import TransformerBlock, drop_path_rates


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the last two dims of ``x`` at the bottom/right up to a multiple of ``multiple``."""
    pad_h = -x.shape[-2] % multiple
    pad_w = -x.shape[-1] % multiple
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return x


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided convolution: (B, C, H, W) -> (B, D, H/p, W/p)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(pad_to_multiple(x, self.patch_size))


class VisionTransformer(nn.Module):
    """ViT encoder returning a feature map ``(B, D, ceil(H/p), ceil(W/p))``."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.patch_embed = PatchEmbed(config.in_chans, dim, config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.pos_grid**2, dim))
        rates = drop_path_rates(config.drop_path_rate, config.depth)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, config.num_heads, config.mlp_ratio, rates[i], config.norm_eps)
            for i in range(config.depth)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embedding ``(1, 1 + grid_h * grid_w, D)`` for a token grid of that size."""
        g = self.config.pos_grid
        if (grid_h, grid_w) == (g, g):
            return self.pos_embed
        cls_slot, patch = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patch = patch.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
        patch = F.interpolate(patch, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patch = patch.flatten(2).transpose(1, 2).to(self.pos_embed.dtype)
        return torch.cat([cls_slot, patch], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, C, H, W) -> (B, D, ceil(H/p), ceil(W/p))."""
        tokens = self.patch_embed(x)
        b, d, gh, gw = tokens.shape
        tokens = tokens.flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embedding(gh, gw)
        if not self.config.keep_cls_token:
            tokens = tokens[:, 1:]
        for block in self.blocks:
            tokens = block(tokens)
        if self.config.keep_cls_token:
            tokens = tokens[:, 1:]
        return tokens.transpose(1, 2).reshape(b, d, gh, gw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)
