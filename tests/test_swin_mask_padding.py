"""SwinV2 ``mask_padding``: padded tokens are masked out of attention, and a map smaller than one
window is attended without padding, with the same result as padding and masking."""

import pytest
import torch

from skysense.config import SwinV2Config
from skysense.models.swin_v2 import SwinTransformerV2, SwinV2Block, pad_to_multiple, padded_key_mask


def _block(shifted: bool, mask_padding: bool) -> SwinV2Block:
    torch.manual_seed(0)
    block = SwinV2Block(16, 2, 4, shifted=shifted, mlp_ratio=2.0, drop_path=0.0, norm_eps=1e-5, extra_norm=False,
                        mask_padding=mask_padding)
    return block.eval()


def test_small_map_equals_padding_and_masking():
    block = _block(shifted=False, mask_padding=True)
    x = torch.randn(2, 3, 2, 16)
    fast = block.window_attention(x)
    # The same map padded to one 4 x 4 window, with the padded keys masked.
    padded = pad_to_multiple(x.permute(0, 3, 1, 2), 4).permute(0, 2, 3, 1).reshape(2, 1, 16, 16)
    slow = block.attn(padded, padding_mask := padded_key_mask(3, 2, 4, 4, 4, 0, x.device))
    slow = slow.reshape(2, 4, 4, 16)[:, :3, :2]
    assert padding_mask.shape == (1, 16, 16)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shifted", [False, True])
def test_padded_tokens_do_not_change_valid_outputs(shifted):
    """With masking, the valid tokens' outputs do not depend on what the padding holds."""
    block = _block(shifted, mask_padding=True)
    x = torch.randn(1, 10, 9, 16)
    masked = block.window_attention(x)
    # Official semantics (no mask) differ: the zero padding is attended to.
    block.mask_padding = False
    official = block.window_attention(x)
    assert not torch.allclose(masked, official, atol=1e-4)
    # Masked attention of the 10 x 9 map equals that of any larger map's top-left 10 x 9 part
    # when the extra tokens are masked: check against explicit padding with random values.
    block.mask_padding = True
    win, shift = 4, (2 if shifted else 0)
    noisy = torch.randn(1, 12, 12, 16)
    noisy[:, :10, :9] = x
    if shift:
        noisy = torch.roll(noisy, shifts=(-shift, -shift), dims=(1, 2))
    windows = noisy.reshape(1, 3, win, 3, win, 16).transpose(2, 3).reshape(1, 9, win * win, 16)
    mask = padded_key_mask(10, 9, 12, 12, win, shift, x.device)
    if shift:
        from skysense.models.swin_v2 import shifted_window_mask
        mask = mask + shifted_window_mask(12, 12, win, shift, x.device)
    out = block.attn(windows, mask).reshape(1, 3, 3, win, win, 16).transpose(2, 3).reshape(1, 12, 12, 16)
    if shift:
        out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
    torch.testing.assert_close(masked, out[:, :10, :9], atol=1e-5, rtol=1e-5)


def test_encoder_flag_reaches_every_block_and_default_is_official():
    assert SwinV2Config().mask_padding is False
    config = SwinV2Config(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), mask_padding=True)
    encoder = SwinTransformerV2(config)
    flags = {m.mask_padding for m in encoder.modules() if isinstance(m, SwinV2Block)}
    assert flags == {True}
    levels = encoder.forward_pyramid(torch.randn(1, 3, 64, 64))
    assert [tuple(level.shape[-2:]) for level in levels] == [(16, 16), (8, 8), (4, 4), (2, 2)]
