"""Objects drawn in a GIS (GeoJSON polygons) as boxes in the pixels of an image."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import rasterio.warp
from rasterio.crs import CRS
from rasterio.transform import from_origin

from skysense.data.geojson_objects import min_area_rectangle, read_objects

from data_helpers import write_geojson

UTM = CRS.from_epsg(32631)
ORIGIN = (448000.0, 5412000.0)
TRANSFORM = from_origin(*ORIGIN, 0.5, 0.5)  # 0.5 m pixels
CLASSES = ("car", "ship")


def _polygon(points: list[tuple[float, float]], **properties: object) -> dict:
    return {"type": "Feature", "properties": properties,
            "geometry": {"type": "Polygon", "coordinates": [[list(p) for p in points + points[:1]]]}}


def _utm(x: float, y: float) -> tuple[float, float]:
    """Pixel (x, y) of the image -> its UTM coordinates."""
    return TRANSFORM * (x, y)


def test_rectangles_in_the_image_crs_and_in_lon_lat_map_to_pixels(tmp_path: Path) -> None:
    box = [_utm(10, 20), _utm(30, 20), _utm(30, 28), _utm(10, 28)]
    lon, lat = rasterio.warp.transform(UTM, "EPSG:4326", [x for x, _ in box], [y for _, y in box])
    utm = write_geojson(tmp_path / "utm.geojson", [_polygon(box, **{"class": "ship"}),
                                             _polygon(box, **{"class": 0, "difficult": True})])
    wgs84 = write_geojson(tmp_path / "wgs84.geojson", [_polygon(list(zip(lon, lat)), **{"class": "car"})], crs=None)
    found = read_objects(utm, CLASSES, UTM, TRANSFORM, (64, 64))
    corners = [10, 20, 30, 20, 30, 28, 10, 28]
    np.testing.assert_allclose(found["boxes"].numpy(), [corners, corners], atol=1e-6)
    assert found["labels"].tolist() == [1, 0] and found["difficult"].tolist() == [False, True]
    np.testing.assert_allclose(read_objects(wgs84, CLASSES, UTM, TRANSFORM, (64, 64))["boxes"].numpy(), [corners],
                               atol=1e-3)
    # an image without a CRS, or a collection in pixels, takes the coordinates as pixels
    pixels = write_geojson(tmp_path / "pixels.geojson", [_polygon([(1, 2), (5, 2), (5, 9), (1, 9)], label="car")], "pixels")
    found = read_objects(pixels, CLASSES, UTM, TRANSFORM, (64, 64), class_key="label")
    np.testing.assert_allclose(found["boxes"].numpy(), [[1, 2, 5, 2, 5, 9, 1, 9]])


def test_other_outlines_become_their_minimum_area_rectangle() -> None:
    angle = math.radians(30)
    u, v = np.array([math.cos(angle), math.sin(angle)]), np.array([-math.sin(angle), math.cos(angle)])
    corners = np.array([[0, 0], 8 * u, 8 * u + 3 * v, 3 * v]) + [20, 20]
    inside = np.array([[20, 20]]) + 4 * u + 1.5 * v
    rectangle = min_area_rectangle(np.concatenate([corners, inside, (corners[0] + corners[1])[None] / 2]))
    assert {tuple(np.round(p, 6)) for p in rectangle} == {tuple(np.round(p, 6)) for p in corners}
    x, y = rectangle[:, 0], rectangle[:, 1]
    assert 0.5 * (np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) == pytest.approx(24.0)  # ccw, 8 x 3


def test_bad_objects_name_the_feature(tmp_path: Path) -> None:
    good = [_utm(10, 20), _utm(30, 20), _utm(30, 28), _utm(10, 28)]
    cases = [
        ([{"type": "Feature", "properties": {"class": "car"}, "geometry": {"type": "Point", "coordinates": [1, 2]}}],
         "feature 0: geometry 'Point': expected a Polygon"),
        ([_polygon(good, **{"class": "plane"})], r"feature 0: class 'plane': expected one of \['car', 'ship'\]"),
        ([_polygon(good, kind="car")], "feature 0: no 'class' property"),
        ([_polygon(good, **{"class": "car"}), _polygon([_utm(1, 1)] * 4, **{"class": "car"})],
         "feature 1: the polygon has no area"),
        ([_polygon([(x + 5000, y) for x, y in good], **{"class": "car"})],
         "feature 0: the object lies wholly outside the 64 x 64 px image .* is the collection's crs right"),
    ]
    for number, (features, message) in enumerate(cases):
        path = write_geojson(tmp_path / f"bad{number}.geojson", features)
        with pytest.raises(ValueError, match=message):
            read_objects(path, CLASSES, UTM, TRANSFORM, (64, 64))
    (tmp_path / "broken.geojson").write_text("{")
    with pytest.raises(ValueError, match="broken.geojson: not a readable GeoJSON file"):
        read_objects(tmp_path / "broken.geojson", CLASSES, UTM, TRANSFORM, (64, 64))
