from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from skysense.data import examples
from skysense.data.sample import collate

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("bigearthnet_common") is None,
    reason="bigearthnet-common not installed (pip install bigearthnet-common)",
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_example_root_is_extracted_once_without_importing_the_package(cache, monkeypatch):
    monkeypatch.setenv("SKYSENSE_CACHE", str(cache))
    root = examples.bigearthnet_example_root()
    assert root == cache / "bigearthnet_example"
    assert (root / "BigEarthNet-S2-Example").is_dir() and (root / "BigEarthNet-S1-Example").is_dir()
    assert len(list((root / "BigEarthNet-S2-Example").iterdir())) == 6
    assert not [p for p in cache.iterdir() if p.name.startswith(".bigearthnet_example.")]  # no staging left
    marker = root / "marker"
    marker.write_text("x")
    assert examples.bigearthnet_example_root() == root and marker.exists()  # cached, not re-extracted
    assert "bigearthnet_common" not in sys.modules


def test_missing_package_is_a_clear_error(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="pip install bigearthnet-common"):
        examples.package_folder("bigearthnet_common_not_there")


def test_example_samples_are_model_ready(cache):
    samples = examples.bigearthnet_example_samples(cache=cache)
    assert len(samples) == 6
    for s in samples:
        assert s["s2"].shape == (1, 10, 120, 120) and s["s1"].shape == (1, 2, 120, 120)
        assert s["s2"].dtype == torch.float32
        assert 300 < s["s2"].mean() < 5000  # reflectance x 10000
        assert -30 < s["s1"].mean() < 0  # dB, not linear power
        assert 35 < s["lat"] < 70 and -10 < s["lon"] < 35  # Europe
        assert 1 <= int(s["s2_dates"][0]) <= 366
        assert s["label"].shape == (19,) and s["label"].sum() >= 1
    by_id = {s["id"]: s for s in samples}
    first = by_id["S2A_MSIL2A_20170613T101031_87_48"]
    assert first["s2_dates"].tolist() == [164] and first["s1_dates"].tolist() == [164]
    assert first["lat"].item() == pytest.approx(48.22, abs=0.01)
    batch = collate(samples)
    assert batch["s2"].shape == (6, 1, 10, 120, 120) and batch["lat"].shape == (6,)
    normalized = examples.bigearthnet_example_samples(normalize=True, cache=cache)
    assert all(s["normalized"] for s in normalized)
    assert abs(float(torch.stack([s["s2"] for s in normalized]).mean())) < 2
