"""Shared fixtures: small deterministic models and inputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from skysense import SkySense


@pytest.fixture(scope="session")
def tiny_model() -> SkySense:
    torch.manual_seed(0)
    return SkySense.from_preset("tiny").eval()


@pytest.fixture
def data_root() -> Path:
    """Root of the real imagery (``$SKYSENSE_DATA``); skips the test when it is absent."""
    root = os.environ.get("SKYSENSE_DATA")
    if not root or not Path(root).is_dir():
        pytest.skip("real data not available: set SKYSENSE_DATA to the shared data folder")
    return Path(root)


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
