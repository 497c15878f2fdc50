"""Labelled objects drawn in a GIS, read from GeoJSON as boxes in the pixels of an image.

:func:`read_objects` turns a GeoJSON ``FeatureCollection`` of ``Polygon`` features (rectangles
drawn around objects in QGIS, or written by ``skysense predict`` with a detector) into the
detection targets of the datasets (:mod:`skysense.data.datasets.detection`): ``boxes`` (N, 8),
the four corners x1, y1, ..., x4, y4 in pixels of the image, ``labels`` (N,) and ``difficult``
(N,).

* **Coordinates.** The collection's ``crs`` member names its CRS (GeoJSON 2008, as QGIS and
  ``skysense predict`` write it); without one the coordinates are longitude / latitude (RFC
  7946). They are reprojected to the image's CRS and mapped to pixels by its transform. An image
  without a CRS takes the coordinates as its pixels (x right, y down), and so does a collection
  whose ``crs`` is ``"pixels"``.
* **Corners.** A polygon whose exterior ring has four corners keeps them, in ring order; any
  other polygon becomes its minimum-area enclosing rectangle. A horizontal-box task takes the
  corners' hull (:func:`skysense.downstream.boxes.horizontal_boxes`).
* **Classes.** The property ``class_key`` (default ``class``) holds a class name or index;
  ``difficult`` (optional, default false) marks objects the evaluation ignores.

Errors name the file, the feature and what was expected: a geometry that is not a polygon, an
unknown class, a degenerate polygon, or an object wholly outside the image (usually a wrong CRS).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio.warp
import torch
from affine import Affine
from rasterio.crs import CRS

from skysense.data.geojson import PIXELS, collection_crs, describe_crs, read_collection
from skysense.data.sample import class_index

def min_area_rectangle(points: np.ndarray) -> np.ndarray:
    """(4, 2) corners of the smallest-area rectangle enclosing (N, 2) ``points`` (one side along an
    edge of their convex hull), counter-clockwise in (x, y)."""
    hull = _convex_hull(points)
    best = None
    for a, b in zip(hull, np.roll(hull, -1, axis=0)):
        edge = b - a
        length = float(np.hypot(*edge))
        if length == 0:
            continue
        u = edge / length
        v = np.array([-u[1], u[0]])
        along, across = hull @ u, hull @ v
        area = (along.max() - along.min()) * (across.max() - across.min())
        if best is None or area < best[0]:
            best = (area, u, v, along.min(), along.max(), across.min(), across.max())
    if best is None:
        raise ValueError("min_area_rectangle: the points coincide")
    _, u, v, a0, a1, c0, c1 = best
    return np.array([a0 * u + c0 * v, a1 * u + c0 * v, a1 * u + c1 * v, a0 * u + c1 * v])


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Andrew's monotone chain: the hull's vertices, counter-clockwise, without repeats."""
    pts = np.unique(np.asarray(points, dtype=np.float64), axis=0)
    if len(pts) < 3:
        return pts

    def half(sequence: np.ndarray) -> list[np.ndarray]:
        chain: list[np.ndarray] = []
        for p in sequence:
            while len(chain) >= 2 and np.cross(chain[-1] - chain[-2], p - chain[-2]) <= 0:
                chain.pop()
            chain.append(p)
        return chain

    lower, upper = half(pts), half(pts[::-1])
    return np.array(lower[:-1] + upper[:-1])


def read_objects(path: str | Path, classes: Sequence[str], image_crs: CRS | None, image_transform: Affine,
                 image_size: tuple[int, int], class_key: str = "class") -> dict[str, torch.Tensor]:
    """The objects of the GeoJSON ``path`` in pixels of an image (module docstring).

    Args:
        path: a GeoJSON FeatureCollection of Polygon features.
        classes: the class names; a feature's ``class_key`` property is one of them or an index.
        image_crs: the image's CRS (None: the coordinates are its pixels).
        image_transform: the image's pixel -> CRS transform.
        image_size: (height, width) of the image in pixels.
        class_key: the property that holds the class.

    Returns:
        ``boxes`` (N, 8) float32 corners, ``labels`` (N,) int64, ``difficult`` (N,) bool.

    Raises:
        ValueError: unreadable JSON, not a FeatureCollection, a geometry that is not a Polygon, an
            unknown class, a degenerate polygon or one wholly outside the image (names the feature).
    """
    path = Path(path)
    collection = read_collection(path)
    source = collection_crs(collection, path)
    pixels = source == PIXELS or image_crs is None
    inverse = ~image_transform
    height, width = image_size
    boxes, labels, difficult = [], [], []
    for number, feature in enumerate(collection.get("features") or []):
        where = f"{path}: feature {number}"
        geometry = (feature or {}).get("geometry") or {}
        if geometry.get("type") != "Polygon" or not geometry.get("coordinates"):
            raise ValueError(f"{where}: geometry {geometry.get('type')!r}: expected a Polygon around the object")
        properties = feature.get("properties") or {}
        if class_key not in properties:
            raise ValueError(f"{where}: no {class_key!r} property (the object's class); it has {sorted(properties)}")
        label = class_index(properties[class_key], classes, where, class_key)
        ring = np.asarray(geometry["coordinates"][0], dtype=np.float64)[:, :2]
        if len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
            ring = ring[:-1]
        if not pixels:
            if source != image_crs:
                xs, ys = rasterio.warp.transform(source, image_crs, ring[:, 0].tolist(), ring[:, 1].tolist())
                ring = np.column_stack([xs, ys])
            ring = np.array([inverse * (x, y) for x, y in ring])
        corners = ring if len(ring) == 4 else min_area_rectangle(ring)
        x, y = corners[:, 0], corners[:, 1]
        area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
        if not area > 0:
            raise ValueError(f"{where}: the polygon has no area in the image's pixels ({ring.tolist()})")
        if x.max() <= 0 or y.max() <= 0 or x.min() >= width or y.min() >= height:
            raise ValueError(f"{where}: the object lies wholly outside the {width} x {height} px image (pixels "
                             f"x {x.min():.1f}..{x.max():.1f}, y {y.min():.1f}..{y.max():.1f}); is the collection's "
                             f"crs right? ({describe_crs(collection)})")
        boxes.append(corners.reshape(-1).tolist())
        labels.append(label)
        difficult.append(bool(properties.get("difficult", False)))
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 8),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "difficult": torch.tensor(difficult, dtype=torch.bool)}
