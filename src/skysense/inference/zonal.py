"""An embedding per region: the mean embedding of each field, building or sample point of a GeoJSON.

:func:`region_embeddings` reads an embedding raster written by ``skysense embed`` (GeoTIFF or
Zarr) and the regions of a GeoJSON (Polygon / MultiPolygon parcels, Point / MultiPoint samples; any
CRS, :mod:`skysense.data.geojson_regions`) and writes one embedding per feature, the mean over
its pixels, ready for a classifier (scikit-learn, a linear probe) or a GIS join:

* **Pixels of a region.** Those whose centre lies inside the polygon, or that hold the point. A
  polygon smaller than a pixel, which holds no pixel centre, takes the pixels it touches.
  Overlapping regions each get all their pixels. Nodata (NaN) pixels are left out; ``pixels``
  says how many were averaged, and a region with none (outside the raster, or on nodata only)
  gets no embedding (``null`` / empty cells).
* **Output** by the suffix of ``out``: ``.geojson``, the input features (geometry and properties
  as they were, the input's ``crs`` member kept) with ``embedding`` (a list of floats) and
  ``pixels`` added; ``.csv``, one row per feature: its number, its scalar properties, ``pixels``
  and ``e0`` ... ``e{C-1}``. Written atomically.
* **Memory and speed.** The raster is read in tiles of ``TILE`` pixels kept in a cache of at most
  ``cache_bytes`` (least recently used dropped), and the regions are visited in the order of their
  top-left pixel, so neighbouring regions share tiles; a large region is read in strips of at most
  ``max_pixels`` pixels. Memory does not grow with the raster or the number of regions.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.errors
import rasterio.features
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window
from tqdm.auto import tqdm

from skysense.data.geojson import read_collection
from skysense.data.geojson_regions import region_shapes
from skysense.inference.reports import JsonReport
from skysense.weights import atomic_write

OUTPUT_SUFFIXES = (".geojson", ".json", ".csv")
TILE = 256
"""Side of the tiles the raster is read and cached in."""


class EmbeddingRaster:
    """An embedding raster written by ``skysense embed``: a GeoTIFF, or a Zarr store ``(channel, y,
    x)`` with its georeference in the attributes; read window by window as float32 (NaN: nodata).
    A context manager: the GeoTIFF stays open until it exits. Windows are assembled from tiles of
    :data:`TILE` pixels cached up to ``cache_bytes``."""

    def __init__(self, path: str | Path, cache_bytes: int = 256 << 20) -> None:
        self.path = Path(path)
        self._array = self._src = None
        self._tiles: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cached = 0
        self.cache_bytes = cache_bytes
        if self.path.is_dir():
            self._open_zarr()
        elif self.path.is_file():
            try:
                self._src = src = rasterio.open(self.path)
            except rasterio.errors.RasterioIOError as error:
                raise ValueError(f"{self.path}: not a readable raster ({error})") from None
            self.crs, self.transform = src.crs, src.transform
            self.channels, self.height, self.width = src.count, src.height, src.width
            self.tags = src.tags()
            self.nodata = src.nodata
        else:
            raise FileNotFoundError(f"{self.path}: no such embedding raster (a GeoTIFF or a Zarr folder)")

    def _open_zarr(self) -> None:
        try:
            import zarr
        except ImportError:
            raise ValueError(f'{self.path}: reading a Zarr store needs the zarr package: pip install "skysense[zarr]"'
                             ) from None
        if not (self.path / "zarr.json").is_file():
            raise ValueError(f"{self.path}: a folder but not a Zarr store")
        self._array = zarr.open_array(str(self.path), mode="r")
        attributes = dict(self._array.attrs)
        if attributes.get("complete") is False:
            raise ValueError(f"{self.path}: an unfinished embedding run (rerun the embed command to complete it)")
        self.crs = CRS.from_wkt(attributes["crs_wkt"]) if attributes.get("crs_wkt") else None
        self.transform = Affine(*attributes.get("transform", (1, 0, 0, 0, 1, 0)))
        self.channels, self.height, self.width = (int(n) for n in self._array.shape)
        self.tags = {k: str(v) for k, v in attributes.items() if k.startswith("skysense_")}
        self.nodata = None

    def __enter__(self) -> "EmbeddingRaster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._src is not None:
            self._src.close()
            self._src = None

    def _read(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """(C, r1 - r0, c1 - c0) float32 straight from the file, NaN where nodata."""
        if self._array is not None:
            return np.asarray(self._array[:, r0:r1, c0:c1], dtype=np.float32)
        data = self._src.read(window=Window(c0, r0, c1 - c0, r1 - r0)).astype(np.float32)
        if self.nodata is not None and not math.isnan(self.nodata):
            data[:, (data == self.nodata).all(axis=0)] = np.nan
        return data

    def _tile(self, row: int, col: int) -> np.ndarray:
        key = (row, col)
        tile = self._tiles.get(key)
        if tile is not None:
            self._tiles.move_to_end(key)
            return tile
        r0, c0 = row * TILE, col * TILE
        tile = self._read(r0, min(r0 + TILE, self.height), c0, min(c0 + TILE, self.width))
        self._tiles[key] = tile
        self._cached += tile.nbytes
        while self._cached > self.cache_bytes and len(self._tiles) > 1:
            _, dropped = self._tiles.popitem(last=False)
            self._cached -= dropped.nbytes
        return tile

    def read(self, window: Window) -> np.ndarray:
        """(C, h, w) float32 of ``window`` (within the raster), NaN where nodata."""
        r0, c0 = int(window.row_off), int(window.col_off)
        r1, c1 = r0 + int(window.height), c0 + int(window.width)
        out = np.empty((self.channels, r1 - r0, c1 - c0), dtype=np.float32)
        for row in range(r0 // TILE, (r1 - 1) // TILE + 1):
            for col in range(c0 // TILE, (c1 - 1) // TILE + 1):
                tile = self._tile(row, col)
                y0, x0 = max(r0, row * TILE), max(c0, col * TILE)
                y1, x1 = min(r1, row * TILE + tile.shape[1]), min(c1, col * TILE + tile.shape[2])
                out[:, y0 - r0:y1 - r0, x0 - c0:x1 - c0] = tile[:, y0 - row * TILE:y1 - row * TILE,
                                                                x0 - col * TILE:x1 - col * TILE]
        return out


@dataclass
class ZonalReport(JsonReport):
    """What :func:`region_embeddings` wrote: the output, how many features, how many got an
    embedding, the channels, the pixels averaged in all, and the time."""

    out: Path
    features: int
    embedded: int
    channels: int
    pixels: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)



def pixel_window(geometry: dict[str, Any], transform: Affine, height: int, width: int) -> Window | None:
    """The window of the raster that holds a Polygon / MultiPolygon ``geometry`` (coordinates
    mapped by ``transform``; :func:`~skysense.data.geojson_regions.region_shapes` gives points as
    the squares of their pixels), or None."""
    coordinates = np.asarray(list(_positions(geometry)), dtype=np.float64)
    cols, rows = ~transform * (coordinates[:, 0], coordinates[:, 1])
    c0, c1 = max(0, math.floor(float(np.min(cols)))), min(width, math.ceil(float(np.max(cols))) + 1)
    r0, r1 = max(0, math.floor(float(np.min(rows)))), min(height, math.ceil(float(np.max(rows))) + 1)
    if c0 >= c1 or r0 >= r1:
        return None
    return Window(c0, r0, c1 - c0, r1 - r0)


def _positions(geometry: dict[str, Any]):
    polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    for polygon in polygons:
        for ring in polygon:
            yield from (p[:2] for p in ring)


def region_mean(raster: EmbeddingRaster, geometry: dict[str, Any], transform: Affine, window: Window | None,
                max_pixels: int = 1 << 22) -> tuple[np.ndarray | None, int]:
    """The mean embedding of one region and the number of pixels averaged (module docstring).

    Args:
        raster: the embeddings.
        geometry: the region (GeoJSON) in coordinates that ``transform`` maps the raster's pixels to.
        transform: pixel -> coordinates of ``geometry``.
        window: the raster's window holding the region (:func:`pixel_window`; None: outside).
        max_pixels: the most pixels read at once (a larger window goes in strips).
    """
    if window is None:
        return None, 0
    total = np.zeros(raster.channels, dtype=np.float64)
    count = 0
    for all_touched in (False, True):  # a region holding no pixel centre takes the pixels it touches
        covered = 0
        rows = max(1, max_pixels // int(window.width))
        for r in range(int(window.row_off), int(window.row_off + window.height), rows):
            strip = Window(window.col_off, r, window.width, min(rows, int(window.row_off + window.height) - r))
            inside = rasterio.features.geometry_mask([geometry], (int(strip.height), int(strip.width)),
                                                     rasterio.windows.transform(strip, transform), invert=True,
                                                     all_touched=all_touched)
            covered += int(inside.sum())
            if not inside.any():
                continue
            values = raster.read(strip)[:, inside]
            valid = np.isfinite(values).all(axis=0)
            total += values[:, valid].sum(axis=1, dtype=np.float64)
            count += int(valid.sum())
        if covered:
            break
    return (total / count if count else None), count


def region_embeddings(embeddings: str | Path, regions: str | Path, out: str | Path, overwrite: bool = False,
                      progress: bool = True, max_pixels: int = 1 << 22) -> ZonalReport:
    """Write the mean embedding of each region of ``regions`` over ``embeddings`` (module docstring).

    Args:
        embeddings: an embedding raster (``skysense embed``'s GeoTIFF or Zarr output; any
            multi-band float raster).
        regions: a GeoJSON FeatureCollection of Polygon / MultiPolygon / Point / MultiPoint features.
        out: ``.geojson`` or ``.csv``.
        overwrite: replace an existing ``out``.
        progress: show a progress bar over the regions.
        max_pixels: the most pixels of a region read at once.

    Raises:
        ValueError: an unknown output suffix, ``out`` exists without ``overwrite``, an unreadable
            GeoJSON or a geometry of another type (names the feature), an unfinished Zarr run.
        FileNotFoundError: no embedding raster at ``embeddings``.
    """
    start = time.perf_counter()
    out = Path(out)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"{out}: expected an output ending in one of {OUTPUT_SUFFIXES}")
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    with EmbeddingRaster(embeddings) as raster:
        found, transform, described = region_shapes(regions, raster.crs, raster.transform,
                                                     (raster.height, raster.width))
        collection = read_collection(regions)
        features = collection.get("features") or []
        means: list[np.ndarray | None] = [None] * len(features)
        counts = [0] * len(features)
        windows = [pixel_window(geometry, transform, raster.height, raster.width) for _, geometry in found]
        order = sorted(range(len(found)), key=lambda k: (-1, -1) if windows[k] is None else (
            int(windows[k].row_off) // TILE, int(windows[k].col_off)))
        for k in tqdm(order, unit="region", desc=out.name, disable=not progress, dynamic_ncols=True):
            region, geometry = found[k]
            means[region.number], counts[region.number] = region_mean(raster, geometry, transform, windows[k],
                                                                      max_pixels)
    if out.suffix.lower() == ".csv":
        _write_csv(out, features, means, counts, raster.channels)
    else:
        _write_geojson(out, collection, means, counts)
    embedded = sum(m is not None for m in means)
    return ZonalReport(out=out, features=len(features), embedded=embedded, channels=raster.channels,
                       pixels=sum(counts), seconds=round(time.perf_counter() - start, 3),
                       extra={"regions_crs": described, "raster_crs": str(raster.crs), "tags": raster.tags})


def _rounded(mean: np.ndarray | None) -> list[float] | None:
    """float32 values as decimals of 9 significant digits, which read back to the same float32."""
    return None if mean is None else [float(f"{v:.9g}") for v in mean.astype(np.float32).tolist()]


def _write_geojson(out: Path, collection: dict[str, Any], means: list, counts: list[int]) -> None:
    features = []
    for feature, mean, count in zip(collection.get("features") or [], means, counts):
        properties = {**(feature.get("properties") or {}), "pixels": count, "embedding": _rounded(mean)}
        features.append({**feature, "properties": properties})
    written = {**collection, "features": features}
    atomic_write(out, lambda p: p.write_text(json.dumps(written) + "\n"))


def _write_csv(out: Path, features: list[dict], means: list, counts: list[int], channels: int) -> None:
    names: list[str] = []
    for feature in features:
        for key, value in (feature.get("properties") or {}).items():
            if key not in names and (value is None or isinstance(value, (str, int, float, bool))):
                names.append(key)
    reserved = {"feature", "pixels", *(f"e{k}" for k in range(channels))}
    columns = [n for n in names if n not in reserved]

    def write(path: Path) -> None:
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["feature", *columns, "pixels", *(f"e{k}" for k in range(channels))])
            for number, (feature, mean, count) in enumerate(zip(features, means, counts)):
                properties = feature.get("properties") or {}
                cells = ["" if properties.get(c) is None else properties.get(c) for c in columns]
                values = _rounded(mean) or [""] * channels
                writer.writerow([number, *cells, count, *values])

    atomic_write(out, write)
