"""EuroSAT-MS: Sentinel-2 land-cover classification, 13-band 64 x 64 GeoTIFF patches."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from skysense.config import S2_BANDS
from skysense.data.datasets.base import Item, SampleDataset, scalar
from skysense.data.rasters import read_stacked
from skysense.data.units import s2_to_model_units

FILE_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B9", "B10", "B11", "B12", "B8A")
"""Band order of the EuroSAT-MS GeoTIFFs (B8A last; checked on the files: band 13 tracks B8)."""

CLASSES = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
           "PermanentCrop", "Residential", "River", "SeaLake")


class EuroSATMS(SampleDataset):
    """EuroSAT multispectral (Helber et al. 2019): 27,000 Sentinel-2 patches in 10 classes.

    Source: https://github.com/phelber/EuroSAT (``EuroSAT_MS.zip``). Licence: MIT.

    Layout: ``<root>/EuroSAT_MS/<Class>/<Class>_<n>.tif`` (or ``<root>/<Class>/...``); each file
    64 x 64 px, 13 bands in the order ``FILE_BANDS``, uint16, georeferenced (UTM).

    Bands: Sentinel-2 **L1C** (top-of-atmosphere reflectance x 10000, acquired 2015-2017, before
    baseline 04.00: no offset). The model's 10 bands are selected; L1C is a domain shift for a
    model trained on L2A. ``label`` is the index in ``CLASSES``.

    Dates: EuroSAT publishes none. ``s2_dates`` is only set when ``day_of_year`` is given
    (required by configs that date-encode S2, e.g. ``huge``).

    Splits: no official split; every patch is ``"all"``.
    """

    name = "eurosat_ms"
    splits = ("all",)
    bands = {"s2": S2_BANDS}

    def __init__(self, root: str | Path, split: str | None = None, day_of_year: int | None = None,
                 skip_corrupt: bool = False) -> None:
        if day_of_year is not None and not 1 <= day_of_year <= 366:
            raise ValueError(f"{self.name}: day_of_year: expected 1..366, got {day_of_year}")
        self.day_of_year = day_of_year
        super().__init__(root, split, skip_corrupt)

    def _index(self) -> list[Item]:
        base = self.root / "EuroSAT_MS" if (self.root / "EuroSAT_MS").is_dir() else self.root
        items = []
        for cls in sorted(p.name for p in base.iterdir() if p.is_dir()):
            if cls not in CLASSES:
                raise ValueError(f"{self.name}: unknown class folder {base / cls}; expected one of {CLASSES}")
            files = sorted((base / cls).glob("*.tif"),
                           key=lambda p: int(m.group(1)) if (m := re.search(r"(\d+)$", p.stem)) else 0)
            for path in files:
                items.append(Item(f"{cls}/{path.stem}", "all", path, {"label": CLASSES.index(cls)}))
        if not items:
            raise FileNotFoundError(f"{self.name}: no <Class>/*.tif files under {base}")
        return items

    def _load(self, item: Item) -> dict[str, Any]:
        stack = read_stacked(item.path, FILE_BANDS, select=S2_BANDS)
        lat, lon = stack.center_latlon()
        sample: dict[str, Any] = {
            "s2": torch.from_numpy(s2_to_model_units(stack.data, "L1C", offset=0.0))[None],
            "s2_mask": torch.tensor([True]),
            "lat": scalar(lat),
            "lon": scalar(lon),
            "label": torch.tensor(item.extra["label"], dtype=torch.int64),
            "crs": stack.crs,
            "transform": stack.transform,
        }
        if self.day_of_year is not None:
            sample["s2_dates"] = torch.tensor([self.day_of_year], dtype=torch.int64)
        return sample
