"""Sen1Floods11: flood water segmentation on co-registered Sentinel-1 / Sentinel-2 chips."""

from __future__ import annotations

import csv
import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from skysense.config import S1_BANDS, S2_BANDS
from skysense.data.dates import day_of_year, parse_date
from skysense.data.datasets.base import Item, SampleDataset, scalar
from skysense.data.rasters import RasterReadError, read_image, read_stacked
from skysense.data.sample import IGNORE_INDEX
from skysense.data.units import s2_to_model_units

S2_FILE_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
"""Band order of the ``S2Hand`` chips (the band descriptions of the files say so)."""

EVENT_DATES: dict[str, tuple[dt.date, dt.date]] = {
    "Bolivia": (dt.date(2018, 2, 15), dt.date(2018, 2, 15)),
    "Colombia": (dt.date(2018, 8, 22), dt.date(2018, 8, 23)),
    "Ghana": (dt.date(2018, 9, 18), dt.date(2018, 9, 19)),
    "India": (dt.date(2016, 8, 12), dt.date(2016, 8, 12)),
    "Cambodia": (dt.date(2018, 8, 5), dt.date(2018, 8, 4)),
    "Nigeria": (dt.date(2018, 9, 21), dt.date(2018, 9, 20)),
    "Pakistan": (dt.date(2017, 6, 28), dt.date(2017, 6, 28)),
    "Paraguay": (dt.date(2018, 10, 31), dt.date(2018, 10, 31)),
    "Somalia": (dt.date(2018, 5, 7), dt.date(2018, 5, 5)),
    "Spain": (dt.date(2019, 9, 17), dt.date(2019, 9, 18)),
    "Sri-Lanka": (dt.date(2017, 5, 30), dt.date(2017, 5, 28)),
    "USA": (dt.date(2019, 5, 22), dt.date(2019, 5, 22)),
}
"""Flood event -> (S1 date, S2 date), from ``Sen1Floods11_Metadata.geojson`` of the authors'
repository (fields ``location``, ``s1_date``, ``s2_date``)."""

EVENT_ALIASES = {"Mekong": "Cambodia"}
"""Chip-name prefixes that differ from the metadata ``location`` (unverified on the full set:
the Cambodian chips are believed to be named ``Mekong_<id>``)."""

SPLIT_FILES = {"train": "flood_train_data.csv", "val": "flood_valid_data.csv", "test": "flood_test_data.csv",
               "bolivia": "flood_bolivia_data.csv"}


