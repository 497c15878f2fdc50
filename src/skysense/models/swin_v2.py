"""SwinV2 encoder for high-resolution optical images, with the authors' (mmcls 0.25) semantics.

What matches the released SkySense HR weights, and differs from Microsoft's or timm's code:

* Feature maps are zero-padded at the bottom/right to a multiple of the window **before** the
  cyclic shift; padded tokens are not masked.
* Patch merging concatenates each 2x2 neighbourhood channel-major (for every channel the
  positions (0,0), (0,1), (1,0), (1,1)), then Linear 4C -> 2C without bias, then LayerNorm.
* At the huge size, an extra LayerNorm is applied to the residual stream after every 6th block
  of stage 3 (``extra_norm_every``).

Shared with SwinV2 everywhere: res-post-norm blocks, cosine attention with a per-head learnable
logit scale clamped at ln(100), a continuous position bias MLP (2 -> 512 -> heads) over
log-spaced relative coordinates passed through 16 * sigmoid, q and v biases without a k bias.

Our choice where the authors' code asserts: when a stage's map is no larger than one window
(``min(H, W) <= window``), the shift is disabled (the official code does this when it equals
the window, and refuses smaller maps unless padding is switched on).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from skysense.config import SwinV2Config
from skysense.models import short_attention
from skysense.models.attention import SHORT, attention
from skysense.models.layers import DropPath, Mlp, drop_path_rates
from skysense.models.vit import pad_to_multiple


def log_spaced_relative_coords(window: int) -> torch.Tensor:
    """Relative coordinates of a window, ``(2w-1, 2w-1, 2)`` with channel 0 = dh, log-spaced."""
    rel = torch.arange(-(window - 1), window, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(rel, rel, indexing="ij"), dim=-1)
    table = table / max(window - 1, 1) * 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


def relative_position_index(window: int) -> torch.Tensor:
    """``(w*w, w*w)`` index into the flattened coordinate table for each query/key pair."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))
    coords = coords.flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]) + (window - 1)
    return rel[0] * (2 * window - 1) + rel[1]


def fused_head_multiple(device: torch.device) -> int:
    """Head width SDPA's fused kernels take on ``device``: on CUDA the bf16 kernels reject widths
    that are not a multiple of 8 and SDPA falls back to its math path, which materialises every
    attention matrix (see PERFORMANCE.md); the CPU's flash kernel takes any width."""
    return 1 if device.type == "cpu" else 8


