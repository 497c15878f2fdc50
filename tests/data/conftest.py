"""Fixtures of the data tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def real_root() -> Path:
    """``$SKYSENSE_DATA``; skips the test when it is not set or missing."""
    value = os.environ.get("SKYSENSE_DATA")
    if not value or not Path(value).is_dir():
        pytest.skip("real data not available: set SKYSENSE_DATA to the shared data folder")
    return Path(value)
