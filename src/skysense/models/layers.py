"""Transformer building blocks shared by the ViT encoders and the fusion transformer.

Parameter names follow timm (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``,
``mlp.fc2``) so timm checkpoints map one to one; the official SkySense names are mapped in
:mod:`skysense.official`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# Names of torch's SDPA backends, for :func:`set_attention_backends`.
SDPA_BACKENDS: dict[str, SDPBackend] = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              scale: float | None = None, backends: tuple[str, ...] | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, run by one of ``backends`` (names of
    :data:`SDPA_BACKENDS`, the others switched off for this call) or, when None, by torch's choice.
    Under ``torch.compile`` the choice is made when the graph is traced."""
    if backends is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    with sdpa_kernel([SDPA_BACKENDS[name] for name in backends]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


def set_attention_backends(module: nn.Module, backends: Sequence[str] | None) -> int:
    """Let only ``backends`` (names of :data:`SDPA_BACKENDS`; None: torch's choice) run the
    attention of every layer in ``module`` that has an ``sdpa_backends`` setting; the number of
    layers set. SDPA picks among the allowed backends in its own order, and fails on inputs none
    of them takes (e.g. flash alone with a mask).

    For shapes where torch's default is slow: ``benchmarks/attention_backends.py`` times each
    backend on the calls of our models. Set it before compiling: a compiled graph keeps the
    backend chosen when it was traced.
    """
    if backends is not None:
        unknown = [name for name in backends if name not in SDPA_BACKENDS]
        if unknown or not backends:
            raise ValueError(f"attention backends: expected one or more of {list(SDPA_BACKENDS)}, got {list(backends)}")
        backends = tuple(backends)
    layers = [m for m in module.modules() if hasattr(m, "sdpa_backends")]
    for layer in layers:
        layer.sdpa_backends = backends
    return len(layers)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch of a sample with probability ``p``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        # The scale joins the (B, 1, ...) mask: one pass over x instead of two (forward and backward).
        scale = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep).div_(keep)
        return x * scale

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """Linear -> exact GELU -> Linear."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (q, k, v stacked along dim 0)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.sdpa_backends: tuple[str, ...] | None = None  # set_attention_backends

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: (N, L, C). ``key_padding_mask``: (N, L) bool, True where a token may be attended."""
        n, length, dim = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn_mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        out = attention(q, k, v, attn_mask, backends=self.sdpa_backends)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), key_padding_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Linearly increasing stochastic-depth rates over ``depth`` blocks, from 0 to ``rate``."""
    if depth == 1:
        return [0.0]
    return [rate * i / (depth - 1) for i in range(depth)]
