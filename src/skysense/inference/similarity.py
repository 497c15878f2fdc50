"""Find more of what you outlined: cosine similarity of every pixel's embedding to examples.

:func:`similarity_map` takes an embedding raster written by ``skysense embed`` (GeoTIFF or Zarr)
and a GeoJSON of examples (a few polygons around solar farms, greenhouses or flooded fields, or
points on them; any CRS), averages each example's embedding (:mod:`skysense.inference.zonal`:
the mean over its pixels), and writes the cosine similarity of every pixel to the mean of the
examples, a map to threshold or rank:

* **Classes.** Examples with a ``class_key`` property (default ``class``) make one band per class,
  in order of first appearance (a nearest-prototype classifier: the band with the highest value
  is the nearest class); without it all examples make one band, ``examples``. Each example counts
  once, whatever its size.
* **Output.** A float32 GeoTIFF on the raster's grid (its CRS and transform), one band per class
  named after it, values in [-1, 1], NaN where the embedding is nodata; tiled, deflate, written
  tile by tile to a temporary file and renamed when complete.

* **Matches.** :func:`matches_map` keeps the pixels whose highest similarity reaches a
  threshold: a uint8 map of the most similar band (255 elsewhere) beside the similarity map,
  which :func:`~skysense.inference.polygons.class_map_polygons` turns into polygons to check in a
  GIS (``skysense similar --threshold 0.9``).

Errors name the example that has no embedding (outside the raster or on nodata only).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window
from tqdm.auto import tqdm

from skysense.data.geojson_regions import region_shapes
from skysense.inference.reports import JsonReport
from skysense.inference.zonal import TILE, EmbeddingRaster, pixel_window, region_mean
from skysense.weights import atomic_write

EXAMPLES = "examples"
"""The band name when the examples have no class."""


@dataclass
class SimilarityReport(JsonReport):
    """What :func:`similarity_map` wrote: the output, its bands (classes) with the examples of each,
    the size, each band's mean and largest similarity, and the time."""

    out: Path
    classes: list[str]
    examples: dict[str, int]
    height: int
    width: int
    mean: dict[str, float]
    maximum: dict[str, float]
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)



def _prototypes(raster: EmbeddingRaster, examples: Path, class_key: str) -> tuple[list[str], np.ndarray, dict]:
    """Unit-length mean example embedding per class, the class names and the examples per class."""
    found, transform, described = region_shapes(examples, raster.crs, raster.transform, (raster.height, raster.width))
    if not found:
        raise ValueError(f"{examples}: no example lies on the {raster.width} x {raster.height} px raster {raster.path}; "
                         f"is the collection's crs right? ({described})")
    by_class: dict[str, list[np.ndarray]] = {}
    for region, geometry in found:
        mean, _ = region_mean(raster, geometry, transform,
                              pixel_window(geometry, transform, raster.height, raster.width))
        if mean is None:
            raise ValueError(f"{examples}: feature {region.number}: no embedding under it (outside the raster or on "
                             "nodata only)")
        name = str(region.properties[class_key]) if class_key in region.properties else EXAMPLES
        by_class.setdefault(name, []).append(mean / max(np.linalg.norm(mean), 1e-12))
    classes = list(by_class)
    prototypes = np.stack([np.mean(by_class[c], axis=0) for c in classes])
    prototypes /= np.maximum(np.linalg.norm(prototypes, axis=1, keepdims=True), 1e-12)
    return classes, prototypes.astype(np.float32), {c: len(by_class[c]) for c in classes}


MATCH_NODATA = 255
"""Value of the matches map where no band reaches the threshold (or the embedding is nodata)."""


def matches_path(out: Path) -> Path:
    """``similarity.tif`` -> ``similarity.matches.tif``."""
    return out.with_name(out.stem + ".matches.tif")


