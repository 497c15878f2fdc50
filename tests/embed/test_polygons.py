"""Class maps as GeoJSON polygons, and back: ``skysense polygons`` and ``predict --polygons``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin

from skysense.cli import main
from skysense.data.geojson_regions import read_regions
from skysense.inference.polygons import class_map_polygons

UTM = CRS.from_epsg(32631)
TRANSFORM = from_origin(448000.0, 5412000.0, 10.0, 10.0)
CLASSES = ("field", "forest", "water")


def _class_map(path: Path, values: np.ndarray, tags: bool = True, crs: CRS | None = UTM) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=values.shape[1], height=values.shape[0], count=1,
                       dtype=values.dtype, nodata=255, crs=crs, transform=TRANSFORM) as dst:
        dst.write(values[None])
        if tags:
            dst.update_tags(skysense_classes=json.dumps(list(CLASSES)))
    return path


def _map() -> np.ndarray:
    """A forest with a lake holding an island of field, a field strip, a nodata corner and specks."""
    values = np.full((20, 24), 1, dtype=np.uint8)
    values[4:12, 4:14] = 2  # the lake
    values[7:9, 8:10] = 0  # its island: the lake polygon has a hole
    values[14:, :] = 0  # a field strip along the bottom
    values[:3, 20:] = 255  # nodata
    values[16, 18] = 2  # a one-pixel pond in the field
    values[17:19, 2:4] = 1  # a 2 x 2 copse
    return values


def test_polygons_rasterise_back_to_the_class_map(tmp_path: Path) -> None:
    values = _map()
    path = _class_map(tmp_path / "map.classes.tif", values)
    report = class_map_polygons(path, tmp_path / "map.geojson", progress=False)
    collection = json.loads((tmp_path / "map.geojson").read_text())
    assert collection["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32631"
    assert report.coordinates == "EPSG:32631" and report.dropped == 0
    assert report.per_class == {"field": 2, "forest": 2, "water": 2} and report.polygons == 6
    lake = next(f for f in collection["features"] if f["properties"]["pixels"] == 80 - 4)
    assert lake["properties"] == {"class": "water", "label": 2, "pixels": 76, "area_m2": 7600.0}
    exterior, hole = (np.asarray(r) for r in lake["geometry"]["coordinates"])

    def signed(ring: np.ndarray) -> float:
        return 0.5 * float(np.dot(ring[:-1, 0], ring[1:, 1]) - np.dot(ring[:-1, 1], ring[1:, 0]))

    assert signed(exterior) > 0 > signed(hole)  # right-hand rule: exterior counter-clockwise, hole clockwise
    assert (exterior[0] == exterior[-1]).all()
    back = read_regions(tmp_path / "map.geojson", CLASSES, UTM, TRANSFORM, values.shape).numpy()
    np.testing.assert_array_equal(back, np.where(values == 255, -1, values.astype(np.int64)))
    # in longitude / latitude, they burn the same pixels
    wgs84 = class_map_polygons(path, tmp_path / "wgs84.geojson", wgs84=True, progress=False)
    collection = json.loads((tmp_path / "wgs84.geojson").read_text())
    assert wgs84.coordinates == "EPSG:4326" and "crs" not in collection
    lon, lat = collection["features"][0]["geometry"]["coordinates"][0][0]
    assert 2.0 < lon < 3.0 and 48.0 < lat < 49.0
    back = read_regions(tmp_path / "wgs84.geojson", CLASSES, UTM, TRANSFORM, values.shape).numpy()
    np.testing.assert_array_equal(back, np.where(values == 255, -1, values.astype(np.int64)))


def test_small_regions_merge_into_their_neighbours(tmp_path: Path) -> None:
    values = _map()
    values[0, 0] = 2  # a one-pixel speck in the forest's corner
    path = _class_map(tmp_path / "map.tif", values)
    report = class_map_polygons(path, tmp_path / "sieved.geojson", min_pixels=5, progress=False)
    # the pond and the copse join the field, the island joins the lake, the speck joins the forest beside it
    assert report.per_class == {"field": 1, "forest": 1, "water": 1} and report.dropped == 0
    pixels = {f["properties"]["class"]: f["properties"]["pixels"]
              for f in json.loads((tmp_path / "sieved.geojson").read_text())["features"]}
    assert pixels == {"water": 80, "field": 6 * 24, "forest": int((values != 255).sum()) - 80 - 6 * 24}
    lone = np.full((6, 6), 255, dtype=np.uint8)
    lone[2, 2] = 1
    lone[4:, :] = 0
    report = class_map_polygons(_class_map(tmp_path / "lone.tif", lone), tmp_path / "lone.geojson", min_pixels=3,
                                progress=False)
    assert report.per_class == {"field": 1} and report.dropped == 1  # a speck among nodata is left out


def test_names_from_the_command_line_pixels_without_a_crs_and_bad_maps(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    values = _map()
    path = _class_map(tmp_path / "plain.tif", values, tags=False, crs=None)
    assert main(["polygons", str(path), "--classes", "a, b, c", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "(pixels)" in printed and "{'a': 2, 'b': 2, 'c': 2}" in printed
    collection = json.loads(path.with_suffix(".geojson").read_text())
    assert collection["crs"]["properties"]["name"] == "pixels" and {tuple(p) for p in collection["features"][0]["geometry"]["coordinates"][0]} <= {
        (float(x), float(y)) for x in range(25) for y in range(21)}
    assert "area_m2" not in collection["features"][0]["properties"]
    assert main(["polygons", str(path), "--no-progress"]) == 2
    assert "plain.geojson exists; pass --overwrite" in capsys.readouterr().err
    # a label raster whose unlabelled value is not its nodata
    labels = np.where(values == 255, -1, values.astype(np.int16)).astype(np.int16)
    with rasterio.open(tmp_path / "labels.tif", "w", driver="GTiff", width=24, height=20, count=1, dtype="int16",
                       crs=UTM, transform=TRANSFORM) as dst:
        dst.write(labels[None])
    assert main(["polygons", str(tmp_path / "labels.tif"), "--nodata", "-1", "--classes", "field,forest,water",
                 "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["per_class"] == {"field": 2, "forest": 2, "water": 2}
    back = read_regions(tmp_path / "labels.geojson", CLASSES, UTM, TRANSFORM, labels.shape).numpy()
    np.testing.assert_array_equal(back, labels)
    with rasterio.open(tmp_path / "float.tif", "w", driver="GTiff", width=4, height=4, count=1,
                       dtype="float32") as dst:
        dst.write(np.zeros((1, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"float.tif: 1 band\(s\) of float32; expected one band of integer"):
        class_map_polygons(tmp_path / "float.tif", tmp_path / "f.geojson")
    assert main(["polygons", str(tmp_path / "missing.tif")]) == 2
    assert "missing.tif: no such class map" in capsys.readouterr().err
    (tmp_path / "text.tif").write_text("not a raster")
    with pytest.raises(ValueError, match="text.tif: not a readable raster"):
        class_map_polygons(tmp_path / "text.tif", tmp_path / "t.geojson")
