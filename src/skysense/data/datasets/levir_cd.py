"""LEVIR-CD: building change detection on 0.5 m RGB image pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from skysense.config import HR_BANDS
from skysense.data.datasets.base import Item, SampleDataset
from skysense.data.rasters import RasterReadError, read_image
from skysense.data.units import hr_to_8bit


class LEVIRCD(SampleDataset):
    """LEVIR-CD (Chen & Shi 2020): 637 Google Earth image pairs (1024 x 1024, 0.5 m), building changes.

    Source: https://justchenhao.github.io/LEVIR/ ; cropped 256 x 256 layout as used by
    ChangeFormer / BIT. Licence: academic use only.

    Layout: ``<root>/A/<name>.png`` (before), ``<root>/B/<name>.png`` (after),
    ``<root>/label/<name>.png`` (0 = no change, 255 = change), optional ``<root>/list/*.txt``.
    Names start with their split: ``train_``, ``val_``, ``test_``.

    Bands: R, G, B, 8-bit. Sample: ``hr`` (3, H, W) the *before* image, ``hr_post`` the
    *after* image (run the model on each: siamese change detection), ``mask`` (H, W) int64 0/1.
    No georeference or dates are published.

    Splits: ``train``, ``val``, ``test`` from the name prefix.
    """

    name = "levir_cd"
    splits = ("train", "val", "test")
    bands = {"hr": HR_BANDS}

    def _index(self) -> list[Item]:
        folder = self.root / "A"
        if not folder.is_dir():
            raise FileNotFoundError(f"{self.name}: folder {folder} does not exist")
        items = []
        for path in sorted(folder.glob("*.png")):
            prefix = path.stem.split("_", 1)[0]
            if prefix not in self.splits:
                raise ValueError(f"{self.name}: {path}: name does not start with train_, val_ or test_")
            items.append(Item(path.stem, prefix, path))
        return items

    def _load(self, item: Item) -> dict[str, Any]:
        return load_change_pair(self.root, item, self.name)


def load_change_pair(root: Path, item: Item, dataset: str) -> dict[str, Any]:
    """``A/<name>`` (before), ``B/<name>`` (after) and ``label/<name>`` (0/255) of one pair.

    Shared by the LEVIR-CD-style layouts (LEVIR-CD, DSIFN-CD in ChangeFormer's layout).
    """
    before, _ = read_image(item.path, expected_bands=3)
    after_path = root / "B" / item.path.name
    after, _ = read_image(after_path, expected_bands=3)
    label_path = root / "label" / item.path.name
    if not label_path.is_file():
        raise FileNotFoundError(f"{dataset}: change mask {label_path} does not exist (pair {item.id})")
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
