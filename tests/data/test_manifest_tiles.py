"""Large scenes in a manifest: a record's window, and tiles cut on the fly (``tile_size``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio.warp
import torch
from rasterio.transform import from_origin

from skysense.cli import main
from skysense.data.datasets import ManifestDataset
from skysense.data.geojson_regions import read_regions

from data_helpers import write_geojson, write_tif

UTM = "EPSG:32633"
ORIGIN = (400000.0, 5340000.0)
HR_TRANSFORM = from_origin(*ORIGIN, 10.0 / 32, 10.0 / 32)
CLASSES = ["field", "forest"]


def _scene(root: Path, width: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HR 192 x ``width`` px at 0.3125 m, one S2 frame of 6 x ``width / 32`` px at 10 m and an
    S2-grid mask raster, over the same ground; a GeoJSON of two forests in longitude / latitude;
    records written by the test."""
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (3, 192, width), dtype=np.uint8)
    s2 = rng.integers(100, 5000, (10, 6, width // 32)).astype(np.uint16)
    mask = rng.integers(0, 2, (1, 6, width // 32)).astype(np.uint8)
    write_tif(root / "hr.tif", hr, res=10.0 / 32, origin=ORIGIN)
    write_tif(root / "s2.tif", s2, res=10.0, origin=ORIGIN)
    write_tif(root / "mask.tif", mask, res=10.0, origin=ORIGIN)
    features = []
    for x0, y0, x1, y1 in ((10, 20, 90, 60), (150, 100, 250, 190)):
        ring = [HR_TRANSFORM * c for c in ((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0))]
        lon, lat = rasterio.warp.transform(UTM, "EPSG:4326", *zip(*ring))
        features.append({"type": "Feature", "properties": {"class": "forest"},
                         "geometry": {"type": "Polygon", "coordinates": [[list(p) for p in zip(lon, lat)]]}})
    write_geojson(root / "forests.geojson", features, crs=None)
    return hr, s2, mask[0]


def _manifest(root: Path, records: list[dict]) -> None:
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _record(**extra: object) -> dict:
    return {"id": "scene", "hr": "hr.tif", "s2": [{"path": "s2.tif", "date": "2021-06-01"}],
            "mask": "forests.geojson", **extra}


def test_tiles_read_their_part_of_every_raster(tmp_path: Path) -> None:
    hr, s2, _ = _scene(tmp_path)
    _manifest(tmp_path, [_record(), _record(id="held-out", split="val", window=[192, 128, 64, 64])])
    dataset = ManifestDataset(tmp_path, classes=CLASSES, mask_background="field", tile_size=64)
    assert dataset.split_counts() == {"train": 12, "val": 1}
    ids = [item.id for item in dataset.items]
    assert ids[:5] == ["scene/0_0", "scene/0_1", "scene/0_2", "scene/0_3", "scene/1_0"] and ids[-1] == "held-out/0_0"
    whole = read_regions(tmp_path / "forests.geojson", CLASSES, rasterio.crs.CRS.from_string(UTM), HR_TRANSFORM,
                         (192, 256), background=0).numpy()
    for index in (0, 6, 12):
        item, sample = dataset.items[index], dataset[index]
        col, row = int(item.extra["window"].col_off), int(item.extra["window"].row_off)
        np.testing.assert_array_equal(sample["hr"].numpy(), hr[:, row:row + 64, col:col + 64])
        assert sample["s2"].shape == (1, 10, 2, 2)
        np.testing.assert_array_equal(sample["mask"].numpy(), whole[row:row + 64, col:col + 64])
        assert sample["transform"] == HR_TRANSFORM * rasterio.Affine.translation(col, row)
    assert (dataset[6]["mask"] == 1).any() and (dataset[6]["mask"] == 0).any()  # tile 1_2 cuts a forest's edge
    lats = {round(float(dataset[i]["lat"]), 7) for i in (0, 4, 8)}
    assert len(lats) == 3  # each tile's own centre


def test_the_last_tiles_end_at_the_edge_and_windows_scale_to_coarser_rasters(tmp_path: Path) -> None:
    _, s2, mask = _scene(tmp_path)
    _manifest(tmp_path, [_record(mask="mask.tif")])
    dataset = ManifestDataset(tmp_path, classes=CLASSES, tile_size=96)
    windows = [(int(i.extra["window"].col_off), int(i.extra["window"].row_off)) for i in dataset.items]
    assert windows == [(0, 0), (96, 0), (160, 0), (0, 96), (96, 96), (160, 96)]
    sample = dataset[2]  # HR columns 160..256, rows 0..96: S2 columns 5..8, rows 0..3
    np.testing.assert_array_equal(sample["mask"].numpy(), mask[0:3, 5:8].astype(np.int64))
    assert sample["s2"].shape == (1, 10, 3, 3)
    # S2 first: tiles of the S2 grid
    _manifest(tmp_path, [{"id": "s2-only", "s2": [{"path": "s2.tif", "date": "2021-06-01"}], "mask": "mask.tif",
                          "label": "field"}])
    tiles = ManifestDataset(tmp_path, classes=CLASSES, modalities=("s2",), tile_size=4)
    assert len(tiles) == 4 and tiles[3]["s2"].shape == (1, 10, 4, 4)
    np.testing.assert_array_equal(tiles[3]["mask"].numpy(), mask[2:6, 4:8].astype(np.int64))


def test_bad_windows_and_tiles_name_the_record(tmp_path: Path) -> None:
    _scene(tmp_path)
    _manifest(tmp_path, [_record(window=[200, 0, 64, 64])])
    with pytest.raises(ValueError, match=r"record 'scene': window \[200, 0, 64, 64\] outside the 256 x 192 px raster"):
        ManifestDataset(tmp_path, classes=CLASSES)
    _manifest(tmp_path, [_record(window=[0, 0, 64])])
    with pytest.raises(ValueError, match=r"window \[0, 0, 64\]: expected \[col_off, row_off, width, height\]"):
        ManifestDataset(tmp_path, classes=CLASSES)
    _manifest(tmp_path, [_record()])
    with pytest.raises(ValueError, match="tile_size 200 is larger than the record's 256 x 192 px raster"):
        ManifestDataset(tmp_path, classes=CLASSES, tile_size=200)
    with pytest.raises(ValueError, match="tile_size: expected a positive number"):
        ManifestDataset(tmp_path, classes=CLASSES, tile_size=0)
    dataset = ManifestDataset(tmp_path, classes=CLASSES, mask_background=0, tile_size=48)  # not a multiple of 32
    with pytest.raises(ValueError, match=r"record 'scene/0_0': .*s2.tif: 8 x 6 px against the first raster's "
                                         r"256 x 192: the window \(0, 0, 48, 48\) falls on .*not whole pixels"):
        dataset.load(0)


def test_tiles_keep_the_objects_whose_centre_they_hold(tmp_path: Path) -> None:
    _scene(tmp_path)
    _manifest(tmp_path, [{"id": "scene", "hr": "hr.tif", "objects": "forests.geojson", "label": 0}])
    whole = ManifestDataset(tmp_path, classes=CLASSES)[0]
    corners = whole["boxes"]  # the two forests' outlines as objects: centres (50, 40) and (200, 145)
    assert corners.shape == (2, 8) and whole["labels"].tolist() == [1, 1]
    tiles = ManifestDataset(tmp_path, classes=CLASSES, tile_size=128)  # tiles at x 0, 128; y 0, 64
    counts = {}
    for index, item in enumerate(tiles.items):
        col, row = int(item.extra["window"].col_off), int(item.extra["window"].row_off)
        sample = tiles[index]
        counts[(col, row)] = len(sample["labels"])
        for box in sample["boxes"]:
            assert any(torch.allclose(box + torch.tensor([col, row] * 4, dtype=torch.float32), c) for c in corners)
    assert counts == {(0, 0): 1, (128, 0): 0, (0, 64): 0, (128, 64): 1}


def test_a_model_trains_on_the_tiles_of_one_scene(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _scene(tmp_path, width=384)  # S2 tiles of 4 px: the ViT's patch
    _manifest(tmp_path, [_record(window=[0, 0, 256, 192]), _record(id="east", split="val", window=[256, 0, 128, 192])])
    assert main(["datasets", "check", "manifest", "--data-root", str(tmp_path), "--json", "--option",
                 "classes=[field, forest]", "--option", "mask_background=field", "--option", "tile_size=128"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["items"] == {"train": 4, "val": 2} and not report["errors"]
    assert sum(report["pixels"]["train mask"].values()) == 4 * 128 * 128 and report["pixels"]["train mask"]["forest"]
    assert main(["finetune", "--task", "segmentation", "--dataset", "manifest", "--data-root", str(tmp_path),
                 "--option", "classes=[field, forest]", "--option", "mask_background=field", "--option",
                 "tile_size=128", "--preset", "tiny", "--out", str(tmp_path / "run"), "--max-steps", "1",
                 "--batch-size", "2", "--crop-size", "128", "--decoder-channels", "8", "--threads", "1",
                 "--evaluate", "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "val" and result["samples"] == 2 and 0.0 <= result["miou"] <= 1.0
