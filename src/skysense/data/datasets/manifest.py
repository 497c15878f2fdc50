"""A manifest-driven multi-modal dataset: one JSON line per place with its HR, S2 and S1 rasters."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from affine import Affine
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from skysense.config import HR_BANDS, S1_BANDS, S2_BANDS
from skysense.data.dates import day_of_year, parse_date
from skysense.data.datasets.base import Item, SampleDataset, hr_band_indexes, scalar
from skysense.data.geojson_objects import read_objects
from skysense.data.geojson_regions import read_regions
from skysense.data.rasters import RasterReadError, center_latlon, open_raster, read_image, read_stacked
from skysense.data.sample import CHANGE_CLASSES, IGNORE_INDEX, class_index
from skysense.data.units import hr_to_8bit, s2_to_model_units

MANIFEST_NAME = "manifest.jsonl"
GEOJSON_SUFFIXES = (".geojson", ".json")
"""A record's ``mask`` or ``change`` with one of these suffixes is a GeoJSON of regions, burnt onto the grid."""


def _tile_starts(length: int, size: int) -> list[int]:
    """Starts of side-by-side tiles of ``size`` over ``length`` pixels, the last one ending at the edge."""
    starts = list(range(0, length - size + 1, size))
    if starts[-1] + size < length:
        starts.append(length - size)
    return starts


@functools.lru_cache(maxsize=1024)
def _raster_size(path: Path) -> tuple[int, int]:
    """(height, width) of a raster, opened once per path: a window is scaled to every raster of a
    record for every sample read."""
    with open_raster(path) as src:
        return src.height, src.width


