"""Checks on model inputs that fail loudly, naming the modality, expected and actual values."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from skysense.config import SkySenseConfig


def _fail(modality: str, what: str, expected: object, actual: object) -> None:
    raise ValueError(f"{modality}: {what}: expected {expected}, got {actual}")


def check_image(name: str, x: torch.Tensor, rank: int, channels: int, channel_dim: int) -> None:
    """Rank, dtype and band count of one modality's tensor."""
    if not isinstance(x, torch.Tensor):
        _fail(name, "type", "torch.Tensor", type(x).__name__)
    if x.ndim != rank:
        layout = "(B, C, H, W)" if rank == 4 else "(B, T, C, H, W)"
        _fail(name, "rank", f"{rank} dims {layout}", f"{x.ndim} dims with shape {tuple(x.shape)}")
    if not x.is_floating_point():
        _fail(name, "dtype", "a floating-point tensor", x.dtype)
    if x.shape[channel_dim] != channels:
        _fail(name, "band count", channels, x.shape[channel_dim])


def check_finite(name: str, x: torch.Tensor, valid: torch.Tensor | None = None) -> None:
    """No NaN or inf, except in frames marked invalid by ``valid`` (B, T)."""
    bad = ~torch.isfinite(x)
    if valid is not None:
        bad = bad & valid.reshape(valid.shape + (1,) * (x.ndim - 2))
    if bool(bad.any()):
        where = tuple(bad.nonzero()[0].tolist())
        _fail(name, "values", "finite numbers", f"NaN or inf, first at index {where}")


def check_dates(name: str, day_of_year: torch.Tensor, batch: int, frames: int) -> None:
    """Day-of-year tensor (B, T) of integers (shape and dtype; the range: :func:`check_date_range`)."""
    if day_of_year.shape != (batch, frames):
        _fail(f"{name}_dates", "shape", (batch, frames), tuple(day_of_year.shape))
    if day_of_year.is_floating_point() or day_of_year.dtype == torch.bool:
        _fail(f"{name}_dates", "dtype", "integer day of year", day_of_year.dtype)


def check_date_range(name: str, day_of_year: torch.Tensor) -> None:
    """Every day of year within 1..366."""
    if day_of_year.numel() and bool((day_of_year.min() < 1) | (day_of_year.max() > 366)):
        _fail(
            f"{name}_dates",
            "day of year",
            "values within 1..366",
            f"range {int(day_of_year.min())}..{int(day_of_year.max())}",
        )


def check_mask(name: str, valid: torch.Tensor, batch: int, frames: int) -> None:
    if valid.shape != (batch, frames):
        _fail(f"{name}_mask", "shape", (batch, frames), tuple(valid.shape))
    if valid.dtype != torch.bool:
        _fail(f"{name}_mask", "dtype", torch.bool, valid.dtype)


def check_location(lat: torch.Tensor, lon: torch.Tensor, batch: int) -> None:
    """Shapes (B,) of latitude and longitude (the range: :func:`check_location_range`)."""
    for name, value in (("lat", lat), ("lon", lon)):
        if value.shape != (batch,):
            _fail(name, "shape", (batch,), tuple(value.shape))


def check_location_range(lat: torch.Tensor, lon: torch.Tensor) -> None:
    """Finite degrees within [-90, 90] (lat) and [-180, 180] (lon)."""
    for name, value, limit in (("lat", lat, 90.0), ("lon", lon, 180.0)):
        if bool((~torch.isfinite(value) | (value.abs() > limit)).any()):
            _fail(name, "degrees", f"finite values within [-{limit}, {limit}]",
                  f"range {value.min().item()}..{value.max().item()}")


def check_values(inputs: Mapping[str, torch.Tensor | None]) -> None:
    """The checks that read values: finite images (valid frames of a series only), days of year
    within 1..366, lat/lon within range; also ``hr_post``, the after-image of a change pair.
    Each reads a result back to the host, which on a GPU waits for the work queued before it (a
    host-device synchronisation): training loops run these on the host batch
    (:func:`checked_on_host`) and switch the model's off."""
    for m in ("hr", "hr_post", "s2", "s1"):
        x = inputs.get(m)
        if x is None:
            continue
        check_finite(m, x, inputs.get(f"{m}_mask") if m in ("s2", "s1") else None)
        dates = inputs.get(f"{m}_dates")
        if dates is not None:
            check_date_range(m, dates)
    if inputs.get("lat") is not None and inputs.get("lon") is not None:
        check_location_range(inputs["lat"], inputs["lon"])


def checked_on_host(batch: Mapping[str, Any]) -> dict[str, Any]:
    """``batch`` (on the CPU) with its values checked (:func:`check_values`) and every series
    mask that marks all frames valid left out, before it goes to a GPU.

    A model given no mask knows, without reading a value back, that every frame is valid: it
    runs its encoders on all frames and the fusion without a key mask. Given a mask, it must
    read it to know (one host-device synchronisation each).
    """
    check_values(batch)
    return {key: value for key, value in batch.items()
            if not (key in ("s2_mask", "s1_mask") and isinstance(value, torch.Tensor) and bool(value.all()))}


def check_same_ground(grids: dict[str, tuple[int, int]], config: SkySenseConfig) -> None:
    """All modalities must map onto the same fusion grid (same ground footprint)."""
    if len(set(grids.values())) > 1:
        detail = ", ".join(f"{m} -> {g[0]}x{g[1]}" for m, g in grids.items())
        raise ValueError(
            "modalities do not cover the same ground: their fusion grids differ "
            f"({detail}); HR maps at 1/{config.hr_stride} of its pixels, S2 and S1 at their "
            "own pixels (e.g. HR 2048 px at 0.3 m with S2/S1 64 px at 10 m)"
        )