class CompiledInPlaceReLU(nn.Module):
    """ReLU, in place when traced by ``torch.compile`` and out of place in eager mode.

    Out of place, inductor's CPU code for the position-bias MLP stores a boolean mask of the
    ReLU in the forward pass, with a kernel (torch 2.14, AVX-512) about 50x slower than the ReLU:
    1.3 ms per block call for a window of 8. A compiled tiny SwinV2 training step (batch 4, 64 px,
    2 cores) took 28.0 ms with it and 21.0 ms without (``benchmarks/position_bias_relu.py``,
    benchmarks/RESULTS.md, session 11). In place, the backward pass reads the
    ReLU's output instead. Eager mode stays out of place: selective activation checkpointing keeps
    the matmul's output that the ReLU would overwrite. The values are the same either way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x, inplace=torch.compiler.is_compiling())


class WindowAttentionV2(nn.Module):
    """Cosine window attention with a continuous position bias, through SDPA."""

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        # Pad heads to the width SDPA's fused kernels take on this device (fused_head_multiple);
        # switched off to count the model's own FLOPs (benchmarks/gpu_step.py).
        self.pad_heads = True
        self.sdpa_backends: tuple[str, ...] | None = None  # attention.set_attention_backends
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512), CompiledInPlaceReLU(), nn.Linear(512, num_heads, bias=False))
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)
        # Recomputed, never stored: the official files do not carry them either.
        self.register_buffer("relative_coords_table", log_spaced_relative_coords(window), persistent=False)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)

    def position_bias(self, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """``(heads, N, N)`` bias 16 * sigmoid(CPB) for every query/key pair of a window.

        ``tokens``: positions (row * window + column) of the window's N tokens; None: all w*w.
        """
        table = self.cpb_mlp(self.relative_coords_table).reshape(-1, self.num_heads)
        index = self.relative_position_index
        if tokens is not None:
            index = index[tokens][:, tokens]
        n = index.shape[0]
        bias = table[index.reshape(-1)].reshape(n, n, self.num_heads)
        # Contiguous: on CUDA, SDPA's fused kernels refuse a mask whose last dimension is strided
        # (a permuted view's is ``heads`` apart) and fall back to the math path, which writes out
        # every attention matrix. The sigmoid would keep the permuted layout.
        return 16 * torch.sigmoid(bias.permute(2, 0, 1).contiguous())

    def forward(self, x: torch.Tensor, shift_mask: torch.Tensor | None,
                tokens: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: (B, nW, N, C) windows; ``shift_mask``: (nW, N, N) additive or None; ``tokens``:
        the window positions of the N tokens when a window holds fewer than w*w (else None)."""
        b, nw, n, c = x.shape
        heads, d = self.num_heads, c // self.num_heads
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias)
        scale = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        position = self.position_bias(tokens).to(qkv.dtype)  # (heads, N, N)
        if self.sdpa_backends == (SHORT,):
            # One Triton program per window and head normalises q and k, adds the bias and the
            # shift mask itself and takes the 44-wide heads unpadded; it reads the projection's
            # output whole and writes its gradient whole (short_attention_qkv).
            windows = qkv.reshape(b * nw, n, 3 * c)
            cosine = scale.reshape(heads)
            if short_attention.supports_qkv(windows, heads, None, position, shift_mask, cosine):
                out = short_attention.short_attention_qkv(windows, heads, None, 1.0, position, shift_mask, cosine)
                return self.proj(out.reshape(b, nw, n, c))
        # Split along the channels, not unbound from a (..., 3, heads, d) view: the backward pass
        # then writes the three gradients straight into the (..., 3C) matrix the weight gradient
        # needs, instead of stacking them and copying the stack into that layout.
        q, k, v = (t.reshape(b, nw, n, heads, d).transpose(2, 3) for t in qkv.split(c, -1))
        # Under autocast the norms come out in float32 and SDPA would cast q, k and the bias back
        # to v's dtype; casting them here first means the padding and masking below move half
        # the bytes in eager mode, with the same values.
        q = (F.normalize(q, dim=-1) * scale).to(v.dtype)
        k = F.normalize(k, dim=-1).to(v.dtype)
        bias = position[None]  # (1, heads, N, N)
        # SDPA's fused kernels take 4-D inputs; a 5-D call falls back to the slow math path.
        # Without a shift mask, windows join the batch and the bias broadcasts over it; with
        # one, windows join the heads so the per-window mask still broadcasts over the batch.
        if shift_mask is None:
            q, k, v = (t.reshape(b * nw, heads, n, d) for t in (q, k, v))
        else:
            q, k, v = (t.reshape(b, nw * heads, n, d) for t in (q, k, v))
            bias = (bias + shift_mask[:, None].to(q.dtype)).reshape(1, nw * heads, n, n)
        # SwinV2-H's heads are 44 wide. Zero columns change no dot product q.k, the output
        # columns that v's zero columns add are dropped, and the scale is explicit, so it does
        # not follow the padded width.
        pad = -d % fused_head_multiple(q.device) if self.pad_heads else 0
        if pad:
            q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
        out = attention(q, k, v, bias, scale=1.0, backends=self.sdpa_backends)[..., :d]
        return self.proj(out.reshape(b, nw, heads, n, d).transpose(2, 3).reshape(b, nw, n, c))


def constant_mask(fn):
    """Caches a mask builder per shape and device in eager mode. Under ``torch.compile`` the
    builder is traced as part of the graph instead: dynamo does not trace through ``lru_cache``
    (it warns and ignores the cache), and the mask depends on shapes only."""
    cached = functools.lru_cache(maxsize=64)(fn)

    @functools.wraps(fn)
    def mask(*args):
        return fn(*args) if torch.compiler.is_compiling() else cached(*args)

    mask.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
    return mask


