from __future__ import annotations

import pytest
import torch
from affine import Affine

from skysense.config import preset_config
from skysense.data.sample import check_sample, collate
from skysense.data.units import normalize


def _sample(t2: int, t1: int, size: int = 8, lat: float = 48.0) -> dict:
    return {
        "s2": torch.rand(t2, 10, size, size) * 3000,
        "s2_dates": torch.arange(1, t2 + 1, dtype=torch.int64) * 30,
        "s2_mask": torch.ones(t2, dtype=torch.bool),
        "s1": torch.rand(t1, 2, size, size) * -20,
        "s1_dates": torch.full((t1,), 100, dtype=torch.int64),
        "lat": torch.tensor(lat),
        "lon": torch.tensor(13.0),
        "label": torch.tensor(3),
        "crs": "EPSG:32633",
        "transform": Affine.identity(),
    }


def test_collate_pads_series_with_invalid_frames():
    batch = collate([_sample(3, 1), _sample(1, 2)])
    assert batch["s2"].shape == (2, 3, 10, 8, 8)
    assert batch["s2_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert batch["s2_dates"][1].tolist() == [30, 1, 1]
    assert torch.all(batch["s2"][1, 1:] == 0)
    assert batch["s1"].shape == (2, 2, 2, 8, 8)
    assert batch["s1_mask"].tolist() == [[True, False], [True, True]]  # filled default mask
    assert batch["lat"].shape == (2,) and batch["label"].tolist() == [3, 3]
    assert batch["crs"] == ["EPSG:32633", "EPSG:32633"] and len(batch["transform"]) == 2


def test_collated_batch_runs_through_the_model():
    from skysense.models.skysense import SkySense

    cfg = preset_config("tiny")
    model = SkySense(cfg).eval()
    batch = normalize(collate([_sample(2, 1, size=8), _sample(1, 1, size=8, lat=-30.0)]), cfg)
    with torch.no_grad():
        out = model.forward_features(**batch)
    assert out["fused"].shape[0] == 2 and "geo" in out


def test_collate_errors_name_the_key():
    a, b = _sample(1, 1), _sample(1, 1, size=4)
    with pytest.raises(ValueError, match="'s2'"):
        collate([a, b])
    c = _sample(1, 1)
    del c["label"]
    with pytest.raises(ValueError, match="label"):
        collate([a, c])
    with pytest.raises(ValueError, match="no samples"):
        collate([])


def test_collate_refuses_mixed_normalisation():
    cfg = preset_config("tiny")
    a = normalize(_sample(1, 1), cfg)
    b = _sample(1, 1)
    b["normalized"] = False
    with pytest.raises(ValueError, match="normalised"):
        collate([a, b])
    assert collate([a, normalize(_sample(1, 1), cfg)])["normalized"] is True


def test_check_sample_reports_key_expected_and_actual():
    bad = _sample(2, 1)
    bad["s2_dates"] = torch.tensor([0, 400])
    with pytest.raises(ValueError, match=r"some.tif: sample key 's2_dates'.*1\.\.366"):
        check_sample(bad, where="some.tif")
    bad = _sample(2, 1)
    bad["s2"] = torch.zeros(2, 9, 8, 8)
    with pytest.raises(ValueError, match=r"'s2': shape: expected \(T, 10, h, w\)"):
        check_sample(bad)
