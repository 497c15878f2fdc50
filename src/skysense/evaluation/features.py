"""Frozen features of a dataset: one pooled vector per sample, for linear probing.

Feature definition (what :func:`pool_features` returns for one sample):

* **HR-only datasets** (e.g. AID: only ``hr`` present): the global average pool of **every** HR
  pyramid level (strides 4, 8, 16, 32: ``config.hr.out_dims`` channels) concatenated with the
  global average pool of the fused map (``config.fusion.embed_dim`` channels); 32 + 64 + 128 +
  256 + 128 = 608 for ``tiny``. Why all levels: a hierarchical backbone's early stages carry the
  texture and colour statistics that scene classes differ by, and its last stage is small and
  coarse (``tiny``: 2 blocks on a 5 x 5 grid for a 160 px image); pooling each level is the usual
  way to probe such backbones. Measured on AID with ``tiny`` (probe of this module, 1500/1500
  split): random init 0.276 with the last level + fused vs 0.297 with every level; a model
  pretrained 1100 steps (InfoNCE) 0.300 vs 0.378, i.e. pretraining changes the earlier stages
  more than the last one, which the last-level probe could not see. Why the fused map too: with
  a single modality the fusion transformer sees one HR token per location plus its extra token,
  so ``fused`` is a (learned) re-mixing of the stride-32 map, and it is what the model hands to
  downstream heads; a linear probe can always zero out what it does not use.
* **Datasets with S2 and/or S1** (with or without HR): the global average pool of the fused map.
  It already mixes every modality and every valid frame (invalid frames are masked out by the
  fusion), so it is the one multi-modal, multi-temporal vector per sample.

The geo-context output (``geo``) is not used: latitude/longitude are not passed to the model,
so a probe never sees the sample's location through the prototypes.

HR image size. The HR encoder fuses at stride 32 and pads every stage's map to a multiple of
its window (8). An image whose sides are not multiples of 32 is padded at several stages
(150 px: 38 -> 40 tokens at stage 1, 19 -> 24 at stage 2, 10 -> 16 at stage 3), which costs
time and, unless the model masks them (``SwinV2Config.mask_padding``, on for ``tiny``), puts
zero tokens into the windows. So the batch is **bilinearly resized** (after
normalisation; bilinear weights sum to one, so the order does not matter) to a multiple of 32:
by default each side rounded **up** to the next multiple of 32 (AID 150 -> 160). Measured with
the ``tiny`` preset before it masked padding, on 2 CPU cores, batch 64, per image: 150 native 9.6 ms, 160 8.1 ms, 128
3.4 ms, 192 10.5 ms, 224 15.4 ms, 256 22.5 ms. Resizing and zero-padding to 160 cost the same
compute (same token grid), so resizing was taken: it keeps the whole image on the grid and adds
no mean-colour border that the pooled features would average in. Rounding up keeps every
source pixel (a 7 % upsampling for AID); ``image_size=128`` is 2.4x faster on CPU but throws away
27 % of the pixels, so it is an option, not the default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from skysense.data.sample import collate
from skysense.data.units import is_normalized, normalize

HR_MULTIPLE = 32
"""HR sides are resized to a multiple of this (the stride of the fused HR map)."""

MODEL_KEYS = ("hr", "s2", "s2_dates", "s2_mask", "s1", "s1_dates", "s1_mask")
"""Batch entries passed to the model (``lat``/``lon`` are left out: no geo-context)."""


def hr_size(height: int, width: int, image_size: int | None = None, multiple: int = HR_MULTIPLE) -> tuple[int, int]:
    """Size an HR image of ``height`` x ``width`` is resized to.

    Args:
        image_size: a square side (must be a positive multiple of ``multiple``), or None to
            round each side up to the next multiple of ``multiple`` (150 -> 160, 160 -> 160).
    """
    if image_size is not None:
        if image_size <= 0 or image_size % multiple:
            raise ValueError(f"image_size: expected a positive multiple of {multiple}, got {image_size}")
        return image_size, image_size
    return -(-height // multiple) * multiple, -(-width // multiple) * multiple


def resize_hr(hr: torch.Tensor, image_size: int | None = None) -> torch.Tensor:
    """Bilinear resize of a (B, 3, H, W) batch to :func:`hr_size` (unchanged when already there)."""
    size = hr_size(hr.shape[-2], hr.shape[-1], image_size)
    if tuple(hr.shape[-2:]) == size:
        return hr
    shrinking = size[0] < hr.shape[-2] or size[1] < hr.shape[-1]
    return F.interpolate(hr, size=size, mode="bilinear", align_corners=False, antialias=shrinking)


def pool_features(out: Mapping[str, Any]) -> torch.Tensor:
    """(B, D) pooled features from ``SkySense.forward_features`` output (see the module docstring)."""
    fused = out["fused"].mean(dim=(-2, -1))
    sentinel = any(m in out for m in ("s2", "s1"))
    if "hr_pyramid" in out and not sentinel:
        return torch.cat([level.mean(dim=(-2, -1)) for level in out["hr_pyramid"]] + [fused], dim=1)
    return fused


def feature_dim(config: Any, modalities: Sequence[str]) -> int:
    """Length of :func:`pool_features` vectors for a model config and the modalities present."""
    if "hr" in modalities and not any(m in modalities for m in ("s2", "s1")):
        return sum(config.hr.out_dims) + config.fusion.embed_dim
    return config.fusion.embed_dim


def per_class_subset(dataset: Dataset, limit: int) -> Subset:
    """The first ``limit`` items of each class, in dataset order (single-label datasets).

    Classes are read from the index (``dataset.items[i].extra["label"]``), so nothing is loaded.

    Raises:
        ValueError: ``limit`` < 1, or the dataset's items carry no integer class label.
    """
    if limit < 1:
        raise ValueError(f"limit per class: expected >= 1, got {limit}")
    items = getattr(dataset, "items", None)
    if items is None or not all(isinstance(getattr(it, "extra", {}).get("label"), int) for it in items):
        raise ValueError(f"{getattr(dataset, 'name', type(dataset).__name__)}: a per-class limit needs "
                         "single-label items (an integer 'label' in the index)")
    seen: dict[int, int] = {}
    keep = []
    for index, item in enumerate(items):
        label = item.extra["label"]
        if seen.get(label, 0) < limit:
            seen[label] = seen.get(label, 0) + 1
            keep.append(index)
    return Subset(dataset, keep)


def extract_features(
    model: torch.nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    num_workers: int = 0,
    image_size: int | None = None,
    progress: bool = True,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled frozen features of every sample of ``dataset``, in order.

    Batches come from a DataLoader with :func:`~skysense.data.sample.collate` (no shuffling);
    each batch is normalised once with :func:`~skysense.data.units.normalize` and the model's
    ``config`` (skipped when the samples are already marked normalised), HR images are resized
    (:func:`resize_hr`), and the model runs under ``torch.inference_mode`` in eval mode (its
    previous mode is restored afterwards).

    Args:
        model: a :class:`~skysense.models.SkySense` (anything with ``config`` and
            ``forward_features``).
        dataset: sample dicts with a ``label``.
        num_workers: DataLoader workers; 0 (default) decodes in this process, which is best on
            a small CPU machine where the model needs every core (decoding an AID JPEG takes
            0.6 ms, the tiny model 8 ms per image).
        image_size: HR square side (multiple of 32) or None to round sides up to a multiple of 32.
        progress: show a tqdm bar (on stderr).

    Returns:
        ``features`` (N, D) float32 on the CPU and ``labels`` (N,) int64 or (N, K) float
        (multi-hot), in dataset order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    if len(dataset) == 0:
        raise ValueError("extract_features: the dataset is empty")
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    features: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
                if "label" not in batch:
                    raise ValueError("extract_features: samples have no 'label'")
                if not is_normalized(batch):
                    normalize(batch, model.config)
                inputs = {k: batch[k].to(device) for k in MODEL_KEYS if isinstance(batch.get(k), torch.Tensor)}
                if "hr" in inputs:
                    inputs["hr"] = resize_hr(inputs["hr"], image_size)
                out = model.forward_features(**inputs)
                features.append(pool_features(out).float().cpu())
                labels.append(torch.as_tensor(batch["label"]).cpu())
    finally:
        model.train(was_training)
    return torch.cat(features), torch.cat(labels)
