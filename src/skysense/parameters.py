"""Parameter counts per part of the model, computed without allocating memory."""

from __future__ import annotations

import torch
from torch import nn

from skysense.config import SkySenseConfig

PARTS = ("hr_encoder", "s2_encoder", "s1_encoder", "projections", "fusion", "geo_context")


def _numel(module: nn.Module | None) -> int:
    if module is None:
        return 0
    # Persistent buffers count too: the geo-context prototypes are learned state updated by EMA.
    return sum(p.numel() for p in module.parameters()) + sum(b.numel() for _, b in _persistent_buffers(module))


def _persistent_buffers(module: nn.Module):
    state = module.state_dict(keep_vars=True)
    return [(k, v) for k, v in state.items() if not isinstance(v, nn.Parameter)]


def count_parameters(config: SkySenseConfig) -> dict[str, int]:
    """Learned values per part (parameters plus persistent buffers), built on the meta device."""
    from skysense.models import SkySense

    with torch.device("meta"):
        model = SkySense(config)
    counts = {
        "hr_encoder": _numel(model.hr_encoder),
        "s2_encoder": _numel(model.s2_encoder),
        "s1_encoder": _numel(model.s1_encoder),
        "projections": _numel(model.s2_projection) + _numel(model.s1_projection),
        "fusion": _numel(model.fusion),
        "geo_context": _numel(model.geo_context),
    }
    counts["total"] = sum(counts.values())
    return counts