def matches_map(similarity: str | Path, threshold: float, out: str | Path | None = None) -> dict[str, Any]:
    """Write the pixels of the similarity GeoTIFF ``similarity`` whose highest band reaches
    ``threshold`` as a uint8 map of that band's index (255 elsewhere), tagged with the band names,
    to ``out`` (default :func:`matches_path`); returns its path and the pixels matched per band."""
    similarity = Path(similarity)
    out = Path(out) if out is not None else matches_path(similarity)
    with rasterio.open(similarity) as src:
        names = list(src.descriptions)
        profile = dict(driver="GTiff", width=src.width, height=src.height, count=1, dtype="uint8",
                       nodata=MATCH_NODATA, crs=src.crs, transform=src.transform, tiled=True, blockxsize=TILE,
                       blockysize=TILE, compress="deflate")
        totals = np.zeros(src.count, dtype=np.int64)

        def write(tmp: Path) -> None:
            with rasterio.open(tmp, "w", **profile) as dst:
                for r in range(0, src.height, TILE):
                    for c in range(0, src.width, TILE):
                        window = Window(c, r, min(TILE, src.width - c), min(TILE, src.height - r))
                        scores = src.read(window=window)
                        finite = np.isfinite(scores).all(axis=0)
                        best = np.nan_to_num(scores, nan=-np.inf).argmax(axis=0)
                        hit = finite & (np.nan_to_num(scores, nan=-np.inf).max(axis=0) >= threshold)
                        labels = np.where(hit, best, MATCH_NODATA).astype(np.uint8)
                        totals[:] += np.bincount(best[hit], minlength=src.count)[:src.count]
                        dst.write(labels[None], window=window)
                dst.update_tags(skysense_classes=json.dumps(names), skysense_threshold=str(threshold))

        atomic_write(out, write)
    counts = {name: int(n) for name, n in zip(names, totals)}
    return {"matches_path": str(out), "threshold": threshold, "pixels_per_class": counts}


def similarity_map(embeddings: str | Path, examples: str | Path, out: str | Path, class_key: str = "class",
                   overwrite: bool = False, progress: bool = True) -> SimilarityReport:
    """Write the cosine similarity of every pixel of ``embeddings`` to the examples (module docstring).

    Args:
        embeddings: an embedding raster (``skysense embed``'s GeoTIFF or Zarr output).
        examples: a GeoJSON of example regions (Polygon / MultiPolygon / Point / MultiPoint).
        out: the similarity GeoTIFF.
        class_key: the property that groups examples into classes (one band each).
        overwrite: replace an existing ``out``.
        progress: show a progress bar over the tiles.

    Raises:
        ValueError: ``out`` exists without ``overwrite``, no example on the raster, or an example
            with no embedding (names the feature).
    """
    start = time.perf_counter()
    out = Path(out)
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    with EmbeddingRaster(embeddings) as raster:
        classes, prototypes, counts = _prototypes(raster, Path(examples), class_key)
        profile = dict(driver="GTiff", width=raster.width, height=raster.height, count=len(classes), dtype="float32",
                       nodata=float("nan"), crs=raster.crs, transform=raster.transform, tiled=True, blockxsize=TILE,
                       blockysize=TILE, compress="deflate", predictor=3)
        totals = np.zeros(len(classes))
        valid_pixels = 0
        maxima = np.full(len(classes), -np.inf)
        tiles = [(r, c) for r in range(0, raster.height, TILE) for c in range(0, raster.width, TILE)]

        def write(tmp: Path) -> None:
            nonlocal valid_pixels
            with rasterio.open(tmp, "w", **profile) as dst:
                for r, c in tqdm(tiles, unit="tile", desc=out.name, disable=not progress, dynamic_ncols=True):
                    window = Window(c, r, min(TILE, raster.width - c), min(TILE, raster.height - r))
                    data = raster.read(window)
                    flat = data.reshape(data.shape[0], -1)
                    norms = np.linalg.norm(flat, axis=0)
                    valid = np.isfinite(flat).all(axis=0) & (norms > 0)
                    scores = np.full((len(classes), flat.shape[1]), np.nan, dtype=np.float32)
                    scores[:, valid] = prototypes @ (flat[:, valid] / norms[valid])
                    if valid.any():
                        totals[:] += scores[:, valid].sum(axis=1, dtype=np.float64)
                        np.maximum(maxima, scores[:, valid].max(axis=1), out=maxima)
                        valid_pixels += int(valid.sum())
                    dst.write(scores.reshape(len(classes), *data.shape[1:]), window=window)
                for band, name in enumerate(classes, start=1):
                    dst.set_band_description(band, name)
                dst.update_tags(skysense_similarity_classes=json.dumps(classes),
                                skysense_embeddings=str(raster.path), skysense_examples=str(examples))

        atomic_write(out, write)
    means = totals / max(valid_pixels, 1)
    return SimilarityReport(out=out, classes=classes, examples=counts, height=raster.height, width=raster.width,
                            mean={c: round(float(m), 4) for c, m in zip(classes, means)},
                            maximum={c: round(float(m), 4) for c, m in zip(classes, maxima)},
                            seconds=round(time.perf_counter() - start, 3), extra={"valid_pixels": valid_pixels})
