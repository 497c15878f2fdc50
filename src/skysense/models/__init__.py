"""SkySense networks: the encoders, the fusion and the full model."""

from skysense.models.fusion import FusionTransformer, PixelShuffleProjection
from skysense.models.geo_context import GeoContextPrototypes, region_index
from skysense.models.attention import ATTENTION_BACKENDS, SDPA_BACKENDS, set_attention_backends
from skysense.models.gelu_bias import set_mlp_kernel
from skysense.models.hr_bands import with_hr_bands
from skysense.models.qkv_gradient import set_qkv_kernel
from skysense.models.residual_norm import set_norm_kernel
from skysense.models.layers import TransformerBlock
from skysense.models.skysense import SkySense
from skysense.models.swin_v2 import SwinTransformerV2, SwinV2Block
from skysense.models.vit import VisionTransformer

TRANSFORMER_BLOCKS = (TransformerBlock, SwinV2Block)
"""The blocks of every encoder and of the fusion: what activation checkpointing recomputes and
block-wise compilation compiles."""

__all__ = [
    "ATTENTION_BACKENDS",
    "FusionTransformer",
    "GeoContextPrototypes",
    "PixelShuffleProjection",
    "SDPA_BACKENDS",
    "SkySense",
    "SwinTransformerV2",
    "TRANSFORMER_BLOCKS",
    "VisionTransformer",
    "region_index",
    "set_attention_backends",
    "set_mlp_kernel",
    "set_norm_kernel",
    "set_qkv_kernel",
    "with_hr_bands",
]
