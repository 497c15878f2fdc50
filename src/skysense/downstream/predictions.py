"""Predictions written atomically: class maps as single-band GeoTIFFs, detections as JSON.

A map gets the CRS and affine transform of the input it was predicted from when that input had
one (OSCD, Sen1Floods11, DynamicEarthNet, ...); otherwise (LEVIR-CD, LoveDA, ... are plain PNGs)
it is written without georeference. Values are class indices (uint8, or int16 when a class
index exceeds 255); ``nodata`` is not set because every pixel holds a prediction.

Detections (:func:`write_detections`) go to ``<id>.json``: boxes in pixels of the image
(x0, y0, x1, y1; oriented: cx, cy, w, h, angle and the four ``corners``), scores, class indices
and names; with a georeferenced input also its CRS and each box's bounds (oriented: corners) in
that CRS.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.errors import NotGeoreferencedWarning

from skysense.weights import atomic_write


def prediction_path(folder: str | Path, sample_id: str, suffix: str = "", extension: str = ".tif") -> Path:
    """``folder/<id>{suffix}{extension}`` with any character other than letters, digits, ``-``,
    ``_``, ``.`` in the id replaced by ``_`` (ids such as ``train/Urban/12`` become one file name)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(sample_id)) or "sample"
    return Path(folder) / f"{safe}{suffix}{extension}"


def write_detections(path: str | Path, detections: Mapping[str, torch.Tensor], class_names: Sequence[str] = (),
                     crs: Any = None, transform: Any = None) -> Path:
    """Write one image's detections (``boxes``, ``scores``, ``labels``, optional ``corners``) to
    ``path`` as JSON, atomically."""
    boxes = detections["boxes"].detach().float().cpu()
    labels = detections["labels"].detach().cpu().tolist()
    record: dict[str, Any] = {
        "boxes": [[round(v, 4) for v in box] for box in boxes.tolist()],
        "scores": [round(v, 5) for v in detections["scores"].detach().float().cpu().tolist()],
        "labels": labels,
        "classes": [class_names[k] if k < len(class_names) else str(k) for k in labels],
    }
    corners = detections.get("corners")
    if corners is not None:
        record["corners"] = [[round(v, 2) for v in quad] for quad in corners.detach().float().cpu().tolist()]
    if crs is not None and transform is not None:
        if corners is None:
            quads = [[x0, y0, x1, y0, x1, y1, x0, y1] for x0, y0, x1, y1 in boxes.tolist()]
        else:
            quads = corners.detach().double().cpu().tolist()
        record["crs"] = str(crs)
        mapped = [[v for k in range(4) for v in transform * (quad[2 * k], quad[2 * k + 1])] for quad in quads]
        if corners is None:
            record["bounds"] = [[min(q[0::2]), min(q[1::2]), max(q[0::2]), max(q[1::2])] for q in mapped]
        else:
            record["corners_crs"] = mapped
    path = Path(path)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(record) + "\n"))
    return path


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
