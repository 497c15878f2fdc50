"""A manifest-driven multi-modal dataset: one JSON line per place with its HR, S2 and S1 rasters."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from skysense.config import HR_BANDS, S1_BANDS, S2_BANDS
from skysense.data.dates import day_of_year, parse_date
from skysense.data.datasets.base import Item, SampleDataset, hr_band_indexes, scalar
from skysense.data.rasters import RasterReadError, read_image, read_stacked
from skysense.data.units import hr_to_8bit, s2_to_model_units

MANIFEST_NAME = "manifest.jsonl"


class ManifestDataset(SampleDataset):
    """Places listed in a JSON-lines manifest, each with an HR image and S2 / S1 time series (pre-training).

    Source: written by the user (or by ``benchmarks/io.py``). Licence: that of the rasters listed.

    Layout: ``<root>/manifest.jsonl`` (or ``manifest=``), one JSON object per line; paths are
    relative to the manifest's folder (or absolute)::

        {"id": "place-0", "split": "train", "lat": 48.1, "lon": 11.6,
         "hr": "hr/place-0.tif", "hr_bit_depth": 8,
         "s2": [{"path": "s2/place-0_20200601.tif", "date": "2020-06-01"}, ...],
         "s2_bands": ["B2", "B3", ...], "s2_level": "L2A", "s2_offset": 0,
         "s1": [{"path": "s1/place-0_20200603.tif", "date": "2020-06-03"}, ...]}

    Only ``id`` and at least one of ``hr``/``s2``/``s1`` are required; every record must list
    the same modalities so that samples collate. ``split`` defaults to ``"train"``.

    Bands: ``hr`` a raster whose first bands are ``hr_bands`` (default R, G, B; e.g. R, G, B,
    NIR for a model made with :meth:`SkySense.with_hr_bands`), or whose bands the record names
    in file order (``"hr_bands": ["NIR", "R", "G", "B"]``) (``hr_bit_depth`` 8..16, default from
    the dtype);
    ``s2`` frames stacked GeoTIFFs whose band order is ``s2_bands`` (default the model's 10
    ``S2_BANDS``; the 10 are selected), Sentinel-2 reflectance x 10000 with the DN offset
    ``s2_offset`` (default 0) removed, ``s2_level`` L2A (default) or L1C; ``s1`` frames 2-band
    VV, VH in dB. Frames of one series must have one size (error names the file).

    Sample: ``hr`` (len(hr_bands), H, W), ``s2`` (T, 10, h, w), ``s2_dates``, ``s2_mask``, ``s1`` (T', 2, h', w'),
    ``s1_dates``, ``s1_mask``, ``lat``/``lon`` (the record's, else the centre of the first
    georeferenced raster). ``modalities`` limits what is read.

    Splits: the records' ``split`` among ``train``, ``val``, ``test``.
    """

    name = "manifest"
    splits = ("train", "val", "test")
    bands = {"hr": HR_BANDS, "s2": S2_BANDS, "s1": S1_BANDS}

    def __init__(self, root: str | Path, split: str | None = None, manifest: str = MANIFEST_NAME,
                 modalities: Sequence[str] = ("hr", "s2", "s1"), hr_bands: Sequence[str] = HR_BANDS,
                 skip_corrupt: bool = False) -> None:
        if not modalities or set(modalities) - {"hr", "s2", "s1"}:
            raise ValueError(f"{self.name}: modalities: expected a non-empty subset of ('hr', 's2', 's1'), "
                             f"got {modalities}")
        self.hr_bands = tuple(hr_bands)
        if not self.hr_bands or len(set(self.hr_bands)) != len(self.hr_bands):
            raise ValueError(f"{self.name}: hr_bands: expected distinct band names, got {list(self.hr_bands)}")
        self.bands = {**self.bands, "hr": self.hr_bands}
        self.manifest = manifest
        self.modalities = tuple(modalities)
        super().__init__(root, split, skip_corrupt)

    def _index(self) -> list[Item]:
        path = self.root / self.manifest
        if not path.is_file():
            raise FileNotFoundError(f"{self.name}: manifest {path} does not exist")
        items, present = [], None
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {number}: not valid JSON ({error})") from None
            if not isinstance(record, dict) or "id" not in record:
                raise ValueError(f"{path}: line {number}: expected an object with an 'id'")
            has = tuple(m for m in ("hr", "s2", "s1") if record.get(m))
            if not has:
                raise ValueError(f"{path}: line {number}: record {record['id']!r} has none of hr, s2, s1")
            if present is not None and has != present:
                raise ValueError(f"{path}: line {number}: record {record['id']!r} has modalities {has}, the first "
                                 f"record {present}; every record must list the same ones")
            present = has
            split = record.get("split", "train")
            if split not in self.splits:
                raise ValueError(f"{path}: line {number}: split {split!r}; expected one of {self.splits}")
            items.append(Item(str(record["id"]), split, path, {"record": record, "line": number}))
        if not items:
            raise ValueError(f"{self.name}: manifest {path} lists no records")
        return items

    def _path(self, value: str) -> Path:
        path = Path(value)
        return path if path.is_absolute() else self.root / path

    def _series(self, item: Item, modality: str, file_bands: Sequence[str], select: Sequence[str]):
        frames = item.extra["record"][modality]
        where = f"{item.path}: line {item.extra['line']}"
        if not isinstance(frames, list) or not frames:
            raise ValueError(f"{where}: {modality}: expected a non-empty list of {{path, date}}")
        data, dates, first = [], [], None
        for frame in frames:
            date = parse_date(str(frame.get("date", "")))
            if date is None:
                raise ValueError(f"{where}: {modality} frame {frame.get('path')}: date {frame.get('date')!r}: "
                                 "expected YYYY-MM-DD")
            path = self._path(frame["path"])
            stack = read_stacked(path, file_bands, select=select)
            if first is not None and stack.data.shape != first.data.shape:
                raise RasterReadError(f"{path}: size {stack.data.shape[-2:]} differs from the first {modality} frame "
                                      f"{first.paths[0]} {first.data.shape[-2:]}")
            first = first or stack
            data.append(stack.data)
            dates.append(day_of_year(date))
        return np.stack(data), dates, first

    def _hr_index(self, path: Path, file_bands: Sequence[str] | None, count: int, item: Item) -> list[int]:
        """Which of the HR file's ``count`` bands are ``hr_bands``, in order."""
        where = f"{item.path}: line {item.extra['line']}: hr {path}"
        if file_bands is None:
            if count < len(self.hr_bands):
                raise RasterReadError(f"{where}: {count} bands, expected at least {len(self.hr_bands)} "
                                      f"({', '.join(self.hr_bands)} as its first bands; or name its bands in the "
                                      f"record's hr_bands)")
            return list(range(len(self.hr_bands)))
        if len(file_bands) != count:
            raise RasterReadError(f"{where}: {count} bands; the record's hr_bands name {len(file_bands)}: "
                                  f"{list(file_bands)}")
        return hr_band_indexes(self.name, self.hr_bands, tuple(file_bands), where)

    def _load(self, item: Item) -> dict[str, Any]:
        record = item.extra["record"]
        sample: dict[str, Any] = {}
        georef = None
        if "hr" in self.modalities and record.get("hr"):
            path = self._path(record["hr"])
            image, dtype = read_image(path)
            image = image[self._hr_index(path, record.get("hr_bands"), image.shape[0], item)]
            bit_depth = record.get("hr_bit_depth", 8 if dtype == "uint8" else None)
            sample["hr"] = torch.from_numpy(hr_to_8bit(image, bit_depth))
        if "s2" in self.modalities and record.get("s2"):
            data, dates, georef = self._series(item, "s2", record.get("s2_bands", S2_BANDS), S2_BANDS)
            data = s2_to_model_units(data, record.get("s2_level", "L2A"), offset=float(record.get("s2_offset", 0.0)))
            sample.update(s2=torch.from_numpy(data), s2_dates=torch.tensor(dates, dtype=torch.int64),
                          s2_mask=torch.ones(len(dates), dtype=torch.bool))
        if "s1" in self.modalities and record.get("s1"):
            data, dates, s1_first = self._series(item, "s1", S1_BANDS, S1_BANDS)
            georef = georef or s1_first
            sample.update(s1=torch.from_numpy(data), s1_dates=torch.tensor(dates, dtype=torch.int64),
                          s1_mask=torch.ones(len(dates), dtype=torch.bool))
        if "lat" in record and "lon" in record:
            sample["lat"], sample["lon"] = scalar(record["lat"]), scalar(record["lon"])
        elif georef is not None and georef.crs is not None:
            lat, lon = georef.center_latlon()
            sample["lat"], sample["lon"] = scalar(lat), scalar(lon)
        return sample
