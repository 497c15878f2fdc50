"""Remote-sensing data layer: raster reading, units, dates, the sample schema and datasets.

Modules (one idea each): :mod:`~skysense.data.rasters` (GeoTIFF bands by name, resampling,
masks, CRS), :mod:`~skysense.data.units` (raw values -> model units, ``normalize``),
:mod:`~skysense.data.dates` (acquisition dates), :mod:`~skysense.data.sample` (schema and
``collate``), :mod:`~skysense.data.datasets` (one class per dataset, ``DATASETS`` registry),
:mod:`~skysense.data.examples` (the BigEarthNet example patches shipped by ``bigearthnet-common``),
:mod:`~skysense.data.geojson` (a GeoJSON's CRS in and out), :mod:`~skysense.data.geojson_objects`
(objects drawn in a GIS as boxes) and :mod:`~skysense.data.geojson_regions` (regions drawn in a GIS
burnt into class masks).
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "SKYSENSE_DATA"
"""Environment variable naming the root of the real data (datasets in sub-folders)."""


def data_root(default: str | Path | None = None) -> Path | None:
    """``$SKYSENSE_DATA`` as a Path, else ``default`` (None when neither is set)."""
    value = os.environ.get(DATA_ENV)
    if value:
        return Path(value)
    return Path(default) if default is not None else None
