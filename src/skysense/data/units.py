"""Conversion of raw pixel values to the units the model was trained on, and normalisation.

Model units (``SkySenseConfig.inputs[m].units``):

* ``s2``: Sentinel-2 **L2A** surface reflectance x 10000, no offset.
* ``s1``: Sentinel-1 backscatter in **dB**.
* ``hr``: 8-bit digital numbers on the **0-255** scale.

Sentinel-2 digital numbers (DN). ESA products store ``reflectance = (DN + OFFSET) / 10000``.
From **processing baseline 04.00** (products generated from 25 January 2022 onwards, ``N0400``
and later in the product name) the offset is ``BOA_ADD_OFFSET = -1000`` for L2A and
``RADIO_ADD_OFFSET = -1000`` for L1C; before it is 0. A DN of a baseline >= 04.00 product is
therefore 1000 higher than the same reflectance in an older product, and feeding it unchanged
shifts every band by ~1 std of the model's normalisation. :func:`s2_to_model_units` removes it:
pass the product's processing baseline (e.g. ``"04.00"``, parsed from the product name with
:func:`processing_baseline_from_name`) or the offset itself (read from the product metadata).

L1C products hold *top-of-atmosphere* reflectance: the same x10000 scale as L2A but without the
atmospheric correction, so they are accepted (``level="L1C"``) but remain a domain shift for a
model trained on L2A.

Values are never clipped: a negative reflectance (possible after removing the offset) is data.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping
from typing import Any

import numpy as np
import torch

from skysense.config import SkySenseConfig

S2_OFFSET_BASELINE = (4, 0)
"""First processing baseline (04.00) whose products carry the -1000 offset."""

S2_BOA_ADD_OFFSET = -1000.0
"""BOA_ADD_OFFSET (L2A) and RADIO_ADD_OFFSET (L1C) of products with baseline >= 04.00."""

S2_QUANTIFICATION = 10000.0

NORMALIZED_KEY = "normalized"

ArrayLike = np.ndarray | torch.Tensor


def _baseline_tuple(baseline: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d{1,2})\.(\d{2})", baseline.strip())
    if not match:
        raise ValueError(f"processing baseline: expected 'NN.NN' such as '04.00', got {baseline!r}")
    return int(match.group(1)), int(match.group(2))


def processing_baseline_from_name(name: str) -> str | None:
    """Processing baseline of a Sentinel-2 product name (``..._N0400_...`` -> ``"04.00"``).

    Returns None when the name carries none, or carries the placeholder ``N9999`` (used by
    re-processed datasets such as BigEarthNet v2, whose names do not tell the baseline).
    """
    match = re.search(r"_N(\d{2})(\d{2})(?=_|$)", name)
    if not match or match.group(0) == "_N9999":
        return None
    return f"{match.group(1)}.{match.group(2)}"


def s2_offset(processing_baseline: str | None = None, offset: float | None = None) -> float:
    """The additive offset of a product's DNs: ``offset`` if given, else from the baseline.

    Raises:
        ValueError: neither is given (the offset cannot be guessed from the values).
    """
    if offset is not None:
        return float(offset)
    if processing_baseline is None:
        raise ValueError(
            "Sentinel-2 DN offset unknown: give processing_baseline (e.g. '02.14' or '04.00') or the "
            "BOA_ADD_OFFSET/RADIO_ADD_OFFSET from the product metadata"
        )
    return S2_BOA_ADD_OFFSET if _baseline_tuple(processing_baseline) >= S2_OFFSET_BASELINE else 0.0


def s2_to_model_units(
    dn: ArrayLike,
    level: str = "L2A",
    processing_baseline: str | None = None,
    offset: float | None = None,
) -> ArrayLike:
    """Sentinel-2 DNs -> reflectance x 10000 without offset (float32).

    Args:
        dn: digital numbers as stored in the product (any shape).
        level: ``"L2A"`` (model domain) or ``"L1C"`` (top of atmosphere; same scale).
        processing_baseline: e.g. ``"04.00"``; baseline >= 04.00 implies offset -1000.
        offset: the product's BOA_ADD_OFFSET / RADIO_ADD_OFFSET; overrides the baseline.
    """
    if level not in ("L2A", "L1C"):
        raise ValueError(f"Sentinel-2 level: expected 'L2A' or 'L1C', got {level!r}")
    add = s2_offset(processing_baseline, offset)
    if isinstance(dn, torch.Tensor):
        return dn.float() + add
    return np.asarray(dn, dtype=np.float32) + np.float32(add)


def s1_linear_to_db(power: ArrayLike, floor: float = 1e-10) -> ArrayLike:
    """Sentinel-1 linear backscatter (sigma0 power) -> dB: ``10 log10(max(x, floor))``."""
    if isinstance(power, torch.Tensor):
        return 10.0 * torch.log10(power.float().clamp_min(floor))
    return (10.0 * np.log10(np.maximum(np.asarray(power, dtype=np.float32), floor))).astype(np.float32)


def s1_db_to_linear(db: ArrayLike) -> ArrayLike:
    """Sentinel-1 backscatter dB -> linear power: ``10 ** (x / 10)``."""
    if isinstance(db, torch.Tensor):
        return torch.pow(10.0, db.float() / 10.0)
    return np.power(10.0, np.asarray(db, dtype=np.float32) / 10.0).astype(np.float32)


def hr_to_8bit(image: ArrayLike, bit_depth: int | None = None) -> ArrayLike:
    """High-resolution optical values -> the 0-255 scale (float32).

    Args:
        image: integer-valued pixels.
        bit_depth: 8, 11, 12, 14 or 16 bits of the source; None infers it from the dtype
            (uint8 -> 8, uint16/int16 -> 16). A 16-bit file holding 11- or 12-bit data must
            say so, otherwise it comes out 16 or 32 times too dark.
    """
    if bit_depth is None:
        dtype = str(image.dtype).replace("torch.", "")
        inferred = {"uint8": 8, "uint16": 16, "int16": 16}.get(dtype)
        if inferred is None:
            raise ValueError(f"hr: cannot infer the bit depth of dtype {dtype}; pass bit_depth (8..16)")
        bit_depth = inferred
    if not 8 <= bit_depth <= 16:
        raise ValueError(f"hr: bit_depth: expected 8..16, got {bit_depth}")
    scale = 255.0 / (2**bit_depth - 1)
    if isinstance(image, torch.Tensor):
        return image.float() * scale
    return np.asarray(image, dtype=np.float32) * np.float32(scale)


def normalize(sample: MutableMapping[str, Any], config: SkySenseConfig) -> MutableMapping[str, Any]:
    """Apply ``(x - mean) / std`` of ``config.inputs`` to the ``hr``, ``s2`` and ``s1`` entries, once.

    Works on a sample (``s2`` (T, C, h, w)) or a batch (``s2`` (B, T, C, h, w)): the band axis is
    always the third from last. The sample is updated **in place** (and returned), with
    ``normalized=True`` recorded in it, so a second call on the same object is caught.

    Raises:
        ValueError: the sample is already normalised (``sample["normalized"]`` is true), or a
            modality's band count differs from the config's band list.
    """
    if sample.get(NORMALIZED_KEY):
        raise ValueError(
            "normalize: sample is already normalised (normalized=True); normalising twice would "
            "corrupt the inputs"
        )
    present = []
    for modality, spec in config.inputs.items():
        x = sample.get(modality)
        if x is None:
            continue
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"normalize: {modality}: expected a torch.Tensor, got {type(x).__name__}")
        if x.ndim < 3 or x.shape[-3] != len(spec.bands):
            raise ValueError(
                f"normalize: {modality}: band count: expected {len(spec.bands)} {spec.bands} on axis -3, "
                f"got shape {tuple(x.shape)}"
            )
        present.append((modality, spec, x))
    out = sample
    for modality, spec, x in present:  # all checked first: never half-normalised
        mean = torch.tensor(spec.mean, dtype=torch.float32, device=x.device).reshape(-1, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32, device=x.device).reshape(-1, 1, 1)
        out[modality] = (x.float() - mean) / std
    out[NORMALIZED_KEY] = True
    return out


def is_normalized(sample: Mapping[str, Any]) -> bool:
    """Whether :func:`normalize` was applied to this sample or batch."""
    return bool(sample.get(NORMALIZED_KEY, False))
