"""The SkySense model: factorized multi-modal spatiotemporal encoder with geo-context.

Inputs (any non-empty subset of modalities; band order from ``config.inputs``):

* ``hr``: (B, 3, H, W) high-resolution optical image, R, G, B, normalised (other band lists,
  e.g. R, G, B, NIR: :meth:`SkySense.with_hr_bands`).
* ``s2``: (B, T, 10, h, w) Sentinel-2 frames, B2..B12, normalised; ``s2_dates`` (B, T) day of
  year 1..366; ``s2_mask`` (B, T) bool, True for valid frames (default: all valid).
* ``s1``: (B, T', 2, h, w) Sentinel-1 frames, VV, VH, normalised; ``s1_dates``; ``s1_mask``.
* ``lat``, ``lon``: (B,) degrees, for the geo-context prototypes (optional).

Frames marked invalid never reach an encoder (they may hold NaN) and are masked out of the
fusion, so samples with different numbers of frames share a batch by padding.

Grids: HR features are taken at stride 32, S2/S1 features at the ViT grid (stride 4) and
brought back to their pixel grid by the PixelShuffle projection; so HR of H pixels fuses with
S2/S1 of H/32 pixels (2048 px at 0.3 m with 64 px at 10 m).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from skysense.config import SkySenseConfig, preset_config
from skysense.models.fusion import FusionTransformer, PixelShuffleProjection
from skysense.models.geo_context import GeoContextPrototypes
from skysense.models.attention import check_attention_backends, set_attention_backends
from skysense.models.swin_v2 import SwinTransformerV2
from skysense.models.vit import VisionTransformer
from skysense import validation

SENTINEL = ("s2", "s1")
# The networks a setting may name per network (attention_backends, activation_checkpointing):
# the encoders of each modality, the fusion transformer, the geo-context module.
NETWORKS = ("hr", *SENTINEL, "fusion", "geo")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class SkySense(nn.Module):
    """HR SwinV2, S2 and S1 ViTs, projections, fusion transformer and geo-context prototypes."""

    def __init__(self, config: SkySenseConfig) -> None:
        super().__init__()
        self.config = config
        width = config.fusion_input_dim
        self.hr_encoder = SwinTransformerV2(config.hr)
        self.s2_encoder = VisionTransformer(config.s2)
        self.s1_encoder = VisionTransformer(config.s1)
        self.s2_projection = PixelShuffleProjection(config.s2.embed_dim, width, config.s2.patch_size)
        self.s1_projection = PixelShuffleProjection(config.s1.embed_dim, width, config.s1.patch_size)
        self.fusion = FusionTransformer(config.fusion, width)
        # Read the inputs' values to check them (NaN/inf, day-of-year and lat/lon ranges): on a
        # GPU each check waits for the queued work. Training loops check batches on the host
        # (validation.checked_on_host) and switch this off.
        self.check_values = True
        self.geo_context = (
            GeoContextPrototypes(config.geo_context, config.fusion.embed_dim) if config.geo_context.enabled else None
        )

    @classmethod
    def from_preset(cls, name: str) -> "SkySense":
        return cls(preset_config(name))

    @classmethod
    def from_pretrained(cls, directory: str, map_location: str | torch.device = "cpu") -> "SkySense":
        """Load a folder written by :meth:`save_pretrained` (safetensors + config.json)."""
        from skysense.weights import from_pretrained

        return from_pretrained(directory, map_location)

    def save_pretrained(self, directory: str) -> None:
        """Write ``model.safetensors`` and ``config.json`` into ``directory``, atomically."""
        from skysense.weights import save_pretrained

        save_pretrained(self, directory)

    def with_hr_bands(self, bands: Sequence[str], init: Mapping[str, str] | None = None,
                      mean: Mapping[str, float] | None = None, std: Mapping[str, float] | None = None) -> "SkySense":
        """Take the HR bands ``bands`` (e.g. ``("R", "G", "B", "NIR")``), in place: new bands copy
        a filter of the patch embedding (NIR: red's, as the authors do); see
        :func:`skysense.models.hr_bands.with_hr_bands`. Returns the model."""
        from skysense.models.hr_bands import with_hr_bands

        return with_hr_bands(self, bands, init=init, mean=mean, std=std)

    # The networks whose attention kernels ``attention_backends`` settings name.
    ATTENTION_NETWORKS = NETWORKS

    @staticmethod
    def check_attention_backends(setting: Mapping[str, Sequence[str]]) -> None:
        """Raise ``ValueError`` naming ``attention_backends.<network>`` unless ``setting`` maps
        networks of :attr:`ATTENTION_NETWORKS` to non-empty lists of SDPA backend names."""
        if not isinstance(setting, Mapping):
            raise ValueError(f"attention_backends: expected a mapping such as {{fusion: [efficient]}}, got {setting!r}")
        for network, backends in setting.items():
            if network not in SkySense.ATTENTION_NETWORKS:
                raise ValueError(f"attention_backends: unknown network {network!r}; expected among "
                                 f"{list(SkySense.ATTENTION_NETWORKS)}")
            check_attention_backends(backends, f"attention_backends.{network}")

    def set_attention_backends(self, setting: Mapping[str, Sequence[str]]) -> int:
        """Restrict the SDPA backends of each named network (``{"fusion": ["efficient"]}``; the
        others keep torch's choice, see :func:`skysense.models.attention.set_attention_backends`).
        Call it before compiling. Returns the number of attention layers set."""
        self.check_attention_backends(setting)
        return sum(set_attention_backends(self.network(network), backends)
                   for network, backends in setting.items() if self.network(network) is not None)

    def network(self, name: str) -> nn.Module | None:
        """The network named ``name`` in :data:`NETWORKS` (``hr``, ``s2``, ``s1``: the
        encoders; ``fusion``; ``geo``: the geo-context module, None when the model has none)."""
        networks = {"hr": self.hr_encoder, "s2": self.s2_encoder, "s1": self.s1_encoder, "fusion": self.fusion,
                    "geo": self.geo_context}
        if name not in networks:
            raise KeyError(f"network {name!r}: expected one of {list(networks)}")
        return networks[name]

    def encoder(self, modality: str) -> nn.Module:
        return {"hr": self.hr_encoder, "s2": self.s2_encoder, "s1": self.s1_encoder}[modality]

    def projection(self, modality: str) -> PixelShuffleProjection:
        return {"s2": self.s2_projection, "s1": self.s1_projection}[modality]

    def encode_frames(self, modality: str, frames: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Run a Sentinel encoder on the valid frames only: (B, T, C, h, w) -> (B, T, D, h/p, w/p).

        ``valid`` (B, T), or None when every frame is valid. Invalid frames come out as zeros;
        they are masked downstream.
        """
        b, t = frames.shape[:2]
        flat = frames.flatten(0, 1)
        encoder = self.encoder(modality)
        keep = None if valid is None else valid.flatten()
        if keep is None or bool(keep.all()):  # a mask is read back to the host to know
            feats = encoder.forward_features(flat)
        else:
            chosen = encoder.forward_features(flat[keep])
            feats = chosen.new_zeros((b * t,) + chosen.shape[1:])
            feats[keep] = chosen
        return feats.reshape((b, t) + feats.shape[1:])

    def validate(self, inputs: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        """Check inputs, fill default masks; returns the present entries (see module docstring)."""
        cfg = self.config
        present = [m for m in ("hr", "s2", "s1") if inputs.get(m) is not None]
        if not present:
            raise ValueError("SkySense needs at least one of hr, s2, s1; got none")
        checked: dict[str, torch.Tensor] = {}
        batch = None
        grids: dict[str, tuple[int, int]] = {}
        for m in present:
            x = inputs[m]
            channels = len(cfg.inputs[m].bands)
            validation.check_image(m, x, rank=4 if m == "hr" else 5, channels=channels, channel_dim=1 if m == "hr" else 2)
            if batch is None:
                batch = x.shape[0]
            elif x.shape[0] != batch:
                raise ValueError(f"{m}: batch size: expected {batch} (as the first modality), got {x.shape[0]}")
            checked[m] = x
            if m == "hr":
                stride = cfg.hr_stride
                grids[m] = (_ceil_div(x.shape[-2], stride), _ceil_div(x.shape[-1], stride))
                continue
            frames = x.shape[1]
            valid = inputs.get(f"{m}_mask")
            if valid is not None:  # None: every frame valid, known without reading a value
                validation.check_mask(m, valid, batch, frames)
                checked[f"{m}_mask"] = valid
            dates = inputs.get(f"{m}_dates")
            if m in cfg.fusion.date_encoded:
                if dates is None:
                    raise ValueError(f"{m}_dates: required (day of year 1..366 per frame, shape {(batch, frames)}), got None")
                validation.check_dates(m, dates, batch, frames)
                checked[f"{m}_dates"] = dates
            patch = cfg.s2.patch_size if m == "s2" else cfg.s1.patch_size
            grids[m] = (_ceil_div(x.shape[-2], patch) * patch, _ceil_div(x.shape[-1], patch) * patch)
        validation.check_same_ground(grids, cfg)
        lat, lon = inputs.get("lat"), inputs.get("lon")
        if (lat is None) != (lon is None):
            raise ValueError("lat/lon: give both or neither")
        if lat is not None:
            validation.check_location(lat, lon, batch)
            checked["lat"], checked["lon"] = lat, lon
        if self.check_values:
            validation.check_values(checked)
        return checked

    def forward_features(
        self,
        hr: torch.Tensor | None = None,
        s2: torch.Tensor | None = None,
        s2_dates: torch.Tensor | None = None,
        s2_mask: torch.Tensor | None = None,
        s1: torch.Tensor | None = None,
        s1_dates: torch.Tensor | None = None,
        s1_mask: torch.Tensor | None = None,
        lat: torch.Tensor | None = None,
        lon: torch.Tensor | None = None,
        **unused: object,
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Encode the given modalities and fuse them.

        Extra keyword arguments (e.g. a sample dict's ``label``) are ignored, so
        ``model.forward_features(**batch)`` works on a TorchGeo-style batch.

        Returns a dict with, for the modalities present:
            ``hr_pyramid``: four maps (B, C_i, H/4/2^i, W/4/2^i);
            ``s2``, ``s1``: (B, T, D_vit, h/4, w/4) per-frame ViT features (zeros where invalid);
            ``fused``: (B, D, Hf, Wf) fusion output;
            ``geo``: (B, 2D, Hf, Wf) fused features with geo-context (when lat/lon are given).
        """
        inputs = self.validate(dict(hr=hr, s2=s2, s2_dates=s2_dates, s2_mask=s2_mask, s1=s1,
                                    s1_dates=s1_dates, s1_mask=s1_mask, lat=lat, lon=lon))
        out: dict[str, torch.Tensor | list[torch.Tensor]] = {}
        sequence = []
        if "hr" in inputs:
            pyramid = self.hr_encoder.forward_pyramid(inputs["hr"])
            out["hr_pyramid"] = pyramid
            sequence.append((pyramid[-1][:, None], None, None))
        for m in SENTINEL:
            if m not in inputs:
                continue
            valid = inputs.get(f"{m}_mask")
            feats = self.encode_frames(m, inputs[m], valid)
            out[m] = feats
            b, t = feats.shape[:2]
            projected = self.projection(m)(feats.flatten(0, 1))
            sequence.append((projected.reshape((b, t) + projected.shape[1:]), inputs.get(f"{m}_dates"), valid))
        fused = self.fusion(sequence)
        out["fused"] = fused
        if self.geo_context is not None and "lat" in inputs:
            out["geo"] = self.geo_context(fused, inputs["lat"], inputs["lon"])
        return out

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        """The fused feature map, with geo-context when lat/lon are given: (B, D or 2D, Hf, Wf)."""
        out = self.forward_features(**inputs)
        return out.get("geo", out["fused"])  # type: ignore[return-value]
