"""Dataset classes (one per dataset, each a torch Dataset of sample dicts) and their registry."""

from __future__ import annotations

from skysense.data.datasets.aid import AID
from skysense.data.datasets.base import Item, SampleDataset
from skysense.data.datasets.bigearthnet import BigEarthNetV1, BigEarthNetV2
from skysense.data.datasets.eurosat import EuroSATMS
from skysense.data.datasets.levir_cd import LEVIRCD
from skysense.data.datasets.oscd import OSCD

DATASETS: dict[str, type[SampleDataset]] = {
    cls.name: cls for cls in (AID, OSCD, BigEarthNetV1, BigEarthNetV2, EuroSATMS, LEVIRCD)
}
"""Dataset name -> class."""

DEFAULT_SUBDIRS: dict[str, str] = {
    "aid": "aid",
    "oscd": "oscd",
    "bigearthnet_v2": "samples/bigearthnet_v2",
    "eurosat_ms": "samples/eurosat_ms",
    "levir_cd": "samples/levir_cd",
}
"""Where each dataset lies under ``$SKYSENSE_DATA`` (the project's real-data layout)."""

__all__ = ["DATASETS", "DEFAULT_SUBDIRS", "Item", "SampleDataset", "AID", "OSCD", "BigEarthNetV1",
           "BigEarthNetV2", "EuroSATMS", "LEVIRCD"]
