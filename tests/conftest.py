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
