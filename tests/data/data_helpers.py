"""Helpers of the data tests: small GeoTIFFs written on the fly, real-data paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

UTM33 = "EPSG:32633"


def write_geojson(path: Path, features: list[dict], crs: str | None = "urn:ogc:def:crs:EPSG::32631") -> Path:
    """A FeatureCollection of ``features`` with a ``crs`` member naming ``crs`` (None: no member,
    longitude / latitude)."""
    collection = {"type": "FeatureCollection", "features": features}
    if crs is not None:
        collection["crs"] = {"type": "name", "properties": {"name": crs}}
    path.write_text(json.dumps(collection))
    return path


def write_tif(path: Path, data: np.ndarray, res: float = 10.0, crs: str | None = UTM33,
              origin: tuple[float, float] = (400000.0, 5340000.0), nodata: float | None = None,
              descriptions: tuple[str, ...] | None = None) -> Path:
    """Write (C, H, W) or (H, W) ``data`` as a GeoTIFF on a north-up grid of ``res`` metres."""
    data = data[None] if data.ndim == 2 else data
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                   dtype=data.dtype, transform=from_origin(origin[0], origin[1], res, res))
    if crs is not None:
        profile["crs"] = crs
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if descriptions:
            for i, d in enumerate(descriptions, start=1):
                dst.set_band_description(i, d)
    return path


def write_s2_folder(folder: Path, prefix: str = "S2A_MSIL2A_20170613T101031_1_1", size: int = 12,
                    bands: tuple[str, ...] = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"),
                    crs: str = UTM33) -> dict[str, Path]:
    """A BigEarthNet-like one-file-per-band patch: 10 m bands ``size`` px, 20 m bands ``size/2`` px."""
    rng = np.random.default_rng(0)
    twenty = {"B05", "B06", "B07", "B8A", "B11", "B12"}
    paths = {}
    for band in bands:
        res = 20.0 if band in twenty else 10.0
        n = size // 2 if band in twenty else size
        data = rng.integers(100, 3000, size=(n, n)).astype(np.uint16)
        paths[band] = write_tif(folder / f"{prefix}_{band}.tif", data, res=res, crs=crs)
    return paths


def real_dataset_dir(root: Path, sub: str) -> Path:
    """``root / sub``; skips the test when it is not there."""
    path = root / sub
    if not path.is_dir():
        pytest.skip(f"real data {path} not present")
    return path
