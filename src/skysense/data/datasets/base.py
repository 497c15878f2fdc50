"""Common base of the dataset classes: an indexed list of items, splits, and corrupt-sample skipping."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.utils.data import Dataset

from skysense.data.sample import check_sample

log = logging.getLogger("skysense.data")


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif")


def numbered_images(folder: Path, dataset: str) -> list[Path]:
    """Images of ``folder`` (``<class>_<n>.<ext>``) sorted by their trailing number ``n``."""

    def number(path: Path) -> int:
        match = re.search(r"(\d+)$", path.stem)
        if match is None:
            raise ValueError(f"{dataset}: image {path} has no trailing number in its name (expected <class>_<n>.jpg)")
        return int(match.group(1))

    return sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=number)


def read_json(path: Path) -> Any:
    """A metadata JSON file; a missing or malformed file is an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"metadata file {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def hr_band_indexes(dataset: str, wanted: tuple[str, ...], available: tuple[str, ...], where: str) -> list[int]:
    """Indexes into ``available`` (the bands ``where`` holds) of the HR bands ``wanted``, in order.

    Raises:
        ValueError: ``wanted`` is empty, repeats a band or asks for one ``where`` does not hold.
    """
    missing = [b for b in wanted if b not in available]
    if not wanted or missing or len(set(wanted)) != len(wanted):
        problem = (f"{missing} not among them" if missing else "an empty list" if not wanted
                   else "a band listed twice")
        raise ValueError(f"{dataset}: hr_bands: {where} holds {list(available)}; got {list(wanted)}: {problem}")
    return [available.index(b) for b in wanted]


@dataclass(frozen=True)
class Item:
    """One sample on disk: an id, its split, its main path and loader-specific extras."""

    id: str
    split: str
    path: Path
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


class SampleDataset(Dataset):
    """A torch Dataset of sample dicts (see :mod:`skysense.data.sample`).

    Subclasses set ``name``, ``splits`` and ``bands`` and implement ``_index()`` (list the items
    of the root) and ``_load(item)`` (read one sample).

    Args:
        root: the dataset folder.
        split: one of ``splits`` or None for every item.
        skip_corrupt: when a sample cannot be read, log it and return the next readable sample
            instead of raising; ``skipped`` records ``item id -> error`` (per process: each
            DataLoader worker keeps its own record).
    """

    name: ClassVar[str] = ""
    splits: ClassVar[tuple[str, ...]] = ()
    bands: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init__(self, root: str | Path, split: str | None = None, skip_corrupt: bool = False) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.name}: dataset root {self.root} does not exist")
        if split is not None and split not in self.splits:
            raise ValueError(f"{self.name}: split: expected one of {self.splits} or None, got {split!r}")
        self.split = split
        self.skip_corrupt = skip_corrupt
        self.skipped: dict[str, str] = {}
        items = self._index()
        self.items: list[Item] = [it for it in items if split is None or it.split == split]

    # -- to implement ------------------------------------------------------------------------
    def _index(self) -> list[Item]:
        raise NotImplementedError

    def _load(self, item: Item) -> dict[str, Any]:
        raise NotImplementedError

    # -- Dataset -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> dict[str, Any]:
        """Read one sample, raising on any error (never skips)."""
        item = self.items[index]
        sample = self._load(item)
        sample.setdefault("id", item.id)
        check_sample(sample, where=f"{self.name} {item.path}",
                     channels={m: len(b) for m, b in self.bands.items()})
        return sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not self.skip_corrupt:
            return self.load(index)
        for offset in range(len(self.items)):
            i = (index + offset) % len(self.items)
            try:
                return self.load(i)
            except (ValueError, FileNotFoundError, OSError) as error:
                item = self.items[i]
                if item.id not in self.skipped:
                    self.skipped[item.id] = str(error)
                    log.warning("%s: skipped sample %s (%s): %s; %d skipped so far",
                                self.name, item.id, item.path, error, len(self.skipped))
        raise ValueError(f"{self.name}: every sample under {self.root} failed to load ({len(self.skipped)} skipped)")

    @property
    def skipped_count(self) -> int:
        """How many distinct samples were skipped as corrupt so far."""
        return len(self.skipped)

    def split_counts(self) -> dict[str, int]:
        """Number of items per split (of the selected items)."""
        return dict(sorted(Counter(it.split for it in self.items).items()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, items={len(self)})"


def scalar(value: float) -> torch.Tensor:
    """A float32 scalar tensor (``lat``, ``lon``)."""
    return torch.tensor(float(value), dtype=torch.float32)
