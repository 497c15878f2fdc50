"""Dataset classes (one per dataset, each a torch Dataset of sample dicts) and their registry."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from skysense.config import HR_BANDS
from skysense.data import DATA_ENV, data_root

from skysense.data.datasets.aid import AID
from skysense.data.datasets.base import Item, SampleDataset
from skysense.data.datasets.bigearthnet import BigEarthNetMM, BigEarthNetV1, BigEarthNetV2
from skysense.data.datasets.detection import DIOR, DIORR, DOTA, FAIR1M
from skysense.data.datasets.dsifn import DSIFN
from skysense.data.datasets.dynamic_earthnet import DynamicEarthNet
from skysense.data.datasets.eurosat import EuroSATMS
from skysense.data.datasets.fmow import FMoWSentinel
from skysense.data.datasets.isprs import Potsdam, Vaihingen
from skysense.data.datasets.levir_cd import LEVIRCD
from skysense.data.datasets.manifest import ManifestDataset
from skysense.data.datasets.oscd import OSCD
from skysense.data.datasets.resisc45 import RESISC45
from skysense.data.datasets.segmentation import ISAID, LoveDA
from skysense.data.datasets.sen1floods11 import Sen1Floods11
from skysense.data.datasets.ssl4eo import SSL4EOS12

DATASETS: dict[str, type[SampleDataset]] = {
    cls.name: cls
    for cls in (AID, OSCD, BigEarthNetV1, BigEarthNetV2, BigEarthNetMM, EuroSATMS, LEVIRCD, Sen1Floods11, SSL4EOS12,
                LoveDA, Potsdam, Vaihingen, ISAID, DOTA, DIOR, DIORR, FAIR1M, DSIFN, RESISC45, FMoWSentinel,
                DynamicEarthNet, ManifestDataset)
}
"""Dataset name -> class."""

DEFAULT_SUBDIRS: dict[str, str] = {
    "aid": "aid",
    "oscd": "oscd",
    "bigearthnet_v2": "samples/bigearthnet_v2",
    "eurosat_ms": "samples/eurosat_ms",
    "levir_cd": "samples/levir_cd",
    "sen1floods11": "samples/sen1floods11",
    "ssl4eo_s12": "samples/ssl4eo_s12",
    "loveda": "samples/loveda",
    "potsdam": "samples/potsdam",
    "vaihingen": "samples/vaihingen",
    "dota": "samples/dota",
    "dsifn": "samples/dsifn",
}
"""Where each dataset lies under ``$SKYSENSE_DATA`` (the project's real-data layout)."""


def reads_hr_bands(name: str) -> bool:
    """Whether dataset ``name`` takes an ``hr_bands`` option (reads HR bands other than R, G, B)."""
    return "hr_bands" in inspect.signature(DATASETS[name]).parameters


def options_with_hr_bands(name: str, options: dict[str, Any] | None, bands: tuple[str, ...]) -> dict[str, Any]:
    """The options of dataset ``name`` with ``hr_bands`` set to a model's HR ``bands`` when they are
    not R, G, B, the options do not set them and the dataset reads other bands."""
    options = dict(options or {})
    if tuple(bands) != HR_BANDS and "hr_bands" not in options and reads_hr_bands(name):
        options["hr_bands"] = list(bands)
    return options


def dataset_root(name: str, given: str | Path | None = None) -> Path:
    """``given``, else ``$SKYSENSE_DATA/<DEFAULT_SUBDIRS[name]>``; an error says what to pass."""
    if given is not None:
        return Path(given)
    base = data_root()
    if base is None or name not in DEFAULT_SUBDIRS:
        raise ValueError(f"{name}: no data root: pass --data-root (or set {DATA_ENV})")
    return base / DEFAULT_SUBDIRS[name]

__all__ = ["DATASETS", "DEFAULT_SUBDIRS", "dataset_root", "reads_hr_bands", "options_with_hr_bands", "Item",
           "SampleDataset", "AID", "OSCD", "BigEarthNetV1",
           "BigEarthNetV2", "BigEarthNetMM", "EuroSATMS", "LEVIRCD", "Sen1Floods11", "SSL4EOS12", "LoveDA",
           "Potsdam", "Vaihingen", "ISAID", "DOTA", "DIOR", "DIORR", "FAIR1M", "DSIFN", "RESISC45", "FMoWSentinel",
           "DynamicEarthNet", "ManifestDataset"]
