"""Which kernel runs our attention: SDPA's backends, or an explicit product, per layer.

Every attention layer of the model (ViT and fusion blocks, SwinV2 windows, the geo-context)
calls :func:`attention` with its ``sdpa_backends`` setting: None leaves the choice to torch's
``scaled_dot_product_attention``; a tuple of names restricts it (:func:`set_attention_backends`).

The names are SDPA's backends (:data:`SDPA_BACKENDS`) and ``"explicit"``: ``softmax(q k^T *
scale + mask) v`` as two batched matrix products in the inputs' dtype (the scale applied by the
first) around a softmax accumulated in float32 (or wider), with its own backward: three
kernels forward and five backward without a mask. For very short sequences (the fusion's 32 tokens), where a flash
kernel's tiles are mostly empty, plain batched products may be faster; under ``torch.compile``
inductor would rewrite such a product back into SDPA, so it is one opaque operator
(``skysense::explicit_attention``). ``"short"`` is :mod:`skysense.models.short_attention`: one
Triton program per sequence and head for sequences of up to 64 tokens (the fusion's), with no
mask or a key-padding mask; the model's attention layers
(:class:`skysense.models.layers.Attention` and SwinV2's window attention, with its position
bias, shift mask and cosine normalisation) call its qkv entry directly, which returns the qkv
projection's gradient as one tensor. Calls it does not take (longer sequences, other additive
masks, the CPU) run SDPA with torch's choice. ``benchmarks/attention_backends.py`` times every choice.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from skysense.models import short_attention

# Names of torch's SDPA backends.
SDPA_BACKENDS: dict[str, SDPBackend] = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
EXPLICIT = "explicit"
SHORT = "short"
# Every name :func:`set_attention_backends` takes; ``"explicit"`` and ``"short"`` only on their own.
ATTENTION_BACKENDS: tuple[str, ...] = (*SDPA_BACKENDS, EXPLICIT, SHORT)
ALONE = (EXPLICIT, SHORT)


def _product(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale * a @ b`` over the leading dimensions, the scale applied by the matmul itself."""
    lead = a.shape[:-2]
    out = torch.baddbmm(a.new_empty(()), a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]),
                        beta=0.0, alpha=scale)
    return out.reshape(*lead, *out.shape[-2:])


# The bodies run with autocast off: it would move the softmax to float32 and back in two more
# kernels, while torch's softmax and its backward already accumulate half-precision inputs in
# float32.
@torch.library.custom_op("skysense::explicit_attention", mutates_args=())
def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.autocast(q.device.type, enabled=False):
        scores = _product(q, k.transpose(-2, -1), scale)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        return _product(probs, v), probs


@_explicit_attention.register_fake
def _(q, k, v, mask, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty((*q.shape[:-1], k.shape[-2]))


def _explicit_setup(ctx, inputs, output) -> None:
    q, k, v, mask, scale = inputs
    ctx.save_for_backward(q, k, v, output[1])
    ctx.scale = scale
    ctx.mask_shape = None if mask is None or mask.dtype == torch.bool else mask.shape


def _explicit_backward(ctx, grad_out, grad_probs):
    q, k, v, probs = ctx.saved_tensors
    with torch.autocast(q.device.type, enabled=False):
        grad_out = grad_out.to(v.dtype)
        grad_v = _product(probs.transpose(-2, -1), grad_out)
        grad_p = _product(grad_out, v.transpose(-2, -1))
        # p * (grad_p - sum(grad_p * p)): one kernel, accumulated in float32 for half types.
        grad_scores = torch._softmax_backward_data(grad_p, probs, -1, probs.dtype)
        grad_q = _product(grad_scores, k, ctx.scale)
        grad_k = _product(grad_scores.transpose(-2, -1), q, ctx.scale)
        grad_mask = None
        if ctx.mask_shape is not None and ctx.needs_input_grad[3]:
            grad_mask = grad_scores.sum_to_size(ctx.mask_shape)
    return grad_q, grad_k, grad_v, grad_mask, None


_explicit_attention.register_autograd(_explicit_backward, setup_context=_explicit_setup)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                       scale: float | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` for 4-D ``q``, ``k``, ``v`` of one batch and head
    count, with an additive or boolean (True: attend) mask that broadcasts to the scores; the
    products in the inputs' dtype, the softmax accumulated in float32 or wider and rounded to
    the inputs' dtype. SDPA's semantics, scale default ``1 / sqrt(head width)``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _explicit_attention(q, k, v, attn_mask, scale)[0]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              scale: float | None = None, backends: tuple[str, ...] | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, run by one of ``backends`` (names of
    :data:`SDPA_BACKENDS`, the others switched off for this call), by :func:`explicit_attention`
    (``("explicit",)``) or, when None, by torch's choice. Under ``torch.compile`` the choice is
    made when the graph is traced."""
    if backends is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    if backends == (EXPLICIT,):
        return explicit_attention(q, k, v, attn_mask, scale)
    if backends == (SHORT,):
        key_padding_mask = _key_padding(attn_mask, q)
        if (attn_mask is None or key_padding_mask is not None) and short_attention.supports(q, k, v, key_padding_mask):
            return short_attention.short_attention(q, k, v, key_padding_mask, scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    with sdpa_kernel([SDPA_BACKENDS[name] for name in backends]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


def _key_padding(attn_mask: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    """The (N, L) key-padding mask behind a boolean (N, 1, 1, L) attention mask, or None."""
    if attn_mask is None or attn_mask.dtype != torch.bool or attn_mask.dim() != 4:
        return None
    n, _, _, length = q.shape
    if tuple(attn_mask.shape) != (n, 1, 1, length):
        return None
    return attn_mask[:, 0, 0, :]


def check_attention_backends(backends: Sequence[str], name: str = "attention backends") -> tuple[str, ...]:
    """``backends`` as a tuple, or ``ValueError`` naming ``name`` unless it is one or more of
    SDPA's backends, or ``"explicit"`` alone."""
    names = [backends] if isinstance(backends, str) else list(backends)
    if not names or any(n not in ATTENTION_BACKENDS for n in names) or (set(ALONE) & set(names) and len(names) > 1):
        raise ValueError(f"{name}: expected one or more of {list(SDPA_BACKENDS)}, or one of {list(ALONE)} alone, "
                         f"got {backends!r}")
    return tuple(names)


def set_attention_backends(module: nn.Module, backends: Sequence[str] | None) -> int:
    """Let only ``backends`` (names of :data:`ATTENTION_BACKENDS`; None: torch's choice) run the
    attention of every layer in ``module`` that has an ``sdpa_backends`` setting; the number of
    layers set. SDPA picks among the allowed backends in its own order, and fails on inputs none
    of them takes (e.g. flash alone with a mask).

    Set it before compiling: a compiled graph keeps the backend chosen when it was traced.
    Inductor's attention patterns may then rewrite the math path's products into a fused SDPA
    kernel; ``"explicit"`` is one operator it leaves alone.
    """
    backends = None if backends is None else check_attention_backends(backends)
    if backends == (SHORT,):
        short_attention.register_operators()  # before any compile traces the layers
    layers = [m for m in module.modules() if hasattr(m, "sdpa_backends")]
    for layer in layers:
        layer.sdpa_backends = backends
    return len(layers)
