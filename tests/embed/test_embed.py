"""``skysense embed``: streaming, resumable embedding of whole scenes into georeferenced rasters."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
import rasterio.warp
import torch
from affine import Affine
from rasterio.enums import Resampling
from rasterio.transform import from_origin
from rasterio.windows import Window

from embed_helpers import ORIGIN, S2_DATES, UTM, s1_db, write_raster, write_s2_series
from skysense import SkySense
from skysense.config import S1_BANDS, S2_BANDS
from skysense.data.rasters import RasterReadError
from skysense.inference import EmbedOptions, Scene, WindowPlan, embed_scene, resolve_frames, s2_frame_offsets
from skysense.inference.embed import preview_path
from skysense.inference.writers import GeoTiffWriter, OutputSpec, progress_path

SMALL = dict(window=16, overlap=4, block=16, batch_size=2, progress=False)
"""Settings that give a small fixture many blocks and windows."""


@pytest.fixture(scope="module")
def model() -> SkySense:
    torch.manual_seed(0)
    return SkySense.from_preset("tiny").eval()


def _scene(model: SkySense, s2: list[Path] | None = None, **kwargs: object) -> Scene:
    frames = resolve_frames("s2", s2, S2_BANDS) if s2 else []
    return Scene(model.config, s2=frames, s2_offsets=[0.0] * len(frames), **kwargs)


def _read(path: Path) -> tuple[np.ndarray, dict]:
    with rasterio.open(path) as src:
        return src.read(), src.profile


def test_window_plan_covers_every_pixel_once_per_lattice_window() -> None:
    plan = WindowPlan.create(height=50, width=37, window=16, overlap=4, block=16, batch_size=3)
    assert plan.rows == (0, 12, 24, 34) and plan.cols == (0, 12, 21)
    coverage = np.zeros((50, 37))
    for r in range(len(plan.rows)):
        for c in range(len(plan.cols)):
            y0, y1, x0, x1 = plan.window_bounds(r, c)
            weights = plan.weights(r, c)
            assert weights.min() > 0 and weights.max() == 1
            coverage[y0:y1, x0:x1] += 1
    assert coverage.min() >= 1
    # Groups: each window exactly once, owned by the block holding its top-left pixel.
    owned = [(g.row, c) for bi in range(plan.block_rows) for bj in range(plan.block_cols)
             for g in plan.groups(bi, bj) for c in g.cols]
    assert sorted(owned) == [(r, c) for r in range(4) for c in range(3)]
    assert all(len(g.cols) <= 3 for bi in range(plan.block_rows) for bj in range(plan.block_cols) for g in plan.groups(bi, bj))
    # The edge of the scene keeps weight 1; sides with a neighbour ramp down.
    assert plan.weights(0, 0)[0, 0] == 1 and plan.weights(1, 1)[0, 0] < 0.1
    with pytest.raises(ValueError, match="block: expected at least the window size"):
        WindowPlan.create(50, 37, window=16, overlap=4, block=8, batch_size=1)


def test_working_geotiff_is_full_size_from_the_start_and_blocks_rewrite_in_place(tmp_path: Path) -> None:
    spec = OutputSpec(rasterio.crs.CRS.from_string(UTM), from_origin(*ORIGIN, 10.0, 10.0), 70, 50, 8, "float32", 32, {})
    writer = GeoTiffWriter(tmp_path / "out.tif", spec)
    writer.create()
    size = writer.working.stat().st_size
    assert size >= 2 * 3 * 32 * 32 * 8 * 4  # every tile allocated (6 tiles of 8 float32 bands)
    block = np.random.default_rng(0).random((8, 18, 6), dtype=np.float32)
    writer.write_block((32, 50, 64, 70), block)
    assert writer.working.stat().st_size == size
    np.testing.assert_array_equal(writer.read_block((32, 50, 64, 70)), block)
    assert np.isnan(writer.read_block((0, 32, 0, 32))).all()  # unwritten: nodata


def test_blocks_give_the_same_embedding_as_one_pass(model: SkySense, tmp_path: Path) -> None:
    s2 = write_s2_series(tmp_path / "s2", 40, 44)
    outputs = {}
    for block in (16, 48):
        with _scene(model, s2) as scene:
            report = embed_scene(model, scene, tmp_path / f"b{block}.tif", EmbedOptions(**{**SMALL, "block": block}))
        outputs[block] = _read(report.out)[0]
    assert np.isfinite(outputs[16]).all()
    np.testing.assert_allclose(outputs[16], outputs[48], rtol=0, atol=1e-5)


def test_output_keeps_crs_and_scales_transform_by_stride(model: SkySense, tmp_path: Path) -> None:
    s2 = write_s2_series(tmp_path / "s2", 40, 44, nodata_box=(0, 20, 0, 24))
    with rasterio.open(s2[0]) as src:
        crs, transform = src.crs, src.transform
    for level, stride in (("fused", 1), ("s2", 4)):
        with _scene(model, s2) as scene:
            report = embed_scene(model, scene, tmp_path / f"{level}.tif", EmbedOptions(level=level, **SMALL))
        data, profile = _read(report.out)
        assert profile["crs"] == crs
        assert profile["transform"] == transform @ Affine.scale(stride)
        assert (profile["height"], profile["width"]) == (math.ceil(40 / stride), math.ceil(44 / stride))
        assert profile["count"] == (128 if level == "fused" else 96)
        assert profile["driver"] == "GTiff" and profile["tiled"]
        # Nodata stays nodata: the box is NaN, everything else holds values.
        box = np.zeros((40, 44), dtype=bool)
        box[:20, :24] = True
        expected_nodata = box.reshape(40 // stride, stride, 44 // stride, stride).all(axis=(1, 3))
        assert np.array_equal(np.isnan(data).all(axis=0), expected_nodata)
        assert np.isfinite(data[:, ~expected_nodata]).all()
        assert not progress_path(report.out).exists()
        assert not report.out.with_name(report.out.name + ".partial.tif").exists()


def test_hr_only_output_transform_is_the_hr_transform_times_32(model: SkySense, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    hr_transform = from_origin(*ORIGIN, 0.3125, 0.3125)
    hr = write_raster(tmp_path / "hr.tif", rng.integers(0, 256, (3, 256, 320), dtype=np.uint8), hr_transform)
    with Scene(model.config, hr=hr) as scene:
        report = embed_scene(model, scene, tmp_path / "hr_fused.tif",
                             EmbedOptions(window=8, overlap=0, block=16, progress=False))
    data, profile = _read(report.out)
    assert profile["transform"] == hr_transform @ Affine.scale(32)
    assert data.shape == (128, 8, 10) and np.isfinite(data).all()


@pytest.mark.real_data
def test_real_oscd_city_keeps_georeference(model: SkySense, data_root: Path, tmp_path: Path) -> None:
    city = data_root / "oscd" / "images" / "rennes"
    frames = resolve_frames("s2", [city / "imgs_1", city / "imgs_2"], S2_BANDS)
    assert [f.date.isoformat() for f in frames] == ["2015-08-21", "2017-06-21"]  # from rennes/dates.txt
    (b2,) = sorted((city / "imgs_1").glob("*_B02.tif"))
    with rasterio.open(b2) as src:
        crs, transform, shape = src.crs, src.transform, src.shape
    with Scene(model.config, s2=frames, s2_offsets=[0.0, 0.0]) as scene:
        report = embed_scene(model, scene, tmp_path / "rennes.tif", EmbedOptions(level="s2", progress=False))
    data, profile = _read(report.out)
    assert profile["crs"] == crs
    assert profile["transform"] == transform @ Affine.scale(4)
    assert (profile["height"], profile["width"]) == (math.ceil(shape[0] / 4), math.ceil(shape[1] / 4))
    assert np.isfinite(data).all() and data.std() > 0
    assert preview_path(report.out).is_file()


def test_dates_come_from_a_dates_txt_sidecar_before_names(tmp_path: Path) -> None:
    s2 = write_s2_series(tmp_path / "series", 8, 8)
    (tmp_path / "series" / "dates.txt").write_text("date_1: 20190301\ndate_2: 20190817\n")
    frames = resolve_frames("s2", [tmp_path / "series"], S2_BANDS)
    assert [f.source for f in frames] == s2
    assert [f.date.isoformat() for f in frames] == ["2019-03-01", "2019-08-17"]
    (tmp_path / "series" / "dates.txt").unlink()
    assert [f.date for f in resolve_frames("s2", [tmp_path / "series"], S2_BANDS)] == list(S2_DATES)


def _write_jp2(path: Path, data: np.ndarray, resolution: float) -> None:
    """A lossless JPEG 2000 band file on the UTM fixture grid (GDAL writes its georeferencing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tif = path.with_suffix(".tif")
    write_raster(tif, data[None], from_origin(*ORIGIN, resolution, resolution))
    rasterio.shutil.copy(tif, path, driver="JP2OpenJPEG", QUALITY="100", REVERSIBLE="YES")
    tif.unlink()


def test_safe_l2a_product_gives_finest_jp2_band_files_date_and_offset(model: SkySense, tmp_path: Path) -> None:
    product = tmp_path / "S2B_MSIL2A_20210812T104619_N0400_R051_T31UDQ_20210812T134201.SAFE"
    img_data = product / "GRANULE" / "L2A_T31UDQ_A023081_20210812T105034" / "IMG_DATA"
    tile = "T31UDQ_20210812T104619"
    values = {b: (1000 + 100 * i + np.arange(32 * 32).reshape(32, 32) % 97).astype(np.uint16)
              for i, b in enumerate(("B02", "B03", "B04", "B08"))}
    for band, data in values.items():
        _write_jp2(img_data / "R10m" / f"{tile}_{band}_10m.jp2", data, 10.0)
        _write_jp2(img_data / "R20m" / f"{tile}_{band}_20m.jp2", data[::2, ::2], 20.0)
    for band in ("B05", "B06", "B07", "B8A", "B11", "B12"):
        _write_jp2(img_data / "R20m" / f"{tile}_{band}_20m.jp2", np.full((16, 16), 2000, np.uint16), 20.0)
    _write_jp2(img_data / "R20m" / f"{tile}_SCL_20m.jp2", np.full((16, 16), 4, np.uint16), 20.0)
    (frame,) = resolve_frames("s2", [product], S2_BANDS)
    assert frame.files[0] == img_data / "R10m" / f"{tile}_B02_10m.jp2"
    assert frame.files[3] == img_data / "R20m" / f"{tile}_B05_20m.jp2"
    assert frame.date.isoformat() == "2021-08-12"
    offsets = s2_frame_offsets([frame])
    assert offsets == [-1000.0]  # processing baseline 04.00 in the product name
    with Scene(model.config, s2=[frame], s2_offsets=offsets) as scene:
        assert scene.grid.transform == from_origin(*ORIGIN, 10.0, 10.0) and scene.grid.width == 32
        window = scene.read(Window(4, 8, 16, 16), ["s2"])
    s2 = window.inputs["s2"][0]
    np.testing.assert_array_equal(s2[0], values["B02"][8:24, 4:20].astype(np.float32) - 1000)
    np.testing.assert_allclose(s2[3], 1000.0)  # B05 at 20 m, resampled onto the 10 m grid, offset removed
    assert window.valid.all()


def _cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "skysense.cli", "embed", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_resume_after_kill_gives_the_uninterrupted_output(tmp_path: Path) -> None:
    s2 = write_s2_series(tmp_path / "s2", 112, 112)
    common = ["--s2", *map(str, s2), "--s2-offset", "0", "--preset", "tiny", "--window", "16", "--overlap", "4",
              "--block", "16", "--batch-size", "2", "--no-progress", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = _cli([*common, "--out", str(tmp_path / "whole.tif")], env)
    out, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err
    blocks = json.loads(out)["blocks"]

    target = tmp_path / "killed.tif"
    sidecar = progress_path(target)
    victim = _cli([*common, "--out", str(target)], env)
    done: list[int] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and victim.poll() is None:
        try:
            done = json.loads(sidecar.read_text())["done"]
        except (OSError, ValueError):
            done = []
        if len(done) >= 3:
            victim.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert 3 <= len(json.loads(sidecar.read_text())["done"]) < blocks
    assert not target.exists()

    resumed = _cli([*common, "--out", str(target)], env)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    report = json.loads(out)
    assert report["blocks_skipped"] >= 3
    assert not sidecar.exists()
    np.testing.assert_array_equal(_read(target)[0], _read(tmp_path / "whole.tif")[0])


def _corrupt_tile(path: Path, tile_col: int, tile_row: int) -> bytes:
    """Overwrite one compressed tile of ``path`` with garbage; returns the original bytes."""
    with rasterio.open(path) as src:
        offset = int(src.get_tag_item(f"BLOCK_OFFSET_{tile_col}_{tile_row}", "TIFF", bidx=1))
        size = int(src.get_tag_item(f"BLOCK_SIZE_{tile_col}_{tile_row}", "TIFF", bidx=1))
    with open(path, "r+b") as f:
        f.seek(offset)
        original = f.read(size)
        f.seek(offset)
        f.write(bytes([0x5A]) * size)
    return original


def test_corrupt_tile_stops_naming_window_and_file_and_resumes(model: SkySense, tmp_path: Path) -> None:
    s2 = write_s2_series(tmp_path / "s2", 64, 64, tiled=True, blockxsize=16, blockysize=16, compress="deflate")
    clean = tmp_path / "clean.tif"
    with _scene(model, s2) as scene:
        embed_scene(model, scene, clean, EmbedOptions(**SMALL))
    original = _corrupt_tile(s2[1], tile_col=1, tile_row=3)
    out = tmp_path / "out.tif"
    with _scene(model, s2) as scene:
        with pytest.raises(RasterReadError) as caught:
            embed_scene(model, scene, out, EmbedOptions(**SMALL))
    message = str(caught.value)
    assert "window (" in message and "output rows" in message and str(s2[1]) in message
    done = json.loads(progress_path(out).read_text())["done"]
    assert len(done) >= 4
    assert out.with_name(out.name + ".partial.tif").is_file() and not out.exists()

    with open(s2[1], "r+b") as f:  # repair the file, then the same run resumes
        with rasterio.open(s2[1]) as src:
            f.seek(int(src.get_tag_item("BLOCK_OFFSET_1_3", "TIFF", bidx=1)))
        f.write(original)
    with _scene(model, s2) as scene:
        report = embed_scene(model, scene, out, EmbedOptions(**SMALL))
    assert report.blocks_skipped == len(done)
    np.testing.assert_array_equal(_read(out)[0], _read(clean)[0])


def test_other_crs_is_reprojected_onto_the_s2_grid(model: SkySense, tmp_path: Path) -> None:
    s2 = write_s2_series(tmp_path / "s2", 32, 32)
    utm_transform = from_origin(*ORIGIN, 10.0, 10.0)
    # S1 on a wider UTM area, resampled onto a geographic (EPSG:4326) grid of its own.
    wide = s1_db(64, 64)
    wide_transform = from_origin(ORIGIN[0] - 160, ORIGIN[1] + 160, 10.0, 10.0)
    dst_transform, width, height = rasterio.warp.calculate_default_transform(
        UTM, "EPSG:4326", 64, 64, *rasterio.transform.array_bounds(64, 64, wide_transform))
    geographic = np.zeros((2, height, width), dtype=np.float32)
    rasterio.warp.reproject(wide, geographic, src_transform=wide_transform, src_crs=UTM, dst_transform=dst_transform,
                            dst_crs="EPSG:4326", resampling=Resampling.bilinear)
    s1_path = write_raster(tmp_path / "S1_20200110.tif", geographic, dst_transform, crs="EPSG:4326")
    s1 = resolve_frames("s1", [s1_path], S1_BANDS)
    with _scene(model, s2, s1=s1) as scene:
        assert scene.grid.crs.to_string() == UTM and scene.grid.transform == utm_transform
        got = scene.read(Window(0, 0, 32, 32), ["s1"]).inputs["s1"][0]
        expected = np.zeros((2, 32, 32), dtype=np.float32)
        rasterio.warp.reproject(geographic, expected, src_transform=dst_transform, src_crs="EPSG:4326",
                                dst_transform=utm_transform, dst_crs=UTM, resampling=Resampling.bilinear)
        np.testing.assert_allclose(got, expected, atol=0.05)
        report = embed_scene(model, scene, tmp_path / "fused.tif", EmbedOptions(**SMALL))
    data, profile = _read(report.out)
    assert profile["crs"] == UTM and profile["transform"] == utm_transform
    assert report.extra["modalities"] == ["s2", "s1"] and np.isfinite(data).all()

    far = write_raster(tmp_path / "far" / "S1_20200110.tif", geographic,
                       dst_transform @ Affine.translation(0, 4000), crs="EPSG:4326")
    with pytest.raises(RasterReadError, match=f"{far}.*does not overlap the scene"):
        _scene(model, s2, s1=resolve_frames("s1", [far], S1_BANDS))


def test_hr_on_another_resolution_is_resampled_onto_the_fusion_grid(model: SkySense, tmp_path: Path) -> None:
    s2 = write_s2_series(tmp_path / "s2", 16, 16)
    rng = np.random.default_rng(1)
    hr = write_raster(tmp_path / "hr.tif", rng.integers(0, 256, (3, 540, 540), dtype=np.uint8),
                      from_origin(*ORIGIN, 0.3, 0.3))
    with _scene(model, s2, hr=hr) as scene:
        window = scene.read(Window(0, 0, 16, 16), ["hr", "s2"])
        assert window.inputs["hr"].shape == (3, 512, 512)
        assert window.inputs["hr_valid"].all()  # 0.3 m x 540 px covers the 160 m of the S2 grid
        report = embed_scene(model, scene, tmp_path / "fused.tif", EmbedOptions(**SMALL))
    assert report.extra["modalities"] == ["hr", "s2"]
    assert np.isfinite(_read(report.out)[0]).all()


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_preview_png_is_a_pca_false_colour_of_the_output(model: SkySense, tmp_path: Path) -> None:
    s2 = write_s2_series(tmp_path / "s2", 40, 44, nodata_box=(0, 20, 0, 24))
    with _scene(model, s2) as scene:
        report = embed_scene(model, scene, tmp_path / "out.tif", EmbedOptions(**SMALL))
    assert report.preview == tmp_path / "out.preview.png"
    with rasterio.open(report.preview) as png:
        assert png.driver == "PNG" and png.count == 4 and png.shape == (40, 44)
        rgba = png.read()
    assert (rgba[3, :20, :24] == 0).all() and (rgba[3, 20:] == 255).all()
    assert all(len(np.unique(rgba[i][rgba[3] > 0])) > 50 for i in range(3))


def test_float16_output_holds_the_float32_values_rounded(model: SkySense, tmp_path: Path) -> None:
    s2 = write_s2_series(tmp_path / "s2", 24, 28, nodata_box=(0, 4, 0, 4))
    results = {}
    for dtype in ("float32", "float16"):
        with _scene(model, s2) as scene:
            report = embed_scene(model, scene, tmp_path / f"{dtype}.tif", EmbedOptions(dtype=dtype, **SMALL))
        with rasterio.open(report.out) as src:
            results[dtype] = src.read()
            if dtype == "float16":
                assert src.tags(1, ns="IMAGE_STRUCTURE").get("NBITS") == "16"
    expected = results["float32"].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(results["float16"], expected)
    assert not np.array_equal(results["float16"], results["float32"])


def test_zarr_output_matches_the_cog(model: SkySense, tmp_path: Path) -> None:
    zarr = pytest.importorskip("zarr")
    s2 = write_s2_series(tmp_path / "s2", 24, 28)
    with _scene(model, s2) as scene:
        cog = embed_scene(model, scene, tmp_path / "out.tif", EmbedOptions(**SMALL))
    with _scene(model, s2) as scene:
        report = embed_scene(model, scene, tmp_path / "out.zarr",
                             EmbedOptions(**{**SMALL, "format": "zarr", "dtype": "float16"}))
    array = zarr.open_array(str(report.out), mode="r")
    assert array.dtype == np.float16 and array.shape == (128, 24, 28) and array.chunks == (128, 16, 16)
    assert array.attrs["complete"] is True and array.attrs["skysense_level"] == "fused"
    with rasterio.open(cog.out) as src:
        assert Affine(*array.attrs["transform"]) == src.transform
        assert rasterio.crs.CRS.from_wkt(array.attrs["crs_wkt"]) == src.crs
        np.testing.assert_array_equal(array[:], src.read().astype(np.float16))


def test_a_finished_or_different_run_is_not_overwritten(model: SkySense, tmp_path: Path) -> None:
    s2 = write_s2_series(tmp_path / "s2", 20, 20)
    out = tmp_path / "out.tif"
    with _scene(model, s2) as scene:
        embed_scene(model, scene, out, EmbedOptions(**SMALL))
        with pytest.raises(ValueError, match="exists .*--overwrite"):
            embed_scene(model, scene, out, EmbedOptions(**SMALL))
        progress_path(out).write_text(json.dumps({"signature": {"options": {}}, "done": [0]}))
        with pytest.raises(ValueError, match="other settings.*differs in: model, options, scene"):
            embed_scene(model, scene, out, EmbedOptions(**SMALL))


def test_cli_reports_a_missing_date_and_a_missing_offset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from skysense.cli import main

    s2 = write_s2_series(tmp_path / "s2", 8, 8)
    undated = tmp_path / "undated.tif"
    shutil.copy(s2[0], undated)
    assert main(["embed", "--s2", str(undated), "--s2-offset", "0", "--preset", "tiny",
                 "--out", str(tmp_path / "a.tif")]) == 2
    assert f"s2: no acquisition date for {undated}" in capsys.readouterr().err
    assert main(["embed", "--s2", str(s2[0]), "--preset", "tiny", "--out", str(tmp_path / "b.tif")]) == 2
    assert f"the DN offset of {s2[0]} is unknown" in capsys.readouterr().err
    assert not (tmp_path / "a.tif").exists() and not (tmp_path / "b.tif").exists()