class Sen1Floods11(SampleDataset):
    """Sen1Floods11 (Bonafilia et al., CVPR-W 2020): 446 hand-labelled 512 x 512 flood chips, 11 events.

    Source: https://github.com/cloudtostreet/Sen1Floods11 (bucket ``gs://sen1floods11``, ``v1.1``).
    Licence: CC-BY-4.0.

    Layout (either)::

        <root>/S1Hand/<Event>_<id>_S1Hand.tif, S2Hand/..._S2Hand.tif, LabelHand/..._LabelHand.tif
              (v1.1/data/flood_events/HandLabeled, the release)
        <root>/S1/<Event>_<id>_S1Hand.tif, S2/..._S2Hand.tif, Labels/..._LabelHand.tif
              (the ``sample/`` folder of the repository)
        <root>/splits/flood_handlabeled/flood_{train,valid,test,bolivia}_data.csv  (optional; rows
              ``<Event>_<id>_S1Hand.tif,<Event>_<id>_LabelHand.tif``; also looked for in <root>)
        <root>/Sen1Floods11_Metadata.geojson   (optional; overrides ``EVENT_DATES``)

    Bands: S1 VV, VH backscatter already in **dB** (float32, NaN = nodata); S2 **L1C**, 13 bands
    ``S2_FILE_BANDS`` int16, TOA reflectance x 10000 (2016-2019 products: no DN offset), 0 =
    nodata; the model's 10 bands are selected. All on one ~10 m EPSG:4326 grid. ``s2_mask`` and
    ``s1_mask`` stay True: per-pixel nodata is in ``valid_s2`` / ``valid_s1`` (H, W) bool.

    Labels: ``LabelHand`` -1 = nodata, 0 = not water, 1 = water; ``mask`` (H, W) int64 keeps
    -1 as ``IGNORE_INDEX``.

    Dates: the chips carry none; S1 and S2 dates are per flood event (``EVENT_DATES``). A chip of an
    unknown event raises a ValueError naming its file.

    Splits: ``train``/``val``/``test`` (and ``bolivia``, the held-out event) from the official CSVs
    when present; otherwise every chip is ``"unlisted"``.
    """

    name = "sen1floods11"
    splits = ("train", "val", "test", "bolivia", "unlisted")
    bands = {"s2": S2_BANDS, "s1": S1_BANDS}

    def _folder(self, *names: str) -> Path:
        for name in names:
            if (self.root / name).is_dir():
                return self.root / name
        raise FileNotFoundError(f"{self.name}: none of the folders {names} exists in {self.root}")

    def _index(self) -> list[Item]:
        s1_dir = self._folder("S1Hand", "S1")
        self.s2_dir = self._folder("S2Hand", "S2")
        self.label_dir = self._folder("LabelHand", "Labels")
        self.event_dates = dict(EVENT_DATES)
        meta = self.root / "Sen1Floods11_Metadata.geojson"
        if meta.is_file():
            self.event_dates.update(_read_event_dates(meta))
        split_of: dict[str, str] = {}
        for split, filename in SPLIT_FILES.items():
            for folder in (self.root / "splits" / "flood_handlabeled", self.root):
                path = folder / filename
                if path.is_file():
                    with path.open(newline="") as handle:
                        for row in csv.reader(handle):
                            if row and row[0].strip():
                                split_of.setdefault(_chip_id(row[0].strip()), split)
                    break
        items = []
        for path in sorted(s1_dir.glob("*_S1Hand.tif")):
            chip = _chip_id(path.name)
            items.append(Item(chip, split_of.get(chip, "unlisted"), path))
        if not items:
            raise FileNotFoundError(f"{self.name}: no *_S1Hand.tif chips in {s1_dir}")
        return items

    def _load(self, item: Item) -> dict[str, Any]:
        event = item.id.rsplit("_", 1)[0]
        dates = self.event_dates.get(EVENT_ALIASES.get(event, event))
        if dates is None:
            raise ValueError(f"{self.name}: {item.path}: unknown flood event {event!r}, no S1/S2 dates; "
                             f"known events: {sorted(self.event_dates)}")
        s1 = read_stacked(item.path, S1_BANDS)
        s2_path = self.s2_dir / f"{item.id}_S2Hand.tif"
        s2 = read_stacked(s2_path, S2_FILE_BANDS, select=S2_BANDS)
        label_path = self.label_dir / f"{item.id}_LabelHand.tif"
        if not label_path.is_file():
            raise FileNotFoundError(f"{self.name}: label {label_path} does not exist (chip {item.id})")
        label, _ = read_image(label_path, expected_bands=1)
        for path, shape in ((s2_path, s2.data.shape[-2:]), (label_path, label.shape[-2:])):
            if tuple(shape) != (s1.height, s1.width):
                raise RasterReadError(f"{path}: size {tuple(shape)} differs from {item.path} {(s1.height, s1.width)}")
        values = set(np.unique(label).tolist())
        if not values <= {-1, 0, 1}:
            raise ValueError(f"{label_path}: label values {sorted(values)}; expected -1 (nodata), 0, 1")
        mask = label[0].astype(np.int64)
        mask[mask == -1] = IGNORE_INDEX
        s1_data = np.where(s1.valid[None], s1.data, 0.0).astype(np.float32)  # NaN nodata -> 0 dB, flagged
        lat, lon = s2.center_latlon()
        return {
            "s2": torch.from_numpy(s2_to_model_units(s2.data, "L1C", offset=0.0))[None],
            "s2_dates": torch.tensor([day_of_year(dates[1])], dtype=torch.int64),
            "s2_mask": torch.tensor([True]),
            "s1": torch.from_numpy(s1_data)[None],
            "s1_dates": torch.tensor([day_of_year(dates[0])], dtype=torch.int64),
            "s1_mask": torch.tensor([True]),
            "valid_s2": torch.from_numpy(s2.valid),
            "valid_s1": torch.from_numpy(s1.valid),
            "mask": torch.from_numpy(mask),
            "lat": scalar(lat),
            "lon": scalar(lon),
            "crs": s2.crs,
            "transform": s2.transform,
        }


def _chip_id(name: str) -> str:
    """``Spain_7370579_S1Hand.tif`` -> ``Spain_7370579``."""
    stem = Path(name).name.split(".")[0]
    return stem.rsplit("_", 1)[0]


def _read_event_dates(path: Path) -> dict[str, tuple[dt.date, dt.date]]:
    try:
        features = json.loads(path.read_text())["features"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a GeoJSON FeatureCollection ({error})") from None
    dates = {}
    for feature in features:
        props = feature.get("properties", {})
        s1 = parse_date(str(props.get("s1_date", "")).replace("/", "-"))
        s2 = parse_date(str(props.get("s2_date", "")).replace("/", "-"))
        if props.get("location") and s1 and s2:
            dates[str(props["location"])] = (s1, s2)
    return dates
