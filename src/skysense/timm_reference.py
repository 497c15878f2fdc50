"""timm counterparts of our encoders, the reference our numerics and speed are tested against.

timm is not a runtime dependency of skysense (it comes with the ``test`` extra), so it is
imported inside the functions. Used by ``tests/test_timm_equivalence.py`` and
``benchmarks/encoders.py``.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from skysense.config import SwinV2Config, ViTConfig


def timm_vit_like(config: ViTConfig) -> nn.Module:
    """timm ViT with our architecture: class token, no final norm, dynamic input size.

    Without head and final norm its state dict has exactly our names and shapes. timm releases
    without the ``final_norm`` argument get their final norm replaced by an identity.
    """
    from timm.models.vision_transformer import VisionTransformer

    arguments = dict(
        img_size=config.patch_size * config.pos_grid,
        patch_size=config.patch_size,
        in_chans=config.in_chans,
        num_classes=0,
        global_pool="",
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=True,
        class_token=True,
        dynamic_img_size=True,
        norm_layer=functools.partial(nn.LayerNorm, eps=config.norm_eps),
    )
    try:
        return VisionTransformer(**arguments, final_norm=False)
    except TypeError as error:
        if "final_norm" not in str(error):
            raise
    model = VisionTransformer(**arguments)
    model.norm = nn.Identity()
    return model


def timm_swin_like(config: SwinV2Config, image_size: int | tuple[int, int]) -> nn.Module:
    """timm SwinV2 with our architecture, built for a fixed input size (its default mode)."""
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    return SwinTransformerV2(
        img_size=image_size,
        patch_size=config.patch_size,
        in_chans=config.in_chans,
        num_classes=0,
        embed_dim=config.embed_dim,
        depths=config.depths,
        num_heads=config.num_heads,
        window_size=config.window_size,
        mlp_ratio=config.mlp_ratio,
        drop_path_rate=0.0,
        norm_layer=functools.partial(nn.LayerNorm, eps=config.norm_eps),
    )


def merging_columns(dim: int) -> torch.Tensor:
    """For each column ``c*4 + dh*2 + dw`` of our reduction, its timm column ``dw*2C + dh*C + c``."""
    return torch.arange(4 * dim).reshape(2, 2, dim).permute(2, 1, 0).flatten()


def timm_swin_state_to_ours(state: dict[str, torch.Tensor], ours: nn.Module) -> dict[str, torch.Tensor]:
    """timm SwinV2 (no head) state dict -> ours, for :class:`skysense.models.SwinTransformerV2` ``ours``.

    timm's ``k_bias``, ``relative_coords_table`` and ``relative_position_index`` are
    non-persistent buffers, absent from its state dict as from ours. ``out_norms[0..2]`` have no
    timm counterpart (``forward_features`` does not use them) and keep our values.
    """
    last = len(ours.stages) - 1
    mapped = {
        key: value
        for key, value in ours.state_dict().items()
        if key.startswith("out_norms.") and not key.startswith(f"out_norms.{last}.")
    }
    for key, value in state.items():
        if key.startswith("patch_embed.proj."):
            new_key = key.replace("patch_embed.proj.", "patch_embed.")
        elif key.startswith("patch_embed.norm."):
            new_key = key.replace("patch_embed.norm.", "patch_norm.")
        elif key.startswith("norm."):
            new_key = f"out_norms.{last}.{key.removeprefix('norm.')}"
        else:
            new_key = key.replace("layers.", "stages.", 1)
        if new_key.endswith("downsample.reduction.weight"):
            value = value[:, merging_columns(value.shape[1] // 4)]
        mapped[new_key] = value
    return mapped
