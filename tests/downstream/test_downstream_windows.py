"""Crops, padding and sliding windows over multi-grid samples; GeoTIFF prediction maps."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from rasterio.crs import CRS

from skysense.downstream.data import flip, random_crop
from skysense.downstream.predictions import prediction_path, write_prediction
from skysense.downstream.sliding_window import (
    crop,
    grid_alignment,
    pad_to,
    scales,
    sliding_window,
    window_starts,
)


def _hr_s2_sample() -> dict[str, torch.Tensor]:
    """HR 128 px with S2 4 px over the same ground (1/32), a mask on the HR grid."""
    return {
        "hr": torch.arange(3 * 128 * 128, dtype=torch.float32).reshape(3, 128, 128),
        "s2": torch.arange(2 * 10 * 4 * 4, dtype=torch.float32).reshape(2, 10, 4, 4),
        "s2_dates": torch.tensor([10, 200]),
        "mask": torch.arange(128 * 128).reshape(128, 128),
    }


def test_window_starts_cover_every_pixel():
    for size, window, stride, align in ((10, 4, 3, 1), (128, 64, 48, 1), (100, 32, 32, 1), (200, 96, 64, 32),
                                        (30, 64, 32, 1)):
        starts = window_starts(size, window, stride, align)
        assert all(s % align == 0 for s in starts) and starts == sorted(set(starts))
        covered = torch.zeros(size, dtype=torch.bool)
        for i, s in enumerate(starts):
            end = size if i == len(starts) - 1 else s + window
            covered[s:end] = True
        assert bool(covered.all())
    assert window_starts(10, 4, 3) == [0, 3, 6]
    with pytest.raises(ValueError):
        window_starts(10, 0, 3)


def test_crop_scales_every_grid():
    sample = _hr_s2_sample()
    assert scales(sample) == {"hr": 1, "s2": Fraction(1, 32), "mask": 1}
    assert grid_alignment(sample) == 32
    out = crop(sample, 32, 64, 64, 64)
    assert out["hr"].shape == (3, 64, 64) and out["s2"].shape == (2, 10, 2, 2) and out["mask"].shape == (64, 64)
    assert torch.equal(out["s2"], sample["s2"][..., 1:3, 2:4])
    assert torch.equal(out["mask"], sample["mask"][32:96, 64:128])
    assert torch.equal(out["s2_dates"], sample["s2_dates"])  # not spatial
    with pytest.raises(ValueError, match="s2: window top 16"):
        crop(sample, 16, 0, 64, 64)


def test_pad_to_fills_images_targets_and_validity():
    sample = {"s2": torch.ones(1, 10, 5, 6), "mask": torch.zeros(5, 6, dtype=torch.int64),
              "valid_s2": torch.ones(5, 6, dtype=torch.bool)}
    out = pad_to(sample, 8, 8)
    assert out["s2"].shape == (1, 10, 8, 8) and float(out["s2"][..., 5:, :].abs().sum()) == 0
    assert out["mask"].shape == (8, 8) and bool((out["mask"][5:] == -1).all()) and bool((out["mask"][:, 6:] == -1).all())
    assert not bool(out["valid_s2"][5:].any()) and bool(out["valid_s2"][:5, :6].all())
    assert pad_to(sample, 4, 4)["s2"].shape == (1, 10, 5, 6)


def test_random_crop_and_flip_keep_grids_aligned():
    sample = _hr_s2_sample()
    g = torch.Generator().manual_seed(0)
    out = random_crop(sample, 64, g)
    top, left = divmod(int(out["mask"][0, 0]), 128)
    assert top % 32 == 0 and left % 32 == 0
    assert torch.equal(out["s2"], sample["s2"][..., top // 32:top // 32 + 2, left // 32:left // 32 + 2])
    flipped = flip(out, horizontal=True, vertical=False)
    assert torch.equal(flipped["hr"], out["hr"].flip(-1)) and torch.equal(flipped["s2"], out["s2"].flip(-1))
    assert torch.equal(flipped["mask"], out["mask"].flip(-1)) and torch.equal(flipped["s2_dates"], out["s2_dates"])
    with pytest.raises(ValueError, match="multiple of 32"):
        random_crop(sample, 48, g)


def test_sliding_window_matches_whole_tile_for_a_pixelwise_model():
    g = torch.Generator().manual_seed(0)
    batch = {"hr": torch.randn(1, 3, 70, 90, generator=g), "mask": torch.zeros(1, 70, 90, dtype=torch.long)}
    weight = torch.randn(4, 3, generator=g)
    calls = []

    def predict(b):
        calls.append(tuple(b["hr"].shape[-2:]))
        return {"mask": torch.einsum("kc,bchw->bkhw", weight, b["hr"])}

    out = sliding_window(predict, batch, window=32, stride=24)
    assert torch.allclose(out["mask"], predict(batch)["mask"], atol=1e-5)
    assert calls[0] == (32, 32) and len(calls) == 3 * 4 + 1


def test_sliding_window_averages_overlaps():
    batch = {"hr": torch.zeros(1, 3, 10, 10)}
    counter = iter(range(100))

    def predict(b):  # every window predicts its own index: overlaps give the mean
        return {"x": torch.full((1, 1) + tuple(b["hr"].shape[-2:]), float(next(counter)))}

    out = sliding_window(predict, batch, window=6, stride=4)["x"][0, 0]
    # Windows start at 0 and 4 per axis; the 2 x 2 = 4 windows have values 0..3 (row-major).
    assert out[0, 0] == 0 and out[0, 9] == 1 and out[9, 0] == 2 and out[9, 9] == 3
    assert out[5, 5] == pytest.approx((0 + 1 + 2 + 3) / 4)


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_prediction_geotiff_keeps_crs_and_transform(tmp_path):
    classes = torch.tensor([[0, 1, 2], [3, 4, 5]])
    crs, transform = CRS.from_epsg(32633), Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5300000.0)
    path = write_prediction(prediction_path(tmp_path, "train/Urban/12"), classes, crs, transform)
    assert path.name == "train_Urban_12.tif"
    with rasterio.open(path) as src:
        assert src.crs == crs and src.transform == transform and src.dtypes == ("uint8",)
        assert np.array_equal(src.read(1), classes.numpy())
    plain = write_prediction(tmp_path / "plain.tif", np.full((4, 5), 300))
    with rasterio.open(plain) as src:
        assert src.crs is None and src.dtypes == ("int16",) and int(src.read(1)[0, 0]) == 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.tif", "train_Urban_12.tif"]  # no temp files left
    with pytest.raises(ValueError, match=r"expected \(H, W\)"):
        write_prediction(tmp_path / "bad.tif", torch.zeros(1, 2, 2))
