"""Labelled regions drawn in a GIS, burnt from GeoJSON into a class mask on an image's grid.

:func:`read_regions` turns a GeoJSON ``FeatureCollection`` of ``Polygon`` / ``MultiPolygon``
features (land-cover parcels, building footprints, flooded areas drawn in QGIS, or the polygons
``skysense predict --polygons`` writes) into the (H, W) class mask of a segmentation or change
sample; ``Point`` / ``MultiPoint`` features label the pixel that holds each point (sparse labels,
with ``background`` None). :func:`region_shapes` gives the features of such a file on an image,
for other uses (:mod:`skysense.inference.zonal`: an embedding per region).

* **Coordinates.** As :mod:`skysense.data.geojson` reads them: the collection's ``crs`` member,
  else longitude / latitude, reprojected to the image's CRS; ``"pixels"`` (or an image without a
  CRS) takes them as the image's pixels.
* **Pixels.** A pixel takes a region's class when its centre lies inside the polygon (holes
  excluded), or when it holds the point; where regions overlap, the later feature in the file wins. Pixels no region covers
  are ``background`` (a class index), or unlabelled (-1) when it is None.
* **Classes.** The property ``class_key`` (default ``class``) holds a class name or index; a
  feature without it takes ``default_class`` when one is given (change polygons: changed). A
  feature with the property ``"ignore": true`` marks its pixels unlabelled (clouds, unsure areas).
* **One file for many images.** A collection may cover a whole region and be named by every
  record whose image lies in it: features that miss the image are skipped, and the parsed file is
  cached while it is unchanged. A mask with no region on it is an error when it would be wholly
  unlabelled (``background`` None: usually a wrong CRS).

Errors name the file, the feature and what was expected.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio.features
import rasterio.warp
import torch
from affine import Affine
from rasterio.crs import CRS

from skysense.data.geojson import PIXELS, collection_crs, describe_crs, read_collection
from skysense.data.sample import IGNORE_INDEX, class_index


GEOMETRIES = ("Polygon", "MultiPolygon", "Point", "MultiPoint")
"""The geometry types a region may have."""


@dataclass(frozen=True)
class Region:
    """One feature of a collection: its number in the file, its geometry (GeoJSON, in the
    collection's coordinates), their bounds (x0, y0, x1, y1) and its properties."""

    number: int
    geometry: dict[str, Any]
    bounds: tuple[float, float, float, float]
    properties: dict[str, Any]


def _points(geometry: dict[str, Any], where: str) -> np.ndarray:
    """The (n, 2) positions of a Polygon / MultiPolygon / Point / MultiPoint, checked."""
    kind, coordinates = geometry.get("type"), geometry.get("coordinates")
    if kind not in GEOMETRIES or coordinates in (None, []):
        raise ValueError(f"{where}: geometry {kind!r}: expected one of {', '.join(GEOMETRIES)}")
    if kind == "Point":
        rings = [[coordinates]]
    elif kind == "MultiPoint":
        rings = [coordinates]
    else:
        rings = [coordinates] if kind == "Polygon" else coordinates
        rings = [ring for polygon in rings for ring in polygon]
    arrays = []
    for ring in rings:
        array = np.asarray(ring, dtype=np.float64)
        if array.ndim != 2 or array.shape[1] < 2 or (kind.endswith("Polygon") and len(array) < 3):
            raise ValueError(f"{where}: a ring of {len(array)} points; expected at least 3 (x, y) positions")
        arrays.append(array[:, :2])
    return np.concatenate(arrays)


@functools.lru_cache(maxsize=8)
def _parsed(path: str, stamp: tuple[int, int]) -> tuple[Any, tuple[Region, ...], str]:
    """The collection in ``path`` (``stamp``: its modification time and size, so that an edited
    file is read again): its CRS, regions and a description of its CRS."""
    collection = read_collection(path)
    source = collection_crs(collection, path)
    regions = []
    for number, feature in enumerate(collection.get("features") or []):
        geometry = (feature or {}).get("geometry") or {}
        points = _points(geometry, f"{path}: feature {number}")
        bounds = (*points.min(axis=0).tolist(), *points.max(axis=0).tolist())
        regions.append(Region(number, geometry, bounds, dict(feature.get("properties") or {})))
    return source, tuple(regions), describe_crs(collection)


def read_collection_regions(path: str | Path) -> tuple[Any, tuple[Region, ...], str]:
    """The regions of the GeoJSON ``path`` (cached while the file is unchanged): the collection's
    CRS (:data:`~skysense.data.geojson.PIXELS` for pixels), its regions, and a description of the
    CRS for messages.

    Raises:
        ValueError: a missing or unreadable file, not a FeatureCollection, or a geometry that is not
            one of :data:`GEOMETRIES` (names the feature).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: not a readable GeoJSON file (no such file)")
    stat = os.stat(path)
    return _parsed(str(path), (stat.st_mtime_ns, stat.st_size))


def region_shapes(path: str | Path, image_crs: CRS | None, image_transform: Affine, image_size: tuple[int, int],
                  pixel_offset: tuple[int, int] = (0, 0)) -> tuple[list[tuple[Region, dict[str, Any]]], Affine, str]:
    """The regions of ``path`` whose bounds meet an image, each with its geometry in the image's
    CRS, the transform that maps the image's pixels to those coordinates (the image's, or when
    the coordinates are pixels a shift by ``pixel_offset``: the image's (column, row) in the
    pixels the collection counts, for a window of a larger raster), and a description of the
    collection's CRS."""
    source, regions, described = read_collection_regions(path)
    height, width = image_size
    pixels = source == PIXELS or image_crs is None
    transform = Affine.translation(*pixel_offset) if pixels else image_transform
    window = ((float(pixel_offset[0]), float(pixel_offset[1]), float(pixel_offset[0] + width),
               float(pixel_offset[1] + height)) if pixels else
              _image_bounds(source, image_crs, image_transform, image_size))
    found = []
    for region in regions:
        if not _overlaps(region.bounds, window):
            continue
        geometry = region.geometry
        if not pixels and source != image_crs:
            geometry = rasterio.warp.transform_geom(source, image_crs, geometry)
        if geometry["type"] in ("Point", "MultiPoint"):
            geometry = _pixel_squares(geometry, transform, image_size)
            if geometry is None:
                continue
        found.append((region, geometry))
    return found, transform, described


