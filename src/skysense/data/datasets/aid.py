"""AID: aerial scene classification, class-per-folder JPEG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from skysense.config import HR_BANDS
from skysense.data.datasets.base import Item, SampleDataset, numbered_images
from skysense.data.rasters import read_image
from skysense.data.units import hr_to_8bit


class AID(SampleDataset):
    """AID, the Aerial Image Dataset (Xia et al. 2017): 30 scene classes, RGB aerial images.

    Source: https://captain-whu.github.io/AID/ (10,000 images of 600 x 600 px, 0.5-8 m).
    Licence: academic use only.

    Layout: ``<root>/<Class>/<class>_<n>.jpg`` (one folder per class; classes are the folder
    names, sorted, and ``label`` is the index in that list).

    Bands: R, G, B, 8-bit (``hr`` on the 0-255 scale, float32). No georeference, no date.

    Splits (fixed, no official one): within each class folder the images are sorted by their
    number ``n``; the first half (rounded down) is ``train``, the rest ``test``.
    """

    name = "aid"
    splits = ("train", "test")
    bands = {"hr": HR_BANDS}

    def _class_root(self) -> Path:
        """Folder holding one sub-folder per class."""
        return self.root

    def _train_count(self, images: int) -> int:
        """How many of a class's ``images`` (sorted by number) form the train split."""
        return images // 2

    def _index(self) -> list[Item]:
        base = self._class_root()
        self.classes = sorted(p.name for p in base.iterdir() if p.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"{self.name}: no class folders in {base}")
        items = []
        for label, cls in enumerate(self.classes):
            images = numbered_images(base / cls, self.name)
            n_train = self._train_count(len(images))
            for i, path in enumerate(images):
                items.append(Item(f"{cls}/{path.stem}", "train" if i < n_train else "test", path, {"label": label}))
        return items

    def _load(self, item: Item) -> dict[str, Any]:
        data, dtype = read_image(item.path, expected_bands=3)
        return {
            "hr": torch.from_numpy(hr_to_8bit(data, 8 if dtype == "uint8" else None)),
            "label": torch.tensor(item.extra["label"], dtype=torch.int64),
        }
