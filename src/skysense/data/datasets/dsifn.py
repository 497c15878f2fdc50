"""DSIFN-CD: change detection on Google Earth image pairs of six Chinese cities."""

from __future__ import annotations

from typing import Any

from skysense.config import HR_BANDS
from skysense.data.datasets.base import Item, SampleDataset
from skysense.data.datasets.levir_cd import load_change_pair

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
        return load_change_pair(self.root, item, self.name)
