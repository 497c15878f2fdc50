"""LEVIR-CD: building change detection on 0.5 m RGB image pairs."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rasterio.errors import RasterioError

from skysense.config import HR_BANDS
from skysense.data.datasets.base import Item, SampleDataset
from skysense.data.rasters import RasterReadError, open_raster, read_image, read_rgb, transparent_pixels
from skysense.data.units import hr_to_8bit

PAIR_FOLDERS = ("A", "B", "label")
"""Sub-folders of the LEVIR-CD layout: before image, after image, change mask."""


class LEVIRCD(SampleDataset):
    """LEVIR-CD (Chen & Shi 2020): 637 Google Earth image pairs (1024 x 1024, 0.5 m), building changes.

    Source: https://justchenhao.github.io/LEVIR/ ; cropped 256 x 256 layout as used by
    ChangeFormer / BIT. Licence: academic use only.

    Layout: ``<root>/A/<name>.png`` (before), ``<root>/B/<name>.png`` (after),
    ``<root>/label/<name>.png`` (0 = no change, 255 = change), optional ``<root>/list/*.txt``.
    Names start with their split: ``train_``, ``val_``, ``test_``.

    Bands: R, G, B, 8-bit. An RGBA PNG whose alpha is fully opaque (as some copies of the
    dataset hold) is read as RGB, its alpha dropped. Sample: ``hr`` (3, H, W) the *before* image,
    ``hr_post`` the *after* image (run the model on each: siamese change detection), ``mask``
    (H, W) int64 0/1. No georeference or dates are published.

    Splits: ``train``, ``val``, ``test`` from the name prefix. Every split is labelled.

    Pairs that cannot be used are **left out** when the dataset is built, with a
    ``warnings.warn`` naming the file and the reason, and listed in ``excluded`` (pair name ->
    reason); ``len()`` does not count them:

    * no change mask ``label/<name>.png`` (an unlabelled pair), or no after image ``B/<name>.png``;
    * an RGBA image (before or after) whose alpha is below full opacity anywhere: those pixels
      hold no image, and the change mask says nothing about them.

    Everything else that is wrong raises a clear error naming the file, because skipping it would
    hide a broken copy of the dataset: a missing ``A/``, ``B/`` or ``label/`` folder or a file
    name without a split prefix (when the dataset is built); an unreadable or truncated file
    (an image whose header cannot be read keeps even an incomplete pair in the dataset, so the
    error shows), a band count other than 3 (or 4 with an opaque alpha), images
    and mask of different sizes, or mask values other than 0 and 255 (when the sample is read;
    ``skip_corrupt=True`` logs and skips those instead, see :class:`SampleDataset`). Building the
    dataset reads only the image headers (and the alpha band of RGBA images) of the selected
    ``split``.
    """

    name = "levir_cd"
    splits = ("train", "val", "test")
    bands = {"hr": HR_BANDS}
    excluded: dict[str, str]
    """Pairs of the selected split left out when the dataset was built: name -> reason."""

    def _index(self) -> list[Item]:
        for sub in PAIR_FOLDERS:
            if not (self.root / sub).is_dir():
                raise FileNotFoundError(f"{self.name}: folder {self.root / sub} does not exist "
                                        f"(expected {', '.join(f'{s}/' for s in PAIR_FOLDERS)})")
        items = []
        for path in sorted((self.root / "A").glob("*.png")):
            prefix = path.stem.split("_", 1)[0]
            if prefix not in self.splits:
                raise ValueError(f"{self.name}: {path}: name does not start with train_, val_ or test_")
            items.append(Item(path.stem, prefix, path))
        items, self.excluded = leave_out_unusable_pairs(self.name, self.root, items, self.split)
        return items

    def _load(self, item: Item) -> dict[str, Any]:
        return load_change_pair(self.root, item, self.name)


UNREADABLE = "unreadable"


def transparency(path: Path) -> str | None:
    """Why ``path`` cannot be read as RGB because of its alpha band; None if it can; ``UNREADABLE``.

    None for a 3-band image or a 4-band one with a fully opaque alpha (and for other band
    counts: :func:`read_rgb` raises for those when the sample is read). ``UNREADABLE`` when the
    header or the alpha band cannot be read. Reads only the header, and the alpha band of
    4-band images.
    """
    try:
        src = open_raster(path)
    except (FileNotFoundError, RasterReadError):
        return UNREADABLE
    with src:
        if src.count != 4:
            return None
        try:
            alpha = src.read(4)
            transparent = transparent_pixels(alpha)
        except (RasterioError, RasterReadError):
            return UNREADABLE
    if transparent == 0:
        return None
    return (f"{path}: RGBA image whose alpha is below full opacity on {transparent} of {alpha.size} pixels "
            "(no image data there)")


def unusable_pair(root: Path, before: Path) -> str | None:
    """Why the pair of ``A/<name>`` (``before``) must be left out, or None (see :class:`LEVIRCD`).

    A pair with an unreadable image is kept whatever else it lacks, so that reading it raises an
    error naming the broken file instead of hiding it.
    """
    after = root / "B" / before.name
    label = root / "label" / before.name
    reasons = [transparency(path) for path in (before, after) if path.is_file()]
    if UNREADABLE in reasons:
        return None
    if not after.is_file():
        return f"after image {after} does not exist"
    if not label.is_file():
        return f"change mask {label} does not exist (unlabelled pair)"
    return next((reason for reason in reasons if reason is not None), None)


def leave_out_unusable_pairs(dataset: str, root: Path, items: list[Item],
                             split: str | None) -> tuple[list[Item], dict[str, str]]:
    """``items`` (pairs ``A/<name>`` of a LEVIR-CD-style layout) without the unusable pairs of
    ``split`` (None: all), each left out with a warning; and the left-out names with the reason.
    Only the selected split is read (headers, and the alpha band of RGBA images)."""
    kept, excluded = [], {}
    for item in items:
        if split is None or item.split == split:
            reason = unusable_pair(root, item.path)
            if reason is not None:
                excluded[item.id] = reason
                warnings.warn(f"{dataset}: pair {item.id} left out: {reason}", stacklevel=4)
                continue
        kept.append(item)
    return kept, excluded


def load_change_pair(root: Path, item: Item, dataset: str) -> dict[str, Any]:
    """``A/<name>`` (before), ``B/<name>`` (after) and ``label/<name>`` (0/255) of one pair.

    Shared by the LEVIR-CD-style layouts (LEVIR-CD, DSIFN-CD in ChangeFormer's layout). Images
    go through :func:`read_rgb` (an opaque alpha is dropped).
    """
    before, _ = read_rgb(item.path)
    after_path = root / "B" / item.path.name
    after, _ = read_rgb(after_path)
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
