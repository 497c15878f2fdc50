"""Configuration of a SkySense model: architecture sizes, bands, normalisation and presets.

Every number of the ``huge`` preset comes from the paper and the authors' released code
(see ``docs/REFERENCE.md`` in the repository, summarised from the authors' material):

* HR encoder: SwinV2-Huge, embed 352, depths (2, 2, 18, 2), heads (8, 16, 32, 64), window 8,
  patch 4, an extra LayerNorm after every 6th block of stage 3.
* S2 / S1 encoders: ViT-Large, patch 4, width 1024, depth 24, 16 heads, pos-embed grid 16x16
  (64 px inputs), the class token kept through all layers (official v1 behaviour).
* Projection ("UPHead"): 1x1 conv 1024 -> 16 * 2816 then PixelShuffle(4).
* Fusion: 2816 -> 1024 linear, 24 pre-norm layers, 16 heads, an extra token per location,
  a learnable day-of-year table of shape (365, 2816) added before the projection.

``tiny`` and ``base`` are our own choices (the paper publishes only ``huge``). ``tiny``, which
has no official weights and is trained on small CPU-sized views, masks the tokens that pad a
SwinV2 map to its window (``SwinV2Config.mask_padding``): at 64 px its last two stages are 4 x 4
and 2 x 2 maps that the official semantics pad to 8 x 8 zeros, which costs time (masked, the HR
encoder's forward+backward is 2.1x faster at 64 px and 5.3x at 32 px: ``benchmarks/swin_padding.py``)
and trains the model on windows of mostly padding.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODALITIES: tuple[str, ...] = ("hr", "s2", "s1")
"""Modality names, in the order their tokens enter the fusion sequence."""

HR_BANDS: tuple[str, ...] = ("R", "G", "B")
S2_BANDS: tuple[str, ...] = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")
S1_BANDS: tuple[str, ...] = ("VV", "VH")


@dataclass
class SwinV2Config:
    """SwinV2 encoder for high-resolution optical images (official mmcls semantics)."""

    in_chans: int = 3
    embed_dim: int = 352
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (8, 16, 32, 64)
    window_size: int = 8
    patch_size: int = 4
    mlp_ratio: float = 4.0
    # An extra LayerNorm on the residual stream after every n-th block of stage 3 (0: never).
    extra_norm_every: int = 0
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-5
    # Mask the zero tokens that pad a map to a multiple of the window out of every attention (and
    # attend over a map smaller than one window without padding it). False is the official
    # semantics (padded tokens are attended to), which the released weights were trained with.
    mask_padding: bool = False

    @property
    def out_dims(self) -> tuple[int, ...]:
        """Channels of the four pyramid levels (strides 4, 8, 16, 32)."""
        return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))


@dataclass
class ViTConfig:
    """ViT encoder applied to each frame of a Sentinel time series (official mmseg semantics)."""

    in_chans: int = 10
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    patch_size: int = 4
    # Grid of the stored position embedding; other input sizes interpolate it (bicubic).
    pos_grid: int = 16
    mlp_ratio: float = 4.0
    # Official v1 keeps the class token through every layer; SkySense++ drops it after pos-embed.
    keep_cls_token: bool = True
    drop_path_rate: float = 0.0
    # SkySense++ uses 1e-6 when it reuses these weights; the eps is not stored in the files.
    norm_eps: float = 1e-6


@dataclass
class FusionConfig:
    """Multi-modal temporal fusion transformer over per-location token sequences."""

    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-5
    # Slots of the learnable day-of-year table; index = day_of_year - 1, day 366 shares slot 365.
    day_of_year_slots: int = 365
    # Modalities whose frames receive the day-of-year encoding. The released weights only
    # add it to Sentinel-2 tokens.
    date_encoded: tuple[str, ...] = ("s2",)


@dataclass
class GeoContextConfig:
    """Region-specific prototypes selected by latitude/longitude.

    The globe is cut into ``lat_bands`` bands equally spaced in sin(latitude) and ``lon_bins``
    equal longitude bins. Every cell of such a grid has the same surface area
    (510.1e6 km2 / 4096 = 124,500 km2 for the default 64 x 64), so each prototype set covers as
    much ground as any other; the paper gives N_R = 4096 regions but not the grid.
    """

    enabled: bool = True
    lat_bands: int = 64
    lon_bins: int = 64
    num_prototypes: int = 100

    @property
    def num_regions(self) -> int:
        return self.lat_bands * self.lon_bins


@dataclass
class ModalityInput:
    """How raw values of one modality are turned into model inputs."""

    bands: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    units: str
    gsd_m: float


def _default_inputs() -> dict[str, ModalityInput]:
    # Published normalisation: HR ImageNet statistics on the 0-255 scale; S2 L2A digital
    # numbers (x10000 reflectance, no offset); S1 backscatter in dB.
    return {
        "hr": ModalityInput(
            bands=HR_BANDS,
            mean=(123.675, 116.28, 103.53),
            std=(58.395, 57.12, 57.375),
            units="8-bit digital number (0-255)",
            gsd_m=0.3,
        ),
        "s2": ModalityInput(
            bands=S2_BANDS,
            mean=(884.29673756, 1144.16202635, 1297.47289228, 1624.90992062, 2194.6423161,
                  2422.21248945, 2517.76053101, 2581.64687018, 2368.51236873, 1805.06846033),
            std=(1155.15170768, 1183.6292542, 1368.11351514, 1370.265037, 1355.55390699,
                 1416.51487101, 1474.78900051, 1439.3086061, 1455.52084939, 1343.48379601),
            units="L2A surface reflectance x 10000",
            gsd_m=10.0,
        ),
        "s1": ModalityInput(
            bands=S1_BANDS,
            mean=(-12.54847273, -20.19237134),
            std=(5.25697717, 5.91150917),
            units="backscatter in dB",
            gsd_m=10.0,
        ),
    }


@dataclass
class SkySenseConfig:
    """Everything needed to rebuild a SkySense model and feed it correctly."""

    preset: str = "huge"
    hr: SwinV2Config = field(default_factory=SwinV2Config)
    s2: ViTConfig = field(default_factory=ViTConfig)
    s1: ViTConfig = field(default_factory=lambda: ViTConfig(in_chans=2))
    fusion: FusionConfig = field(default_factory=FusionConfig)
    geo_context: GeoContextConfig = field(default_factory=GeoContextConfig)
    inputs: dict[str, ModalityInput] = field(default_factory=_default_inputs)
    # Coordinates are always passed as separate ``lat`` and ``lon`` tensors in degrees (WGS84).
    lat_lon_order: str = "lat,lon"

    def __post_init__(self) -> None:
        for name, encoder in (("s2", self.s2), ("s1", self.s1)):
            bands = self.inputs[name].bands
            if encoder.in_chans != len(bands):
                raise ValueError(
                    f"config: modality {name!r} lists {len(bands)} bands {bands} but its encoder "
                    f"expects in_chans={encoder.in_chans}"
                )
        if self.hr.in_chans != len(self.inputs["hr"].bands):
            raise ValueError(
                f"config: modality 'hr' lists {len(self.inputs['hr'].bands)} bands but its encoder "
                f"expects in_chans={self.hr.in_chans}"
            )
        unknown = set(self.fusion.date_encoded) - {"s2", "s1"}
        if unknown:
            raise ValueError(
                f"config: fusion.date_encoded may name the time series 's2' and 's1'; got {sorted(unknown)}"
            )

    @property
    def fusion_input_dim(self) -> int:
        """Width of the tokens entering the fusion: the HR encoder's last stage."""
        return self.hr.out_dims[-1]

    @property
    def hr_stride(self) -> int:
        """Stride of the HR pyramid level used for fusion (the last one)."""
        return self.hr.patch_size * 2 ** (len(self.hr.depths) - 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SkySenseConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        inputs = data.get("inputs")
        if isinstance(inputs, dict):
            data = {**data, "inputs": {m: build_dataclass(ModalityInput, v, f"config.inputs.{m}")
                                       for m, v in inputs.items()}}
        nested = {"hr": SwinV2Config, "s2": ViTConfig, "s1": ViTConfig, "fusion": FusionConfig,
                  "geo_context": GeoContextConfig}
        return build_dataclass(cls, data, "config", nested)


def config_from_yaml(kind: Any, path: str | Path, what: str) -> Any:
    """``kind.from_dict`` of a YAML file's top-level mapping; errors name the file.

    Args:
        kind: a config class with a ``from_dict`` classmethod.
        what: what the file holds, for the not-found message (e.g. "pretraining config").
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return kind.from_dict(data)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from error


def build_dataclass(kind: type, values: dict[str, Any], where: str,
                    nested: dict[str, type] | None = None) -> Any:
    """Dataclass ``kind`` from a JSON/YAML mapping: lists become tuples, ``nested`` names the
    fields (at any depth) that are dataclasses themselves; unknown keys are an error naming
    ``where`` and the accepted keys."""
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} in {where!r}; expected a subset of {sorted(names)}")
    nested = nested or {}
    kwargs = {}
    for key, value in values.items():
        if key in nested and isinstance(value, dict):
            kwargs[key] = build_dataclass(nested[key], value, f"{where}.{key}", nested)
        elif isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return kind(**kwargs)


def _tiny() -> SkySenseConfig:
    return SkySenseConfig(
        preset="tiny",
        hr=SwinV2Config(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), mask_padding=True),
        s2=ViTConfig(in_chans=10, embed_dim=96, depth=4, num_heads=3),
        s1=ViTConfig(in_chans=2, embed_dim=96, depth=4, num_heads=3),
        fusion=FusionConfig(embed_dim=128, depth=2, num_heads=4, date_encoded=("s2", "s1")),
        geo_context=GeoContextConfig(lat_bands=16, lon_bins=16, num_prototypes=16),
    )


def _base() -> SkySenseConfig:
    return SkySenseConfig(
        preset="base",
        hr=SwinV2Config(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
        s2=ViTConfig(in_chans=10, embed_dim=768, depth=12, num_heads=12),
        s1=ViTConfig(in_chans=2, embed_dim=768, depth=12, num_heads=12),
        fusion=FusionConfig(embed_dim=768, depth=12, num_heads=12, date_encoded=("s2", "s1")),
        geo_context=GeoContextConfig(num_prototypes=100),
    )


def _huge() -> SkySenseConfig:
    return SkySenseConfig(
        preset="huge",
        hr=SwinV2Config(extra_norm_every=6, drop_path_rate=0.2),
        s2=ViTConfig(in_chans=10, drop_path_rate=0.3),
        s1=ViTConfig(in_chans=2, drop_path_rate=0.3),
        fusion=FusionConfig(drop_path_rate=0.3),
    )


PRESETS = {"tiny": _tiny, "base": _base, "huge": _huge}


def preset_config(name: str) -> SkySenseConfig:
    """The configuration of a named preset (``tiny``, ``base`` or ``huge``)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}") from None
