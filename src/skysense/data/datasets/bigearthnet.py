"""BigEarthNet: Sentinel-1 + Sentinel-2 multi-label scene classification (v1 and v2 layouts)."""

from __future__ import annotations

import bz2
import importlib.util
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from skysense.config import S1_BANDS, S2_BANDS
from skysense.data.dates import date_from_name, day_of_year, parse_date
from skysense.data.datasets.base import Item, SampleDataset, read_json, scalar
from skysense.data.rasters import RasterReadError, read_band_folder, read_image
from skysense.data.units import processing_baseline_from_name, s2_to_model_units
from skysense.data.units import s2_offset as offset_of_baseline

# The 43 CORINE Land Cover classes of BigEarthNet v1, in the original order
# (https://git.tu-berlin.de/rsim/BigEarthNet-S2_19-classes_models label_indices.json), mapped to
# the 19-class nomenclature of Sumbul et al. 2021 (None: dropped from the 19 classes).
OLD_TO_19 = {
    "Continuous urban fabric": "Urban fabric",
    "Discontinuous urban fabric": "Urban fabric",
    "Industrial or commercial units": "Industrial or commercial units",
    "Road and rail networks and associated land": None,
    "Port areas": None,
    "Airports": None,
    "Mineral extraction sites": None,
    "Dump sites": None,
    "Construction sites": None,
    "Green urban areas": None,
    "Sport and leisure facilities": None,
    "Non-irrigated arable land": "Arable land",
    "Permanently irrigated land": "Arable land",
    "Rice fields": "Arable land",
    "Vineyards": "Permanent crops",
    "Fruit trees and berry plantations": "Permanent crops",
    "Olive groves": "Permanent crops",
    "Pastures": "Pastures",
    "Annual crops associated with permanent crops": "Permanent crops",
    "Complex cultivation patterns": "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation":
        "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas": "Agro-forestry areas",
    "Broad-leaved forest": "Broad-leaved forest",
    "Coniferous forest": "Coniferous forest",
    "Mixed forest": "Mixed forest",
    "Natural grassland": "Natural grassland and sparsely vegetated areas",
    "Moors and heathland": "Moors, heathland and sclerophyllous vegetation",
    "Sclerophyllous vegetation": "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland/shrub": "Transitional woodland, shrub",
    "Beaches, dunes, sands": "Beaches, dunes, sands",
    "Bare rock": None,
    "Sparsely vegetated areas": "Natural grassland and sparsely vegetated areas",
    "Burnt areas": None,
    "Inland marshes": "Inland wetlands",
    "Peatbogs": "Inland wetlands",
    "Salt marshes": "Coastal wetlands",
    "Salines": "Coastal wetlands",
    "Intertidal flats": None,
    "Water courses": "Inland waters",
    "Water bodies": "Inland waters",
    "Coastal lagoons": "Marine waters",
    "Estuaries": "Marine waters",
    "Sea and ocean": "Marine waters",
}
LABELS_43: tuple[str, ...] = tuple(sorted(OLD_TO_19))
"""The 43 v1 classes, sorted by name (the label index order of TorchGeo)."""
LABELS_19: tuple[str, ...] = tuple(sorted({v for v in OLD_TO_19.values() if v is not None}))
"""The 19 classes (v1 19-class nomenclature and v2), sorted by name."""

# BigEarthNet v1 patches were acquired June 2017 - May 2018, with processing baselines 02.xx:
# no DN offset. BigEarthNet v2 names carry the placeholder N9999; its values agree with v1's for
# the same tile and date (no offset either).
DEFAULT_S2_OFFSET = 0.0


def _multi_hot(names: Sequence[str], label_set: str, where: Path) -> torch.Tensor:
    classes = LABELS_19 if label_set == "19" else LABELS_43
    target = torch.zeros(len(classes), dtype=torch.float32)
    for name in names:
        mapped = OLD_TO_19.get(name, name) if label_set == "19" else name
        if mapped is None:
            continue
        if mapped not in classes:
            raise ValueError(f"{where}: unknown BigEarthNet label {name!r}; expected one of the {label_set} classes")
        target[classes.index(mapped)] = 1.0
    return target


@lru_cache(maxsize=1)
def _v1_official_splits() -> dict[str, str]:
    """S2 patch name -> train/val/test, from the CSVs shipped in ``bigearthnet-common`` (not imported)."""
    spec = importlib.util.find_spec("bigearthnet_common")
    if spec is None or not spec.submodule_search_locations:
        return {}
    folder = Path(list(spec.submodule_search_locations)[0])
    splits: dict[str, str] = {}
    for split in ("train", "val", "test"):
        path = folder / f"{split}.csv.bz2"
        if path.is_file():
            with bz2.open(path, "rt") as handle:
                for line in handle:
                    name = line.strip().split(",")[0]
                    if name:
                        splits[name] = split
    return splits


