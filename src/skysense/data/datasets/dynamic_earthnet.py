"""DynamicEarthNet: daily Planet time series with monthly land-cover labels, plus S2 / S1 monthly composites."""

from __future__ import annotations

import csv
import datetime as dt
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from skysense.config import HR_BANDS, S1_BANDS, S2_BANDS
from skysense.data.dates import day_of_year
from skysense.data.datasets.base import Item, SampleDataset, hr_band_indexes, scalar
from skysense.data.rasters import RasterReadError, read_image, read_stacked
from skysense.data.sample import IGNORE_INDEX
from skysense.data.units import s1_linear_to_db, s2_to_model_units

log = logging.getLogger("skysense.data")

CLASSES = ("impervious_surface", "agriculture", "forest_and_other_vegetation", "wetlands", "soil", "water",
           "snow_and_ice")
PLANET_BANDS = ("B", "G", "R", "NIR")
"""Band order of the Planet Fusion ``PF-SR`` files (blue first, as read by the authors' loader)."""
PLANET_HR_BANDS = ("R", "G", "B", "NIR")
"""The Planet bands in ``planet``'s order, which ``hr_bands`` choose from."""
S2_FILE_BANDS = ("B2", "B3", "B4", "B8", "B5", "B6", "B7", "B8A", "B11", "B12", "B1", "B9")
"""Inferred band order of the 12-band monthly Sentinel-2 composites (see the class docstring)."""
WEEKLY_DAYS = (1, 5, 10, 15, 20, 25)
COMPOSITE_DAY = 15
"""Day of month given to the monthly S2 / S1 composites (their exact compositing window is not used)."""
SPLIT_FOLDER = "dynnet_training_splits"
"""Folder of the authors' split lists ``train.txt``, ``val.txt``, ``test.txt``."""

_CUBE = re.compile(r"\d+_\d+_\d+")
_LABEL_DATE = re.compile(r"(\d{4})[-_](\d{2})[-_](\d{2})\.tif$")
_MONTH_FILE = re.compile(r"(?<!\d)(\d{4})[-_](\d{2})\.tif$")
_PLANET_PATTERNS = ("planet/*/*/*/PF-SR", "planet.*/planet/*/*/*/PF-SR")
_LABEL_ROOTS = ("labels", "labels/labels", "dynamicearthnet_test_labels")
_SENTINEL_ROOTS = {"s2": ("sentinel2", "sentinel2/sentinel2"), "s1": ("sentinel1", "sentinel1/sentinel1")}


def _month(text: str, where: str) -> dt.date:
    try:
        return dt.datetime.strptime(text.strip()[:7], "%Y-%m").date()
    except ValueError:
        raise ValueError(f"{where}: year_month {text!r}: expected YYYY-MM") from None


