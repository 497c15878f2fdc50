"""Other band lists for the HR encoder: RGB + near-infrared (RGBNIR), reordered or fewer bands.

The released HR encoder takes R, G, B. The authors feed four-band (R, G, B, NIR) imagery by
copying the red filter of the patch embedding to the NIR band; :func:`with_hr_bands` does that
for any band list:

* a band the model already takes keeps its filter and its normalisation;
* a new band starts from the filter of the band named in ``init`` (default: ``NIR`` and ``N``
  from ``R``, the authors' choice) and, unless ``mean`` / ``std`` give its own statistics, is
  normalised with that band's (our choice: the copied filter then sees values on the scale it
  was trained on; the authors publish no NIR statistics);
* a band that is left out loses its filter.

The model's config (``hr.in_chans`` and ``inputs["hr"]``) follows, so ``save_pretrained`` /
``from_pretrained``, :func:`skysense.data.units.normalize` and every reader that asks the
config for the HR bands (``skysense embed`` reads that many bands of an HR GeoTIFF) see the new
list. With ``NIR`` copied from ``R``, an image whose NIR band equals its mean after normalising
gives exactly the three-band model's features: the copied filter adds nothing there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from skysense.config import ModalityInput

DEFAULT_INIT: dict[str, str] = {"NIR": "R", "N": "R"}
"""The band whose filter a new band starts from when ``init`` does not say (the authors: NIR
from red)."""


def parse_bands(text: str) -> tuple[str, ...]:
    """``"R,G,B,NIR"`` -> ``("R", "G", "B", "NIR")`` (a command-line band list)."""
    bands = tuple(b.strip() for b in text.split(",") if b.strip())
    if not bands:
        raise ValueError(f"hr bands: expected a comma-separated list such as R,G,B,NIR, got {text!r}")
    return bands


def with_hr_bands(model: nn.Module, bands: Sequence[str], init: Mapping[str, str] | None = None,
                  mean: Mapping[str, float] | None = None, std: Mapping[str, float] | None = None) -> nn.Module:
    """Make ``model`` (a :class:`~skysense.models.SkySense`) take the HR bands ``bands``, in place.

    Args:
        model: the model; its HR patch embedding and config are replaced.
        bands: the new band list, in the order of the input's channels, e.g. ``("R", "G", "B", "NIR")``.
        init: for each new band, the existing band whose filter it copies (default
            :data:`DEFAULT_INIT`).
        mean, std: normalisation of new bands (default: that of the band they copy). Only new
            bands may be given: the existing ones keep the statistics their filters were trained with.

    Returns:
        ``model``.

    Raises:
        ValueError: ``bands`` is empty or repeats a band; a new band has no ``init`` entry, or
            its entry names a band the model does not take; ``mean`` / ``std`` name a band that
            is not new, or a standard deviation is not positive.
    """
    bands = tuple(bands)
    config = model.config
    spec: ModalityInput = config.inputs["hr"]
    current = tuple(spec.bands)
    if not bands:
        raise ValueError(f"hr bands: expected at least one band; the model takes {list(current)}")
    repeated = sorted({b for b in bands if bands.count(b) > 1})
    if repeated:
        raise ValueError(f"hr bands: {repeated} listed more than once in {list(bands)}")
    init = {**DEFAULT_INIT, **(init or {})}
    mean, std = dict(mean or {}), dict(std or {})
    new = [b for b in bands if b not in current]
    for name, given in (("mean", mean), ("std", std)):
        stray = sorted(set(given) - set(new))
        if stray:
            raise ValueError(f"hr bands: {name} given for {stray}, which the model already takes "
                             f"({list(current)}); only new bands ({new}) take statistics")
    sources = {}
    for band in bands:
        source = band if band in current else init.get(band)
        if source is None:
            raise ValueError(f"hr bands: new band {band!r} needs a band to copy its filter from "
                             f"(init={{{band!r}: one of {list(current)}}})")
        if source not in current:
            raise ValueError(f"hr bands: band {band!r} would copy the filter of {source!r}, which the "
                             f"model does not take; expected one of {list(current)}")
        if band in std and not std[band] > 0:
            raise ValueError(f"hr bands: std of {band!r}: expected a positive number, got {std[band]}")
        sources[band] = current.index(source)

    embed = model.hr_encoder.patch_embed
    index = torch.tensor([sources[b] for b in bands], device=embed.weight.device)
    replaced = nn.Conv2d(len(bands), embed.out_channels, embed.kernel_size, embed.stride,
                         bias=embed.bias is not None, device=embed.weight.device, dtype=embed.weight.dtype)
    with torch.no_grad():
        replaced.weight.copy_(embed.weight.index_select(1, index))
        if embed.bias is not None:
            replaced.bias.copy_(embed.bias)
    replaced.weight.requires_grad_(embed.weight.requires_grad)
    if embed.bias is not None:
        replaced.bias.requires_grad_(embed.bias.requires_grad)
    model.hr_encoder.patch_embed = replaced

    config.hr.in_chans = len(bands)
    config.inputs["hr"] = dataclasses.replace(
        spec,
        bands=bands,
        mean=tuple(float(mean.get(b, spec.mean[sources[b]])) for b in bands),
        std=tuple(float(std.get(b, spec.std[sources[b]])) for b in bands),
    )
    return model
