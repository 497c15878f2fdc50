"""Embedding four-band (R, G, B, NIR) HR scenes with a model made to take them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from rasterio.transform import from_origin
from rasterio.windows import Window

from embed_helpers import ORIGIN, write_raster
from skysense import SkySense
from skysense.data.rasters import RasterReadError
from skysense.inference import EmbedOptions, Scene, embed_scene

NAIP = "samples/naip_series/m_4709963_se_14_1_20180716.tif"
"""A real NAIP quad: R, G, B, NIR 8-bit, resampled to 5 m (see the data README)."""


def rgbnir_model() -> SkySense:
    torch.manual_seed(0)
    return SkySense.from_preset("tiny").eval().with_hr_bands(("R", "G", "B", "NIR"))


@pytest.fixture(scope="module")
def model() -> SkySense:
    return rgbnir_model()


def test_the_model_bands_are_read_first_or_by_name(model: SkySense, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgbn = rng.integers(0, 256, (4, 64, 96), dtype=np.uint8)
    transform = from_origin(*ORIGIN, 1.0, 1.0)
    in_order = write_raster(tmp_path / "rgbn.tif", rgbn, transform)
    with Scene(model.config, hr=in_order) as scene:
        window = scene.read(Window(0, 0, 3, 2), ["hr"])
        assert scene.hr_band_indexes == (1, 2, 3, 4)
    assert window.inputs["hr"].shape == (4, 64, 96)
    np.testing.assert_array_equal(window.inputs["hr"], rgbn.astype(np.float32))
    shuffled = write_raster(tmp_path / "nrgb_alpha.tif",
                            np.concatenate([rgbn[[3, 0, 1, 2]], np.full((1, 64, 96), 255, np.uint8)]), transform)
    with Scene(model.config, hr=shuffled, hr_file_bands=("NIR", "R", "G", "B", "A")) as scene:
        assert scene.hr_band_indexes == (2, 3, 4, 1)
        np.testing.assert_array_equal(scene.read(Window(0, 0, 3, 2), ["hr"]).inputs["hr"], rgbn.astype(np.float32))
    rgb = write_raster(tmp_path / "rgb.tif", rgbn[:3], transform)
    with pytest.raises(RasterReadError, match=r"hr: .*rgb.tif has 3 bands, expected at least 4 \(the model's R, G, "
                                              r"B, NIR as bands 1-4"):
        Scene(model.config, hr=rgb)
    with pytest.raises(RasterReadError, match=r"hr: .*rgb.tif holds \['R', 'G', 'B'\]; the model takes \['R', 'G', "
                                              r"'B', 'NIR'\]: \['NIR'\] missing"):
        Scene(model.config, hr=rgb, hr_file_bands=("R", "G", "B"))
    with pytest.raises(RasterReadError, match=r"rgbn.tif has 4 bands; the HR file bands name 3"):
        Scene(model.config, hr=in_order, hr_file_bands=("R", "G", "B"))


@pytest.mark.real_data
def test_real_naip_quad_embeds_with_its_nir_band(model: SkySense, data_root: Path, tmp_path: Path) -> None:
    naip = data_root / NAIP
    with rasterio.open(naip) as src:
        crs, transform, (height, width), count = src.crs, src.transform, src.shape, src.count
    assert count == 4
    options = EmbedOptions(window=8, overlap=0, block=32, progress=False)
    with Scene(model.config, hr=naip) as scene:
        report = embed_scene(model, scene, tmp_path / "naip.tif", options)
    with rasterio.open(report.out) as out:
        data, out_crs, out_transform = out.read(), out.crs, out.transform
    assert out_crs == crs and out_transform == transform @ Affine.scale(32)
    assert data.shape == (128, -(-height // 32), -(-width // 32))
    assert np.isfinite(data).all() and data.std() > 0
    # the NIR band is read: the same weights without it (three bands) embed the scene differently
    three = SkySense.from_preset("tiny").eval()
    three.load_state_dict({**model.state_dict(),
                           "hr_encoder.patch_embed.weight": model.hr_encoder.patch_embed.weight[:, :3]})
    with Scene(three.config, hr=naip) as scene:
        rgb_report = embed_scene(three, scene, tmp_path / "naip_rgb.tif", options)
    with rasterio.open(rgb_report.out) as out:
        rgb_data = out.read()
    assert np.abs(data - rgb_data).max() > 1e-2


@pytest.mark.real_data
def test_embed_command_takes_nir_from_the_naip_file(data_root: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    from skysense.cli import main

    out = tmp_path / "naip.tif"
    args = ["embed", "--hr", str(data_root / NAIP), "--preset", "tiny", "--with-hr-bands", "R,G,B,NIR",
            "--window", "8", "--overlap", "0", "--no-progress", "--no-preview", "--json"]
    assert main([*args, "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["extra"]["modalities"] == ["hr"]
    with rasterio.open(out) as src:
        command_data = src.read()
    # the same as the library with the same seed's model
    with Scene(rgbnir_model().config, hr=data_root / NAIP) as scene:
        library = embed_scene(rgbnir_model(), scene, tmp_path / "library.tif",
                              EmbedOptions(window=8, overlap=0, progress=False, preview=False))
    with rasterio.open(library.out) as src:
        np.testing.assert_allclose(command_data, src.read(), rtol=1e-5, atol=1e-5)
    assert main(["embed", "--hr", str(data_root / NAIP), "--preset", "tiny", "--hr-bands", "R,G,B",
                 "--with-hr-bands", "R,G,B,NIR", "--out", str(tmp_path / "bad.tif")]) == 2
    assert "has 4 bands; the HR file bands name 3" in capsys.readouterr().err
