"""An embedding per region of a GeoJSON: ``skysense zonal`` over ``skysense embed``'s rasters."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.warp
from rasterio.transform import from_origin

from embed_helpers import ORIGIN, UTM, write_raster, write_s2_series
from skysense.cli import main
from skysense.inference.zonal import region_embeddings

TRANSFORM = from_origin(*ORIGIN, 10.0, 10.0)


def _lonlat(x: float, y: float) -> list[float]:
    """Pixel (x, y) of the fixture grid -> [lon, lat]."""
    (lon,), (lat,) = rasterio.warp.transform(UTM, "EPSG:4326", *([v] for v in TRANSFORM * (x, y)))
    return [lon, lat]


def _box(x0: float, y0: float, x1: float, y1: float, to=_lonlat) -> list[list[list[float]]]:
    return [[to(x, y) for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0))]]


def _feature(kind: str, coordinates: list, **properties: object) -> dict:
    return {"type": "Feature", "properties": properties, "geometry": {"type": kind, "coordinates": coordinates}}


def _embeddings(path: Path) -> np.ndarray:
    rng = np.random.default_rng(0)
    data = rng.normal(size=(3, 10, 12)).astype(np.float32)
    data[:, 6:, 8:] = np.nan  # nodata corner
    write_raster(path, data, TRANSFORM, nodata=float("nan"))
    return data


def test_each_region_gets_the_mean_of_its_pixels(tmp_path: Path) -> None:
    data = _embeddings(tmp_path / "emb.tif")
    features = [
        _feature("Polygon", _box(2, 1, 5, 4), id="field-a", crop="wheat"),  # 3 x 3 pixels
        _feature("Polygon", _box(7, 5, 10, 8), id="field-b", crop="maize"),  # half on nodata
        _feature("Point", _lonlat(6.5, 2.5), id="sample"),
        _feature("Polygon", _box(0.6, 8.6, 0.9, 8.9), id="tiny"),  # inside one pixel: not its centre
        _feature("Polygon", _box(3, 2, 6, 3), id="overlapping"),  # overlaps field-a: both get the shared pixels
        _feature("Polygon", _box(40, 40, 44, 44), id="elsewhere", crop=None),
    ]
    regions = tmp_path / "fields.geojson"
    regions.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    report = region_embeddings(tmp_path / "emb.tif", regions, tmp_path / "out.geojson", progress=False)
    assert report.features == 6 and report.embedded == 5 and report.channels == 3
    written = json.loads((tmp_path / "out.geojson").read_text())
    got = {f["properties"]["id"]: f["properties"] for f in written["features"]}
    block = data[:, 5:8, 7:10].reshape(3, -1)  # field-b: pixels x 7..9, y 5..7; x >= 8 and y >= 6 is nodata
    valid = np.isfinite(block).all(axis=0)
    expected = {
        "field-a": (data[:, 1:4, 2:5].reshape(3, -1), 9),
        "field-b": (block[:, valid], 5),
        "sample": (data[:, 2:3, 6:7].reshape(3, -1), 1),
        "tiny": (data[:, 8:9, 0:1].reshape(3, -1), 1),
        "overlapping": (data[:, 2:3, 3:6].reshape(3, -1), 3),
    }
    for name, (pixels, count) in expected.items():
        np.testing.assert_allclose(got[name]["embedding"], pixels.mean(axis=1), rtol=1e-5, atol=1e-6, err_msg=name)
        assert got[name]["pixels"] == count, name
    assert got["elsewhere"]["embedding"] is None and got["elsewhere"]["pixels"] == 0
    assert got["field-a"]["crop"] == "wheat" and written["features"][0]["geometry"] == features[0]["geometry"]
    # the same as a table: the features' scalar properties, pixels and e0..e2
    region_embeddings(tmp_path / "emb.tif", regions, tmp_path / "out.csv", progress=False)
    with (tmp_path / "out.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["feature", "id", "crop", "pixels", "e0", "e1", "e2"]
    assert rows[0]["id"] == "field-a" and rows[0]["crop"] == "wheat" and rows[0]["pixels"] == "9"
    np.testing.assert_allclose([float(rows[0][f"e{k}"]) for k in range(3)], got["field-a"]["embedding"], rtol=1e-6)
    assert rows[5]["e0"] == "" and rows[5]["crop"] == "" and rows[5]["pixels"] == "0"


def test_zonal_over_embed_outputs_in_geotiff_and_zarr(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("zarr")
    s2 = write_s2_series(tmp_path / "s2", 16, 24)
    common = ["--s2", *map(str, s2), "--s2-offset", "0", "--preset", "tiny", "--window", "16", "--overlap", "4",
              "--no-progress", "--no-preview"]
    assert main(["embed", *common, "--out", str(tmp_path / "emb.tif")]) == 0
    assert main(["embed", *common, "--out", str(tmp_path / "emb.zarr"), "--format", "zarr"]) == 0
    capsys.readouterr()
    regions = tmp_path / "parcels.geojson"  # in the raster's CRS this time
    utm = [[list(TRANSFORM * (x, y)) for x, y in ((1, 1), (9, 1), (9, 7), (1, 7), (1, 1))]]
    regions.write_text(json.dumps({"type": "FeatureCollection", "crs": {"type": "name", "properties": {
        "name": "urn:ogc:def:crs:EPSG::32631"}}, "features": [_feature("Polygon", utm, name="p")]}))
    assert main(["zonal", str(tmp_path / "emb.tif"), "--regions", str(regions), "--out", str(tmp_path / "a.csv"),
                 "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["zonal", str(tmp_path / "emb.zarr"), "--regions", str(regions), "--out",
                 str(tmp_path / "b.geojson"), "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["embedded"] == 1 and report["pixels"] == 48
    with rasterio.open(tmp_path / "emb.tif") as src:
        expected = src.read()[:, 1:7, 1:9].reshape(src.count, -1).mean(axis=1)
    with (tmp_path / "a.csv").open() as handle:
        row = next(csv.DictReader(handle))
    from_tif = [float(row[f"e{k}"]) for k in range(len(expected))]
    from_zarr = json.loads((tmp_path / "b.geojson").read_text())["features"][0]["properties"]["embedding"]
    np.testing.assert_allclose(from_tif, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(from_zarr, expected, rtol=1e-5, atol=1e-6)
    assert main(["zonal", str(tmp_path / "emb.tif"), "--regions", str(regions), "--out", str(tmp_path / "a.csv"),
                 "--no-progress"]) == 2
    assert "a.csv exists; pass --overwrite" in capsys.readouterr().err
    assert main(["zonal", str(tmp_path / "missing.tif"), "--regions", str(regions), "--out",
                 str(tmp_path / "c.csv")]) == 2
    assert "missing.tif: no such embedding raster" in capsys.readouterr().err
    (tmp_path / "text.tif").write_text("not a raster")
    with pytest.raises(ValueError, match="text.tif: not a readable raster"):
        region_embeddings(tmp_path / "text.tif", regions, tmp_path / "d.csv")


def test_the_zonal_benchmark_agrees_with_its_in_memory_reference(tmp_path: Path) -> None:
    from benchmark_scripts import load_benchmark

    bench = load_benchmark("zonal_regions")
    rng = np.random.default_rng(1)
    data = rng.normal(size=(4, 40, 50)).astype(np.float32)
    data[:, :3, :] = np.nan
    write_raster(tmp_path / "emb.tif", data, TRANSFORM, nodata=float("nan"))
    assert bench.parcels(tmp_path / "p.geojson", UTM, TRANSFORM, 40, 50, per_side=4) == 16
    region_embeddings(tmp_path / "emb.tif", tmp_path / "p.geojson", tmp_path / "p.geojson.json", progress=False)
    features = json.loads((tmp_path / "p.geojson.json").read_text())["features"]
    ours = np.array([f["properties"]["embedding"] for f in features[0::2]])
    expected, _ = bench.reference(tmp_path / "emb.tif", tmp_path / "p.geojson")
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
    assert [f["properties"]["pixels"] for f in features[:2]] == [9 * 9 - 3 * 9, 1]  # 9 x 9 px, 3 rows nodata


@pytest.mark.real_data
@pytest.mark.slow
def test_changed_areas_of_a_real_oscd_city_get_their_mean_embedding(data_root: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """Rennes: the fused embedding of both dates, the hand-labelled change map vectorised (in the
    S2 grid's pixels: the label raster has no georeference) and an embedding per region."""
    city = data_root / "oscd" / "images" / "rennes"
    labels = data_root / "oscd" / "labels" / "rennes" / "cm" / "rennes-cm.tif"
    embeddings = tmp_path / "rennes.tif"
    assert main(["embed", "--s2", str(city / "imgs_1"), str(city / "imgs_2"), "--s2-offset", "0", "--s2-level",
                 "L1C", "--preset", "tiny", "--out", str(embeddings), "--no-progress", "--no-preview"]) == 0
    regions = tmp_path / "rennes-cm.geojson"
    assert main(["polygons", str(labels), "--out", str(regions), "--classes", "none,unchanged,changed",
                 "--no-progress"]) == 0
    assert main(["zonal", str(embeddings), "--regions", str(regions), "--out", str(tmp_path / "regions.csv"),
                 "--no-progress", "--json"]) == 0
    capsys.readouterr()
    with rasterio.open(labels) as src:
        cm = src.read(1)
    with rasterio.open(embeddings) as src:
        data = src.read()
    assert data.shape[1:] == cm.shape and np.isfinite(data).all()
    with (tmp_path / "regions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    collection = json.loads(regions.read_text())
    assert len(rows) == len(collection["features"]) > 10
    assert sum(int(r["pixels"]) for r in rows) == cm.size  # the regions tile the map
    assert {r["class"] for r in rows} == {"unchanged", "changed"}
    from skysense.data.geojson_regions import read_regions

    for row, feature in list(zip(rows, collection["features"]))[:5]:  # each region's pixels, burnt on their own
        one = tmp_path / "one.geojson"
        one.write_text(json.dumps({**collection, "features": [{**feature, "properties": {"class": 0}}]}))
        inside = read_regions(one, ("x",), None, TRANSFORM, cm.shape).numpy() == 0
        assert int(row["pixels"]) == int(inside.sum()) == feature["properties"]["pixels"]
        np.testing.assert_allclose([float(row[f"e{k}"]) for k in range(data.shape[0])],
                                   data[:, inside].mean(axis=1), rtol=1e-4, atol=1e-5)
    # the same regions as examples: how much each pixel looks like the changed and the unchanged areas
    assert main(["similar", str(embeddings), "--examples", str(regions), "--out", str(tmp_path / "similar.tif"),
                 "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["classes"] == ["unchanged", "changed"] or report["classes"] == ["changed", "unchanged"]
    assert sum(report["examples"].values()) == len(rows)
    with rasterio.open(tmp_path / "similar.tif") as src:
        similarity = src.read()
        assert src.shape == cm.shape and src.descriptions == tuple(report["classes"])
    assert np.isfinite(similarity).all() and (np.abs(similarity) <= 1 + 1e-5).all()