def _s2_sample(folder: Path, offset: float, name: str) -> dict[str, Any]:
    stack = read_band_folder(folder, S2_BANDS, reference="B2")
    s2 = s2_to_model_units(stack.data, "L2A", offset=offset)
    lat, lon = stack.center_latlon()
    return {
        "s2": torch.from_numpy(s2)[None],
        "s2_dates": torch.tensor([day_of_year(date_from_name(name))], dtype=torch.int64),
        "s2_mask": torch.tensor([True]),
        "lat": scalar(lat),
        "lon": scalar(lon),
        "crs": stack.crs,
        "transform": stack.transform,
    }


def _s1_frames(folder: Path, date_doy: int, shape: tuple[int, int] | None, crs: Any) -> dict[str, Any]:
    stack = read_band_folder(folder, S1_BANDS, out_shape=shape)
    if crs is not None and stack.crs != crs:
        raise RasterReadError(f"inconsistent CRS: S1 patch {folder} has {stack.crs}, expected {crs} (as its S2 patch)")
    return {
        "s1": torch.from_numpy(stack.data)[None],
        "s1_dates": torch.tensor([date_doy], dtype=torch.int64),
        "s1_mask": torch.tensor([True]),
        "_s1_stack": stack,
    }


class BigEarthNetV1(SampleDataset):
    """BigEarthNet v1.0 (BigEarthNet-S2 and BigEarthNet-MM / S1), folder-per-patch layout.

    Source: https://bigearth.net (Sumbul et al. 2019, 2021); the six example pairs shipped inside
    the ``bigearthnet-common`` pip package are this layout (see :mod:`skysense.data.examples`).
    Licence: CDLA-Permissive-1.0.

    Layout::

        <root>/BigEarthNet-v1.0 (or BigEarthNet-S2*)/<S2 patch>/<S2 patch>_B01.tif ... _B12.tif,
                                                    <S2 patch>_labels_metadata.json
        <root>/BigEarthNet-S1*/<S1 patch>/<S1 patch>_VV.tif, _VH.tif,
                                         <S1 patch>_labels_metadata.json   (field corresponding_s2_patch)

    Bands: S2 L2A, 12 bands (10 m: B2 B3 B4 B8; 20 m: B5 B6 B7 B8A B11 B12; 60 m: B1 B9); the
    model's 10 are read and the 20 m bands resampled bilinearly onto the 120 x 120 10 m grid.
    S1 VV, VH in dB (float32, 120 x 120, already 10 m). Patches cover 1.2 km x 1.2 km.

    Labels: multi-hot over the 19-class nomenclature (``label_set="19"``, default) or the
    original 43 classes (``"43"``), both sorted by name (``LABELS_19`` / ``LABELS_43``).

    Splits: the official train/val/test lists of Sumbul et al. (cloud/snow patches excluded),
    read from the CSVs in the ``bigearthnet-common`` package when it is installed; patches not
    in them are ``"unlisted"``.

    Sample: ``s2`` (1, 10, 120, 120), ``s2_dates`` from the patch name, ``s1`` (1, 2, 120, 120)
    and ``s1_dates`` from the S1 JSON ``acquisition_time``, ``lat``/``lon`` of the S2 footprint,
    ``label``, ``crs``, ``transform``.
    """

    name = "bigearthnet_v1"
    splits = ("train", "val", "test", "unlisted")
    bands = {"s2": S2_BANDS, "s1": S1_BANDS}

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        modalities: Sequence[str] = ("s2", "s1"),
        label_set: str = "19",
        s2_offset: float = DEFAULT_S2_OFFSET,
        skip_corrupt: bool = False,
    ) -> None:
        if label_set not in ("19", "43"):
            raise ValueError(f"{self.name}: label_set: expected '19' or '43', got {label_set!r}")
        unknown = set(modalities) - {"s2", "s1"}
        if unknown or not modalities:
            raise ValueError(f"{self.name}: modalities: expected a non-empty subset of ('s2', 's1'), got {modalities}")
        self.modalities = tuple(modalities)
        self.label_set = label_set
        self.s2_offset = s2_offset
        super().__init__(root, split, skip_corrupt)

    def _folders(self) -> tuple[Path | None, Path | None]:
        s1_dir = s2_dir = None
        for child in sorted(self.root.iterdir()):
            if not child.is_dir() or not child.name.startswith("BigEarthNet"):
                continue
            if "-S1" in child.name:
                s1_dir = s1_dir or child
            else:
                s2_dir = s2_dir or child
        return s2_dir, s1_dir

    def _index(self) -> list[Item]:
        s2_dir, s1_dir = self._folders()
        for m, folder, pattern in (("s2", s2_dir, "BigEarthNet-v1.0 or BigEarthNet-S2*"),
                                   ("s1", s1_dir, "BigEarthNet-S1*")):
            if m in self.modalities and folder is None:
                raise FileNotFoundError(f"{self.name}: no {pattern} folder in {self.root}")
        official = _v1_official_splits()
        items = []
        if "s2" in self.modalities:
            s1_of: dict[str, Path] = {}
            if "s1" in self.modalities:
                for patch in sorted(p for p in s1_dir.iterdir() if p.is_dir()):
                    meta_path = patch / f"{patch.name}_labels_metadata.json"
                    try:
                        meta = read_json(meta_path)
                    except (FileNotFoundError, ValueError):
                        continue  # reported when the paired S2 patch is loaded
                    s2_name = meta.get("corresponding_s2_patch")
                    if s2_name:
                        s1_of[s2_name] = patch
            for patch in sorted(p for p in s2_dir.iterdir() if p.is_dir()):
                extra = {"s1": s1_of.get(patch.name)}
                items.append(Item(patch.name, official.get(patch.name, "unlisted"), patch, extra))
        else:
            for patch in sorted(p for p in s1_dir.iterdir() if p.is_dir()):
                items.append(Item(patch.name, "unlisted", patch, {}))
        return items

    def _load(self, item: Item) -> dict[str, Any]:
        meta = read_json(item.path / f"{item.path.name}_labels_metadata.json")
        labels = meta.get("labels")
        if not isinstance(labels, list):
            raise ValueError(f"{item.path}: labels_metadata.json has no 'labels' list")
        if self.modalities == ("s1",):
            doy = day_of_year(self._s1_date(meta, item.path))
            frames = _s1_frames(item.path, doy, None, None)
            stack = frames.pop("_s1_stack")
            lat, lon = stack.center_latlon()
            sample = {**frames, "lat": scalar(lat), "lon": scalar(lon), "crs": stack.crs, "transform": stack.transform}
        else:
            baseline = processing_baseline_from_name(str(meta.get("tile_source", "")))
            offset = self.s2_offset if baseline is None else offset_of_baseline(baseline)
            sample = _s2_sample(item.path, offset, item.path.name)
            if "s1" in self.modalities:
                s1_path = item.extra.get("s1")
                if s1_path is None:
                    raise FileNotFoundError(
                        f"{self.name}: no S1 patch whose corresponding_s2_patch is {item.id} in {self._folders()[1]}"
                    )
                s1_meta = read_json(s1_path / f"{s1_path.name}_labels_metadata.json")
                doy = day_of_year(self._s1_date(s1_meta, s1_path))
                frames = _s1_frames(s1_path, doy, tuple(sample["s2"].shape[-2:]), sample["crs"])
                frames.pop("_s1_stack")
                sample.update(frames)
        sample["label"] = _multi_hot(labels, self.label_set, item.path)
        return sample

    @staticmethod
    def _s1_date(meta: dict[str, Any], path: Path):
        found = parse_date(str(meta.get("acquisition_time", "")))
        return found if found is not None else date_from_name(path)


