"""SSL4EO-S12: seasonal Sentinel-1 / Sentinel-2 time series of 250k locations (self-supervised)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from skysense.config import S1_BANDS, S2_BANDS
from skysense.data.dates import date_from_name, day_of_year
from skysense.data.datasets.base import Item, SampleDataset, read_json, scalar
from skysense.data.rasters import RasterReadError, read_band_folder
from skysense.data.units import s2_to_model_units

PRODUCTS = {"s2_l2a": "s2a", "s2_l1c": "s2c", "s1": "s1"}
"""Modality name -> sub-folder of the release."""


def _acquisition_date(folder: Path, meta: dict[str, Any]) -> dt.date:
    """``system:time_start`` (ms since 1970, UTC) of the metadata, else the date in the folder name."""
    start = meta.get("system:time_start")
    if isinstance(start, (int, float)):
        return dt.datetime.fromtimestamp(start / 1000.0, tz=dt.timezone.utc).date()
    return date_from_name(folder)


class SSL4EOS12(SampleDataset):
    """SSL4EO-S12 (Wang et al. 2023): 251,079 locations x 4 seasons of S1 GRD, S2 L1C and S2 L2A.

    Source: https://github.com/zhu-xlab/SSL4EO-S12 (the GeoTIFF release). Licence: CC-BY-4.0.

    Layout::

        <root>/s1/<location id>/<S1 product id>/VV.tif, VH.tif, metadata.json
        <root>/s2a/<location id>/<date>_<date>_T<tile>/B1.tif ... B12.tif, metadata.json   (L2A, 12 bands)
        <root>/s2c/<location id>/<date>_<date>_T<tile>/B1.tif ... B12.tif, B10.tif, metadata.json (L1C, 13)

    One sample per location: every season of the chosen S2 product (``s2_level`` ``"L2A"``,
    default, or ``"L1C"``) as ``s2`` (T, 10, 264, 264) and every S1 season as ``s1`` (T', 2, ...),
    each sorted by date. Patches are 2.64 km (264 px at 10 m; 20 m bands 132 px and 60 m bands
    44 px are resampled bilinearly onto the B2 grid) in EPSG:4326. S1 patches keep their own
    footprint, resized to the S2 pixel count: as distributed, the S1 and S2 footprints of a
    location are offset by a few 10 m pixels (about 4 px on the sample site), which the release
    treats as co-located.

    Units: S2 DNs are reflectance x 10000; the DN offset of baseline >= 04.00 products (2022 on)
    is removed using ``PROCESSING_BASELINE`` of each ``metadata.json``. S1 is sigma0 in dB (Earth
    Engine ``COPERNICUS/S1_GRD``). Dates: ``system:time_start`` of each ``metadata.json``.

    Splits: none (pre-training data); every location is ``"all"``.
    """

    name = "ssl4eo_s12"
    splits = ("all",)
    bands = {"s2": S2_BANDS, "s1": S1_BANDS}

    def __init__(self, root: str | Path, split: str | None = None, s2_level: str = "L2A",
                 modalities: Sequence[str] = ("s2", "s1"), skip_corrupt: bool = False) -> None:
        if s2_level not in ("L2A", "L1C"):
            raise ValueError(f"{self.name}: s2_level: expected 'L2A' or 'L1C', got {s2_level!r}")
        if not modalities or set(modalities) - {"s2", "s1"}:
            raise ValueError(f"{self.name}: modalities: expected a non-empty subset of ('s2', 's1'), got {modalities}")
        self.s2_level = s2_level
        self.modalities = tuple(modalities)
        super().__init__(root, split, skip_corrupt)

    def _product_dir(self, modality: str) -> Path:
        key = "s1" if modality == "s1" else f"s2_{self.s2_level.lower()}"
        folder = self.root / PRODUCTS[key]
        if not folder.is_dir():
            raise FileNotFoundError(f"{self.name}: folder {folder} ({key}) does not exist")
        return folder

    def _index(self) -> list[Item]:
        lead = self._product_dir(self.modalities[0])
        items = [Item(p.name, "all", p) for p in sorted(lead.iterdir()) if p.is_dir()]
        if not items:
            raise FileNotFoundError(f"{self.name}: no location folders in {lead}")
        return items

    def _series(self, modality: str, location: str, bands: Sequence[str],
                shape: tuple[int, int] | None) -> tuple[list, list[dt.date], list[tuple[Path, dict[str, Any]]]]:
        folder = self._product_dir(modality) / location
        if not folder.is_dir():
            raise FileNotFoundError(f"{self.name}: {modality} folder {folder} does not exist (location {location})")
        frames = []
        for product in sorted(p for p in folder.iterdir() if p.is_dir()):
            meta = read_json(product / "metadata.json")
            frames.append((_acquisition_date(product, meta), product, meta))
        if not frames:
            raise FileNotFoundError(f"{self.name}: no acquisitions in {folder}")
        frames.sort(key=lambda f: f[0])
        stacks = []
        for _, product, _ in frames:  # every season onto the first one's grid size
            stack = read_band_folder(product, bands, reference=bands[0], out_shape=shape)
            if stacks and stack.crs != stacks[0].crs:
                raise RasterReadError(f"inconsistent CRS: {product} has {stack.crs}, expected {stacks[0].crs}")
            shape = shape or (stack.height, stack.width)
            stacks.append(stack)
        return stacks, [f[0] for f in frames], [(f[1], f[2]) for f in frames]

    def _load(self, item: Item) -> dict[str, Any]:
        sample: dict[str, Any] = {}
        shape = None
        if "s2" in self.modalities:
            stacks, dates, metas = self._series("s2", item.id, S2_BANDS, None)
            data = []
            for stack, (product, meta) in zip(stacks, metas):
                baseline = meta.get("PROCESSING_BASELINE")
                if not isinstance(baseline, str):
                    raise ValueError(f"{product / 'metadata.json'}: no PROCESSING_BASELINE (needed for the DN offset)")
                data.append(s2_to_model_units(stack.data, self.s2_level, processing_baseline=baseline))
            sample["s2"] = torch.from_numpy(np.stack(data))
            sample["s2_dates"] = torch.tensor([day_of_year(d) for d in dates], dtype=torch.int64)
            sample["s2_mask"] = torch.ones(len(dates), dtype=torch.bool)
            shape = (stacks[0].height, stacks[0].width)
            lat, lon = stacks[0].center_latlon()
            sample.update(crs=stacks[0].crs, transform=stacks[0].transform)
        if "s1" in self.modalities:
            stacks, dates, _ = self._series("s1", item.id, S1_BANDS, shape)
            if "crs" in sample and stacks[0].crs != sample["crs"]:
                raise RasterReadError(f"inconsistent CRS: {stacks[0].paths[0].parent} has {stacks[0].crs}, "
                                      f"expected {sample['crs']} (as the S2 frames)")
            sample["s1"] = torch.from_numpy(np.stack([s.data for s in stacks]))
            sample["s1_dates"] = torch.tensor([day_of_year(d) for d in dates], dtype=torch.int64)
            sample["s1_mask"] = torch.ones(len(dates), dtype=torch.bool)
            if shape is None:
                lat, lon = stacks[0].center_latlon()
                sample.update(crs=stacks[0].crs, transform=stacks[0].transform)
        sample["lat"], sample["lon"] = scalar(lat), scalar(lon)
        return sample
