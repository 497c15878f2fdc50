"""The sample schema shared by every dataset, its checks, and ``collate`` into model batches.

A sample is a TorchGeo-style dict. Every key is optional except that at least one of ``hr``,
``s2``, ``s1`` is present:

==============  ==================  =========================================================
key             shape / type        meaning
==============  ==================  =========================================================
``hr``          (3, H, W) float     R, G, B on the 0-255 scale (or normalised); a dataset
                                    that reads more bands (``hr_bands=("R", "G", "B", "NIR")``)
                                    gives (C, H, W) in its ``bands["hr"]`` order
``s2``          (T, 10, h, w) float B2..B12 (``S2_BANDS``), L2A reflectance x 10000
``s2_dates``    (T,) int64          day of year 1..366 of each frame
``s2_mask``     (T,) bool           True for real frames, False for padding / missing
``s1``          (T', 2, h, w) float VV, VH backscatter in dB
``s1_dates``    (T',) int64
``s1_mask``     (T',) bool
``lat``/``lon`` () float32          degrees WGS84 of the footprint centre
``label``       tensor              class index () int64, or multi-hot (K,) float
``mask``        (H, W) int64        per-pixel target (segmentation, change); -1 = ignore
``boxes``       (N, 4|8) float      detection boxes in pixels of ``hr``: x0, y0, x1, y1
                                    (horizontal) or x1, y1, ..., x4, y4 (oriented corners)
``labels``      (N,) int64          class index of each box
``difficult``   (N,) bool           boxes flagged difficult by the annotators
``crs``         rasterio CRS        not a tensor: collated into a list
``transform``   affine.Affine       not a tensor: collated into a list
``normalized``  bool                set by :func:`skysense.data.units.normalize`
==============  ==================  =========================================================

:func:`collate` turns a list of samples into a batch for ``model.forward_features(**batch)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from skysense.config import HR_BANDS, S1_BANDS, S2_BANDS

SERIES = ("s2", "s1")
"""Time-series modalities: padded to the longest series of a batch."""

CHANNELS = {"hr": len(HR_BANDS), "s2": len(S2_BANDS), "s1": len(S1_BANDS)}

DETECTION_KEYS = ("boxes", "labels", "difficult")
"""Per-object targets: one row per object, collated into lists."""

IGNORE_INDEX = -1
"""Value of ``mask`` pixels without a label (nodata, unlabelled, boundary)."""

CHANGE_CLASSES = ("no_change", "change")
"""What the values 0 and 1 of a ``change`` mask mean."""

PAD_DAY_OF_YEAR = 1
"""Day of year given to padding frames (they are masked out, but the value must be valid)."""



def class_index(value: Any, classes: Sequence[str], where: str, key: str = "label") -> int:
    """The index of a class given by name (one of ``classes``) or by index; the error names
    ``where``, the ``key`` that held it and the classes."""
    if isinstance(value, str) and value in classes:
        return list(classes).index(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(classes):
        return value
    raise ValueError(f"{where}: {key} {value!r}: expected one of {list(classes)} or an index 0..{len(classes) - 1}")


def _fail(key: str, what: str, expected: object, actual: object, where: str = "") -> None:
    prefix = f"{where}: " if where else ""
    raise ValueError(f"{prefix}sample key {key!r}: {what}: expected {expected}, got {actual}")


def check_sample(sample: Mapping[str, Any], where: str = "", channels: Mapping[str, int] | None = None) -> None:
    """Check a sample against the schema; errors name the key and expected vs actual.

    Args:
        where: prefix for error messages (e.g. the sample's file).
        channels: band count per modality where it differs from :data:`CHANNELS` (a dataset
            read with other HR bands).
    """
    channels = {**CHANNELS, **(channels or {})}
    if not any(sample.get(m) is not None for m in CHANNELS):
        _fail("hr/s2/s1", "presence", "at least one modality", sorted(sample), where)
    hr = sample.get("hr")
    if hr is not None:
        if not isinstance(hr, torch.Tensor) or hr.ndim != 3 or hr.shape[0] != channels["hr"]:
            _fail("hr", "shape", f"({channels['hr']}, H, W) tensor", getattr(hr, "shape", type(hr).__name__), where)
        if not hr.is_floating_point():
            _fail("hr", "dtype", "floating point", hr.dtype, where)
    for m in SERIES:
        x = sample.get(m)
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != channels[m]:
            _fail(m, "shape", f"(T, {channels[m]}, h, w) tensor", getattr(x, "shape", type(x).__name__), where)
        if not x.is_floating_point():
            _fail(m, "dtype", "floating point", x.dtype, where)
        frames = x.shape[0]
        dates = sample.get(f"{m}_dates")
        if dates is not None:
            if dates.shape != (frames,) or dates.dtype != torch.int64:
                _fail(f"{m}_dates", "shape/dtype", f"({frames},) int64", f"{tuple(dates.shape)} {dates.dtype}", where)
            if frames and (int(dates.min()) < 1 or int(dates.max()) > 366):
                _fail(f"{m}_dates", "day of year", "1..366", f"{int(dates.min())}..{int(dates.max())}", where)
        mask = sample.get(f"{m}_mask")
        if mask is not None and (mask.shape != (frames,) or mask.dtype != torch.bool):
            _fail(f"{m}_mask", "shape/dtype", f"({frames},) bool", f"{tuple(mask.shape)} {mask.dtype}", where)
    boxes = sample.get("boxes")
    if boxes is not None:
        if (not isinstance(boxes, torch.Tensor) or boxes.ndim != 2 or boxes.shape[1] not in (4, 8)
                or not boxes.is_floating_point()):
            _fail("boxes", "shape/dtype", "(N, 4) or (N, 8) float tensor",
                  f"{tuple(getattr(boxes, 'shape', ()))} {getattr(boxes, 'dtype', type(boxes).__name__)}", where)
        for key in ("labels", "difficult"):
            value = sample.get(key)
            if value is not None and (not isinstance(value, torch.Tensor) or value.shape != (boxes.shape[0],)):
                _fail(key, "shape", f"({boxes.shape[0]},) tensor (one per box)",
                      getattr(value, "shape", type(value).__name__), where)
    for key in ("lat", "lon"):
        value = sample.get(key)
        if value is not None and (not isinstance(value, torch.Tensor) or value.ndim != 0):
            _fail(key, "shape", "scalar tensor", getattr(value, "shape", type(value).__name__), where)


def _pad_series(values: list[torch.Tensor], frames: int, fill: float | int | bool) -> torch.Tensor:
    padded = []
    for v in values:
        missing = frames - v.shape[0]
        if missing:
            pad = v.new_full((missing,) + tuple(v.shape[1:]), fill)
            v = torch.cat([v, pad])
        padded.append(v)
    return torch.stack(padded)


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack samples into a batch accepted by ``SkySense.forward_features(**batch)``.

    * tensors are stacked (``lat``/``lon`` become (B,));
    * ``s2``/``s1`` series of different lengths are padded to the longest with invalid frames
      (zeros, ``*_dates`` = 1, ``*_mask`` = False); a missing ``*_mask`` means all frames valid;
    * non-tensor values (``crs``, ``transform``, ids, paths) become lists;
    * per-object detection targets (``boxes``, ``labels``, ``difficult``: ``DETECTION_KEYS``)
      have a different length per sample and become lists of tensors (torchvision style);
    * ``normalized`` must agree between samples and stays one bool.

    Raises:
        ValueError: empty input, a key present in some samples only, or tensors whose shapes
            differ other than in the number of frames (names the key and the sample index).
    """
    if not samples:
        raise ValueError("collate: no samples")
    keys = list(samples[0])
    for i, s in enumerate(samples):
        if set(s) != set(keys):
            diff = sorted(set(s) ^ set(keys))
            raise ValueError(f"collate: sample {i} keys differ from sample 0 in {diff}")
    # Fill default masks so padding can mark frames invalid.
    filled = [dict(s) for s in samples]
    for m in SERIES:
        if m in keys and f"{m}_mask" not in keys:
            for s in filled:
                s[f"{m}_mask"] = torch.ones(s[m].shape[0], dtype=torch.bool)
            keys.append(f"{m}_mask")
    batch: dict[str, Any] = {}
    for key in keys:
        values = [s[key] for s in filled]
        if key == "normalized":
            if len({bool(v) for v in values}) > 1:
                raise ValueError("collate: samples mix normalised and raw values (key 'normalized')")
            batch[key] = bool(values[0])
            continue
        if key in DETECTION_KEYS or not all(isinstance(v, torch.Tensor) for v in values):
            batch[key] = list(values)
            continue
        series = next((m for m in SERIES if key == m or key.startswith(f"{m}_")), None)
        if series is not None and key in (series, f"{series}_dates", f"{series}_mask"):
            frames = max(v.shape[0] for v in values)
            rest = {tuple(v.shape[1:]) for v in values}
            if len(rest) > 1:
                raise ValueError(f"collate: key {key!r}: per-frame shapes differ between samples: {sorted(rest)}")
            fill = {series: 0.0, f"{series}_dates": PAD_DAY_OF_YEAR, f"{series}_mask": False}[key]
            batch[key] = _pad_series(values, frames, fill)
            continue
        shapes = [tuple(v.shape) for v in values]
        for i, shape in enumerate(shapes):
            if shape != shapes[0]:
                raise ValueError(f"collate: key {key!r}: sample {i} has shape {shape}, sample 0 has {shapes[0]}")
        batch[key] = torch.stack(values)
    return batch