class BigEarthNetV2(SampleDataset):
    """BigEarthNet v2.0 (reBEN, Clasen et al. 2024): S1 + S2 patches with pixel reference maps.

    Source: https://bigearth.net (v2.0). Licence: CDLA-Permissive-1.0.

    Layout::

        <root>/BigEarthNet-S2/<S2 tile product>/<patch>/<patch>_B01.tif ... _B12.tif, _B8A.tif
        <root>/BigEarthNet-S1/<S1 product>/<patch>/<patch>_VV.tif, _VH.tif
        <root>/Reference_Maps/<S2 tile product>/<patch>/<patch>_reference_map.tif
        <root>/metadata.parquet  (patch_id, labels, split, s1_name; optional here)

    Bands: as v1 (S2 L2A 12 bands at 10/20/60 m, the model's 10 on the 10 m grid; S1 VV/VH dB).
    Product names carry the placeholder baseline ``N9999``; values carry no DN offset
    (``s2_offset=0``). Reference maps hold CORINE codes per 10 m pixel (``mask``, int64).

    Splits: given by ``metadata.parquet`` (train/validation/test), read when ``pandas`` with a
    parquet engine is installed; otherwise every patch is ``"unlisted"``. Pairing S2 with S1 and
    the 19-class labels also need ``metadata.parquet``; without it ``modalities`` must be one of
    ``("s2",)`` or ``("s1",)``.
    """

    name = "bigearthnet_v2"
    splits = ("train", "validation", "test", "unlisted")
    bands = {"s2": S2_BANDS, "s1": S1_BANDS}

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        modalities: Sequence[str] = ("s2",),
        reference_maps: bool = False,
        s2_offset: float = DEFAULT_S2_OFFSET,
        skip_corrupt: bool = False,
    ) -> None:
        unknown = set(modalities) - {"s2", "s1"}
        if unknown or not modalities:
            raise ValueError(f"{self.name}: modalities: expected a non-empty subset of ('s2', 's1'), got {modalities}")
        self.modalities = tuple(modalities)
        self.reference_maps = reference_maps
        self.s2_offset = s2_offset
        self.metadata = self._read_metadata(Path(root) / "metadata.parquet")
        if set(self.modalities) == {"s2", "s1"} and self.metadata is None:
            raise FileNotFoundError(
                f"{self.name}: pairing S2 with S1 needs {Path(root) / 'metadata.parquet'} (column s1_name) "
                "and pandas with a parquet engine"
            )
        super().__init__(root, split, skip_corrupt)

    @staticmethod
    def _read_metadata(path: Path) -> dict[str, dict[str, Any]] | None:
        if not path.is_file():
            return None
        try:
            import pandas  # noqa: PLC0415
        except ImportError:
            return None
        frame = pandas.read_parquet(path)
        return {row["patch_id"]: dict(row) for row in frame.to_dict("records")}

    def _index(self) -> list[Item]:
        lead = "s2" if "s2" in self.modalities else "s1"
        folder = self.root / ("BigEarthNet-S2" if lead == "s2" else "BigEarthNet-S1")
        if not folder.is_dir():
            raise FileNotFoundError(f"{self.name}: folder {folder} does not exist")
        items = []
        for product in sorted(p for p in folder.iterdir() if p.is_dir()):
            for patch in sorted(p for p in product.iterdir() if p.is_dir()):
                meta = (self.metadata or {}).get(patch.name, {}) if lead == "s2" else {}
                items.append(Item(patch.name, str(meta.get("split", "unlisted")), patch, {"meta": meta}))
        return items

    def _load(self, item: Item) -> dict[str, Any]:
        meta = item.extra.get("meta", {})
        if "s2" in self.modalities:
            sample = _s2_sample(item.path, self.s2_offset, item.path.name)
            if "s1" in self.modalities:
                s1_name = meta.get("s1_name")
                if not s1_name:
                    raise ValueError(f"{self.name}: metadata.parquet has no s1_name for patch {item.id}")
                s1_path = self.root / "BigEarthNet-S1" / s1_name.rsplit("_", 2)[0] / s1_name
                frames = _s1_frames(s1_path, day_of_year(date_from_name(s1_name)),
                                    tuple(sample["s2"].shape[-2:]), sample["crs"])
                frames.pop("_s1_stack")
                sample.update(frames)
        else:
            frames = _s1_frames(item.path, day_of_year(date_from_name(item.path.name)), None, None)
            stack = frames.pop("_s1_stack")
            lat, lon = stack.center_latlon()
            sample = {**frames, "lat": scalar(lat), "lon": scalar(lon), "crs": stack.crs, "transform": stack.transform}
        if "labels" in meta:
            sample["label"] = _multi_hot(list(meta["labels"]), "19", item.path)
        if self.reference_maps:
            if "s2" not in self.modalities:
                raise ValueError(f"{self.name}: reference maps are on the S2 grid; include 's2' in modalities")
            ref = self.root / "Reference_Maps" / item.path.parent.name / item.id / f"{item.id}_reference_map.tif"
            if not ref.is_file():
                raise FileNotFoundError(f"{self.name}: reference map {ref} does not exist (patch {item.id})")
            data, _ = read_image(ref, expected_bands=1)
            if data.shape[-2:] != tuple(sample["s2"].shape[-2:]):
                raise RasterReadError(
                    f"{ref}: size {data.shape[-2:]} differs from its S2 patch {tuple(sample['s2'].shape[-2:])}"
                )
            sample["mask"] = torch.from_numpy(data[0].astype(np.int64))
        return sample


class BigEarthNetMM(BigEarthNetV1):
    """BigEarthNet-MM (Sumbul et al., GRSM 2021): BigEarthNet v1.0 S2 patches paired with BigEarthNet-S1.

    The registry alias of :class:`BigEarthNetV1` with both modalities (its default). Layout: the
    v1.0 folders of S2 and S1 patches; the same bands, labels and official splits (see there). Source: https://bigearth.net .
    Licence: CDLA-Permissive-1.0. Both modalities are always read; use ``bigearthnet_v1`` for one.
    """

    name = "bigearthnet_mm"

    def __init__(self, root: str | Path, split: str | None = None, label_set: str = "19",
                 s2_offset: float = DEFAULT_S2_OFFSET, skip_corrupt: bool = False) -> None:
        super().__init__(root, split, modalities=("s2", "s1"), label_set=label_set, s2_offset=s2_offset,
                         skip_corrupt=skip_corrupt)
