"""Task heads on SkySense features: a linear classifier and a UperNet decoder.

:class:`UperNetHead` follows UperNet (Xiao et al., ECCV 2018) as mmsegmentation's ``UPerHead``
builds it, the decoder the SkySense paper uses for segmentation: a pyramid pooling module on the
coarsest level, lateral 1x1 convolutions and a top-down path, a 3x3 convolution per level, all
levels upsampled to the finest and fused by a 3x3 convolution, then a 1x1 classifier.

Normalisation is GroupNorm, not BatchNorm: fine-tuning here runs with batches of 1-8 crops on a
CPU, and the pyramid pooling's 1 x 1 branch has a single value per channel per sample, which
BatchNorm cannot normalise at batch size 1. GroupNorm's statistics do not depend on the batch
(groups of at least two channels, see :func:`group_norm`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with at most ``groups`` groups of at least 2 channels each (the 1 x 1 pooling
    branch has one value per channel, and a group needs two values to normalise)."""
    return nn.GroupNorm(math.gcd(groups, max(1, channels // 2)), channels)


class ConvNormAct(nn.Sequential):
    """k x k convolution (no bias), GroupNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            group_norm(out_channels),
            nn.ReLU(inplace=True),
        )


class LinearClassifier(nn.Module):
    """LayerNorm then a linear layer on pooled features: (B, D) -> (B, K) logits.

    The LayerNorm puts the concatenated parts of a pooled feature (e.g. HR levels and the fused
    map, see :func:`skysense.evaluation.features.pool_features`) on one scale.
    """

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.linear = nn.Linear(in_dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


class PyramidPooling(nn.Module):
    """Average-pool to each of ``scales`` x ``scales`` bins, 1x1 conv, upsample, concatenate, 3x3 conv."""

    def __init__(self, in_channels: int, channels: int, scales: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.scales = tuple(scales)
        self.branches = nn.ModuleList(ConvNormAct(in_channels, channels) for _ in self.scales)
        self.bottleneck = ConvNormAct(in_channels + len(self.scales) * channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [
            F.interpolate(branch(F.adaptive_avg_pool2d(x, scale)), size=size, mode="bilinear", align_corners=False)
            for scale, branch in zip(self.scales, self.branches)
        ]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class UperNetHead(nn.Module):
    """UperNet decoder: feature pyramid (fine to coarse) -> (B, K, H0, W0) logits at the finest level.

    Args:
        in_channels: channels of each pyramid level, finest first.
        num_classes: output classes.
        channels: decoder width (mmsegmentation uses 512 for Swin backbones).
        pool_scales: bins of the pyramid pooling on the coarsest level.
        dropout: dropout before the classifier.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 256,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__()
        if len(in_channels) < 1:
            raise ValueError("UperNetHead: in_channels: expected at least one level")
        self.in_channels = tuple(in_channels)
        self.ppm = PyramidPooling(self.in_channels[-1], channels, pool_scales)
        self.laterals = nn.ModuleList(ConvNormAct(c, channels) for c in self.in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvNormAct(channels, channels, 3) for _ in self.in_channels[:-1])
        self.fuse = ConvNormAct(len(self.in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(levels) != len(self.in_channels):
            raise ValueError(f"UperNetHead: expected {len(self.in_channels)} levels, got {len(levels)}")
        for i, (x, c) in enumerate(zip(levels, self.in_channels)):
            if x.ndim != 4 or x.shape[1] != c:
                raise ValueError(f"UperNetHead: level {i}: expected (B, {c}, H, W), got {tuple(x.shape)}")
        maps = [lateral(x) for lateral, x in zip(self.laterals, levels[:-1])] + [self.ppm(levels[-1])]
        for i in range(len(maps) - 1, 0, -1):  # top-down path
            maps[i - 1] = maps[i - 1] + F.interpolate(maps[i], size=maps[i - 1].shape[-2:], mode="bilinear",
                                                      align_corners=False)
        outs = [conv(m) for conv, m in zip(self.fpn_convs, maps[:-1])] + [maps[-1]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]]
        return self.classifier(self.dropout(self.fuse(torch.cat(outs, dim=1))))
