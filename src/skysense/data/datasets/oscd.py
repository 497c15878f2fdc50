"""OSCD: Onera Satellite Change Detection, Sentinel-2 L1C image pairs of 24 cities."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from skysense.config import S2_BANDS
from skysense.data.dates import day_of_year, read_dates_txt
from skysense.data.datasets.base import Item, SampleDataset, scalar
from skysense.data.rasters import RasterReadError, read_band_folder, read_image
from skysense.data.units import s2_to_model_units

TRAIN_CITIES = ("abudhabi", "aguasclaras", "beihai", "bercy", "bordeaux", "hongkong", "mumbai", "nantes")
TEST_CITIES = ("paris", "pisa", "rennes", "saclay_e")
"""The project's fixed split of the labelled cities (``$SKYSENSE_DATA/README.md``)."""


class OSCD(SampleDataset):
    """OSCD (Caye Daudt et al., IGARSS 2018): urban change between two Sentinel-2 dates.

    Source: https://rcdaudt.github.io/oscd/ . Licence: Sentinel data Copernicus open; change
    labels CC BY-NC-SA.

    Layout (original)::

        <root>/images/<city>/imgs_1/*_B01.tif ... *_B12.tif, *_B8A.tif   (date 1, 13 bands)
        <root>/images/<city>/imgs_2/...                                  (date 2)
        <root>/images/<city>/dates.txt      ("date_1: YYYYMMDD", "date_2: YYYYMMDD")
        <root>/labels/<city>/cm/<city>-cm.tif   (1 = no change, 2 = change; the README's
                                                 "0/1" is wrong for these files) and cm.png (0/255)

    Bands: Sentinel-2 **L1C** (TOA reflectance x 10000, 2015-2018, no DN offset), each at its
    native 10/20/60 m size in EPSG:4326. The model's 10 bands are read and resampled
    (bilinear) onto the date-1 B2 grid; date 2 is read onto the same grid (some cities' date-2
    rasters are a few pixels smaller over the same footprint). Dates come from ``dates.txt``:
    the ``S2A_OPER`` file names carry the processing date, not the acquisition date.

    Sample: ``s2`` (2, 10, H, W) whole city scene, ``s2_dates`` (2,), ``s2_mask`` (2,),
    ``mask`` (H, W) int64 0/1 change, ``lat``/``lon``, ``crs``, ``transform``. Scenes are
    300-900 px per side; crop them for training.

    Splits: ``train`` = ``TRAIN_CITIES``, ``test`` = ``TEST_CITIES``; other cities found are
    ``"unlisted"``.
    """

    name = "oscd"
    splits = ("train", "test", "unlisted")
    bands = {"s2": S2_BANDS}

    def _index(self) -> list[Item]:
        images = self.root / "images"
        if not images.is_dir():
            raise FileNotFoundError(f"{self.name}: folder {images} does not exist")
        items = []
        for city in sorted(p for p in images.iterdir() if p.is_dir()):
            split = "train" if city.name in TRAIN_CITIES else "test" if city.name in TEST_CITIES else "unlisted"
            items.append(Item(city.name, split, city))
        return items

    def _load(self, item: Item) -> dict[str, Any]:
        dates = read_dates_txt(item.path / "dates.txt")
        if len(dates) != 2:
            raise ValueError(f"{item.path / 'dates.txt'}: expected 2 dates, got {len(dates)}")
        first = read_band_folder(item.path / "imgs_1", S2_BANDS, reference="B2")
        second = read_band_folder(item.path / "imgs_2", S2_BANDS, reference="B2",
                                  out_shape=(first.height, first.width))
        if second.crs != first.crs:
            raise RasterReadError(
                f"inconsistent CRS: {item.path / 'imgs_2'} has {second.crs}, expected {first.crs} (as imgs_1)"
            )
        label_path = self.root / "labels" / item.id / "cm" / f"{item.id}-cm.tif"
        if not label_path.is_file():
            raise FileNotFoundError(f"{self.name}: change mask {label_path} does not exist (city {item.id})")
        label, _ = read_image(label_path, expected_bands=1)
        label = label[0]
        if label.shape != (first.height, first.width):
            raise RasterReadError(
                f"{label_path}: size {label.shape} differs from the date-1 10 m grid {(first.height, first.width)}"
            )
        values = set(np.unique(label).tolist())
        if values <= {0, 1}:
            change = label.astype(np.int64)
        elif values <= {1, 2}:
            change = (label == 2).astype(np.int64)
        else:
            raise ValueError(f"{label_path}: change mask values {sorted(values)}; expected 1/2 (or 0/1)")
        lat, lon = first.center_latlon()
        s2 = np.stack([first.data, second.data])
        return {
            "s2": torch.from_numpy(s2_to_model_units(s2, "L1C", offset=0.0)),
            "s2_dates": torch.tensor([day_of_year(d) for d in dates], dtype=torch.int64),
            "s2_mask": torch.tensor([True, True]),
            "mask": torch.from_numpy(change),
            "lat": scalar(lat),
            "lon": scalar(lon),
            "crs": first.crs,
            "transform": first.transform,
        }
