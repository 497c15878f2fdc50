"""A class map as polygons: the regions of each class of a GeoTIFF written out as GeoJSON for a GIS.

:func:`class_map_polygons` vectorises a one-band integer class map (the ``.classes.tif`` that
``skysense predict`` writes for a segmentation, change or classification model, or any classified
GeoTIFF) into a GeoJSON ``FeatureCollection``, one ``Polygon`` per connected region of a class
(4-connected, holes kept), so a map can be edited in QGIS and read back as training labels
(a record's ``mask`` in the manifest, :mod:`skysense.data.geojson_regions`):

* **Outlines** follow pixel edges; each feature has ``class`` (its name: the map's
  ``skysense_classes`` tag, else ``classes``, else the value), ``label`` (the value), ``pixels``
  and, in a CRS with metre units, ``area_m2``.
* **Small regions.** With ``min_pixels`` > 1 the map is sieved first: a region of fewer pixels is
  merged into its largest neighbour (:func:`rasterio.features.sieve`); one with no labelled
  neighbour is left out (the report counts them).
* **Nodata** (the raster's nodata value, 255 in predict's maps, or the value ``nodata`` names, such
  as -1 for unlabelled pixels of a label raster) gets no polygon.
* **Coordinates**: the map's CRS with an EPSG-named ``crs`` member, or longitude / latitude with
  ``wgs84`` or when the CRS has no EPSG code (:mod:`skysense.data.geojson`); a map without a CRS
  is written in pixels.

The whole map is read into memory (one byte per pixel for uint8 maps); the GeoJSON is written
atomically.
"""

from __future__ import annotations

import json
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.errors
import rasterio.features
import rasterio.warp
from tqdm.auto import tqdm

from skysense.data.geojson import WGS84, closed_ring, output_coordinates
from skysense.inference.reports import JsonReport
from skysense.weights import atomic_write


@dataclass
class PolygonReport(JsonReport):
    """What :func:`class_map_polygons` wrote: the output, polygons per class, those left out for
    being smaller than ``min_pixels`` with no labelled neighbour, the coordinates and the time."""

    out: Path
    polygons: int
    per_class: dict[str, int]
    dropped: int
    coordinates: str
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)



def _area(ring: Sequence[Sequence[float]]) -> float:
    """The unsigned area of a closed ring (shoelace)."""
    points = np.asarray(ring, dtype=np.float64)
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x[:-1], y[1:]) - np.dot(y[:-1], x[1:])))


def _class_names(src: rasterio.DatasetReader, classes: Sequence[str] | None) -> dict[int, str]:
    """The class name of each value: the map's ``skysense_classes`` tag, else ``classes``."""
    tagged = src.tags().get("skysense_classes")
    names = json.loads(tagged) if tagged else list(classes or ())
    return dict(enumerate(str(n) for n in names))


def class_map_polygons(class_map: str | Path, out: str | Path, classes: Sequence[str] | None = None,
                       min_pixels: int = 1, wgs84: bool = False, overwrite: bool = False,
                       progress: bool = True, nodata: int | None = None) -> PolygonReport:
    """Write the regions of ``class_map`` as the GeoJSON ``out`` (module docstring).

    Args:
        class_map: a one-band integer GeoTIFF of class values.
        out: the GeoJSON's path.
        classes: class names by value, when the map has no ``skysense_classes`` tag.
        min_pixels: regions smaller than this are merged into their largest neighbour (sieved).
        wgs84: longitude / latitude instead of the map's CRS.
        overwrite: replace an existing ``out``.
        progress: show a progress bar over the polygons.
        nodata: the value without a class (default: the raster's nodata value, if it has one).

    Raises:
        FileNotFoundError: no file at ``class_map``.
        ValueError: the map is not a readable raster of one band of integers, ``min_pixels`` < 1, or
            ``out`` exists without ``overwrite``.
    """
    start = time.perf_counter()
    class_map, out = Path(class_map), Path(out)
    if min_pixels < 1:
        raise ValueError(f"min_pixels: expected at least 1, got {min_pixels}")
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    if not class_map.is_file():
        raise FileNotFoundError(f"{class_map}: no such class map")
    with warnings.catch_warnings():  # a map without georeference is written in its pixels, and says so
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        try:
            src = rasterio.open(class_map)
        except rasterio.errors.RasterioIOError as error:
            raise ValueError(f"{class_map}: not a readable raster ({error})") from None
    with src:
        if src.count != 1 or not np.issubdtype(np.dtype(src.dtypes[0]), np.integer):
            raise ValueError(f"{class_map}: {src.count} band(s) of {src.dtypes[0]}; expected one band of integer "
                             "class values (skysense predict's .classes.tif)")
        values = src.read(1)
        nodata = src.nodata if nodata is None else nodata
        crs, transform = src.crs, src.transform
        names = _class_names(src, classes)
    if values.dtype not in (np.uint8, np.int16, np.int32, np.uint16):
        values = values.astype(np.int32)  # the types rasterio.features vectorises
    valid = np.ones(values.shape, dtype=bool) if nodata is None else values != nodata
    if min_pixels > 1:
        values = rasterio.features.sieve(values, min_pixels, mask=valid)
    coordinates, member = output_coordinates(crs, wgs84)
    to_wgs84 = coordinates == WGS84
    pixel_area = abs(transform.a * transform.e - transform.b * transform.d)
    metres = crs is not None and crs.is_projected and (crs.linear_units or "").lower() in ("metre", "meter", "m")
    shapes = rasterio.features.shapes(values, mask=valid, connectivity=4,
                                      transform=transform if crs is not None else rasterio.Affine.identity())
    features, per_label, dropped = [], Counter(), 0
    for geometry, value in tqdm(shapes, unit="polygon", desc=out.name, disable=not progress, dynamic_ncols=True):
        rings = geometry["coordinates"]
        area = _area(rings[0]) - sum(_area(r) for r in rings[1:])
        pixels = int(round(area / (pixel_area if crs is not None else 1.0)))
        if pixels < min_pixels:
            dropped += 1
            continue
        if to_wgs84:
            geometry = rasterio.warp.transform_geom(crs, WGS84, geometry)
            rings = geometry["coordinates"]
        label = int(value)
        name = names.get(label, str(label))
        properties: dict[str, Any] = {"class": name, "label": label, "pixels": pixels}
        if metres:
            properties["area_m2"] = round(area, 3)
        polygon = [closed_ring([tuple(p) for p in r], hole=k > 0) for k, r in enumerate(rings)]
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": polygon},
                         "properties": properties})
        per_label[label] += 1
    per_class_sorted = {names.get(v, str(v)): per_label[v] for v in sorted(per_label)}
    collection: dict[str, Any] = {"type": "FeatureCollection", "features": features}
    if member is not None:
        collection["crs"] = member
    collection["skysense"] = {"class_map": str(class_map), "classes": [names[k] for k in sorted(names)],
                              "coordinates": coordinates, "min_pixels": min_pixels, "polygons": len(features),
                              "per_class": per_class_sorted, "dropped": dropped}
    atomic_write(out, lambda p: p.write_text(json.dumps(collection) + "\n"))
    return PolygonReport(out=out, polygons=len(features), per_class=per_class_sorted, dropped=dropped,
                         coordinates=coordinates, seconds=round(time.perf_counter() - start, 3),
                         extra={"height": int(values.shape[0]), "width": int(values.shape[1])})
