"""DynamicEarthNet: daily Planet time series with monthly land-cover labels, plus S2 / S1 monthly composites."""

from __future__ import annotations

import calendar
import csv
import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from skysense.config import S1_BANDS, S2_BANDS
from skysense.data.dates import day_of_year
from skysense.data.datasets.base import Item, SampleDataset, scalar
from skysense.data.rasters import RasterReadError, read_image, read_stacked
from skysense.data.sample import IGNORE_INDEX
from skysense.data.units import s2_to_model_units

CLASSES = ("impervious_surface", "agriculture", "forest_and_other_vegetation", "wetlands", "soil", "water",
           "snow_and_ice")
PLANET_BANDS = ("B", "G", "R", "NIR")
"""Band order of the Planet Fusion ``PF-SR`` files (blue first, as read by the authors' loader)."""
S2_FILE_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12")
"""Assumed band order of the 12-band monthly Sentinel-2 composites (unverified)."""
DAYS = {"monthly": (1,), "weekly": (1, 5, 10, 15, 20, 25)}
COMPOSITE_DAY = 15
"""Day of month given to the monthly S2 / S1 composites (their exact compositing window is not used)."""


class DynamicEarthNet(SampleDataset):
    """DynamicEarthNet (Toker et al., CVPR 2022): 75 areas, daily Planet Fusion 2018-2019, monthly labels.

    Source: https://github.com/aysim/dynnet (data on mediaTUM). Licence: CC BY-SA 4.0 for the
    labels; Planet imagery under Planet's research licence (check before redistribution).

    Layout: **the TorchGeo redistribution** (``hf.co/datasets/torchgeo/dynamic_earthnet``),
    indexed by its ``splits.csv``::

        <root>/splits.csv   columns split, year_month (YYYY-MM), planet_path (folder of daily
                            files), label_path, s2_path, s1_path, missing_label, missing_s2, missing_s1
        <root>/<planet_path>/<YYYY-MM-DD>.tif   Planet Fusion surface reflectance x 10000, 4 bands
                                                B, G, R, NIR, 1024 x 1024 at 3 m
        <root>/<label_path>   7 bands, one per class of ``CLASSES``, 255 where the class holds
        <root>/<s2_path>      monthly S2 composite, 12 bands (order ``S2_FILE_BANDS`` assumed)
        <root>/<s1_path>      monthly S1 composite, 8 bands (meaning not documented)

    The mediaTUM folder layout is not indexed directly (write such a ``splits.csv`` for it).
    **Unverified on real files**: the S2 band order, the S2 level and DN offset (taken as L2A
    reflectance x 10000, no offset, 2018-2019), and which S1 bands are VV/VH and in which unit:
    S1 is only read when asked for (``modalities`` containing ``"s1"``) with explicit
    ``s1_band_indexes`` (0-based, VV then VH) and ``s1_in_db``.

    Sample (``task="segmentation"``, one per labelled month): ``planet`` (T, 4, H, W) R, G, B,
    NIR reflectance x 10000 of the month's days (``days``: ``"monthly"`` = day 1, the labelled
    day; ``"weekly"`` = days 1, 5, 10, 15, 20, 25; ``"daily"`` = every day), ``planet_dates``;
    ``hr`` (3, H, W) the day-1 R, G, B mapped to 0-255 by ``hr = 255 * reflectance /
    planet_hr_max`` clipped (Planet is not 8-bit imagery: a domain shift for the HR encoder);
    ``s2`` (1, 10, h, w) on the 15th; ``mask`` (H, W) int64 0..6, -1 where no class is set.

    ``task="change"`` (semantic change, one per pair of consecutive labelled months of an area):
    ``hr`` / ``hr_post``, ``planet`` of the first month, ``s2`` (2, ...), ``mask`` / ``mask_post``
    and ``change`` (H, W) int64 1 where the class differs, 0 where equal, -1 where either is
    unlabelled.

    Splits: the ``split`` column (``train``, ``val``, ``test``).
    """

    name = "dynamic_earthnet"
    splits = ("train", "val", "test")
    bands = {"s2": S2_BANDS, "s1": S1_BANDS}

    def __init__(self, root: str | Path, split: str | None = None, task: str = "segmentation",
                 days: str = "monthly", modalities: Sequence[str] = ("s2",),
                 s1_band_indexes: tuple[int, int] | None = None, s1_in_db: bool | None = None,
                 planet_hr_max: float = 3000.0, skip_corrupt: bool = False) -> None:
        if task not in ("segmentation", "change"):
            raise ValueError(f"{self.name}: task: expected 'segmentation' or 'change', got {task!r}")
        if days not in ("monthly", "weekly", "daily"):
            raise ValueError(f"{self.name}: days: expected 'monthly', 'weekly' or 'daily', got {days!r}")
        if set(modalities) - {"s2", "s1"}:
            raise ValueError(f"{self.name}: modalities: expected a subset of ('s2', 's1'), got {modalities}")
        if "s1" in modalities and (s1_band_indexes is None or s1_in_db is None):
            raise ValueError(f"{self.name}: reading S1 needs s1_band_indexes (VV, VH) and s1_in_db: the band "
                             "meaning of the 8-band S1 composites is not documented")
        self.task, self.days, self.modalities = task, days, tuple(modalities)
        self.s1_band_indexes, self.s1_in_db, self.planet_hr_max = s1_band_indexes, s1_in_db, planet_hr_max
        super().__init__(root, split, skip_corrupt)

    def _index(self) -> list[Item]:
        path = self.root / "splits.csv"
        if not path.is_file():
            raise FileNotFoundError(f"{self.name}: index {path} does not exist")
        rows = []
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            missing = {"split", "year_month", "planet_path", "label_path"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{self.name}: {path}: missing columns {sorted(missing)}")
            for number, row in enumerate(reader, start=2):
                if str(row.get("missing_label", "")).strip().lower() in ("true", "1"):
                    continue
                if any(str(row.get(f"missing_{m}", "")).strip().lower() in ("true", "1") for m in self.modalities):
                    continue
                try:
                    month = dt.datetime.strptime(row["year_month"].strip()[:7], "%Y-%m").date()
                except ValueError:
                    raise ValueError(f"{self.name}: {path}: line {number}: year_month {row['year_month']!r}: "
                                     "expected YYYY-MM") from None
                rows.append((row["split"].strip(), month, row))
        rows.sort(key=lambda r: (r[2]["planet_path"], r[1]))
        items = []
        if self.task == "segmentation":
            for split, month, row in rows:
                items.append(Item(f"{row['planet_path']}@{month:%Y-%m}", split, self.root / row["planet_path"],
                                  {"months": [(month, row)]}))
        else:
            for (split, month, row), (_, month2, row2) in zip(rows, rows[1:]):
                consecutive = (month2.year * 12 + month2.month) - (month.year * 12 + month.month) == 1
                if row2["planet_path"] == row["planet_path"] and consecutive:
                    items.append(Item(f"{row['planet_path']}@{month:%Y-%m}", split, self.root / row["planet_path"],
                                      {"months": [(month, row), (month2, row2)]}))
        return items

    def _day_list(self, month: dt.date) -> list[int]:
        if self.days == "daily":
            return list(range(1, calendar.monthrange(month.year, month.month)[1] + 1))
        return list(DAYS[self.days])

    def _label(self, path: Path, shape: tuple[int, int]) -> np.ndarray:
        data, _ = read_image(path, expected_bands=len(CLASSES))
        if data.shape[-2:] != shape:
            raise RasterReadError(f"{path}: size {data.shape[-2:]} differs from its Planet images {shape}")
        values = set(np.unique(data).tolist())
        if not values <= {0, 255}:
            raise ValueError(f"{path}: one-hot label values {sorted(values)}; expected 0 and 255")
        hot = data == 255
        mask = np.argmax(hot, axis=0).astype(np.int64)
        mask[~hot.any(axis=0)] = IGNORE_INDEX
        return mask

    def _load(self, item: Item) -> dict[str, Any]:
        sample: dict[str, Any] = {}
        s2_frames, s2_dates, s1_frames, s1_dates, masks, hrs = [], [], [], [], [], []
        for k, (month, row) in enumerate(item.extra["months"]):
            folder = self.root / row["planet_path"]
            days = self._day_list(month) if k == 0 else [1]
            planet = []
            for day in days:
                path = folder / f"{month:%Y-%m}-{day:02d}.tif"
                stack = read_stacked(path, PLANET_BANDS, select=("R", "G", "B", "NIR"))
                if planet and stack.data.shape != planet[0].shape:
                    raise RasterReadError(f"{path}: size {stack.data.shape[-2:]} differs from day 1 {planet[0].shape[-2:]}")
                planet.append(stack.data)
                if day == days[0]:
                    first = stack
            hrs.append(np.clip(planet[0][:3] * (255.0 / self.planet_hr_max), 0.0, 255.0).astype(np.float32))
            if k == 0:
                sample["planet"] = torch.from_numpy(np.stack(planet))
                sample["planet_dates"] = torch.tensor([day_of_year(month.replace(day=d)) for d in days],
                                                      dtype=torch.int64)
                lat, lon = first.center_latlon()
                sample.update(lat=scalar(lat), lon=scalar(lon), crs=first.crs, transform=first.transform)
            masks.append(self._label(self.root / row["label_path"], (first.height, first.width)))
            mid = day_of_year(month.replace(day=COMPOSITE_DAY))
            if "s2" in self.modalities:
                s2 = read_stacked(self.root / row["s2_path"], S2_FILE_BANDS, select=S2_BANDS)
                s2_frames.append(s2_to_model_units(s2.data, "L2A", offset=0.0))
                s2_dates.append(mid)
            if "s1" in self.modalities:
                s1_path = self.root / row["s1_path"]
                data, _ = read_image(s1_path)
                if max(self.s1_band_indexes) >= data.shape[0]:
                    raise RasterReadError(f"{s1_path}: {data.shape[0]} bands, no band index {max(self.s1_band_indexes)}")
                s1 = data[list(self.s1_band_indexes)].astype(np.float32)
                if not self.s1_in_db:
                    s1 = (10.0 * np.log10(np.maximum(s1, 1e-10))).astype(np.float32)
                s1_frames.append(s1)
                s1_dates.append(mid)
        sample["hr"] = torch.from_numpy(hrs[0])
        sample["mask"] = torch.from_numpy(masks[0])
        if self.task == "change":
            sample["hr_post"] = torch.from_numpy(hrs[1])
            sample["mask_post"] = torch.from_numpy(masks[1])
            change = (masks[0] != masks[1]).astype(np.int64)
            change[(masks[0] == IGNORE_INDEX) | (masks[1] == IGNORE_INDEX)] = IGNORE_INDEX
            sample["change"] = torch.from_numpy(change)
        for key, frames, dates in (("s2", s2_frames, s2_dates), ("s1", s1_frames, s1_dates)):
            if frames:
                sample[key] = torch.from_numpy(np.stack(frames))
                sample[f"{key}_dates"] = torch.tensor(dates, dtype=torch.int64)
                sample[f"{key}_mask"] = torch.ones(len(dates), dtype=torch.bool)
        return sample
