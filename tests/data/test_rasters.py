from __future__ import annotations

import numpy as np
import pytest
from rasterio.windows import Window

from skysense.config import S2_BANDS
from skysense.data.rasters import (
    RasterReadError,
    canonical_band,
    center_latlon,
    find_band_files,
    read_band_files,
    read_band_folder,
    read_image,
    read_stacked,
)

from data_helpers import write_s2_folder, write_tif


def test_canonical_band_names():
    assert canonical_band("B02") == "B2"
    assert canonical_band("b8a") == "B8A"
    assert canonical_band("B08A") == "B8A"
    assert canonical_band("B11") == "B11"
    assert canonical_band("vv") == "VV"


def test_band_folder_resamples_20m_onto_10m_grid(tmp_path):
    write_s2_folder(tmp_path / "patch", size=12)
    stack = read_band_folder(tmp_path / "patch", S2_BANDS)
    assert stack.data.shape == (10, 12, 12)
    assert stack.data.dtype == np.float32
    assert stack.bands == S2_BANDS
    assert str(stack.crs) == "EPSG:32633"
    assert stack.transform.a == 10.0 and stack.transform.e == -10.0
    assert stack.valid.all()
    lat, lon = stack.center_latlon()
    assert 48.0 < lat < 48.3 and 13.5 < lon < 13.8


def test_bilinear_resampling_of_a_constant_band_is_constant(tmp_path):
    write_tif(tmp_path / "x_B02.tif", np.zeros((8, 8), np.uint16), res=10)
    write_tif(tmp_path / "x_B05.tif", np.full((4, 4), 500, np.uint16), res=20)
    stack = read_band_folder(tmp_path, ["B2", "B5"])
    assert stack.data.shape == (2, 8, 8)
    np.testing.assert_allclose(stack.data[1], 500)


def test_short_band_names_ssl4eo_style(tmp_path):
    write_tif(tmp_path / "VV.tif", np.zeros((4, 4), np.float32))
    write_tif(tmp_path / "VH.tif", np.ones((4, 4), np.float32))
    stack = read_band_folder(tmp_path, ["VV", "VH"])
    assert stack.data[:, 0, 0].tolist() == [0.0, 1.0]


def test_window_read_on_reference_grid(tmp_path):
    data = np.arange(64, dtype=np.uint16).reshape(8, 8)
    write_tif(tmp_path / "x_B02.tif", data, res=10)
    write_tif(tmp_path / "x_B05.tif", np.full((4, 4), 7, np.uint16), res=20)
    stack = read_band_folder(tmp_path, ["B2", "B5"], window=Window(2, 4, 4, 2))
    assert stack.data.shape == (2, 2, 4)
    np.testing.assert_array_equal(stack.data[0], data[4:6, 2:6])
    np.testing.assert_allclose(stack.data[1], 7)
    assert stack.transform.c == 400000.0 + 20 and stack.transform.f == 5340000.0 - 40


def test_window_outside_grid_names_file(tmp_path):
    path = write_tif(tmp_path / "x_B02.tif", np.zeros((8, 8), np.uint16))
    with pytest.raises(RasterReadError, match=str(path)):
        read_band_folder(tmp_path, ["B2"], window=Window(6, 6, 4, 4))


def test_nodata_becomes_invalid(tmp_path):
    data = np.full((4, 4), 10, np.uint16)
    data[0, 0] = 0
    write_tif(tmp_path / "x_B02.tif", data, nodata=0)
    nan = np.ones((4, 4), np.float32)
    nan[3, 3] = np.nan
    write_tif(tmp_path / "x_B03.tif", nan)
    stack = read_band_folder(tmp_path, ["B2", "B3"])
    assert not stack.valid[0, 0] and not stack.valid[3, 3]
    assert stack.valid.sum() == 14


def test_missing_band_file_names_folder_and_band(tmp_path):
    write_s2_folder(tmp_path / "patch", bands=("B02", "B03"))
    with pytest.raises(FileNotFoundError) as error:
        find_band_files(tmp_path / "patch", ["B2", "B4"])
    assert str(tmp_path / "patch") in str(error.value) and "B4" in str(error.value)


def test_inconsistent_crs_names_file(tmp_path):
    write_tif(tmp_path / "x_B02.tif", np.zeros((4, 4), np.uint16), crs="EPSG:32633")
    other = write_tif(tmp_path / "x_B03.tif", np.zeros((4, 4), np.uint16), crs="EPSG:32632")
    with pytest.raises(RasterReadError, match="inconsistent CRS") as error:
        read_band_folder(tmp_path, ["B2", "B3"])
    assert str(other) in str(error.value)


def test_different_footprint_names_file(tmp_path):
    write_tif(tmp_path / "x_B02.tif", np.zeros((4, 4), np.uint16))
    moved = write_tif(tmp_path / "x_B03.tif", np.zeros((4, 4), np.uint16), origin=(401000.0, 5340000.0))
    with pytest.raises(RasterReadError, match=str(moved)):
        read_band_folder(tmp_path, ["B2", "B3"])


def test_multiband_file_in_band_folder_names_file(tmp_path):
    path = write_tif(tmp_path / "x_B02.tif", np.zeros((2, 4, 4), np.uint16))
    with pytest.raises(RasterReadError, match="has 2 bands, expected 1") as error:
        read_band_files({"B2": path})
    assert str(path) in str(error.value)


def test_stacked_file_selects_bands_by_name(tmp_path):
    data = np.stack([np.full((3, 3), i, np.uint16) for i in range(4)])
    path = write_tif(tmp_path / "stack.tif", data)
    stack = read_stacked(path, ["B1", "B2", "B3", "B4"], select=["B4", "B2"])
    assert stack.data[:, 0, 0].tolist() == [3.0, 1.0]
    assert stack.paths == (path, path)


def test_stacked_wrong_band_count_names_file(tmp_path):
    path = write_tif(tmp_path / "stack.tif", np.zeros((3, 4, 4), np.uint16))
    with pytest.raises(RasterReadError, match="has 3 bands, expected 4") as error:
        read_stacked(path, ["B1", "B2", "B3", "B4"])
    assert str(path) in str(error.value)


def test_truncated_file_names_file(tmp_path):
    rng = np.random.default_rng(1)
    path = write_tif(tmp_path / "x_B02.tif", rng.integers(0, 60000, (256, 256)).astype(np.uint16))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(RasterReadError) as error:
        read_band_folder(tmp_path, ["B2"])
    assert str(path) in str(error.value)


def test_garbage_file_names_file(tmp_path):
    path = tmp_path / "x_B02.tif"
    path.write_bytes(b"not a tiff at all")
    with pytest.raises(RasterReadError, match="cannot open") as error:
        read_band_folder(tmp_path, ["B2"])
    assert str(path) in str(error.value)


def test_read_image_wrong_band_count_names_file(tmp_path):
    path = write_tif(tmp_path / "img.tif", np.zeros((4, 5, 5), np.uint8), crs=None)
    with pytest.raises(RasterReadError, match=str(path)):
        read_image(path, expected_bands=3)


def test_center_latlon_without_crs_is_an_error():
    from affine import Affine

    with pytest.raises(RasterReadError, match="no CRS"):
        center_latlon(None, Affine.identity(), 4, 4, where="some.tif")
