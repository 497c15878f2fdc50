"""Samples for fine-tuning and evaluation: normalisation, crops and flips, seeded per position.

:class:`TrainingSamples` wraps a dataset for the :class:`~skysense.pretrain.data.StepBatchSampler`
of the pretraining loop: item ``(index, seed, ...)`` -> a normalised sample cut and flipped with a
generator seeded by ``seed`` (which the sampler derives from the run's seed and the sample's
global position), so a resumed run sees exactly the data of an uninterrupted one.

* classification: random horizontal and vertical flips of every spatial entry; with
  ``sentinel_size`` the ``s2`` / ``s1`` frames of each sample are first resized to that square
  side (:func:`resize_series`), so samples of different sizes (fMoW-Sentinel) share a batch;
* segmentation / change: padded (images 0, targets ignore) up to ``crop_size`` when smaller,
  a random ``crop_size`` window (aligned to the coarsest grid), random flips;
* detection: the same crops and flips, with the boxes moved, clipped and flipped along
  (:mod:`skysense.downstream.boxes`; oriented boxes become their horizontal hulls first).

With ``cache`` each normalised sample is kept in memory once read (per DataLoader worker): for
a few large scenes (OSCD: 8 training cities, about 250 MB as float32) that are cropped many times.

Only the entries the model and the loss use are kept (the modalities with their dates and
masks, ``hr_post``, ``lat``/``lon``, targets), so every sample of a batch has the same keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from skysense.config import SkySenseConfig
from skysense.data.sample import SERIES
from skysense.data.units import normalize
from skysense.downstream.boxes import DETECTION_TARGETS, crop_boxes, flip_boxes, with_horizontal_boxes
from skysense.downstream.sliding_window import SPATIAL_KEYS, crop, grid_alignment, pad_to, reference_size

TARGETS = ("label", "mask", "mask_post", "change") + DETECTION_TARGETS


def normalize_sample(sample: Mapping[str, Any], config: SkySenseConfig) -> dict[str, Any]:
    """A normalised copy: ``hr``, ``s2``, ``s1`` by :func:`~skysense.data.units.normalize`, and
    ``hr_post`` (the *after* image of a change pair) with the HR statistics."""
    out = normalize(dict(sample), config)
    if isinstance(sample.get("hr_post"), torch.Tensor):
        out["hr_post"] = normalize({"hr": sample["hr_post"]}, config)["hr"]
    return out


def model_keys(modalities: Sequence[str], geo_context: bool) -> tuple[str, ...]:
    """Sample entries a task model reads for these modalities."""
    keys = []
    for m in modalities:
        keys += [m, f"{m}_dates", f"{m}_mask"]
        if m == "hr":
            keys.append("hr_post")
    if geo_context:
        keys += ["lat", "lon"]
    return tuple(keys)


def select(sample: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The entries of ``sample`` among ``keys`` and the targets."""
    return {k: v for k, v in sample.items() if k in keys or k in TARGETS}


def flip(sample: Mapping[str, Any], horizontal: bool, vertical: bool) -> dict[str, Any]:
    """Flip every spatial entry (last two axes), and the detection boxes with them."""
    dims = tuple(d for d, on in ((-1, horizontal), (-2, vertical)) if on)
    if not dims:
        return dict(sample)
    out = {k: torch.flip(v, dims) if k in SPATIAL_KEYS and isinstance(v, torch.Tensor) else v
           for k, v in sample.items()}
    if isinstance(sample.get("boxes"), torch.Tensor):
        out["boxes"] = flip_boxes(sample["boxes"], *reference_size(sample), horizontal, vertical)
    return out


def resize_series(sample: Mapping[str, Any], size: int) -> dict[str, Any]:
    """A copy whose ``s2`` / ``s1`` frames (T, C, h, w) are resized to ``size`` x ``size``.

    Bilinear (``align_corners=False``), antialiased when shrinking; every frame and band alike.
    Other entries are not touched: this is for classification, where the targets have no pixels
    (segmentation masks are never resized; their tasks crop instead, :func:`random_crop`).
    """
    if size < 1:
        raise ValueError(f"sentinel_size: expected a positive number of pixels, got {size}")
    out = dict(sample)
    for key in SERIES:
        x = sample.get(key)
        if isinstance(x, torch.Tensor) and tuple(x.shape[-2:]) != (size, size):
            out[key] = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False,
                                     antialias=True).to(x.dtype)
    return out


