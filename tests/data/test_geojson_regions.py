"""Regions drawn in a GIS (GeoJSON polygons) burnt into class masks on an image's grid."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import rasterio.warp
from rasterio.crs import CRS
from rasterio.transform import from_origin

from skysense.data.geojson_regions import read_regions

from data_helpers import write_geojson

UTM = CRS.from_epsg(32631)
TRANSFORM = from_origin(448000.0, 5412000.0, 10.0, 10.0)  # 10 m pixels
CLASSES = ("field", "forest", "water")
SIZE = (12, 16)


def _feature(geometry_type: str, coordinates: list, **properties: object) -> dict:
    return {"type": "Feature", "properties": properties,
            "geometry": {"type": geometry_type, "coordinates": coordinates}}


def _box(x0: float, y0: float, x1: float, y1: float, to=lambda x, y: TRANSFORM * (x, y)) -> list[list[float]]:
    """A closed ring around pixels x0..x1, y0..y1 (edges on pixel edges), mapped by ``to``."""
    return [list(to(x, y)) for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0))]


def _lonlat(x: float, y: float) -> tuple[float, float]:
    (lon,), (lat,) = rasterio.warp.transform(UTM, "EPSG:4326", *map(list, zip(TRANSFORM * (x, y))))
    return lon, lat


def test_regions_in_the_image_crs_in_lon_lat_and_in_pixels_burn_the_same_pixels(tmp_path: Path) -> None:
    expected = np.full(SIZE, -1)
    expected[1:4, 2:6] = 2
    utm = write_geojson(tmp_path / "utm.geojson", [_feature("Polygon", [_box(2, 1, 6, 4)], **{"class": "water"})])
    wgs84 = write_geojson(tmp_path / "wgs84.geojson", [_feature("Polygon", [_box(2, 1, 6, 4, _lonlat)], **{"class": 2})],
                   crs=None)
    pixels = write_geojson(tmp_path / "px.geojson", [_feature("Polygon", [_box(2, 1, 6, 4, lambda x, y: (x, y))],
                                                       kind="water")], crs="pixels")
    np.testing.assert_array_equal(read_regions(utm, CLASSES, UTM, TRANSFORM, SIZE).numpy(), expected)
    np.testing.assert_array_equal(read_regions(wgs84, CLASSES, UTM, TRANSFORM, SIZE).numpy(), expected)
    np.testing.assert_array_equal(read_regions(pixels, CLASSES, UTM, TRANSFORM, SIZE, class_key="kind").numpy(),
                                  expected)
    # an image without a CRS takes the coordinates as its pixels; pixels outside the regions can be a class
    background = read_regions(pixels, CLASSES, None, TRANSFORM, SIZE, class_key="kind", background=0).numpy()
    np.testing.assert_array_equal(background, np.where(expected == -1, 0, expected))


def test_holes_multipolygons_overlaps_and_ignored_regions(tmp_path: Path) -> None:
    path = write_geojson(tmp_path / "r.geojson", [
        _feature("Polygon", [_box(0, 0, 8, 8), _box(2, 2, 4, 4)[::-1]], **{"class": "forest"}),  # a hole
        _feature("MultiPolygon", [[_box(10, 0, 12, 2)], [_box(14, 10, 16, 12)]], **{"class": "water"}),
        _feature("Polygon", [_box(6, 6, 10, 10)], **{"class": "field"}),  # drawn over the forest: wins
        _feature("Polygon", [_box(0, 10, 3, 12)], **{"class": "field", "ignore": True}),
    ])
    mask = read_regions(path, CLASSES, UTM, TRANSFORM, SIZE, background=2).numpy()
    expected = np.full(SIZE, 2)
    expected[0:8, 0:8] = 1
    expected[2:4, 2:4] = 2  # the hole is background
    expected[0:2, 10:12] = 2
    expected[10:12, 14:16] = 2
    expected[6:10, 6:10] = 0
    expected[10:12, 0:3] = -1
    np.testing.assert_array_equal(mask, expected)


def test_one_file_for_many_images_skips_the_regions_elsewhere_and_is_read_again_when_edited(tmp_path: Path) -> None:
    far = _box(5000, 5000, 5004, 5004)  # 50 km away: on another record's image
    path = write_geojson(tmp_path / "all.geojson", [_feature("Polygon", [far], **{"class": "forest"}),
                                             _feature("Polygon", [_box(0, 0, 2, 2)], **{"class": "water"})])
    mask = read_regions(path, CLASSES, UTM, TRANSFORM, SIZE).numpy()
    assert (mask == 2).sum() == 4 and (mask == 1).sum() == 0
    write_geojson(path, [_feature("Polygon", [far], **{"class": "forest"}),
                  _feature("Polygon", [_box(0, 0, 3, 3)], **{"class": "field"})])
    os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 10**9))
    mask = read_regions(path, CLASSES, UTM, TRANSFORM, SIZE).numpy()
    assert (mask == 0).sum() == 9 and (mask == 2).sum() == 0
    # an image with no region on it: all background, or an error when that would be all unlabelled
    only_far = write_geojson(tmp_path / "far.geojson", [_feature("Polygon", [far], **{"class": "forest"})])
    assert (read_regions(only_far, CLASSES, UTM, TRANSFORM, SIZE, background=0) == 0).all()
    with pytest.raises(ValueError, match=r"far.geojson: no region lies on the 16 x 12 px image.*crs right"):
        read_regions(only_far, CLASSES, UTM, TRANSFORM, SIZE)


def test_points_label_the_pixels_that_hold_them(tmp_path: Path) -> None:
    path = write_geojson(tmp_path / "points.geojson", [
        _feature("Point", list(_lonlat(3.5, 2.5)), **{"class": "water"}),
        _feature("MultiPoint", [list(_lonlat(0.2, 0.7)), list(_lonlat(15.9, 11.1))], **{"class": "forest"}),
    ], crs=None)
    mask = read_regions(path, CLASSES, UTM, TRANSFORM, SIZE).numpy()
    assert mask[2, 3] == 2 and mask[0, 0] == 1 and mask[11, 15] == 1 and (mask >= 0).sum() == 3
    # a point on a pixel corner labels the pixel right of and below it; points off the image nothing
    corner = write_geojson(tmp_path / "corner.geojson", [_feature("Point", [5.0, 5.0], **{"class": "field"}),
                                                         _feature("Point", [16.0, 3.0], **{"class": "field"})],
                           crs="pixels")
    mask = read_regions(corner, CLASSES, UTM, TRANSFORM, SIZE).numpy()
    assert mask[5, 5] == 0 and (mask >= 0).sum() == 1


def test_change_regions_default_to_changed(tmp_path: Path) -> None:
    path = write_geojson(tmp_path / "changes.geojson", [_feature("Polygon", [_box(1, 1, 3, 3)]),
                                                 _feature("Polygon", [_box(1, 1, 2, 2)], change="no_change")])
    mask = read_regions(path, ("no_change", "change"), UTM, TRANSFORM, SIZE, class_key="change", background=0,
                        default_class=1).numpy()
    assert mask.sum() == 3 and mask[1, 1] == 0 and mask[2, 2] == 1


@pytest.mark.parametrize(("feature", "message"), [
    (_feature("LineString", [[0, 0], [1, 1]], **{"class": "field"}),
     "feature 0: geometry 'LineString': expected one of Polygon, MultiPolygon, Point, MultiPoint"),
    (_feature("Polygon", [[[0, 0], [1, 1]]], **{"class": "field"}), "feature 0: a ring of 2 points"),
    (_feature("Polygon", [_box(0, 0, 2, 2)], **{"class": "urban"}),
     r"feature 0: class 'urban': expected one of \['field', 'forest', 'water'\]"),
    (_feature("Polygon", [_box(0, 0, 2, 2)], kind="field"), "feature 0: no 'class' property"),
])
def test_bad_regions_name_the_file_and_feature(tmp_path: Path, feature: dict, message: str) -> None:
    path = write_geojson(tmp_path / "bad.geojson", [feature])
    with pytest.raises(ValueError, match=message) as error:
        read_regions(path, CLASSES, UTM, TRANSFORM, SIZE)
    assert "bad.geojson" in str(error.value)


def test_unreadable_files_say_what_they_are(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="missing.geojson: not a readable GeoJSON"):
        read_regions(tmp_path / "missing.geojson", CLASSES, UTM, TRANSFORM, SIZE)
    (tmp_path / "fields.shp").write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match="fields.shp: not a readable GeoJSON file .*ogr2ogr -f GeoJSON out.geojson "
                                         "fields.shp"):
        read_regions(tmp_path / "fields.shp", CLASSES, UTM, TRANSFORM, SIZE)
