"""Transformer building blocks shared by the ViT encoders and the fusion transformer.

Parameter names follow timm (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``,
``mlp.fc2``) so timm checkpoints map one to one; the official SkySense names are mapped in
:mod:`skysense.official`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from skysense.models import gelu_bias, qkv_gradient, residual_norm, short_attention
from skysense.models.attention import SHORT, attention


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch of a sample with probability ``p``.

    Under ``torch.compile`` the keep probability is read from a float32 buffer, not from ``p``:
    a Python float would be a guarded constant, so the blocks of a linear rate schedule would
    each compile their own graph (at ``huge`` more than dynamo's recompile limit). Compiled
    blocks guard only on whether the rate is zero (``active``): two graphs at most per shape.
    The buffer is not saved (``state_dict``), stays float32 when the module changes dtype, and
    follows ``p`` when it is set.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("keep_prob", torch.ones((), dtype=torch.float32), persistent=False)
        self.p = p

    @property
    def p(self) -> float:
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"drop path rate: expected 0 <= p < 1, got {value}")
        self._p = float(value)
        self.active = self._p > 0.0
        self.reset_keep_prob(self.keep_prob.device)

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202  (nn.Module's signature)
        """Moves and casts make the rate anew instead of converting it: it stays exact and float32,
        and a model built on the meta device and loaded with ``assign=True`` (the rate is not
        saved) moves like the rest of it."""
        keep = self._buffers.pop("keep_prob")
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["keep_prob"] = keep
        probe = torch.zeros((), device="cpu" if keep.is_meta else keep.device)
        self.reset_keep_prob(fn(probe).device)
        return self

    def reset_keep_prob(self, device: torch.device | str) -> None:
        """Make the keep-probability buffer on ``device`` (e.g. after loading onto the meta device)."""
        self.keep_prob = torch.tensor(1.0 - self._p, dtype=torch.float32, device=device)

    def sample_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """The (B,) scale of ``x``'s samples in ``x``'s type, 0 (dropped) or ``1 / (1 - p)``
        (kept); None where nothing is dropped (evaluation, or rate 0)."""
        if not self.training or not self.active:
            return None
        # Compiled: the rate as a tensor, one graph for every nonzero rate.
        keep: torch.Tensor | float = self.keep_prob if torch.compiler.is_compiling() else 1.0 - self._p
        # The scale joins the mask: one pass over x instead of two (forward and backward).
        return x.new_empty((x.shape[0],)).bernoulli_(keep).div_(keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.sample_scale(x)
        return x if scale is None else x * scale.view((x.shape[0],) + (1,) * (x.ndim - 1))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """Linear -> exact GELU -> Linear. With ``gelu_kernel`` set (:func:`~skysense.models.gelu_bias.set_mlp_kernel`)
    the first bias and the GELU run as :func:`~skysense.models.gelu_bias.bias_gelu` where it takes
    the call: one backward kernel writes both of their gradients. ``fc2_bias_gradient=False``
    adds the second bias with its gradient detached, for a caller whose kernel sums it
    (:func:`~skysense.models.residual_norm.branch_add`)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.gelu_kernel = False

    def forward(self, x: torch.Tensor, fc2_bias_gradient: bool = True) -> torch.Tensor:
        if self.gelu_kernel and self.training and torch.is_grad_enabled():
            u = F.linear(x, self.fc1.weight)
            if gelu_bias.supports(u, self.fc1.bias):
                hidden = gelu_bias.bias_gelu(u, self.fc1.bias)
            else:
                hidden = self.act(u + self.fc1.bias.to(u.dtype))
        else:
            hidden = self.act(self.fc1(x))
        return F.linear(hidden, self.fc2.weight, self.fc2.bias if fc2_bias_gradient else self.fc2.bias.detach())


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
        self.qkv_kernel = False  # qkv_gradient.set_qkv_kernel

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                proj_bias_gradient: bool = True) -> torch.Tensor:
        """``x``: (N, L, C). ``key_padding_mask``: (N, L) bool, True where a token may be attended.
        ``proj_bias_gradient=False`` adds the output projection's bias with its gradient detached,
        for a caller whose kernel sums it (:func:`~skysense.models.residual_norm.branch_layer_norm`)."""
        n, length, dim = x.shape
        proj_bias = self.proj.bias if proj_bias_gradient else self.proj.bias.detach()
        heads = self.num_heads
        short = self.sdpa_backends == (SHORT,)
        # The short kernel, and the qkv kernel with SDPA, sum the projection bias's gradient as they
        # write the qkv gradient: the projection then adds the bias with its gradient detached.
        bias = self.qkv.bias
        detached = bias is not None and (short or (self.qkv_kernel and torch.is_grad_enabled()))
        qkv = F.linear(x, self.qkv.weight, bias.detach() if detached else bias)
        if short and short_attention.supports_qkv(qkv, heads, key_padding_mask):
            # The kernel reads the projection's output whole and writes its gradient whole.
            out = short_attention.short_attention_qkv(qkv, heads, key_padding_mask, qkv_bias=bias)
            return F.linear(out, self.proj.weight, proj_bias)
        # Split along the channels, not unbound from an (N, L, 3, heads, d) view: the backward pass
        # then writes the three gradients straight into the (N, L, 3C) matrix the weight gradient
        # needs, instead of stacking them and copying the stack into that layout (one copy of
        # q, k and v less: benchmarks/block_traffic.py). With the qkv kernel one Triton kernel per
        # gradient does that copy and sums the bias's gradient.
        q, k, v = qkv_gradient.split_qkv(qkv, heads, bias if detached else None, kernel=self.qkv_kernel)
        attn_mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        out = attention(q, k, v, attn_mask, backends=self.sdpa_backends)
        return F.linear(out.transpose(1, 2).reshape(n, length, dim), self.proj.weight, proj_bias)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + Attn(LN(x)), then x + MLP(LN(x)). With ``norm_kernel`` set
    (:func:`~skysense.models.residual_norm.set_norm_kernel`) its three residual junctions run
    through :mod:`skysense.models.residual_norm` in training where it takes the call: one backward
    kernel each writes the residual stream's gradient, the branch's, and the norm's and the
    projection's bias gradients."""

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
        self.norm_kernel = False

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.norm_kernel and self.training and torch.is_grad_enabled() and residual_norm.supports(x):
            return self._forward_junctions(x, key_padding_mask)
        x = x + self.drop_path(self.attn(self.norm1(x), key_padding_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _forward_junctions(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """The same block, its junctions differentiated by residual_norm's kernels (stochastic depth
        drawn in the same order: the same samples dropped for the same seed)."""
        x, h = residual_norm.layer_norm_residual(x, self.norm1)
        a = self.attn(h, key_padding_mask, proj_bias_gradient=False)
        x, h = residual_norm.branch_layer_norm(x, a, self.drop_path.sample_scale(a), self.attn.proj.bias, self.norm2)
        m = self.mlp(h, fc2_bias_gradient=False)
        return residual_norm.branch_add(x, m, self.drop_path.sample_scale(m), self.mlp.fc2.bias)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Linearly increasing stochastic-depth rates over ``depth`` blocks, from 0 to ``rate``."""
    if depth == 1:
        return [0.0]
    return [rate * i / (depth - 1) for i in range(depth)]
