"""Our ViT and SwinV2 encoders compute exactly what timm's do, once timm's weights are mapped.

Every weight of a small timm model (norms, logit scales, q/v biases and the position-bias MLP
included) is randomised with a fixed seed, its state dict is renamed onto ours (the only value
that changes is the column order of the SwinV2 patch-merging reduction), loaded with
``strict=True``, and both forwards are compared in fp32.

Two deliberate differences from timm are bridged in the test, not hidden:

* timm resizes the ViT position embedding with ``antialias=True``; PyTorch's antialiased
  bicubic kernel uses a = -0.5 (PIL's) instead of a = -0.75, so it differs from ours (the
  authors' mmseg, no antialias) even when upsampling. The resized-grid test runs timm with
  ``antialias=False``.
* Inputs are chosen so that every SwinV2 stage map is a multiple of the window (timm pads after
  the cyclic shift, the authors' code before it) and, on non-square maps, no side equals the
  window (timm disables the shift per side, the authors' code for both sides at once).
"""

from __future__ import annotations

import functools
import math

import pytest
import timm.models.vision_transformer as timm_vit
import torch
from torch import nn

from skysense.config import SwinV2Config, ViTConfig
from skysense.models.swin_v2 import SwinTransformerV2
from skysense.models.vit import VisionTransformer
from skysense.timm_reference import timm_swin_like, timm_swin_state_to_ours, timm_vit_like

MAX_RELATIVE_ERROR = 1e-4


def randomise_(model: nn.Module, seed: int) -> None:
    """Overwrite every parameter of ``model`` with seeded random values of a sensible scale."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("logit_scale"):
                # Spans ln(100) = 4.6 so that some heads hit the clamp.
                param.uniform_(1.0, 6.0)
            elif "norm" in name and name.endswith("weight"):
                param.normal_(1.0, 0.2)
            elif param.ndim >= 2 and name not in ("cls_token", "pos_embed"):
                param.normal_(0.0, 1.0 / math.sqrt(param[0].numel()))
            else:
                param.normal_(0.0, 0.2)


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference, relative to the largest magnitude of ``reference``."""
    assert ours.shape == reference.shape
    return ((ours - reference).abs().max() / reference.abs().max()).item()


VIT = ViTConfig(in_chans=10, embed_dim=48, depth=2, num_heads=3, patch_size=4, pos_grid=8, norm_eps=1e-6)


@pytest.fixture(scope="module")
def vit_pair() -> tuple[VisionTransformer, timm_vit.VisionTransformer]:
    reference = timm_vit_like(VIT).eval()
    randomise_(reference, seed=0)
    ours = VisionTransformer(VIT).eval()
    # Without final norm and head, timm's ViT state dict has exactly our names and shapes.
    ours.load_state_dict(reference.state_dict(), strict=True)
    return ours, reference


def compare_vit(ours: VisionTransformer, reference: timm_vit.VisionTransformer, grid: tuple[int, int]) -> float:
    torch.manual_seed(1)
    x = torch.randn(2, VIT.in_chans, grid[0] * VIT.patch_size, grid[1] * VIT.patch_size)
    with torch.inference_mode():
        expected = reference.forward_features(x)[:, 1:]
        actual = ours(x)
    assert actual.shape == (2, VIT.embed_dim, *grid)
    return relative_error(actual.flatten(2).transpose(1, 2), expected)


def test_vit_matches_timm_at_native_grid(vit_pair: tuple[VisionTransformer, timm_vit.VisionTransformer]) -> None:
    assert compare_vit(*vit_pair, grid=(VIT.pos_grid, VIT.pos_grid)) < MAX_RELATIVE_ERROR


def test_vit_matches_timm_at_larger_grid(
    vit_pair: tuple[VisionTransformer, timm_vit.VisionTransformer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        timm_vit,
        "resample_abs_pos_embed",
        functools.partial(timm_vit.resample_abs_pos_embed, antialias=False),
    )
    # Non-square, so that swapping height and width would show.
    assert compare_vit(*vit_pair, grid=(12, 10)) < MAX_RELATIVE_ERROR


@pytest.mark.parametrize(
    ("window", "image_size"),
    [
        # Stage maps (64, 96), (32, 48), (16, 24), (8, 12): shifted windows in every stage.
        (4, (256, 384)),
        # Stage maps 64, 32, 16, 8: the last stage is one window, unshifted in both.
        (8, (256, 256)),
    ],
)
def test_swin_v2_matches_timm(window: int, image_size: tuple[int, int]) -> None:
    config = SwinV2Config(
        in_chans=3, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=window, patch_size=4
    )
    reference = timm_swin_like(config, image_size).eval()
    randomise_(reference, seed=2)
    ours = SwinTransformerV2(config).eval()
    ours.load_state_dict(timm_swin_state_to_ours(reference.state_dict(), ours), strict=True)

    torch.manual_seed(3)
    x = torch.randn(2, config.in_chans, *image_size)
    with torch.inference_mode():
        expected = reference.forward_features(x).permute(0, 3, 1, 2)
        actual = ours(x)
    assert actual.shape == (2, config.out_dims[-1], image_size[0] // 32, image_size[1] // 32)
    assert relative_error(actual, expected) < MAX_RELATIVE_ERROR


def test_timm_without_final_norm_argument_gets_an_identity(monkeypatch) -> None:
    """Older timm releases have no ``final_norm``: the reference is built the same without it."""
    import timm.models.vision_transformer as timm_vit

    from skysense.config import preset_config
    from skysense.timm_reference import timm_vit_like

    config = preset_config("tiny").s2
    current = timm_vit_like(config)
    init = timm_vit.VisionTransformer.__init__

    def older(self, *args, final_norm=None, **kwargs):
        if final_norm is not None:
            raise TypeError("VisionTransformer.__init__() got an unexpected keyword argument 'final_norm'")
        init(self, *args, **kwargs)

    monkeypatch.setattr(timm_vit.VisionTransformer, "__init__", older)
    model = timm_vit_like(config)
    assert isinstance(model.norm, torch.nn.Identity)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in current.state_dict().items()}


def test_a_shifted_block_rolling_its_input_keeps_values_and_gradients() -> None:
    """SwinV2Block.forward rolls a shifted block's input and output instead of the attention's
    (a map of whole windows): the same output and gradients as rolling around the attention,
    which ``window_attention`` still does for padded maps."""
    from skysense.models.swin_v2 import SwinV2Block

    torch.manual_seed(0)
    block = SwinV2Block(32, 2, 4, True, 4.0, 0.0, 1e-5, True).double()
    x = torch.randn(2, 12, 8, 32, dtype=torch.float64, requires_grad=True)
    assert block.shift(12, 8) == 2

    def rolled_around_attention(x: torch.Tensor) -> torch.Tensor:
        y = x + block.norm1(block.window_attention(x))
        return block.norm3(y + block.norm2(block.mlp(y)))

    outputs, grads = [], []
    for forward in (block, rolled_around_attention):
        block.zero_grad(set_to_none=True)
        x.grad = None
        out = forward(x)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
        outputs.append(out.detach())
        grads.append([x.grad] + [p.grad for p in block.parameters()])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)
    for new, old in zip(*grads):
        torch.testing.assert_close(new, old, rtol=1e-10, atol=1e-12)