def random_crop(sample: Mapping[str, Any], size: int, generator: torch.Generator) -> dict[str, Any]:
    """A ``size`` x ``size`` window (reference grid) at a random aligned position, after padding;
    detection boxes are cut to it (:func:`~skysense.downstream.boxes.crop_boxes`)."""
    sample = pad_to(sample, size, size)
    height, width = reference_size(sample)
    align = grid_alignment(sample)
    if size % align:
        raise ValueError(f"crop_size {size}: must be a multiple of {align} for these inputs (their grids differ "
                         f"by that factor)")
    top = int(torch.randint(0, (height - size) // align + 1, (1,), generator=generator)) * align
    left = int(torch.randint(0, (width - size) // align + 1, (1,), generator=generator)) * align
    return crop_boxes(crop(sample, top, left, size, size), top, left, size, size)


def prepared(sample: Mapping[str, Any], config: SkySenseConfig, keys: Sequence[str], sentinel_size: int | None,
             task: str | None) -> dict[str, Any]:
    """A raw sample normalised, cut down to ``keys`` and the targets, its S2/S1 frames resized to
    ``sentinel_size`` (when given) and, for ``task="detection"``, its boxes made horizontal."""
    sample = select(normalize_sample(sample, config), keys)
    if sentinel_size is not None:
        sample = resize_series(sample, sentinel_size)
    if task == "detection":
        sample = with_horizontal_boxes(sample)
    return sample


def _check_sentinel_size(task: str, sentinel_size: int | None) -> None:
    if sentinel_size is not None and task != "classification":
        raise ValueError(f"sentinel_size: only for classification (resizing would distort {task} targets); "
                         f"got {sentinel_size} for {task}")


class TrainingSamples(Dataset):
    """Item ``(index, seed, ...)`` -> normalised, augmented sample (module docstring).

    Args:
        sentinel_size: classification: side ``s2`` / ``s1`` frames are resized to
            (:func:`resize_series`); None keeps their size.
    """

    def __init__(self, dataset: Dataset, config: SkySenseConfig, task: str, keys: Sequence[str],
                 crop_size: int | None = None, flips: bool = True, cache: bool = False,
                 sentinel_size: int | None = None) -> None:
        if task != "classification" and not crop_size:
            raise ValueError(f"{task}: crop_size is required for training")
        _check_sentinel_size(task, sentinel_size)
        self.dataset, self.config, self.task = dataset, config, task
        self.keys, self.crop_size, self.flips = tuple(keys), crop_size, flips
        self.sentinel_size = sentinel_size
        self.cache: dict[int, dict[str, Any]] | None = {} if cache else None

    def _sample(self, index: int) -> dict[str, Any]:
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        sample = prepared(self.dataset[index], self.config, self.keys, self.sentinel_size, self.task)
        if self.cache is not None:
            self.cache[index] = sample
        return sample

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, ...]) -> dict[str, Any]:
        # The sampler's key starts with (index, per-position seed); later entries are not used.
        index, seed = key[0], key[1]
        generator = torch.Generator().manual_seed(seed)
        sample = self._sample(index)
        if self.task != "classification":
            sample = random_crop(sample, self.crop_size, generator)
        if self.flips:
            h, v = (torch.rand(2, generator=generator) < 0.5).tolist()
            sample = flip(sample, h, v)
        return sample


class EvaluationSamples(Dataset):
    """Item ``index`` -> normalised sample with only the model's entries, targets, ``id``,
    ``crs`` and ``transform`` (for georeferenced predictions); ``s2`` / ``s1`` frames resized
    to ``sentinel_size`` when given (classification, as in training); for ``task="detection"``
    horizontal boxes (the hull of oriented ones, as in training)."""

    def __init__(self, dataset: Dataset, config: SkySenseConfig, keys: Sequence[str],
                 sentinel_size: int | None = None, task: str | None = None) -> None:
        self.dataset, self.config, self.keys = dataset, config, tuple(keys) + ("id", "crs", "transform")
        self.sentinel_size, self.task = sentinel_size, task

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return prepared(self.dataset[index], self.config, self.keys, self.sentinel_size, self.task)


def evenly_spaced(dataset: Dataset, count: int | None) -> Dataset:
    """``count`` items spread evenly over the dataset (all when None or larger): a few samples of
    every class of a class-sorted dataset, unlike its first ``count`` items."""
    if count is None or count >= len(dataset):
        return dataset
    if count < 1:
        raise ValueError(f"sample limit: expected >= 1, got {count}")
    indices = torch.linspace(0, len(dataset) - 1, count).round().long().unique().tolist()
    return Subset(dataset, indices)
