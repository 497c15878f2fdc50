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


@pytest.fixture
def sdpa_choices(monkeypatch) -> list[int]:
    """The backend SDPA picks by itself (``torch._fused_sdp_choice``, as ints of ``SDPBackend``)
    at every call of ``F.scaled_dot_product_attention`` during the test, in order."""
    import torch.nn.functional as F

    chosen: list[int] = []
    attention = F.scaled_dot_product_attention

    def recorded(q, k, v, attn_mask=None, *args, **kwargs):
        chosen.append(int(torch._fused_sdp_choice(q, k, v, attn_mask, 0.0, False)))
        return attention(q, k, v, attn_mask, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recorded)
    return chosen


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, workers share the cores: each PyTorch thread pool gets its share, but
    never fewer than 2 threads (on 2 cores, one thread per worker together with ``--dist
    worksteal`` was slower: 575 s against 497 s for the suite; benchmarks/RESULTS.md, session 13)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        torch.set_num_threads(max(2, (os.cpu_count() or 1) // workers))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true",
                     help="also run the tests marked slow (CI and the README's test command run every test)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without ``--slow`` the tests marked slow are skipped, with the reason saying so: the
    default suite is the quick one for working on the code."""
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="marked slow: run with --slow (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
