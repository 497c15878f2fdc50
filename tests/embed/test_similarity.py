"""Cosine similarity of every pixel to examples outlined in a GeoJSON: ``skysense similar``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from embed_helpers import ORIGIN, write_raster
from skysense.cli import main
from skysense.inference.similarity import similarity_map

TRANSFORM = from_origin(*ORIGIN, 10.0, 10.0)
CRS_MEMBER = {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32631"}}


def _square(x0: float, y0: float, x1: float, y1: float, **properties: object) -> dict:
    ring = [list(TRANSFORM * (x, y)) for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0))]
    return {"type": "Feature", "properties": properties, "geometry": {"type": "Polygon", "coordinates": [ring]}}


def _scene(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left half 'solar' (near direction a), right half 'forest' (near b), a nodata square, on 300 x 280
    pixels (more than one 256-px tile each way)."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=8), rng.normal(size=8)
    data = np.empty((8, 300, 280), dtype=np.float32)
    data[:, :, :140] = a[:, None, None]
    data[:, :, 140:] = b[:, None, None]
    data += rng.normal(scale=0.2, size=data.shape).astype(np.float32)
    data[:, 10:20, 200:210] = np.nan
    write_raster(path, data, TRANSFORM, nodata=float("nan"), tiled=True, blockxsize=256, blockysize=256)
    return data, a, b


def _cosine(data: np.ndarray, query: np.ndarray) -> np.ndarray:
    flat = data.reshape(data.shape[0], -1)
    return ((query / np.linalg.norm(query)) @ (flat / np.linalg.norm(flat, axis=0))).reshape(data.shape[1:])


def test_one_band_per_class_of_examples(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data, a, b = _scene(tmp_path / "emb.tif")
    examples = tmp_path / "examples.geojson"
    examples.write_text(json.dumps({"type": "FeatureCollection", "crs": CRS_MEMBER, "features": [
        _square(10, 10, 14, 14, **{"class": "solar"}), _square(50, 200, 53, 203, **{"class": "solar"}),
        _square(250, 250, 256, 256, **{"class": "forest"})]}))
    report = similarity_map(tmp_path / "emb.tif", examples, tmp_path / "sim.tif", progress=False)
    assert report.classes == ["solar", "forest"] and report.examples == {"solar": 2, "forest": 1}
    with rasterio.open(tmp_path / "sim.tif") as src:
        sim, descriptions, transform = src.read(), src.descriptions, src.transform
    assert descriptions == ("solar", "forest") and transform == TRANSFORM and sim.shape == (2, 300, 280)
    # the query of a class is the mean of its examples' unit-length mean embeddings
    means = [data[:, 10:14, 10:14].reshape(8, -1).mean(axis=1), data[:, 200:203, 50:53].reshape(8, -1).mean(axis=1)]
    solar = np.mean([m / np.linalg.norm(m) for m in means], axis=0)
    np.testing.assert_allclose(sim[0], _cosine(data, solar), atol=1e-5)
    assert np.isnan(sim[:, 10:20, 200:210]).all() and np.isfinite(sim[:, :10]).all()
    nearest = np.nanargmax(np.nan_to_num(sim, nan=-2), axis=0)
    assert (nearest[:, :140] == 0).mean() > 0.99 and (nearest[:, 140:] == 1).mean() > 0.99
    assert report.maximum["solar"] <= 1.0 and report.mean["solar"] < report.maximum["solar"]
    # the pixels most like each class, where they reach a threshold, as a map and as polygons
    assert main(["similar", str(tmp_path / "emb.tif"), "--examples", str(examples), "--out", str(tmp_path / "s.tif"),
                 "--threshold", "0.8", "--min-pixels", "20", "--no-progress", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    with rasterio.open(tmp_path / "s.matches.tif") as src:
        matches = src.read(1)
        assert json.loads(src.tags()["skysense_classes"]) == ["solar", "forest"]
    best = np.nan_to_num(sim, nan=-2).max(axis=0)
    expected = np.where(np.isfinite(sim).all(axis=0) & (best >= 0.8), nearest, 255)
    np.testing.assert_array_equal(matches, expected)
    assert printed["extra"]["matches"]["pixels_per_class"] == {"solar": int((expected == 0).sum()),
                                                               "forest": int((expected == 1).sum())}
    regions = json.loads((tmp_path / "s.matches.geojson").read_text())
    assert regions["crs"]["properties"]["name"].endswith("32631")
    assert {f["properties"]["class"] for f in regions["features"]} == {"solar", "forest"}
    assert min(f["properties"]["pixels"] for f in regions["features"]) >= 20
    assert main(["similar", str(tmp_path / "emb.tif"), "--examples", str(examples), "--out", str(tmp_path / "u.tif"),
                 "--min-pixels", "20"]) == 2
    assert "--min-pixels and --wgs84 apply to the matches' polygons" in capsys.readouterr().err


def test_examples_without_a_class_and_bad_examples(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _scene(tmp_path / "emb.tif")
    examples = tmp_path / "points.geojson"
    point = list(TRANSFORM * (20.5, 30.5))
    examples.write_text(json.dumps({"type": "FeatureCollection", "crs": CRS_MEMBER, "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Point", "coordinates": point}}]}))
    assert main(["similar", str(tmp_path / "emb.tif"), "--examples", str(examples), "--out", str(tmp_path / "s.tif"),
                 "--no-progress"]) == 0
    assert "1 band(s) x 300 x 280" in capsys.readouterr().out
    with rasterio.open(tmp_path / "s.tif") as src:
        assert src.descriptions == ("examples",) and src.read(1)[30, 20] == pytest.approx(1.0, abs=1e-6)
    examples.write_text(json.dumps({"type": "FeatureCollection", "crs": CRS_MEMBER, "features": [
        _square(201, 11, 205, 15)]}))  # on nodata only
    with pytest.raises(ValueError, match="points.geojson: feature 0: no embedding under it"):
        similarity_map(tmp_path / "emb.tif", examples, tmp_path / "t.tif", progress=False)
    examples.write_text(json.dumps({"type": "FeatureCollection", "crs": CRS_MEMBER, "features": [
        _square(1000, 1000, 1004, 1004)]}))
    with pytest.raises(ValueError, match=r"no example lies on the 280 x 300 px raster .*crs right"):
        similarity_map(tmp_path / "emb.tif", examples, tmp_path / "t.tif", progress=False)
    assert main(["similar", str(tmp_path / "emb.tif"), "--examples", str(examples), "--out", str(tmp_path / "s.tif"),
                 "--no-progress"]) == 2
    assert "s.tif exists; pass --overwrite" in capsys.readouterr().err
