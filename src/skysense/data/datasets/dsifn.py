"""DSIFN-CD: change detection on Google Earth image pairs of six Chinese cities."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from skysense.config import HR_BANDS
from skysense.data.datasets.base import IMAGE_SUFFIXES, Item, SampleDataset
from skysense.data.datasets.levir_cd import leave_out_unusable_pairs, load_change_pair
from skysense.data.rasters import RasterReadError, read_image
from skysense.data.units import hr_to_8bit

LIST_SPLITS = ("train", "val", "test")
AUTHORS = "authors' release"
CHANGEFORMER = "ChangeFormer"
MASK_SUFFIXES = (".png", ".tif", ".tiff")
"""Suffixes of the authors' change masks: PNG for train and val, TIFF for test."""


class DSIFN(SampleDataset):
    """DSIFN-CD (Zhang et al., ISPRS J. 2020): bi-temporal Google Earth images, land-cover change masks.

    Source: https://github.com/GeoZcx/A-deeply-supervised-image-fusion-network-for-change-detection-in-remote-sensing-images
    (download link in its ``dataset/README.md``). Licence: academic use only.

    Layouts (detected; errors name the one found):

    * **the authors' release**: ``<root>/{train,val,test}/t1/<n>.jpg`` (before),
      ``<root>/<split>/t2/<n>.jpg`` (after), ``<root>/{train,val}/mask/<n>.png`` and
      ``<root>/test/mask/<n>.tif`` (change masks), 512 x 512 px: 3,600 train and 340 val pairs
      (394 crops of five cities, augmented ten-fold) and 48 test pairs (Xi'an). Checked
      against Open-CD's DSIFN configuration (same folders, ``.jpg`` images, ``.png`` / ``.tif``
      masks); images with another suffix (``.png``, ``.tif``) are read too.
    * **ChangeFormer / BIT's 256 x 256 re-cut** (the same as LEVIR-CD): ``<root>/A/<name>.png``
      (before), ``<root>/B/<name>.png`` (after), ``<root>/label/<name>.png``,
      ``<root>/list/{train,val,test}.txt`` (one file name per line). Names carry no split.

    Masks: 0 = no change, 255 (or 1) = change, one band or three equal bands. Bands: R, G, B,
    8-bit. Sample: ``hr`` (before), ``hr_post`` (after), ``mask`` (H, W) int64 0/1. No
    georeference or dates are published.

    In the ChangeFormer layout, unusable pairs are left out with a warning as in LEVIR-CD
    (``excluded``). In the authors' release a missing after image or mask is an error when the
    pair is read.

    Splits: the split folders (authors' release) or ``list/train.txt``, ``val.txt``, ``test.txt``
    (ChangeFormer); images in no list (e.g. only ``list/demo.txt``, as in the project's samples)
    are ``"unlisted"``.
    """

    name = "dsifn"
    splits = LIST_SPLITS + ("unlisted",)
    bands = {"hr": HR_BANDS}
    layout: str = ""
    """The layout found under ``root``: ``AUTHORS`` or ``CHANGEFORMER``."""
    excluded: dict[str, str]
    """ChangeFormer layout: pairs of the selected split left out (name -> reason), by LEVIR-CD's
    rule (no after image or change mask; a transparent RGBA image); see :class:`LEVIRCD`."""

    def _index(self) -> list[Item]:
        self.excluded = {}
        if (self.root / "A").is_dir():
            self.layout = CHANGEFORMER
            return self._changeformer_items()
        if any((self.root / split / "t1").is_dir() for split in LIST_SPLITS):
            self.layout = AUTHORS
            return self._authors_items()
        raise FileNotFoundError(
            f"{self.name}: {self.root} is in no known layout: expected <split>/t1, <split>/t2, <split>/mask "
            f"({AUTHORS}) or A/, B/, label/ ({CHANGEFORMER})")

    def _changeformer_items(self) -> list[Item]:
        split_of: dict[str, str] = {}
        for split in LIST_SPLITS:
            path = self.root / "list" / f"{split}.txt"
            if path.is_file():
                for line in path.read_text().split():
                    split_of[line.strip()] = split
        items = [Item(p.stem, split_of.get(p.name, "unlisted"), p, {"layout": CHANGEFORMER})
                 for p in sorted((self.root / "A").glob("*.png"))]
        items, self.excluded = leave_out_unusable_pairs(self.name, self.root, items, self.split)
        return items

    def _authors_items(self) -> list[Item]:
        items = []
        for split in LIST_SPLITS:
            folder = self.root / split / "t1"
            if not folder.is_dir():
                continue
            images = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES),
                            key=lambda p: (len(p.stem), p.stem))
            items += [Item(f"{split}/{p.stem}", split, p, {"layout": AUTHORS}) for p in images]
        if not items:
            raise FileNotFoundError(f"{self.name} ({AUTHORS}): no images in {self.root}/<split>/t1")
        return items

    def _load(self, item: Item) -> dict[str, Any]:
        layout = item.extra["layout"]
        try:
            if layout == CHANGEFORMER:
                return load_change_pair(self.root, item, self.name)
            return self._load_authors(item)
        except (ValueError, FileNotFoundError) as error:
            raise type(error)(f"{self.name} ({layout} layout): {error}") from None

    def _load_authors(self, item: Item) -> dict[str, Any]:
        split_folder = item.path.parent.parent
        before, _ = read_image(item.path, expected_bands=3)
        after_path = _sibling(split_folder / "t2", item.path.stem, IMAGE_SUFFIXES, prefer=item.path.suffix)
        if after_path is None:
            raise FileNotFoundError(f"after image {split_folder / 't2' / item.path.name} does not exist "
                                    f"(pair {item.id})")
        after, _ = read_image(after_path, expected_bands=3)
        mask_path = _sibling(split_folder / "mask", item.path.stem, MASK_SUFFIXES)
        if mask_path is None:
            raise FileNotFoundError(f"change mask {split_folder / 'mask' / item.path.stem}"
                                    f"{{{','.join(MASK_SUFFIXES)}}} does not exist (pair {item.id})")
        label, _ = read_image(mask_path)
        if label.shape[0] not in (1, 3):
            raise RasterReadError(f"wrong band count: {mask_path} has {label.shape[0]} bands, expected 1 (or 3 equal)")
        if label.shape[0] == 3 and (np.any(label[1] != label[0]) or np.any(label[2] != label[0])):
            raise ValueError(f"{mask_path}: 3 bands that differ; expected a grey change mask")
        label = label[0]
        for path, array in ((after_path, after), (mask_path, label)):
            if array.shape[-2:] != before.shape[-2:]:
                raise RasterReadError(f"{path}: size {array.shape[-2:]} differs from {item.path} {before.shape[-2:]}")
        values = set(np.unique(label).tolist())
        if not (values <= {0, 255} or values <= {0, 1}):
            raise ValueError(f"{mask_path}: change mask values {sorted(values)}; expected 0 and 255 (or 0 and 1)")
        return {
            "hr": torch.from_numpy(hr_to_8bit(before, 8)),
            "hr_post": torch.from_numpy(hr_to_8bit(after, 8)),
            "mask": torch.from_numpy((label > 0).astype(np.int64)),
        }


def _sibling(folder: Path, stem: str, suffixes: tuple[str, ...], prefer: str | None = None) -> Path | None:
    """``folder/<stem><suffix>`` for the first suffix that exists (``prefer`` first), or None."""
    order = ([prefer] if prefer else []) + [s for s in suffixes if s != prefer]
    for suffix in order:
        for candidate in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return None