def _scaled_window(window: Window | None, first: tuple[int, int], other: tuple[int, int], where: str) -> Window | None:
    """``window`` of a record's first raster (``first`` = its height, width) on a raster of the
    same ground with ``other`` pixels; the error names ``where`` when it does not fall on whole pixels."""
    if window is None:
        return None
    if other == first:
        return window
    fy, fx = other[0] / first[0], other[1] / first[1]
    values = (window.col_off * fx, window.row_off * fy, window.width * fx, window.height * fy)
    if any(abs(v - round(v)) > 1e-6 for v in values):
        raise RasterReadError(f"{where}: {other[1]} x {other[0]} px against the first raster's {first[1]} x {first[0]}: "
                              f"the window {tuple(int(v) for v in (window.col_off, window.row_off, window.width, window.height))} "
                              f"falls on {tuple(round(v, 3) for v in values)}, not whole pixels (use tiles and windows "
                              "that are multiples of the resolution ratio)")
    return Window(*(int(round(v)) for v in values))


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

    Targets (fine-tuning on your own places, ``skysense finetune --dataset manifest --task
    classification|segmentation|detection|oriented_detection``), read when the dataset option
    ``classes`` lists the class names:

    * ``"label"``: the class, as a name of ``classes`` or its index (``label`` () int64); with
      ``multilabel=True`` a list of them (``label`` (K,) float multi-hot);
    * ``"mask"``: a one-band integer raster of class indices 0..K-1 on the grid of the first
      modality (HR, else S2, else S1) or any grid that is a whole scaling of it; ``mask_ignore``
      (default 255) marks unlabelled pixels (``mask`` (H, W) int64, -1 there). Or a GeoJSON file
      (``.geojson`` / ``.json``) of the regions drawn in a GIS, Polygon / MultiPolygon features
      with their class in the property ``mask_class_key`` (default ``class``), burnt onto the grid
      of the first modality read (:func:`~skysense.data.geojson_regions.read_regions`: a pixel
      whose centre is inside; a Point labels the pixel that holds it; a feature with
      ``"ignore": true`` marks unlabelled pixels); pixels
      outside every region are the class ``mask_background`` (a name or index), or unlabelled
      when it is not given. One file may hold the regions of many records.
    * ``"objects"``: a GeoJSON file of the objects in the HR image, one Polygon each (a rectangle
      drawn in QGIS, or any outline: its minimum-area rectangle) with its class in the property
      ``object_class_key`` (default ``class``) and optionally ``difficult``; coordinates in the
      collection's ``crs`` (else longitude / latitude), reprojected onto the HR image
      (:func:`~skysense.data.geojson_objects.read_objects`): ``boxes`` (N, 8) corners in HR
      pixels, ``labels`` (N,), ``difficult`` (N,), for ``--task detection`` (their hulls) or
      ``oriented_detection``.

    Change detection (``--task change``) needs no ``classes``: each record has two dates of one
    place, as ``"hr"`` and ``"hr_post"`` (the HR image after, read like ``hr``, the same size)
    and/or S2 / S1 series of exactly two frames (before, after), and ``"change"``: a one-band raster,
    1 changed, 0 unchanged, ``mask_ignore`` unlabelled (``change`` (H, W) int64, -1 there); or a
    GeoJSON of the changed areas (every pixel outside them unchanged; a feature's ``mask_class_key``
    property, when it has one, may say ``no_change`` / ``change`` or 0 / 1).

    Within a split every record has the same targets (a test split may have none), so samples
    collate; a label outside ``classes`` or a mask value above K-1 is an error naming the record.

    Splits: the records' ``split`` among ``train``, ``val``, ``test``.

    Large scenes: a record's ``"window"``, ``[col_off, row_off, width, height]`` in pixels of its
    first modality (HR, else S2, else S1), reads only that part of its rasters (the other
    modalities, masks and change rasters at their own scale: every raster of a record covers the
    same ground, at whole-number resolution ratios); two records of one scene with other windows
    and splits hold out part of it. The dataset option ``tile_size`` cuts every record (or its
    window) into square tiles of that many first-modality pixels, side by side (the last row and
    column shifted back to end at the edge), each a sample with the id ``<id>/<row>_<col>``:
    train on a whole scene and one GeoJSON of regions without cutting files. A tiled sample's
    ``lat``/``lon`` is its tile's centre when the rasters are georeferenced (else the record's).
    A tile keeps the ``objects`` whose centre lies in it, as a training crop does.
    """

    name = "manifest"
    splits = ("train", "val", "test")
    bands = {"hr": HR_BANDS, "s2": S2_BANDS, "s1": S1_BANDS}

    def __init__(self, root: str | Path, split: str | None = None, manifest: str = MANIFEST_NAME,
                 modalities: Sequence[str] = ("hr", "s2", "s1"), hr_bands: Sequence[str] = HR_BANDS,
                 classes: Sequence[str] | None = None, multilabel: bool = False, mask_ignore: int | None = 255,
                 object_class_key: str = "class", mask_class_key: str = "class",
                 mask_background: str | int | None = None, tile_size: int | None = None,
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
        if classes is not None:
            self.classes = tuple(str(c) for c in classes)
            if not self.classes or len(set(self.classes)) != len(self.classes):
                raise ValueError(f"{self.name}: classes: expected distinct class names, got {list(self.classes)}")
        if multilabel and classes is None:
            raise ValueError(f"{self.name}: multilabel: needs the class names (classes)")
        self.multilabel = multilabel
        self.mask_ignore = mask_ignore
        self.object_class_key = object_class_key
        if tile_size is not None and tile_size < 1:
            raise ValueError(f"{self.name}: tile_size: expected a positive number of pixels, got {tile_size}")
        self.tile_size = tile_size
        self.mask_class_key = mask_class_key
        if mask_background is not None and classes is None:
            raise ValueError(f"{self.name}: mask_background: needs the class names (classes)")
        self.mask_background = (None if mask_background is None else
                                class_index(mask_background, self.classes, self.name, "mask_background"))
        super().__init__(root, split, skip_corrupt)
        self._check_targets()

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
            if items and bool(record.get("hr_post")) != bool(items[0].extra["record"].get("hr_post")):
                raise ValueError(f"{path}: line {number}: record {record['id']!r}: every record or none must "
                                 "have an hr_post image (the HR image after, for change detection)")
            if record.get("hr_post") and not record.get("hr"):
                raise ValueError(f"{path}: line {number}: record {record['id']!r} has hr_post but no hr")
            split = record.get("split", "train")
            if split not in self.splits:
                raise ValueError(f"{path}: line {number}: split {split!r}; expected one of {self.splits}")
            item = Item(str(record["id"]), split, path, {"record": record, "line": number})
            items.extend(self._tiles(item) if record.get("window") is not None or self.tile_size else [item])
        if not items:
            raise ValueError(f"{self.name}: manifest {path} lists no records")
        return items

    def _first_raster(self, record: dict[str, Any]) -> Path:
        """The raster of the record's first modality (HR, else the first S2 frame, else S1's)."""
        if record.get("hr"):
            return self._path(record["hr"])
        frames = record.get("s2") or record.get("s1")
        if not isinstance(frames, list) or not frames or not isinstance(frames[0], dict):
            raise ValueError(f"expected a non-empty list of {{path, date}} frames, got {frames!r}")
        return self._path(frames[0]["path"])

    def _tiles(self, item: Item) -> list[Item]:
        """The item as a window of its rasters, or as tiles of ``tile_size`` (class docstring)."""
        record = item.extra["record"]
        where = f"{item.path}: line {item.extra['line']}: record {item.id!r}"
        first = self._first_raster(record)
        with open_raster(first) as src:
            height, width = src.height, src.width
        item = Item(item.id, item.split, item.path, {**item.extra, "first_size": (height, width)})
        window = record.get("window")
        if window is None:
            col, row, w, h = 0, 0, width, height
        else:
            if not (isinstance(window, list) and len(window) == 4 and all(isinstance(v, int) for v in window)):
                raise ValueError(f"{where}: window {window!r}: expected [col_off, row_off, width, height] in pixels")
            col, row, w, h = window
            if col < 0 or row < 0 or w < 1 or h < 1 or col + w > width or row + h > height:
                raise ValueError(f"{where}: window {window} outside the {width} x {height} px raster {first}")
        if not self.tile_size:
            return [Item(item.id, item.split, item.path, {**item.extra, "window": Window(col, row, w, h)})]
        size = self.tile_size
        if size > w or size > h:
            raise ValueError(f"{where}: tile_size {size} is larger than the record's {w} x {h} px "
                             f"{'window' if window is not None else 'raster'} ({first})")
        rows, cols = _tile_starts(h, size), _tile_starts(w, size)
        return [Item(f"{item.id}/{r}_{c}", item.split, item.path,
                     {**item.extra, "window": Window(col + x, row + y, size, size)})
                for r, y in enumerate(rows) for c, x in enumerate(cols)]

    def _path(self, value: str) -> Path:
        path = Path(value)
        return path if path.is_absolute() else self.root / path

    def _window(self, item: Item, path: Path) -> Window | None:
        """The item's window (of its first raster) on the raster ``path`` (None: read it whole)."""
        window = item.extra.get("window")
        if window is None:
            return None
        return _scaled_window(window, item.extra["first_size"], _raster_size(path),
                              f"{item.path}: line {item.extra['line']}: record {item.id!r}: {path}")

    def _series(self, item: Item, modality: str, file_bands: Sequence[str], select: Sequence[str]):
        frames = item.extra["record"][modality]
        where = f"{item.path}: line {item.extra['line']}"
        if not isinstance(frames, list) or not frames:
            raise ValueError(f"{where}: {modality}: expected a non-empty list of {{path, date}}")
        data, dates, first, window = [], [], None, None
        for frame in frames:
            date = parse_date(str(frame.get("date", "")))
            if date is None:
                raise ValueError(f"{where}: {modality} frame {frame.get('path')}: date {frame.get('date')!r}: "
                                 "expected YYYY-MM-DD")
            path = self._path(frame["path"])
            if first is None:
                window = self._window(item, path)
            stack = read_stacked(path, file_bands, select=select, window=window)
            if first is not None and stack.data.shape != first.data.shape:
                raise RasterReadError(f"{path}: size {stack.data.shape[-2:]} differs from the first {modality} frame "
                                      f"{first.paths[0]} {first.data.shape[-2:]}")
            first = first or stack
            data.append(stack.data)
            dates.append(day_of_year(date))
        return np.stack(data), dates, first

    def _check_targets(self) -> None:
        """Every record of a split has the same targets, and ``label`` names a class."""
        first: dict[str, tuple[str, ...]] = {}
        read = ("label", "mask", "objects", "change") if getattr(self, "classes", None) is not None else ("change",)
        for item in self.items:
            record = item.extra["record"]
            targets = tuple(k for k in read if record.get(k) is not None)
            where = f"{item.path}: line {item.extra['line']}: record {item.id!r}"
            if first.setdefault(item.split, targets) != targets:
                raise ValueError(f"{where}: targets {list(targets)}; the first {item.split} record has "
                                 f"{list(first[item.split])}: every record of a split needs the same")
            if "label" in targets:
                self._label(record["label"], where)
            if "objects" in targets and not record.get("hr"):
                raise ValueError(f"{where}: objects lie on the HR image, and the record has no hr")

    def _label(self, value: Any, where: str) -> torch.Tensor:
        """A record's ``label``: () int64 class index, or (K,) float multi-hot with ``multilabel``."""
        if not self.multilabel:
            return torch.tensor(class_index(value, self.classes, where), dtype=torch.int64)
        if not isinstance(value, list):
            raise ValueError(f"{where}: label {value!r}: expected a list of classes (multilabel)")
        hot = torch.zeros(len(self.classes))
        for v in value:
            hot[class_index(v, self.classes, where)] = 1.0
        return hot

    def _mask(self, path: Path, where: str, classes: Sequence[str], key: str = "mask",
              window: Window | None = None) -> torch.Tensor:
        """A record's ``mask`` (or ``change``) raster (its ``window``) as (H, W) int64 indices of
        ``classes``, -1 where ``mask_ignore``."""
        data, _ = read_image(path, expected_bands=1, window=window)
        values = data[0]
        if not np.issubdtype(values.dtype, np.integer):
            raise RasterReadError(f"{where}: {key} {path}: {values.dtype} values; expected integer class indices")
        mask = values.astype(np.int64)
        if self.mask_ignore is not None:
            mask[values == self.mask_ignore] = IGNORE_INDEX
        bad = np.unique(mask[(mask != IGNORE_INDEX) & ((mask < 0) | (mask >= len(classes)))])
        if bad.size:
            raise ValueError(f"{where}: {key} {path}: values {bad[:10].tolist()} outside 0..{len(classes) - 1} "
                             f"({', '.join(f'{i} {c}' for i, c in enumerate(classes))}; unlabelled: "
                             f"{self.mask_ignore})")
        return torch.from_numpy(mask)

    def _target_mask(self, value: str, where: str, grid: tuple[Any, Affine, tuple[int, int]] | None,
                     key: str, item: Item) -> torch.Tensor:
        """A record's ``mask`` / ``change``: a raster (:meth:`_mask`) or a GeoJSON of regions burnt
        onto ``grid``, the (crs, transform, size) of the first modality read."""
        path = self._path(value)
        classes = self.classes if key == "mask" else CHANGE_CLASSES
        if path.suffix.lower() not in GEOJSON_SUFFIXES:
            return self._mask(path, where, classes, key, self._window(item, path))
        if grid is None:
            raise ValueError(f"{where}: {key} {path}: regions are burnt onto the grid of the first modality read, "
                             f"and none of the record's is read (modalities {list(self.modalities)})")
        crs, transform, size = grid
        window = item.extra.get("window")
        offset = (0, 0) if window is None else (int(window.col_off), int(window.row_off))
        if key == "mask":
            return read_regions(path, classes, crs, transform, size, self.mask_class_key, self.mask_background,
                                pixel_offset=offset)
        return read_regions(path, classes, crs, transform, size, self.mask_class_key, background=0, default_class=1,
                            pixel_offset=offset)

    def _objects(self, record: dict[str, Any], item: Item) -> dict[str, torch.Tensor]:
        """The record's objects in pixels of its HR image; of a tile (window), those whose centre
        lies in it, moved to its pixels (as a training crop keeps them)."""
        path = self._path(record["hr"])
        with open_raster(path) as src:
            crs, transform, size = src.crs, src.transform, (src.height, src.width)
        if crs is None:
            transform = Affine.identity()
        objects = read_objects(self._path(record["objects"]), self.classes, crs, transform, size,
                               self.object_class_key)
        window = item.extra.get("window")
        if window is None:
            return objects
        col, row, width, height = (int(v) for v in (window.col_off, window.row_off, window.width, window.height))
        corners = objects["boxes"] - torch.tensor([col, row] * 4, dtype=torch.float32)
        cx, cy = corners[:, 0::2].mean(1), corners[:, 1::2].mean(1)
        keep = (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)
        return {"boxes": corners[keep], "labels": objects["labels"][keep], "difficult": objects["difficult"][keep]}

    def _hr(self, path: Path, record: dict[str, Any], item: Item) -> tuple[torch.Tensor, Any]:
        """An HR raster of a record (the item's window of it): (C, H, W) on the 0-255 scale, and its
        (crs, transform) or None."""
        window = self._window(item, path)
        image, dtype = read_image(path, window=window)
        with open_raster(path) as src:
            transform = src.transform if window is None else window_transform(window, src.transform)
            georef = (src.crs, transform) if src.crs is not None else None
        image = image[self._hr_index(path, record.get("hr_bands"), image.shape[0], item)]
        bit_depth = record.get("hr_bit_depth", 8 if dtype == "uint8" else None)
        return torch.from_numpy(hr_to_8bit(image, bit_depth)), georef

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
        georef = hr_georef = None
        if "hr" in self.modalities and record.get("hr"):
            sample["hr"], hr_georef = self._hr(self._path(record["hr"]), record, item)
            if record.get("hr_post"):
                post = self._path(record["hr_post"])
                sample["hr_post"], _ = self._hr(post, record, item)
                if sample["hr_post"].shape != sample["hr"].shape:
                    raise RasterReadError(f"{item.path}: line {item.extra['line']}: hr_post {post}: size "
                                          f"{tuple(sample['hr_post'].shape[-2:])} differs from hr "
                                          f"{tuple(sample['hr'].shape[-2:])}")
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
        reference = hr_georef if sample.get("hr") is not None else (
            (georef.crs, georef.transform) if georef is not None and georef.crs is not None else None)
        if reference is not None:  # the grid of the first modality: predictions keep it
            sample["crs"], sample["transform"] = reference
        where = f"{item.path}: line {item.extra['line']}: record {item.id!r}"
        first = next((sample[m] for m in ("hr", "s2", "s1") if sample.get(m) is not None), None)
        grid = None if first is None else (*(reference or (None, Affine.identity())), tuple(first.shape[-2:]))
        if getattr(self, "classes", None) is not None:
            if record.get("label") is not None:
                sample["label"] = self._label(record["label"], where)
            if record.get("mask") is not None:
                sample["mask"] = self._target_mask(record["mask"], where, grid, "mask", item)
            if record.get("objects") is not None:
                if sample.get("hr") is None:
                    raise ValueError(f"{where}: objects lie on the HR image; read it (modalities include 'hr')")
                sample.update(self._objects(record, item))
        if record.get("change") is not None:
            sample["change"] = self._target_mask(record["change"], where, grid, "change", item)
        centre = None
        if georef is not None and georef.crs is not None:
            centre = georef.center_latlon
        elif item.extra.get("window") is not None and hr_georef is not None:  # a tile of an HR-only record
            height, width = sample["hr"].shape[-2:]
            centre = lambda: center_latlon(*hr_georef, height, width, where=str(record["hr"]))  # noqa: E731
        if "lat" in record and "lon" in record and (item.extra.get("window") is None or centre is None):
            sample["lat"], sample["lon"] = scalar(record["lat"]), scalar(record["lon"])
        elif centre is not None:
            lat, lon = centre()
            sample["lat"], sample["lon"] = scalar(lat), scalar(lon)
        return sample