def _pixel_squares(geometry: dict[str, Any], transform: Affine, size: tuple[int, int]) -> dict[str, Any] | None:
    """A Point / MultiPoint as the squares of the pixels that hold its points (a point on a pixel
    edge goes to the pixel right of / below it), so that burning it never misses; None when every
    point lies outside the image."""
    points = [geometry["coordinates"]] if geometry["type"] == "Point" else geometry["coordinates"]
    inverse = ~transform
    squares = []
    for point in points:
        col, row = (math.floor(v) for v in inverse * (float(point[0]), float(point[1])))
        if 0 <= row < size[0] and 0 <= col < size[1]:
            corners = [transform * (col + dx, row + dy) for dx, dy in ((0, 0), (1, 0), (1, 1), (0, 1), (0, 0))]
            squares.append([[list(c) for c in corners]])
    return {"type": "MultiPolygon", "coordinates": squares} if squares else None


def _image_bounds(source: CRS, image_crs: CRS, transform: Affine, size: tuple[int, int]) -> tuple[float, ...]:
    """The image's bounds in the collection's CRS (densified edges, so a reprojected box holds them)."""
    height, width = size
    corners = [transform * (x, y) for x, y in ((0, 0), (width, 0), (width, height), (0, height))]
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    if source == image_crs:
        return min(xs), min(ys), max(xs), max(ys)
    return rasterio.warp.transform_bounds(image_crs, source, min(xs), min(ys), max(xs), max(ys), densify_pts=21)


def _overlaps(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def read_regions(path: str | Path, classes: Sequence[str], image_crs: CRS | None, image_transform: Affine,
                 image_size: tuple[int, int], class_key: str = "class", background: int | None = None,
                 default_class: int | None = None, pixel_offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """The regions of the GeoJSON ``path`` as a class mask on an image's grid (module docstring).

    Args:
        path: a GeoJSON FeatureCollection of Polygon / MultiPolygon (or Point / MultiPoint) features.
        classes: the class names; a feature's ``class_key`` property is one of them or an index.
        image_crs: the image's CRS (None: the coordinates are its pixels).
        image_transform: the image's pixel -> CRS transform.
        image_size: (height, width) of the image in pixels.
        class_key: the property that holds the class.
        background: the class of pixels no region covers (None: unlabelled, -1).
        default_class: the class of a feature without ``class_key`` (None: such a feature is an error).
        pixel_offset: where the image starts (column, row) in the pixels of a collection in pixels.

    Returns:
        (H, W) int64 class indices, -1 where unlabelled.

    Raises:
        ValueError: unreadable JSON, not a FeatureCollection, a geometry of another type, a
            missing or unknown class, or (``background`` None) no region on the image.
    """
    path = Path(path)
    found, transform, described = region_shapes(path, image_crs, image_transform, image_size, pixel_offset)
    height, width = image_size
    shapes = []
    for region, geometry in found:
        where = f"{path}: feature {region.number}"
        if region.properties.get("ignore") is True:
            value = IGNORE_INDEX
        elif class_key in region.properties:
            value = class_index(region.properties[class_key], classes, where, class_key)
        elif default_class is not None:
            value = default_class
        else:
            raise ValueError(f"{where}: no {class_key!r} property (the region's class); it has "
                             f"{sorted(region.properties)}")
        shapes.append((geometry, value))
    if not shapes and background is None:
        raise ValueError(f"{path}: no region lies on the {width} x {height} px image, and pixels outside the regions "
                         f"are unlabelled, so the mask would be empty; is the collection's crs right? ({described}) "
                         "Or name a background class for the pixels outside the regions")
    fill = IGNORE_INDEX if background is None else background
    if not shapes:
        return torch.full((height, width), fill, dtype=torch.int64)
    mask = rasterio.features.rasterize(shapes, out_shape=(height, width), fill=fill, transform=transform,
                                       dtype="int32")
    return torch.from_numpy(mask.astype(np.int64))
