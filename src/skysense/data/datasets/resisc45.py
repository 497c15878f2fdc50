"""NWPU-RESISC45: aerial scene classification, class-per-folder JPEG."""

from __future__ import annotations

from pathlib import Path

from skysense.config import HR_BANDS
from skysense.data.datasets.aid import AID


class RESISC45(AID):
    """NWPU-RESISC45 (Cheng et al., Proc. IEEE 2017): 31,500 RGB images of 256 x 256 px, 45 classes, 0.2-30 m.

    Source: https://gcheng-nwpu.github.io/#Datasets . Licence: academic use only.

    Layout: ``<root>/NWPU-RESISC45/<class>/<class>_<nnn>.jpg`` (or ``<root>/<class>/...``);
    700 images per class; classes are the folder names, sorted, and ``label`` is the index.

    Bands: R, G, B, 8-bit (``hr``). No georeference, no date.

    Splits (no official one; the usual protocol trains on 10 % or 20 % per class): within each
    class the images are sorted by their number ``nnn``; the first ``round(train_ratio * n)``
    are ``train``, the rest ``test`` (``train_ratio`` 0.2 by default, 0 < ratio < 1).
    """

    name = "resisc45"
    splits = ("train", "test")
    bands = {"hr": HR_BANDS}

    def __init__(self, root: str | Path, split: str | None = None, train_ratio: float = 0.2,
                 skip_corrupt: bool = False) -> None:
        if not 0.0 < train_ratio < 1.0:
            raise ValueError(f"{self.name}: train_ratio: expected 0 < ratio < 1, got {train_ratio}")
        self.train_ratio = train_ratio
        super().__init__(root, split, skip_corrupt)

    def _class_root(self) -> Path:
        nested = self.root / "NWPU-RESISC45"
        return nested if nested.is_dir() else self.root

    def _train_count(self, images: int) -> int:
        return round(self.train_ratio * images)
