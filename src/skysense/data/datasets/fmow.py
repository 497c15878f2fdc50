"""fMoW-Sentinel: Sentinel-2 time series of the Functional Map of the World locations (62 classes)."""

from __future__ import annotations

import csv
import datetime as dt
import re
from collections import defaultdict
from typing import Any

import numpy as np
import torch

from skysense.config import S2_BANDS
from skysense.data.dates import day_of_year
from skysense.data.datasets.base import Item, SampleDataset, scalar
from skysense.data.rasters import read_stacked
from skysense.data.units import s2_to_model_units

FILE_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
"""Band order of the GeoTIFFs: the 13 Sentinel-2 bands by increasing wavelength (the authors'
README lists them as "B1 ... B7, B8A, B8B, B9 ...", read here as B8 then B8A)."""

CATEGORIES = (
    "airport", "airport_hangar", "airport_terminal", "amusement_park", "aquaculture", "archaeological_site", "barn",
    "border_checkpoint", "burial_site", "car_dealership", "construction_site", "crop_field", "dam",
    "debris_or_rubble", "educational_institution", "electric_substation", "factory_or_powerplant", "fire_station",
    "flooded_road", "fountain", "gas_station", "golf_course", "ground_transportation_station", "helipad",
    "hospital", "impoverished_settlement", "interchange", "lake_or_pond", "lighthouse", "military_facility",
    "multi-unit_residential", "nuclear_powerplant", "office_building", "oil_or_gas_facility", "park",
    "parking_lot_or_garage", "place_of_worship", "police_station", "port", "prison", "race_track", "railway_bridge",
    "recreational_facility", "road_bridge", "runway", "shipyard", "shopping_mall", "single-unit_residential",
    "smokestack", "solar_farm", "space_facility", "stadium", "storage_tank", "surface_mine", "swimming_pool",
    "toll_booth", "tower", "tunnel_opening", "waste_disposal", "water_treatment_facility", "wind_farm", "zoo",
)
"""The 62 fMoW categories, sorted (``label`` is the index)."""

CSV_SPLITS = {"train": "train.csv", "val": "val.csv", "test": "test_gt.csv"}
IMAGE_FOLDERS = {"train": ("train",), "val": ("val",), "test": ("test_gt", "test")}


def _timestamp(text: str, where: str) -> dt.date:
    try:
        return dt.datetime.strptime(text.strip(), "%Y-%m-%dT%H:%M:%SZ").date()
    except ValueError:
        raise ValueError(f"{where}: timestamp {text!r}: expected YYYY-MM-DDThh:mm:ssZ") from None


def _polygon_center(text: str) -> tuple[float, float] | None:
    """(lat, lon) mean of the vertices of a WKT ``POLYGON ((lon lat, ...))``, or None."""
    numbers = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", text or "")]
    if len(numbers) < 6 or len(numbers) % 2:
        return None
    lons, lats = numbers[0::2], numbers[1::2]
    if len(lons) > 3 and lons[0] == lons[-1] and lats[0] == lats[-1]:
        lons, lats = lons[:-1], lats[:-1]
    return sum(lats) / len(lats), sum(lons) / len(lons)


class FMoWSentinel(SampleDataset):
    """fMoW-Sentinel (Cong et al., SatMAE, NeurIPS 2022): 13-band Sentinel-2 composites of 83k fMoW locations.

    Source: https://purl.stanford.edu/vg497cb6002 . Licence: fMoW Challenge Public License for
    the locations and categories (CSV), Sentinel data terms for the images.

    Layout (the authors' README)::

        <root>/train.csv, val.csv, test_gt.csv   (category, location_id, image_id, timestamp, polygon)
        <root>/<split>/<category>/<category>_<location_id>/<category>_<location_id>_<image_id>.tif

    (the README states the file name as ``<category>_<image_id>_<location_id>`` but its example
    ``train/airport/airport_0/airport_0_6.tif`` and SatMAE's loader use location then image; the
    latter is read). Test images are looked for in ``test_gt/`` then ``test/`` (unverified).

    One sample per **location**: every image of the location (composites over +-45 days, one
    per fMoW image time plus one per empty 6-month interval 2015-07..2019-12), sorted by
    ``timestamp``, as ``s2`` (T, 10, h, w); frames of a location are resampled onto the size of
    its first frame (sizes vary by a pixel or so). ``s2_dates`` from ``timestamp``.
    ``lat``/``lon``: centre of the CSV ``polygon`` (else of the first raster's footprint).
    ``label``: index of ``category`` in ``CATEGORIES``.

    Bands: Sentinel-2 **L1C** (13 bands ``FILE_BANDS``, TOA reflectance x 10000, products up to
    early 2020: no DN offset); the model's 10 bands are selected.

    Splits: ``train``, ``val``, ``test`` from the CSV the rows come from.
    """

    name = "fmow_sentinel"
    splits = ("train", "val", "test")
    bands = {"s2": S2_BANDS}

    def _index(self) -> list[Item]:
        items = []
        for split, filename in CSV_SPLITS.items():
            path = self.root / filename
            if not path.is_file():
                continue
            folder = next((self.root / f for f in IMAGE_FOLDERS[split] if (self.root / f).is_dir()),
                          self.root / IMAGE_FOLDERS[split][0])
            locations: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
            with path.open(newline="") as handle:
                reader = csv.DictReader(handle)
                missing = {"category", "location_id", "image_id", "timestamp"} - set(reader.fieldnames or ())
                if missing:
                    raise ValueError(f"{self.name}: {path}: missing columns {sorted(missing)}")
                for number, row in enumerate(reader, start=2):
                    cat, loc, img = row["category"], row["location_id"], row["image_id"]
                    if cat not in CATEGORIES:
                        raise ValueError(f"{self.name}: {path}: line {number}: unknown category {cat!r}")
                    image = folder / cat / f"{cat}_{loc}" / f"{cat}_{loc}_{img}.tif"
                    date = _timestamp(row["timestamp"], f"{path}: line {number}")
                    locations[(cat, loc)].append({"path": image, "date": date, "polygon": row.get("polygon", "")})
            for (cat, loc), frames in sorted(locations.items()):
                frames.sort(key=lambda f: f["date"])
                items.append(Item(f"{split}/{cat}_{loc}", split, frames[0]["path"].parent,
                                  {"frames": frames, "label": CATEGORIES.index(cat)}))
        if not items:
            raise FileNotFoundError(f"{self.name}: none of {sorted(CSV_SPLITS.values())} in {self.root}")
        return items

    def _load(self, item: Item) -> dict[str, Any]:
        frames = item.extra["frames"]
        data, shape, first = [], None, None
        for frame in frames:
            stack = read_stacked(frame["path"], FILE_BANDS, select=S2_BANDS, out_shape=shape)
            if first is None:
                first, shape = stack, (stack.height, stack.width)
            data.append(s2_to_model_units(stack.data, "L1C", offset=0.0))
        center = _polygon_center(frames[0]["polygon"])
        lat, lon = center if center is not None else first.center_latlon()
        return {
            "s2": torch.from_numpy(np.stack(data)),
            "s2_dates": torch.tensor([day_of_year(f["date"]) for f in frames], dtype=torch.int64),
            "s2_mask": torch.ones(len(frames), dtype=torch.bool),
            "lat": scalar(lat),
            "lon": scalar(lon),
            "label": torch.tensor(item.extra["label"], dtype=torch.int64),
            "crs": first.crs,
            "transform": first.transform,
        }

