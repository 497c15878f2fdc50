"""DSIFN-CD: change detection on Google Earth image pairs of six Chinese cities."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from skysense.config import HR_BANDS
from skysense.data.datasets.base import Item, SampleDataset
from skysense.data.rasters import RasterReadError, read_image
from skysense.data.units import hr_to_8bit

LIST_SPLITS = ("train", "val", "test")


class DSIFN(SampleDataset):
    """DSIFN-CD (Zhang et al., ISPRS J. 2020): bi-temporal Google Earth images, land-cover change masks.

    Source: https://github.com/GeoZcx/A-deeply-supervised-image-fusion-network-for-change-detection-in-remote-sensing-images ;
    read here in the 256 x 256 layout of ChangeFormer / BIT (the same as LEVIR-CD). The authors'
    own release (``train/t1``, ``train/t2``, ``train/mask``, test masks as ``.tif``) is not
    supported. Licence: academic use only.

    Layout: ``<root>/A/<name>.png`` (before), ``<root>/B/<name>.png`` (after),
    ``<root>/label/<name>.png`` (0 = no change, 255 = change), ``<root>/list/{train,val,test}.txt``
    (one file name per line). Names carry no split (``0_2.png``).

    Bands: R, G, B, 8-bit. Sample: ``hr`` (before), ``hr_post`` (after), ``mask`` (H, W) int64
    0/1. No georeference or dates are published.

    Splits: from ``list/train.txt``, ``val.txt``, ``test.txt``; images in none of them (e.g. only
    ``list/demo.txt``, as in the project's samples) are ``"unlisted"``.
    """

    name = "dsifn"
    splits = LIST_SPLITS + ("unlisted",)
    bands = {"hr": HR_BANDS}

    def _index(self) -> list[Item]:
        folder = self.root / "A"
        if not folder.is_dir():
            raise FileNotFoundError(f"{self.name}: folder {folder} does not exist")
        split_of: dict[str, str] = {}
        for split in LIST_SPLITS:
            path = self.root / "list" / f"{split}.txt"
            if path.is_file():
                for line in path.read_text().split():
                    split_of[line.strip()] = split
        return [Item(p.stem, split_of.get(p.name, "unlisted"), p) for p in sorted(folder.glob("*.png"))]

    def _load(self, item: Item) -> dict[str, Any]:
        before, _ = read_image(item.path, expected_bands=3)
        after_path = self.root / "B" / item.path.name
        after, _ = read_image(after_path, expected_bands=3)
        label_path = self.root / "label" / item.path.name
        if not label_path.is_file():
            raise FileNotFoundError(f"{self.name}: change mask {label_path} does not exist (pair {item.id})")
        label, _ = read_image(label_path)
        label = label[0]
        for path, array in ((after_path, after), (label_path, label)):
            if array.shape[-2:] != before.shape[-2:]:
                raise RasterReadError(f"{path}: size {array.shape[-2:]} differs from {item.path} {before.shape[-2:]}")
        values = set(np.unique(label).tolist())
        if not values <= {0, 255}:
            raise ValueError(f"{label_path}: change mask values {sorted(values)}; expected 0 and 255")
        return {
            "hr": torch.from_numpy(hr_to_8bit(before, 8)),
            "hr_post": torch.from_numpy(hr_to_8bit(after, 8)),
            "mask": torch.from_numpy((label > 0).astype(np.int64)),
        }