@constant_mask
def shifted_window_mask(height: int, width: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """``(nW, w*w, w*w)`` additive mask: -100 between tokens from different pre-shift regions.

    Cached per shape and device: every shifted block of a stage reuses it (see :func:`constant_mask`).
    """
    region = torch.zeros(height, width, device=device)
    count = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            region[hs, ws] = count
            count += 1
    windows = region.reshape(height // window, window, width // window, window).transpose(1, 2)
    windows = windows.reshape(-1, window * window)
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.where(diff != 0, -100.0, 0.0)


class SwinV2Block(nn.Module):
    """Res-post-norm block: x + LN(WMSA(x)), then x + LN(MLP(x)), optional extra LN."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: int,
        shifted: bool,
        mlp_ratio: float,
        drop_path: float,
        norm_eps: float,
        extra_norm: bool,
        mask_padding: bool = False,
    ) -> None:
        super().__init__()
        self.window = window
        self.shifted = shifted
        self.mask_padding = mask_padding
        self.attn = WindowAttentionV2(dim, num_heads, window)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps) if extra_norm else None
        self.drop_path = DropPath(drop_path)

    def shift(self, height: int, width: int) -> int:
        """The cyclic shift of this block's windows on a ``height`` x ``width`` map (0: none)."""
        return self.window // 2 if self.shifted and min(height, width) > self.window else 0

    def window_attention(self, x: torch.Tensor, rolled: bool = False) -> torch.Tensor:
        """``x``: (B, H, W, C) -> (B, H, W, C). ``rolled``: ``x`` comes already rolled by the
        shift (see :meth:`forward`), and the result stays so."""
        b, h, w, c = x.shape
        win = self.window
        if self.mask_padding and h <= win and w <= win:
            # One window holding the whole map: attend over its h*w tokens only, with their
            # position bias; the same as padding to the window and masking the padded keys.
            rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
            index = (rows[:, None] * win + cols[None, :]).flatten()
            return self.attn(x.reshape(b, 1, h * w, c), None, index).reshape(b, h, w, c)
        x = pad_to_multiple(x.permute(0, 3, 1, 2), win).permute(0, 2, 3, 1)
        hp, wp = x.shape[1], x.shape[2]
        shift = self.shift(h, w)
        mask = None
        if shift:
            if not rolled:
                x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
            mask = shifted_window_mask(hp, wp, win, shift, x.device)
        if self.mask_padding and (hp, wp) != (h, w):
            padding = padded_key_mask(h, w, hp, wp, win, shift, x.device)
            mask = padding if mask is None else mask + padding
        windows = x.reshape(b, hp // win, win, wp // win, win, c).transpose(2, 3).reshape(b, -1, win * win, c)
        windows = self.attn(windows, mask)
        x = windows.reshape(b, hp // win, wp // win, win, win, c).transpose(2, 3).reshape(b, hp, wp, c)
        if shift and not rolled:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        return x[:, :h, :w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1], x.shape[2]
        # A shifted block on a map of whole windows rolls its input and its output instead of
        # the attention's: everything else in the block works token by token, so the values are
        # the same. The windows are then a reshape of the norm's output, and inductor's kernel
        # for the norm's backward writes the attention's gradient straight in the windows'
        # layout instead of a second kernel rolling it there. In inductor's H100 plan a shifted
        # SwinV2-H stage-3 block moves 153.0 element-wise bytes per element instead of 167.0
        # (unshifted: 151.0; benchmarks/block_traffic.py --plan h100 --attention short).
        shift = self.shift(h, w) if h % self.window == 0 and w % self.window == 0 else 0
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        x = x + self.drop_path(self.norm1(self.window_attention(x, rolled=bool(shift))))
        x = x + self.drop_path(self.norm2(self.mlp(x)))
        if self.norm3 is not None:
            x = self.norm3(x)
        if shift:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        return x


class PatchMerging(nn.Module):
    """2x2 channel-major concatenation, Linear 4C -> 2C (no bias), then LayerNorm(2C)."""

    def __init__(self, dim: int, norm_eps: float) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(2 * dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)."""
        x = pad_to_multiple(x.permute(0, 3, 1, 2), 2)
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h // 2, w // 2, 4 * c)
        return self.norm(self.reduction(x))


@constant_mask
def padded_key_mask(height: int, width: int, padded_height: int, padded_width: int, window: int, shift: int,
                    device: torch.device) -> torch.Tensor:
    """``(nW, w*w, w*w)`` additive mask: -100 on keys that are padding (outside ``height`` x
    ``width``), for a map padded to ``padded_height`` x ``padded_width`` and rolled by ``shift``."""
    valid = torch.zeros(padded_height, padded_width, device=device)
    valid[:height, :width] = 1
    if shift:
        valid = torch.roll(valid, shifts=(-shift, -shift), dims=(0, 1))
    windows = valid.reshape(padded_height // window, window, padded_width // window, window).transpose(1, 2)
    windows = windows.reshape(-1, 1, window * window).expand(-1, window * window, -1)
    return torch.where(windows > 0, 0.0, -100.0)


class SwinV2Stage(nn.Module):
    def __init__(self, config: SwinV2Config, index: int, rates: list[float]) -> None:
        super().__init__()
        dim = config.out_dims[index]
        self.downsample = PatchMerging(dim // 2, config.norm_eps) if index > 0 else None
        every = config.extra_norm_every
        self.blocks = nn.ModuleList(
            SwinV2Block(
                dim,
                config.num_heads[index],
                config.window_size,
                shifted=j % 2 == 1,
                mlp_ratio=config.mlp_ratio,
                drop_path=rates[j],
                norm_eps=config.norm_eps,
                extra_norm=index == 2 and every > 0 and (j + 1) % every == 0,
                mask_padding=config.mask_padding,
            )
            for j in range(config.depths[index])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        for block in self.blocks:
            x = block(x)
        return x


class SwinTransformerV2(nn.Module):
    """SwinV2 returning a 4-level pyramid with strides 4, 8, 16, 32.

    ``out_norms[i]`` normalises pyramid level ``i``; only the last one is part of the released
    weights (the others are freshly initialised, as in the authors' downstream configs).
    """

    def __init__(self, config: SwinV2Config) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = nn.Conv2d(config.in_chans, config.embed_dim, config.patch_size, config.patch_size)
        self.patch_norm = nn.LayerNorm(config.embed_dim, eps=config.norm_eps)
        rates = drop_path_rates(config.drop_path_rate, sum(config.depths))
        starts = [sum(config.depths[:i]) for i in range(len(config.depths))]
        self.stages = nn.ModuleList(
            SwinV2Stage(config, i, rates[starts[i] : starts[i] + config.depths[i]]) for i in range(len(config.depths))
        )
        self.out_norms = nn.ModuleList(nn.LayerNorm(d, eps=config.norm_eps) for d in config.out_dims)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def out_dims(self) -> tuple[int, ...]:
        return self.config.out_dims

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, C, H, W) -> normalised patch tokens (B, H/4, W/4, D), padded as needed."""
        x = self.patch_embed(pad_to_multiple(x, self.config.patch_size))
        return self.patch_norm(x.permute(0, 2, 3, 1))

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x``: (B, C, H, W) -> four maps (B, C_i, ceil(H / 4 / 2^i), ...), i = 0..3."""
        x = self.embed(x)
        outputs = []
        for stage, norm in zip(self.stages, self.out_norms):
            x = stage(x)
            outputs.append(norm(x).permute(0, 3, 1, 2).contiguous())
        return outputs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last pyramid level, (B, C_3, H/32, W/32), as used by the fusion."""
        x = self.embed(x)
        for stage in self.stages:
            x = stage(x)
        return self.out_norms[-1](x).permute(0, 3, 1, 2).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)
