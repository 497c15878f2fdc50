"""Convert the authors' released SkySense state dicts into this library's layout.

The six released files (users bring their own copies; they are not redistributable):

==========  ==================================  =================================================
part        file                                 keys
==========  ==================================  =================================================
``hr``      skysense_model_backbone_hr.pth       ``backbone.`` + mmcls SwinV2 names, ``mask_token``
``s2``      skysense_model_backbone_s2.pth       mmseg ViT names, plus ``ctpe`` (the date table)
``s1``      skysense_model_backbone_s1.pth       mmseg ViT names
``s2_head`` skysense_model_head_s2.pth           ``decoder.0.{weight,bias}``
``s1_head`` skysense_model_head_s1.pth           ``decoder.0.{weight,bias}``
``fusion``  skysense_model_fusion.pth            ``cls_token``, ``porj_linear``, mmseg layers
==========  ==================================  =================================================

Accepted variations: a leading ``backbone.`` on any key, the fused-attention spelling
``.Wqkv.`` for ``.in_proj_``, and a ``state_dict``/``model`` wrapper. Stored SwinV2 coordinate
buffers and ``mask_token`` are ignored (recomputed or unused at inference).

The mapping is written once as pairs of name templates, so it runs both ways:
:func:`to_official` produces the authors' layout from ours (used by the tests, and handy to
feed our weights to the authors' code).
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

PARTS = ("hr", "s2", "s1", "s2_head", "s1_head", "fusion")

_PARAM = "(?P<p>weight|bias)"

_TRANSFORMER_LAYER = [
    ("layers.{i}.ln1.{p}", "blocks.{i}.norm1.{p}"),
    ("layers.{i}.ln2.{p}", "blocks.{i}.norm2.{p}"),
    ("layers.{i}.attn.attn.in_proj_{p}", "blocks.{i}.attn.qkv.{p}"),
    ("layers.{i}.attn.attn.out_proj.{p}", "blocks.{i}.attn.proj.{p}"),
    ("layers.{i}.ffn.layers.0.0.{p}", "blocks.{i}.mlp.fc1.{p}"),
    ("layers.{i}.ffn.layers.1.{p}", "blocks.{i}.mlp.fc2.{p}"),
]

_VIT = [
    ("cls_token", "cls_token"),
    ("pos_embed", "pos_embed"),
    ("patch_embed.projection.{p}", "patch_embed.proj.{p}"),
    *_TRANSFORMER_LAYER,
]

_SWIN = [
    ("patch_embed.projection.{p}", "patch_embed.{p}"),
    ("patch_embed.norm.{p}", "patch_norm.{p}"),
    ("stages.{i}.downsample.reduction.weight", "stages.{i}.downsample.reduction.weight"),
    ("stages.{i}.downsample.norm.{p}", "stages.{i}.downsample.norm.{p}"),
    ("stages.{i}.blocks.{j}.attn.w_msa.logit_scale", "stages.{i}.blocks.{j}.attn.logit_scale"),
    ("stages.{i}.blocks.{j}.attn.w_msa.q_bias", "stages.{i}.blocks.{j}.attn.q_bias"),
    ("stages.{i}.blocks.{j}.attn.w_msa.v_bias", "stages.{i}.blocks.{j}.attn.v_bias"),
    ("stages.{i}.blocks.{j}.attn.w_msa.cpb_mlp.{k}.{p}", "stages.{i}.blocks.{j}.attn.cpb_mlp.{k}.{p}"),
    ("stages.{i}.blocks.{j}.attn.w_msa.qkv.weight", "stages.{i}.blocks.{j}.attn.qkv.weight"),
    ("stages.{i}.blocks.{j}.attn.w_msa.proj.{p}", "stages.{i}.blocks.{j}.attn.proj.{p}"),
    ("stages.{i}.blocks.{j}.norm{k}.{p}", "stages.{i}.blocks.{j}.norm{k}.{p}"),
    ("stages.{i}.blocks.{j}.ffn.layers.0.0.{p}", "stages.{i}.blocks.{j}.mlp.fc1.{p}"),
    ("stages.{i}.blocks.{j}.ffn.layers.1.{p}", "stages.{i}.blocks.{j}.mlp.fc2.{p}"),
    ("norm{i}.{p}", "out_norms.{i}.{p}"),
]

_HEAD = [("decoder.0.{p}", "conv.{p}")]

_FUSION = [
    ("cls_token", "extra_token"),
    ("porj_linear.{p}", "input_proj.{p}"),
    *_TRANSFORMER_LAYER,
]

# part -> (rules, prefix of our module in SkySense's state dict)
_PART_RULES = {
    "hr": (_SWIN, "hr_encoder."),
    "s2": (_VIT, "s2_encoder."),
    "s1": (_VIT, "s1_encoder."),
    "s2_head": (_HEAD, "s2_projection."),
    "s1_head": (_HEAD, "s1_projection."),
    "fusion": (_FUSION, "fusion."),
}

# Keys that may be in the files and carry nothing we need.
_IGNORED = re.compile(r"^(mask_token|.*\.relative_coords_table|.*\.relative_position_index)$")
# The date table ships inside the S2 backbone file; ours lives in the fusion.
_DATE_TABLE_OFFICIAL, _DATE_TABLE_OURS = "ctpe", "fusion.day_of_year"


@functools.lru_cache(maxsize=None)
def _template_regex(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    for name in ("i", "j", "k"):
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>\\d+)")
    pattern = pattern.replace(re.escape("{p}"), _PARAM)
    return re.compile(f"^{pattern}$")


def _rename(key: str, rules: list[tuple[str, str]], forward: bool) -> str | None:
    for official, ours in rules:
        source, target = (official, ours) if forward else (ours, official)
        match = _template_regex(source).match(key)
        if match:
            return target.format(**match.groupdict())
    return None


def normalise_official_key(key: str) -> str:
    """Strip a leading ``backbone.`` and spell fused attention as ``in_proj_``."""
    if key.startswith("backbone."):
        key = key[len("backbone."):]
    return key.replace(".Wqkv.", ".in_proj_")


@dataclass
class ConversionReport:
    """What a conversion did, key by key."""

    converted: dict[str, str] = field(default_factory=dict)  # official key -> our key
    ignored: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"converted {len(self.converted)} tensors"]
        if self.ignored:
            lines.append(f"ignored (not needed): {', '.join(self.ignored)}")
        if self.unexpected:
            lines.append(f"unexpected (not converted): {', '.join(self.unexpected)}")
        if self.missing:
            lines.append(f"missing (left at initialisation): {', '.join(self.missing)}")
        return "\n".join(lines)


def convert_state_dicts(
    parts: dict[str, dict[str, torch.Tensor]],
    expected: dict[str, torch.Size],
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Map official state dicts (by part name) onto our keys, checking every shape.

    Args:
        parts: part name (see :data:`PARTS`) -> that file's state dict.
        expected: our full model's key -> shape (e.g. from a model built on the meta device).

    Returns:
        Our state dict for the converted keys, and a report. ``missing`` lists our keys of the
        given parts that no file provided.

    Raises:
        ValueError: naming the official key, our key and both shapes when a shape differs.
    """
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; expected a subset of {list(PARTS)}")
    report = ConversionReport()
    state: dict[str, torch.Tensor] = {}
    for part, official_state in parts.items():
        rules, prefix = _PART_RULES[part]
        for raw_key, tensor in official_state.items():
            key = normalise_official_key(raw_key)
            if part == "s2" and key == _DATE_TABLE_OFFICIAL:
                ours = _DATE_TABLE_OURS
                tensor = tensor.reshape(tensor.shape[-2:]) if tensor.ndim == 3 else tensor
            elif _IGNORED.match(key):
                report.ignored.append(f"{part}:{raw_key}")
                continue
            else:
                renamed = _rename(key, rules, forward=True)
                if renamed is None or prefix + renamed not in expected:
                    report.unexpected.append(f"{part}:{raw_key}")
                    continue
                ours = prefix + renamed
            if ours not in expected:
                report.unexpected.append(f"{part}:{raw_key}")
                continue
            if tuple(tensor.shape) != tuple(expected[ours]):
                raise ValueError(
                    f"{part}: key {raw_key!r} (ours {ours!r}): shape mismatch: expected "
                    f"{tuple(expected[ours])}, got {tuple(tensor.shape)}"
                )
            state[ours] = tensor
            report.converted[f"{part}:{raw_key}"] = ours
    prefixes = tuple(_PART_RULES[p][1] for p in parts)
    needed = [k for k in expected if k.startswith(prefixes) or ("s2" in parts and k == _DATE_TABLE_OURS)]
    report.missing = [k for k in needed if k not in state]
    return state, report


def to_official(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Our state dict -> the authors' six state dicts (un-prefixed names; ``ctpe`` in ``s2``)."""
    out: dict[str, dict[str, torch.Tensor]] = {part: {} for part in PARTS}
    for part, (rules, prefix) in _PART_RULES.items():
        for key, tensor in state.items():
            if key.startswith(prefix):
                official = _rename(key[len(prefix):], rules, forward=False)
                if official is not None:
                    out[part][official] = tensor
    if _DATE_TABLE_OURS in state:
        out["s2"][_DATE_TABLE_OFFICIAL] = state[_DATE_TABLE_OURS][None]
    return out


def load_official_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a released ``.pth`` without unpickling code (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or unsafe files
        raise ValueError(f"{path}: cannot be read as a weights-only PyTorch state dict: {error}") from error
    for wrapper in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict), got {type(data).__name__}")
    return data
