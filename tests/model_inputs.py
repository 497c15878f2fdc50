"""Deterministic inputs for the tiny preset, shared by the model tests."""

from __future__ import annotations

import torch


def tiny_inputs(batch: int = 2, hr_px: int = 128, frames: tuple[int, int] = (3, 2)) -> dict[str, torch.Tensor]:
    """Inputs for the tiny preset covering the same ground: HR of hr_px, S2/S1 of hr_px/32."""
    g = torch.Generator().manual_seed(1)
    px = hr_px // 32
    t2, t1 = frames
    return {
        "hr": torch.randn(batch, 3, hr_px, hr_px, generator=g),
        "s2": torch.randn(batch, t2, 10, px, px, generator=g),
        "s2_dates": torch.randint(1, 367, (batch, t2), generator=g),
        "s1": torch.randn(batch, t1, 2, px, px, generator=g),
        "s1_dates": torch.randint(1, 367, (batch, t1), generator=g),
        "lat": torch.tensor([48.1, -33.9, 0.0, 89.9][:batch]),
        "lon": torch.tensor([11.6, 151.2, 0.0, -179.9][:batch]),
    }
