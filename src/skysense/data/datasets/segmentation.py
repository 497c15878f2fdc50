"""Aerial semantic segmentation in the mmsegmentation layout: LoveDA, iSAID (ISPRS Potsdam / Vaihingen: ``isprs``)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from skysense.config import HR_BANDS
from skysense.data.datasets.base import Item, SampleDataset
from skysense.data.rasters import RasterReadError, read_image, read_rgb
from skysense.data.sample import IGNORE_INDEX
from skysense.data.units import hr_to_8bit

MMSEG_SPLITS = ("train", "val", "test")


class MMSegDataset(SampleDataset):
    """Common part of the mmsegmentation-layout datasets (not registered itself).

    Layout::

        <root>/img_dir/{train,val,test}/<name><img_suffix>
        <root>/ann_dir/{train,val}/<name><seg_suffix>

    or, without split sub-folders, ``<root>/img_dir/<name>`` and ``<root>/ann_dir/<name>`` (split
    ``"all"``). Images without an annotation (the test splits) have no ``mask``; a split is
    either fully annotated or not at all, so its samples collate.

    Masks follow mmsegmentation: with ``reduce_zero_label`` the stored 0 is "no label" and
    1..K are the classes, so ``mask = value - 1`` and 0 becomes ``IGNORE_INDEX`` (-1); without it
    values are the class indices and 255 is "no label". Values above the class count raise.
    """

    classes: ClassVar[tuple[str, ...]] = ()
    reduce_zero_label: ClassVar[bool] = True
    img_suffix: ClassVar[str] = ".png"
    seg_suffix: ClassVar[str] = ".png"
    splits = MMSEG_SPLITS + ("all",)
    bands = {"hr": HR_BANDS}

    def _index(self) -> list[Item]:
        img_dir, ann_dir = self.root / "img_dir", self.root / "ann_dir"
        if not img_dir.is_dir():
            raise FileNotFoundError(f"{self.name}: folder {img_dir} does not exist (mmsegmentation layout)")
        subdirs = [img_dir / s for s in MMSEG_SPLITS if (img_dir / s).is_dir()]
        folders = [(d, d.name) for d in subdirs] or [(img_dir, "all")]
        items = []
        for folder, split in folders:
            for path in sorted(folder.glob(f"*{self.img_suffix}")):
                stem = path.name[: -len(self.img_suffix)]
                ann = (ann_dir / split if split != "all" else ann_dir) / f"{stem}{self.seg_suffix}"
                items.append(Item(stem if split == "all" else f"{split}/{stem}", split, path,
                                  {"ann": ann if ann.is_file() else None}))
        if not items:
            raise FileNotFoundError(f"{self.name}: no *{self.img_suffix} images under {img_dir}")
        return items

    def _load(self, item: Item) -> dict[str, Any]:
        image, dtype = read_rgb(item.path)  # RGBA PNG: a fully opaque alpha is dropped, a real one refused
        sample: dict[str, Any] = {"hr": torch.from_numpy(hr_to_8bit(image, 8 if dtype == "uint8" else None))}
        ann = item.extra["ann"]
        if ann is None:
            if item.split != "test":
                raise FileNotFoundError(f"{self.name}: annotation for {item.path} does not exist in "
                                        f"{self.root / 'ann_dir'} (expected <name>{self.seg_suffix})")
            return sample
        label, _ = read_image(ann, expected_bands=1)
        label = label[0].astype(np.int64)
        if label.shape != image.shape[-2:]:
            raise RasterReadError(f"{ann}: size {label.shape} differs from {item.path} {image.shape[-2:]}")
        if self.reduce_zero_label:
            label = label - 1  # 0 (no label) -> -1
        else:
            label[label == 255] = IGNORE_INDEX
        bad = np.unique(label[(label < IGNORE_INDEX) | (label >= len(self.classes))])
        if bad.size:
            raw = (bad + 1) if self.reduce_zero_label else bad
            expected = (f"1..{len(self.classes)} (0 = no label)" if self.reduce_zero_label
                        else f"0..{len(self.classes) - 1} (255 = no label)")
            raise ValueError(f"{ann}: label values {raw.tolist()}; expected {expected}")
        label[label < 0] = IGNORE_INDEX
        sample["mask"] = torch.from_numpy(label)
        return sample


class LoveDA(MMSegDataset):
    """LoveDA (Wang et al., NeurIPS 2021 D&B): 5,987 urban and rural 1024 x 1024 tiles, 0.3 m, 7 classes.

    Layouts (either):

    * the authors' release: ``<root>/{Train,Val,Test}/{Urban,Rural}/images_png/<n>.png`` with
      masks in the sibling ``masks_png`` (none for ``Test``);
    * mmsegmentation's ``img_dir/<split>``, ``ann_dir/<split>`` (see :class:`MMSegDataset`), as
      made by its ``tools/dataset_converters/loveda.py``, which flattens the domains.

    Source: https://github.com/Junjue-Wang/LoveDA . Licence: CC BY-NC-SA 4.0.

    Bands: R, G, B 8-bit PNG (``hr``). Masks: 0 = no-data, 1..7 = ``classes``; ``mask`` holds
    0..6 and -1 for no-data (mmsegmentation's ``reduce_zero_label=True``).

    Splits: ``train`` (2,522), ``val`` (1,669), ``test`` (1,796, no public masks); a flat
    ``img_dir`` without split folders (as the project's samples) is ``"all"``.
    """

    name = "loveda"
    classes = ("background", "building", "road", "water", "barren", "forest", "agricultural")
    author_splits: ClassVar[dict[str, str]] = {"Train": "train", "Val": "val", "Test": "test"}

    def _index(self) -> list[Item]:
        present = [d for d in self.author_splits if (self.root / d).is_dir()]
        if not present:
            return super()._index()
        items = []
        for folder in present:
            split = self.author_splits[folder]
            for domain in ("Urban", "Rural"):
                images = self.root / folder / domain / "images_png"
                for path in sorted(images.glob("*.png")):
                    ann = images.parent / "masks_png" / path.name
                    items.append(Item(f"{split}/{domain}/{path.stem}", split, path,
                                      {"ann": ann if ann.is_file() else None}))
        if not items:
            raise FileNotFoundError(f"{self.name}: no <split>/<Urban|Rural>/images_png/*.png under {self.root}")
        return items


class ISAID(MMSegDataset):
    """iSAID semantic segmentation (Waqas Zamir et al., CVPR-W 2019): DOTA images, 15 object classes.

    Layout: mmsegmentation's ``img_dir/<split>``, ``ann_dir/<split>`` (see :class:`MMSegDataset`).

    Source: https://captain-whu.github.io/iSAID/ ; patches (896 x 896, stride 512) made by
    mmsegmentation's ``tools/dataset_converters/isaid.py``: ``img_dir/{train,val,test}/<name>.png``
    and ``ann_dir/{train,val}/<name>_instance_color_RGB.png`` holding class indices.
    Licence: academic use only (as DOTA).

    Bands: R, G, B 8-bit. Masks: 0 = background, 1..15 = objects (``classes``), 255 = no label
    (mmsegmentation ``reduce_zero_label=False``): ``mask`` holds 0..15 and -1.

    Splits: ``train``, ``val``, ``test`` (no public masks).
    """

    name = "isaid"
    classes = ("background", "ship", "store_tank", "baseball_diamond", "tennis_court", "basketball_court",
               "ground_track_field", "bridge", "large_vehicle", "small_vehicle", "helicopter", "swimming_pool",
               "roundabout", "soccer_ball_field", "plane", "harbor")
    reduce_zero_label = False
    seg_suffix = "_instance_color_RGB.png"

