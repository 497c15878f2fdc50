"""Other HR band lists (RGBNIR): filters copied as the authors do, the config following, errors."""

from __future__ import annotations

import pytest
import torch

from skysense import SkySense
from skysense.data.units import normalize
from skysense.models.hr_bands import parse_bands


@pytest.fixture
def model() -> SkySense:
    torch.manual_seed(0)
    return SkySense.from_preset("tiny").eval()


def hr_features(model: SkySense, hr: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_features(hr=hr)["fused"]


def test_nir_starts_from_the_red_filter_with_the_red_statistics(model: SkySense) -> None:
    before = model.hr_encoder.patch_embed.weight.detach().clone()
    spec = model.config.inputs["hr"]
    assert model.with_hr_bands(("R", "G", "B", "NIR")) is model
    after = model.hr_encoder.patch_embed.weight
    assert after.shape == (before.shape[0], 4, *before.shape[2:])
    assert torch.equal(after[:, :3], before)
    assert torch.equal(after[:, 3], before[:, 0])
    assert after.requires_grad
    assert model.config.hr.in_chans == 4
    hr = model.config.inputs["hr"]
    assert hr.bands == ("R", "G", "B", "NIR")
    assert hr.mean == (*spec.mean, spec.mean[0]) and hr.std == (*spec.std, spec.std[0])
    assert hr.units == spec.units and hr.gsd_m == spec.gsd_m


def test_a_neutral_nir_band_gives_the_three_band_features(model: SkySense) -> None:
    torch.manual_seed(1)
    rgb = torch.randn(2, 3, 64, 64)
    expected = hr_features(model, rgb)
    model.with_hr_bands(("R", "G", "B", "NIR"))
    neutral = hr_features(model, torch.cat([rgb, torch.zeros(2, 1, 64, 64)], 1))
    torch.testing.assert_close(neutral, expected, atol=1e-5, rtol=1e-5)
    bright = hr_features(model, torch.cat([rgb, torch.ones(2, 1, 64, 64)], 1))
    assert (bright - expected).abs().max() > 1e-2  # the NIR band is read
    with pytest.raises(ValueError, match="hr.*4"):
        model.forward_features(hr=rgb)  # a three-band image no longer fits


def test_reordered_bands_give_the_same_features_for_the_reordered_image(model: SkySense) -> None:
    torch.manual_seed(2)
    rgb = torch.randn(1, 3, 64, 64)
    expected = hr_features(model, rgb)
    spec = model.config.inputs["hr"]
    model.with_hr_bands(("B", "G", "R"))
    assert model.config.inputs["hr"].mean == spec.mean[::-1]
    torch.testing.assert_close(hr_features(model, rgb.flip(1)), expected, atol=1e-5, rtol=1e-5)


def test_own_statistics_and_init_for_a_new_band(model: SkySense) -> None:
    before = model.hr_encoder.patch_embed.weight.detach().clone()
    model.with_hr_bands(("R", "G", "B", "NIR", "RE"), init={"RE": "G"}, mean={"NIR": 90.0}, std={"NIR": 40.0})
    after = model.hr_encoder.patch_embed.weight
    assert torch.equal(after[:, 4], before[:, 1])
    hr = model.config.inputs["hr"]
    assert hr.mean[3:] == (90.0, model.config.inputs["hr"].mean[1])
    assert hr.std[3] == 40.0
    # normalize follows the new list: (x - mean) / std per band, a three-band sample refused
    sample = {"hr": torch.full((5, 4, 4), 130.0)}
    out = normalize(sample, model.config)["hr"]
    assert out[3].allclose(torch.full((4, 4), 1.0))
    with pytest.raises(ValueError, match=r"hr: band count: expected 5"):
        normalize({"hr": torch.zeros(3, 4, 4)}, model.config)


def test_the_band_list_survives_save_and_load(model: SkySense, tmp_path) -> None:
    model.with_hr_bands(("R", "G", "B", "NIR"), mean={"NIR": 100.0}, std={"NIR": 50.0})
    model.save_pretrained(str(tmp_path / "rgbnir"))
    loaded = SkySense.from_pretrained(str(tmp_path / "rgbnir"))
    assert loaded.config.inputs["hr"] == model.config.inputs["hr"]
    assert loaded.config.hr.in_chans == 4
    assert torch.equal(loaded.hr_encoder.patch_embed.weight, model.hr_encoder.patch_embed.weight)
    hr = torch.randn(1, 4, 64, 64)
    torch.testing.assert_close(hr_features(loaded, hr), hr_features(model, hr))


@pytest.mark.parametrize("bands, kwargs, message", [
    ((), {}, "at least one band"),
    (("R", "G", "R"), {}, r"\['R'\] listed more than once"),
    (("R", "G", "B", "SWIR"), {}, "new band 'SWIR' needs a band to copy its filter from"),
    (("R", "G", "B", "RE"), {"init": {"RE": "NIR"}}, "copy the filter of 'NIR', which the model does not take"),
    (("R", "G", "B", "NIR"), {"mean": {"R": 1.0}}, r"mean given for \['R'\], which the model already takes"),
    (("R", "G", "B", "NIR"), {"std": {"NIR": 0.0}}, "std of 'NIR': expected a positive number, got 0.0"),
])
def test_bad_band_lists_are_refused_and_leave_the_model_as_it_was(model: SkySense, bands, kwargs, message) -> None:
    weight = model.hr_encoder.patch_embed.weight
    with pytest.raises(ValueError, match=message):
        model.with_hr_bands(bands, **kwargs)
    assert model.hr_encoder.patch_embed.weight is weight
    assert model.config.inputs["hr"].bands == ("R", "G", "B") and model.config.hr.in_chans == 3


def test_band_lists_from_the_command_line() -> None:
    assert parse_bands("R, G,B,NIR") == ("R", "G", "B", "NIR")
    with pytest.raises(ValueError, match="comma-separated"):
        parse_bands(" , ")
