"""GeoJSON in and out: reading a FeatureCollection's CRS, and writing one in a scene's CRS or WGS84.

Shared by the readers of labels drawn in a GIS (:mod:`skysense.data.geojson_objects`: boxes;
:mod:`skysense.data.geojson_regions`: class masks) and the writers of predictions
(:mod:`skysense.inference.detect`: boxes; :mod:`skysense.inference.polygons`: class-map polygons).

* **Reading.** A collection's ``crs`` member (GeoJSON 2008, as QGIS writes it) names its CRS;
  without one the coordinates are longitude / latitude (RFC 7946). ``"pixels"`` names the
  coordinates of an image's pixels (x right, y down).
* **Writing.** Coordinates stay in the scene's CRS with an EPSG-named ``crs`` member, or are
  reprojected to longitude / latitude (RFC 7946, no ``crs`` member) when asked or when the CRS has
  no EPSG code; a scene without a CRS is written in pixels, with a ``crs`` member named
  ``"pixels"`` so that it reads back as pixels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rasterio.crs import CRS

PIXELS = "pixels"
"""The ``crs`` name of a collection whose coordinates are image pixels."""

VECTOR_SUFFIXES = (".shp", ".gpkg", ".kml", ".kmz", ".gml", ".fgb", ".zip")
"""Vector formats other than GeoJSON, for which errors say how to convert."""

WGS84 = "EPSG:4326"
"""Longitude / latitude, the coordinates of a GeoJSON without a ``crs`` member (RFC 7946)."""


def read_collection(path: str | Path) -> dict[str, Any]:
    """The GeoJSON FeatureCollection in ``path``.

    Raises:
        ValueError: unreadable JSON or not a FeatureCollection (names the file).
    """
    path = Path(path)
    try:
        collection = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        hint = ("; convert a Shapefile, GeoPackage or KML with: ogr2ogr -f GeoJSON out.geojson "
                f"{path.name}" if path.suffix.lower() in VECTOR_SUFFIXES else "")
        raise ValueError(f"{path}: not a readable GeoJSON file ({error}){hint}") from None
    if not isinstance(collection, dict) or collection.get("type") != "FeatureCollection":
        raise ValueError(f"{path}: expected a GeoJSON FeatureCollection, got {str(collection)[:80]!r}")
    return collection


def collection_crs(collection: dict[str, Any], path: str | Path) -> CRS | str:
    """The CRS of a collection's coordinates: its ``crs`` member, else WGS84; :data:`PIXELS` for
    image pixels.

    Raises:
        ValueError: a ``crs`` member whose name is not a CRS (names the file).
    """
    member = collection.get("crs")
    if member is None:
        return CRS.from_epsg(4326)
    name = (member.get("properties") or {}).get("name") if isinstance(member, dict) else None
    if name == PIXELS:
        return PIXELS
    try:
        return CRS.from_user_input(name)
    except Exception:  # noqa: BLE001 - rasterio raises CRSError or ValueError for unreadable names
        raise ValueError(f"{path}: crs {member!r}: expected a name such as urn:ogc:def:crs:EPSG::32631 or "
                         f"{PIXELS!r}") from None


def describe_crs(collection: dict[str, Any]) -> str:
    """What a collection's coordinates were taken to be, for error messages."""
    member = collection.get("crs")
    return "none: longitude / latitude" if member is None else str(member)


def output_coordinates(crs: CRS | None, wgs84: bool) -> tuple[str, dict[str, Any] | None]:
    """Where a collection written for a scene in ``crs`` puts its coordinates (module docstring):
    ``("EPSG:<code>", crs member)``, ``("EPSG:4326", None)`` or ``("pixels", crs member)``."""
    if crs is None:
        return PIXELS, {"type": "name", "properties": {"name": PIXELS}}
    epsg = crs.to_epsg()
    if wgs84 or epsg is None:
        return WGS84, None
    return f"EPSG:{epsg}", {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{epsg}"}}


def closed_ring(points: list[tuple[float, float]], hole: bool = False, digits: int = 9) -> list[list[float]]:
    """A closed linear ring through ``points`` by the right-hand rule: counter-clockwise, or
    clockwise for a ``hole``."""
    points = list(points)
    if len(points) > 1 and points[0] == points[-1]:
        points = points[:-1]
    area = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]))
    if (area < 0) != hole:
        points = points[::-1]
    return [[round(x, digits), round(y, digits)] for x, y in points + points[:1]]
