"""Prediction maps written as single-band GeoTIFFs, atomically.

A map gets the CRS and affine transform of the input it was predicted from when that input had
one (OSCD, Sen1Floods11, DynamicEarthNet, ...); otherwise (LEVIR-CD, LoveDA, ... are plain PNGs)
it is written without georeference. Values are class indices (uint8, or int16 when a class
index exceeds 255); ``nodata`` is not set because every pixel holds a prediction.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.errors import NotGeoreferencedWarning

from skysense.weights import atomic_write


def prediction_path(folder: str | Path, sample_id: str, suffix: str = "") -> Path:
    """``folder/<id>{suffix}.tif`` with any character other than letters, digits, ``-``, ``_``,
    ``.`` in the id replaced by ``_`` (ids such as ``train/Urban/12`` become one file name)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(sample_id)) or "sample"
    return Path(folder) / f"{safe}{suffix}.tif"


def write_prediction(path: str | Path, classes: torch.Tensor | np.ndarray, crs: Any = None,
                     transform: Any = None) -> Path:
    """Write an (H, W) class map to ``path`` (GeoTIFF, deflate), atomically; returns the path.

    Raises:
        ValueError: the map is not 2-D, or holds negative values.
    """
    array = classes.detach().cpu().numpy() if isinstance(classes, torch.Tensor) else np.asarray(classes)
    if array.ndim != 2:
        raise ValueError(f"{path}: prediction map: expected (H, W), got shape {array.shape}")
    if array.size and array.min() < 0:
        raise ValueError(f"{path}: prediction map: class indices must be >= 0, got {array.min()}")
    dtype = "uint8" if (not array.size or array.max() <= 255) else "int16"
    profile = {"driver": "GTiff", "height": array.shape[0], "width": array.shape[1], "count": 1, "dtype": dtype,
               "compress": "deflate"}
    if crs is not None:
        profile["crs"] = crs
    if transform is not None and crs is not None:
        profile["transform"] = transform

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(tmp, "w", **profile) as dst:
                dst.write(array.astype(dtype), 1)

    path = Path(path)
    atomic_write(path, write)
    return path