class DynamicEarthNet(SampleDataset):
    """DynamicEarthNet (Toker et al., CVPR 2022): 75 areas, daily Planet Fusion 2018-2019, monthly labels.

    Source: https://github.com/aysim/dynnet ; data on mediaTUM (https://mediatum.ub.tum.de/1650201,
    test labels https://mediatum.ub.tum.de/1738088), split lists from the authors' webshare
    ``dynnet_training_splits/``. Licence: CC BY-SA 4.0 for the labels; Planet imagery under
    Planet's research licence (check before redistribution).

    Layout (detected): **the authors' mediaTUM release**, the archives unzipped into ``<root>``::

        <root>/planet/<zone>/<lonlat>/<cube>/PF-SR/<YYYY-MM-DD>.tif   daily, 1024 x 1024 at 3 m
              (or planet.<zone>/planet/<zone>/...: one folder per unzipped planet.<zone>.zip)
        <root>/labels/<cube>_<zone>/Labels/Raster/<scene>/<scene>-<YYYY_MM_01>.tif   monthly
              (also found: labels/labels/..., <cube>-<zone>, no Labels/ level, YYYY-MM-01 dates;
               the separately released test labels in dynamicearthnet_test_labels/<cube>_<zone>/...)
        <root>/sentinel2/<cube>/<cube>_<YYYY>_<MM>.tif   monthly S2 composite, 12 bands
        <root>/sentinel1/<cube>/<cube>_<YYYY>_<MM>.tif   monthly S1 composite, 8 bands
        <root>/dynnet_training_splits/{train,val,test}.txt   lines "<planet folder> <label file>
              <YYYY-MM>"; the planet folder is written /reprocess-cropped/UTM-24000/<zone>/...,
              only its <cube> component is used

    or **the TorchGeo redistribution** (``hf.co/datasets/torchgeo/dynamic_earthnet``), indexed
    by its ``<root>/splits.csv`` (columns split, year_month, planet_path, label_path, s2_path,
    s1_path, missing_label, missing_s2, missing_s1; paths relative to the root).

    What was checked against public sources (the authors' ``data/utae_dynamicen.py``, TorchGeo's
    loader and test-data script, users' loaders of the mediaTUM files) and what is assumed:

    * verified: Planet ``PF-SR`` files hold B, G, R, NIR (the authors read bands 3, 2, 1, 4 as
      R, G, B, NIR), surface reflectance x 10000; daily names ``YYYY-MM-DD.tif``; the weekly
      setting uses days 1, 5, 10, 15, 20, 25 and the single setting day 1; labels have 7 bands,
      one per ``CLASSES`` entry, 255 where the class holds; the split list format; the label
      folder naming ``<cube>_<zone>/Labels/Raster/<scene>/<scene>-YYYY_MM_01.tif`` and its
      variants listed above;
    * the authors' loader maps snow & ice (band 7) to "ignore" and evaluates 6 classes
      (``ignore_snow_and_ice=True`` does the same); it also leaves pixels without any class at
      0, where this loader gives -1;
    * **inferred, not confirmed by the authors**: the S2 band order ``S2_FILE_BANDS`` (B2, B3,
      B4, B8, B5, B6, B7, B8A, B11, B12, B1, B9: 10 m, 20 m, 60 m bands). The band means that
      GEO-Bench-2 published for these files (labelled there B01..B12 without B09, an order the
      values contradict: a "cirrus" band at 1700 and B12 well above B11) follow a vegetation
      spectrum exactly in this order (visible < red edge rising to NIR, B11 > B12); pass
      ``s2_file_bands`` if you know better. Level (L2A), unit (reflectance x 10000, no DN offset)
      and grid of the S2 composites are assumed; the S2 file naming (``<cube>_<YYYY>_<MM>``) is
      taken from users' code (any name ending ``YYYY_MM.tif`` or ``YYYY-MM.tif`` in the cube
      folder is accepted);
    * **unknown**: which of the 8 S1 bands are VV and VH and in which unit: S1 is only read with
      explicit ``s1_band_indexes`` (0-based, VV then VH) and ``s1_in_db``.

    Sample (``task="segmentation"``, one per labelled month of an area): ``planet`` (T, 4, H, W)
    R, G, B, NIR reflectance x 10000 of the month's days (``days``: ``"monthly"`` = day 1, the
    labelled day; ``"weekly"`` = ``WEEKLY_DAYS``; ``"daily"`` = every file of the month present),
    ``planet_dates``; ``hr`` (3, H, W) the day-1 R, G, B mapped to 0-255 by ``hr = 255 *
    reflectance / planet_hr_max`` clipped (Planet is not 8-bit imagery: a domain shift for the HR
    encoder; ``hr_bands`` picks others of R, G, B, NIR, e.g. ``("R", "G", "B", "NIR")`` for a model
    made with :meth:`SkySense.with_hr_bands`: ``hr`` (4, H, W)); ``s2`` (1, 10, h, w) / ``s1`` (1, 2, h, w) dated the 15th; ``mask`` (H, W) int64
    0..6, -1 where no class is set; ``lat``, ``lon``, ``crs``, ``transform`` of the Planet grid.

    ``task="change"`` (semantic change, one per pair of consecutive labelled months of an area in
    the same split): ``hr`` / ``hr_post``, ``planet`` of the first month, ``s2`` / ``s1``
    (2, ...), ``mask`` / ``mask_post`` and ``change`` (H, W) int64 1 where the class differs, 0
    where equal, -1 where either is unlabelled.

    Splits: ``train``, ``val``, ``test`` (the authors' lists or the ``split`` column); labelled
    months in no list are ``"unlisted"``. Months whose Planet folder, label or requested S2/S1
    file is missing are left out and recorded in ``missing`` (item id -> reason).
    """

    name = "dynamic_earthnet"
    splits = ("train", "val", "test", "unlisted")
    bands = {"hr": HR_BANDS, "s2": S2_BANDS, "s1": S1_BANDS}

    def __init__(self, root: str | Path, split: str | None = None, task: str = "segmentation",
                 days: str = "monthly", modalities: Sequence[str] = ("s2",),
                 s1_band_indexes: tuple[int, int] | None = None, s1_in_db: bool | None = None,
                 s2_file_bands: Sequence[str] = S2_FILE_BANDS, ignore_snow_and_ice: bool = False,
                 planet_hr_max: float = 3000.0, hr_bands: Sequence[str] = HR_BANDS,
                 skip_corrupt: bool = False) -> None:
        if task not in ("segmentation", "change"):
            raise ValueError(f"{self.name}: task: expected 'segmentation' or 'change', got {task!r}")
        if days not in ("monthly", "weekly", "daily"):
            raise ValueError(f"{self.name}: days: expected 'monthly', 'weekly' or 'daily', got {days!r}")
        if set(modalities) - {"s2", "s1"}:
            raise ValueError(f"{self.name}: modalities: expected a subset of ('s2', 's1'), got {modalities}")
        if "s1" in modalities and (s1_band_indexes is None or s1_in_db is None):
            raise ValueError(f"{self.name}: reading S1 needs s1_band_indexes (VV, VH) and s1_in_db: the band "
                             "meaning of the 8-band S1 composites is not documented")
        missing_bands = set(S2_BANDS) - set(s2_file_bands)
        if len(s2_file_bands) != 12 or missing_bands:
            raise ValueError(f"{self.name}: s2_file_bands: expected the 12 band names of the S2 files, including "
                             f"{', '.join(S2_BANDS)}; got {tuple(s2_file_bands)}")
        self.task, self.days, self.modalities = task, days, tuple(modalities)
        self.s1_band_indexes, self.s1_in_db, self.planet_hr_max = s1_band_indexes, s1_in_db, planet_hr_max
        self.s2_file_bands = tuple(s2_file_bands)
        self.ignore_snow_and_ice = ignore_snow_and_ice
        self.hr_index = hr_band_indexes(self.name, tuple(hr_bands), PLANET_HR_BANDS, "Planet Fusion")
        self.bands = {**self.bands, "hr": tuple(hr_bands)}
        self.layout = ""
        self.missing: dict[str, str] = {}
        super().__init__(root, split, skip_corrupt)

    # -- index ---------------------------------------------------------------------------------
    def _index(self) -> list[Item]:
        if (self.root / "splits.csv").is_file():
            self.layout = "TorchGeo"
            rows = self._torchgeo_rows()
        elif (self.root / "planet").is_dir() or any(self.root.glob("planet.*/planet")):
            self.layout = "mediaTUM"
            rows = self._mediatum_rows()
        else:
            raise FileNotFoundError(
                f"{self.name}: {self.root} is in no known layout: expected splits.csv (TorchGeo) or planet/ "
                "(or planet.<zone>/planet/) with labels/ (the authors' mediaTUM release)")
        if self.missing:
            log.warning("%s (%s layout): %d months left out for missing files, e.g. %s: %s", self.name,
                        self.layout, len(self.missing), *next(iter(self.missing.items())))
        rows.sort(key=lambda r: (r["id"], r["month"]))
        if self.task == "segmentation":
            return [Item(f"{r['id']}@{r['month']:%Y-%m}", r["split"], self.root / r["planet_path"], {"months": [r]})
                    for r in rows]
        items = []
        for first, second in zip(rows, rows[1:]):
            consecutive = (second["month"].year * 12 + second["month"].month
                           - first["month"].year * 12 - first["month"].month) == 1
            if first["id"] == second["id"] and consecutive and first["split"] == second["split"]:
                items.append(Item(f"{first['id']}@{first['month']:%Y-%m}", first["split"],
                                  self.root / first["planet_path"], {"months": [first, second]}))
        return items

    def _torchgeo_rows(self) -> list[dict[str, Any]]:
        path = self.root / "splits.csv"
        rows = []
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            missing = {"split", "year_month", "planet_path", "label_path"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{self.name}: {path}: missing columns {sorted(missing)}")
            for number, row in enumerate(reader, start=2):
                month = _month(row["year_month"], f"{self.name}: {path}: line {number}")
                flagged = [m for m in ("label",) + self.modalities
                           if str(row.get(f"missing_{m}", "")).strip().lower() in ("true", "1")]
                if flagged:
                    self.missing[f"{row['planet_path']}@{month:%Y-%m}"] = f"missing_{flagged[0]} in {path.name}"
                    continue
                rows.append({"id": row["planet_path"], "month": month, "split": row["split"].strip(),
                             "planet_path": row["planet_path"], "label_path": row["label_path"],
                             "s2_path": row.get("s2_path", ""), "s1_path": row.get("s1_path", "")})
        return rows

    def _mediatum_rows(self) -> list[dict[str, Any]]:
        planet = self._planet_folders()
        labels = self._label_files()
        split_of = self._split_lists()
        sentinel = {m: self._sentinel_files(m) for m in self.modalities}
        rows = []
        for (cube, month), label in sorted(labels.items()):
            key = f"{cube}@{month:%Y-%m}"
            row = {"id": cube, "month": month, "split": split_of.pop((cube, month), "unlisted"),
                   "label_path": label, "planet_path": planet.get(cube), "s2_path": "", "s1_path": ""}
            if row["planet_path"] is None:
                self.missing[key] = f"no planet/<zone>/<lonlat>/{cube}/PF-SR folder"
                continue
            absent = [m for m in self.modalities if (cube, month) not in sentinel[m]]
            if absent:
                self.missing[key] = f"no {_SENTINEL_ROOTS[absent[0]][0]}/{cube}/*{month:%Y_%m}.tif"
                continue
            for m in self.modalities:
                row[f"{m}_path"] = sentinel[m][(cube, month)]
            rows.append(row)
        for cube, month in split_of:  # listed in a split file but without a label file
            self.missing[f"{cube}@{month:%Y-%m}"] = "listed in a split file, no label file found"
        return rows

    def _relative(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def _planet_folders(self) -> dict[str, str]:
        folders: dict[str, str] = {}
        for pattern in _PLANET_PATTERNS:
            for path in sorted(self.root.glob(pattern)):
                cube = path.parent.name
                if not _CUBE.fullmatch(cube):
                    continue
                if cube in folders:
                    raise ValueError(f"{self.name} (mediaTUM layout): area {cube} has two Planet folders: "
                                     f"{folders[cube]} and {self._relative(path)}")
                folders[cube] = self._relative(path)
        if not folders:
            raise FileNotFoundError(f"{self.name} (mediaTUM layout): no Planet folders under {self.root}: expected "
                                    "planet/<zone>/<lonlat>/<cube>/PF-SR or planet.<zone>/planet/<zone>/...")
        return folders

    def _label_files(self) -> dict[tuple[str, dt.date], str]:
        found: dict[tuple[str, dt.date], str] = {}
        for base in _LABEL_ROOTS:
            folder = self.root / base
            if not folder.is_dir():
                continue
            for area in sorted(p for p in folder.iterdir() if p.is_dir()):
                match = re.match(r"(\d+_\d+_\d+)[_-]", area.name)
                if match is None:
                    continue
                cube = match.group(1)
                for path in sorted([*area.glob("Labels/Raster/*/*.tif"), *area.glob("Raster/*/*.tif")]):
                    date = _LABEL_DATE.search(path.name)
                    if date is None:
                        continue
                    month = dt.date(int(date.group(1)), int(date.group(2)), 1)
                    if (cube, month) in found:
                        raise ValueError(f"{self.name} (mediaTUM layout): two label files for area {cube}, "
                                         f"{month:%Y-%m}: {found[(cube, month)]} and {self._relative(path)}")
                    found[(cube, month)] = self._relative(path)
        if not found:
            raise FileNotFoundError(f"{self.name} (mediaTUM layout): no label rasters under {self.root}/labels: "
                                    "expected labels/<cube>_<zone>/Labels/Raster/<scene>/<scene>-YYYY_MM_01.tif")
        return found

    def _split_lists(self) -> dict[tuple[str, dt.date], str]:
        split_of: dict[tuple[str, dt.date], str] = {}
        for split in ("train", "val", "test"):
            path = self.root / SPLIT_FOLDER / f"{split}.txt"
            if not path.is_file():
                continue
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                fields = line.split()
                cubes = [part for part in fields[0].split("/") if _CUBE.fullmatch(part)] if fields else []
                if len(fields) != 3 or len(cubes) != 1:
                    raise ValueError(f"{self.name}: {path}: line {number}: expected '<planet folder with the "
                                     f"area id> <label file> <YYYY-MM>', got {line.strip()!r}")
                month = _month(fields[2], f"{self.name}: {path}: line {number}")
                split_of[(cubes[0], month)] = split
        return split_of

    def _sentinel_files(self, modality: str) -> dict[tuple[str, dt.date], str]:
        bases = [self.root / b for b in _SENTINEL_ROOTS[modality] if (self.root / b).is_dir()]
        if not bases:
            raise FileNotFoundError(
                f"{self.name} (mediaTUM layout): folder {self.root / _SENTINEL_ROOTS[modality][0]} does not exist, "
                f"needed for modalities {self.modalities}; pass modalities=() to read Planet and labels only")
        base = bases[-1]  # sentinel2/sentinel2 when the archive was unzipped into its own folder
        found: dict[tuple[str, dt.date], str] = {}
        for area in sorted(p for p in base.iterdir() if p.is_dir() and _CUBE.fullmatch(p.name)):
            for path in sorted(area.glob("*.tif")):
                date = _MONTH_FILE.search(path.name)
                if date is not None:
                    found[(area.name, dt.date(int(date.group(1)), int(date.group(2)), 1))] = self._relative(path)
        return found

    # -- samples -------------------------------------------------------------------------------
    def _day_files(self, folder: Path, month: dt.date, first_only: bool) -> list[Path]:
        if first_only or self.days == "monthly":
            return [folder / f"{month:%Y-%m}-01.tif"]
        if self.days == "weekly":
            return [folder / f"{month:%Y-%m}-{day:02d}.tif" for day in WEEKLY_DAYS]
        files = sorted(folder.glob(f"{month:%Y-%m}-[0-3][0-9].tif"))
        if not files:
            raise FileNotFoundError(f"{self.name}: no daily Planet files {month:%Y-%m}-DD.tif in {folder}")
        return files

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
        if self.ignore_snow_and_ice:
            mask[mask == CLASSES.index("snow_and_ice")] = IGNORE_INDEX
        return mask

    def _s1(self, path: Path) -> np.ndarray:
        data, _ = read_image(path)
        if max(self.s1_band_indexes) >= data.shape[0]:
            raise RasterReadError(f"{path}: {data.shape[0]} bands, no band index {max(self.s1_band_indexes)}")
        s1 = data[list(self.s1_band_indexes)].astype(np.float32)
        return s1 if self.s1_in_db else s1_linear_to_db(s1).astype(np.float32)

    def _load(self, item: Item) -> dict[str, Any]:
        sample: dict[str, Any] = {}
        s2_frames, s1_frames, dates, masks, hrs = [], [], [], [], []
        for k, row in enumerate(item.extra["months"]):
            month = row["month"]
            paths = self._day_files(self.root / row["planet_path"], month, first_only=k > 0)
            planet = []
            for path in paths:
                stack = read_stacked(path, PLANET_BANDS, select=PLANET_HR_BANDS)
                if planet and stack.data.shape != planet[0].shape:
                    raise RasterReadError(f"{path}: size {stack.data.shape[-2:]} differs from the month's first "
                                          f"image {planet[0].shape[-2:]}")
                if not planet:
                    first = stack
                planet.append(stack.data)
            hrs.append(np.clip(planet[0][self.hr_index] * (255.0 / self.planet_hr_max), 0.0, 255.0).astype(np.float32))
            if k == 0:
                sample["planet"] = torch.from_numpy(np.stack(planet))
                sample["planet_dates"] = torch.tensor([day_of_year(dt.date.fromisoformat(p.stem)) for p in paths],
                                                      dtype=torch.int64)
                lat, lon = first.center_latlon()
                sample.update(lat=scalar(lat), lon=scalar(lon), crs=first.crs, transform=first.transform)
            masks.append(self._label(self.root / row["label_path"], (first.height, first.width)))
            dates.append(day_of_year(month.replace(day=COMPOSITE_DAY)))
            if "s2" in self.modalities:
                s2 = read_stacked(self.root / row["s2_path"], self.s2_file_bands, select=S2_BANDS)
                s2_frames.append(s2_to_model_units(s2.data, "L2A", offset=0.0))
            if "s1" in self.modalities:
                s1_frames.append(self._s1(self.root / row["s1_path"]))
        sample["hr"] = torch.from_numpy(hrs[0])
        sample["mask"] = torch.from_numpy(masks[0])
        if self.task == "change":
            sample["hr_post"] = torch.from_numpy(hrs[1])
            sample["mask_post"] = torch.from_numpy(masks[1])
            change = (masks[0] != masks[1]).astype(np.int64)
            change[(masks[0] == IGNORE_INDEX) | (masks[1] == IGNORE_INDEX)] = IGNORE_INDEX
            sample["change"] = torch.from_numpy(change)
        for key, frames in (("s2", s2_frames), ("s1", s1_frames)):
            if frames:
                sample[key] = torch.from_numpy(np.stack(frames))
                sample[f"{key}_dates"] = torch.tensor(dates, dtype=torch.int64)
                sample[f"{key}_mask"] = torch.ones(len(dates), dtype=torch.bool)
        return sample
