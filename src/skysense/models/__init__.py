"""SkySense networks: the encoders, the fusion and the full model."""

from skysense.models.fusion import FusionTransformer, PixelShuffleProjection
from skysense.models.geo_context import GeoContextPrototypes, region_index
from skysense.models.skysense import SkySense
from skysense.models.swin_v2 import SwinTransformerV2
from skysense.models.vit import VisionTransformer

__all__ = [
    "FusionTransformer",
    "GeoContextPrototypes",
    "PixelShuffleProjection",
    "SkySense",
    "SwinTransformerV2",
    "VisionTransformer",
    "region_index",
]
