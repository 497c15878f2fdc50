"""Small GeoTIFF scenes written by the embedding tests (deterministic values, real CRSs)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.transform import from_origin

UTM = "EPSG:32631"
ORIGIN = (448000.0, 5412000.0)
"""Top-left corner of the fixtures on UTM zone 31N (near Paris), 10 m pixels."""
S2_DATES = (dt.date(2020, 1, 15), dt.date(2020, 7, 4))


def write_raster(path: Path, data: np.ndarray, transform: Affine, crs: str = UTM, nodata: float | None = None,
                 descriptions: tuple[str, ...] | None = None, **profile: object) -> Path:
    """Write (C, H, W) ``data`` as a GeoTIFF."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=data.dtype, crs=crs, transform=transform, nodata=nodata, **profile) as dst:
        dst.write(data)
        if descriptions:
            for i, name in enumerate(descriptions, start=1):
                dst.set_band_description(i, name)
    return path


def s2_values(height: int, width: int, seed: int) -> np.ndarray:
    """(10, H, W) uint16 reflectance-like values: smooth fields plus texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    bands = []
    for b in range(10):
        field = 1500 + 800 * np.sin(x / (7 + b) + seed) * np.cos(y / (9 + b))
        bands.append(field + rng.normal(0, 150, (height, width)))
    return np.clip(np.stack(bands), 1, 10000).astype(np.uint16)


def write_s2_series(folder: Path, height: int, width: int, nodata_box: tuple[int, int, int, int] | None = None,
                    **profile: object) -> list[Path]:
    """Two stacked 10-band S2 files (model band order, dates in the names) on the UTM fixture grid.

    ``nodata_box`` (row0, row1, col0, col1) is nodata (0) in both dates.
    """
    transform = from_origin(*ORIGIN, 10.0, 10.0)
    paths = []
    for i, date in enumerate(S2_DATES):
        data = s2_values(height, width, seed=i)
        if nodata_box is not None:
            r0, r1, c0, c1 = nodata_box
            data[:, r0:r1, c0:c1] = 0
        paths.append(write_raster(folder / f"S2_{date:%Y%m%d}.tif", data, transform, nodata=0, **profile))
    return paths


def s1_db(height: int, width: int) -> np.ndarray:
    """(2, H, W) float32 smooth VV/VH backscatter in dB."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    vv = -12 + 3 * np.sin(x / 11) + 2 * np.cos(y / 13)
    vh = -19 + 2 * np.cos(x / 9) * np.sin(y / 15)
    return np.stack([vv, vh]).astype(np.float32)
