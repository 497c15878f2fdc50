"""Encode several views in as few forward passes as possible.

The student encodes two global views per step (plus any local crops) and the teacher the two
global views. Every operation of :meth:`SkySense.forward_features` acts on each sample alone
(layer norms, attention within a sample, per-sample stochastic depth, geo-context by each
sample's location), so views with the same input shapes can be stacked along the batch and
encoded in one pass, and the outputs split back: the same features, with half the kernel
launches, one FSDP all-gather per block instead of one per view, and twice the rows per matrix
product. Views whose shapes differ (local crops) form their own group.

A frame mask that only some views of a group carry (:func:`skysense.validation.checked_on_host`
drops masks that mark every frame valid) is filled with all-valid rows for the others.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence

import torch

from skysense.models.skysense import SENTINEL, SkySense

MODEL_INPUTS: tuple[str, ...] = tuple(
    name for name, parameter in inspect.signature(SkySense.forward_features).parameters.items()
    if name != "self" and parameter.kind is parameter.POSITIONAL_OR_KEYWORD
)
"""The keys of a view that :meth:`SkySense.forward_features` reads (its named parameters: hr,
s2 and s1 with their dates and masks, lat, lon); other keys are left out."""

Features = dict[str, torch.Tensor | list[torch.Tensor]]


def _signature_keys(view: Mapping[str, torch.Tensor]) -> list[str]:
    return [key for key in MODEL_INPUTS if not key.endswith("_mask") and view.get(key) is not None]


def _signature(view: Mapping[str, torch.Tensor]) -> tuple:
    """What must agree for two views to share a pass: every input but the masks, by shape and dtype."""
    return tuple((key, tuple(view[key].shape[1:]), view[key].dtype, view[key].device) for key in _signature_keys(view))


def group_views(views: Sequence[Mapping[str, torch.Tensor]]) -> list[list[int]]:
    """Indices of the views that can be encoded together, in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for index, view in enumerate(views):
        groups.setdefault(_signature(view), []).append(index)
    return list(groups.values())


def stack_views(views: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One input dict holding ``views`` (of one group) one after another along the batch."""
    stacked = {key: torch.cat([view[key] for view in views]) for key in _signature_keys(views[0])}
    for m in SENTINEL:
        key = f"{m}_mask"
        if m in stacked and any(view.get(key) is not None for view in views):
            stacked[key] = torch.cat([
                view[key] if view.get(key) is not None
                else torch.ones(view[m].shape[:2], dtype=torch.bool, device=view[m].device)
                for view in views
            ])
    return stacked


def split_features(features: Features, sizes: Sequence[int]) -> list[Features]:
    """Undo :func:`stack_views` on the outputs: one features dict per view, in the same order."""
    parts: list[Features] = [{} for _ in sizes]
    for key, value in features.items():
        if isinstance(value, torch.Tensor):
            for part, piece in zip(parts, value.split(list(sizes))):
                part[key] = piece
        else:  # a list of maps (hr_pyramid)
            levels = [level.split(list(sizes)) for level in value]
            for i, part in enumerate(parts):
                part[key] = [pieces[i] for pieces in levels]
    return parts


def encode_views(
    encode: Callable[..., Features], views: Sequence[Mapping[str, torch.Tensor]], batched: bool = True
) -> list[Features]:
    """``encode(**view)`` for each view, with views of the same shapes stacked into one call.

    ``encode`` is a ``forward_features``; ``batched=False`` calls it once per view instead.
    """
    if not batched:
        return [encode(**view) for view in views]
    outputs: list[Features | None] = [None] * len(views)
    for group in group_views(views):
        members = [views[i] for i in group]
        if len(members) == 1:
            outputs[group[0]] = encode(**members[0])
            continue
        sizes = [_batch_size(view) for view in members]
        for i, part in zip(group, split_features(encode(**stack_views(members)), sizes)):
            outputs[i] = part
    return outputs  # type: ignore[return-value]


def _batch_size(view: Mapping[str, torch.Tensor]) -> int:
    return int(view[_signature_keys(view)[0]].shape[0])
