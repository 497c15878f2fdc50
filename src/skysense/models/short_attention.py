"""Attention over short sequences in one Triton program per sequence and head, forward and backward.

The fusion transformer attends over 32 tokens per location (2048 sequences of 16 heads at
``huge``). SDPA's fused kernels tile for long sequences: on the H100 cuDNN took about 47 ms per
training step of the fusion for 0.62 TFLOP of attention, where moving q, k, v, the output and
their gradients takes about 14 ms (``benchmarks/RESULTS.md``, 2026-11-28). Here one program
holds a whole (L x D) sequence of one head in registers: ``q k^T``, the softmax and ``p v`` in
one pass (the row log-sum-exp kept for the backward pass), and one backward program that
recomputes ``p`` and writes dq, dk and dv. It reads q, k and v in whatever strides they come
(the qkv projection's split, transposed), and writes the output and the gradients in the
(N, L, H, D) layout the projections around attention read without a copy.

:func:`short_attention` takes up to :data:`MAX_LENGTH` tokens, head widths of 16 to 128 (powers
of two) and an optional key-padding mask; :func:`supports` says whether a call qualifies. It
runs on CUDA, and on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``, how the tests
check it). Registered as ``skysense::short_attention`` with ``torch.library.triton_op``, so
``torch.compile`` places the kernels in its graph instead of calling out of it.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # e.g. macOS wheels of torch come without Triton
    triton = None

# Longest sequence one program holds (its scores are BLOCK x BLOCK float32 in registers).
MAX_LENGTH = 64
HEAD_WIDTHS = (16, 32, 64, 128)


def interpreted() -> bool:
    """Whether Triton runs its kernels in the interpreter (on the CPU), as the tests do."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supports(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None) -> bool:
    """Whether :func:`short_attention` takes this call: 4-D (N, H, L, D) self-attention of at
    most :data:`MAX_LENGTH` tokens and a head width in :data:`HEAD_WIDTHS`, one floating dtype,
    on CUDA (or under the interpreter), with no mask or an (N, L) boolean key-padding mask."""
    if triton is None or q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        return False
    if not (q.is_cuda or (interpreted() and q.device.type == "cpu")):
        return False
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    n, _, length, width = q.shape
    if length > MAX_LENGTH or width not in HEAD_WIDTHS:
        return False
    return key_padding_mask is None or (key_padding_mask.dtype == torch.bool
                                        and tuple(key_padding_mask.shape) == (n, length))


def _block(length: int) -> int:
    return max(16, triton.next_power_of_2(length))


if triton is not None:

    @triton.jit
    def _load_rows(ptr, offset, row_stride, rows, cols, inside):
        """One head's (BLOCK, WIDTH) rows, zeros past the sequence."""
        return tl.load(ptr + offset + rows[:, None] * row_stride + cols[None, :], mask=inside[:, None], other=0.0)

    @triton.jit
    def _head_inputs(q_ptr, k_ptr, v_ptr, q_n, q_h, q_l, k_n, k_h, k_l, v_n, v_h, v_l, heads, length,
                     BLOCK: tl.constexpr, WIDTH: tl.constexpr):
        """This program's sequence and head, its rows and columns, and its q, k and v."""
        program = tl.program_id(0)
        n = program // heads
        h = program % heads
        rows = tl.arange(0, BLOCK)
        cols = tl.arange(0, WIDTH)
        inside = rows < length
        q = _load_rows(q_ptr, n * q_n + h * q_h, q_l, rows, cols, inside)
        k = _load_rows(k_ptr, n * k_n + h * k_h, k_l, rows, cols, inside)
        v = _load_rows(v_ptr, n * v_n + h * v_h, v_l, rows, cols, inside)
        return n, h, rows, cols, inside, q, k, v

    @triton.jit
    def _scores(q, k, scale, mask_ptr, mask_offset, rows, inside, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr):
        """``q k^T * scale`` in float32, and which keys may be attended."""
        keys = inside
        if HAS_MASK:
            keys = keys & (tl.load(mask_ptr + mask_offset + rows, mask=inside, other=0) != 0)
        return tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale, keys

    @triton.jit
    def _forward_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, lse_ptr,
                        q_n, q_h, q_l, k_n, k_h, k_l, v_n, v_h, v_l, mask_n, out_n, out_h, out_l,
                        heads, length, scale,
                        HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, WIDTH: tl.constexpr,
                        PRECISION: tl.constexpr):
        program = tl.program_id(0)
        n, h, rows, cols, inside, q, k, v = _head_inputs(
            q_ptr, k_ptr, v_ptr, q_n, q_h, q_l, k_n, k_h, k_l, v_n, v_h, v_l, heads, length, BLOCK, WIDTH)
        scores, keys = _scores(q, k, scale, mask_ptr, n * mask_n, rows, inside, HAS_MASK, PRECISION)
        scores = tl.where(keys[None, :], scores, float("-inf"))
        top = tl.max(scores, 1)
        top = tl.where(top == float("-inf"), 0.0, top)  # a row with no key: zeros, not NaN
        p = tl.exp(scores - top[:, None])
        total = tl.sum(p, 1)
        total = tl.where(total == 0.0, 1.0, total)
        p = p / total[:, None]
        out = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        tl.store(out_ptr + n * out_n + h * out_h + rows[:, None] * out_l + cols[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=inside[:, None])
        tl.store(lse_ptr + program * BLOCK + rows, top + tl.log(total))

    @triton.jit
    def _backward_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, grad_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr,
                         q_n, q_h, q_l, k_n, k_h, k_l, v_n, v_h, v_l, mask_n, out_n, out_h, out_l,
                         g_n, g_h, g_l, d_n, d_h, d_l,
                         heads, length, scale,
                         HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, WIDTH: tl.constexpr,
                         PRECISION: tl.constexpr):
        program = tl.program_id(0)
        n, h, rows, cols, inside, q, k, v = _head_inputs(
            q_ptr, k_ptr, v_ptr, q_n, q_h, q_l, k_n, k_h, k_l, v_n, v_h, v_l, heads, length, BLOCK, WIDTH)
        out = _load_rows(out_ptr, n * out_n + h * out_h, out_l, rows, cols, inside)
        grad = _load_rows(grad_ptr, n * g_n + h * g_h, g_l, rows, cols, inside)
        lse = tl.load(lse_ptr + program * BLOCK + rows)
        scores, keys = _scores(q, k, scale, mask_ptr, n * mask_n, rows, inside, HAS_MASK, PRECISION)
        p = tl.where(keys[None, :] & inside[:, None], tl.exp(scores - lse[:, None]), 0.0)
        dv = tl.dot(tl.trans(p.to(grad.dtype)), grad, input_precision=PRECISION)
        dp = tl.dot(grad, tl.trans(v), input_precision=PRECISION)
        delta = tl.sum(out.to(tl.float32) * grad.to(tl.float32), 1)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * scale
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION) * scale
        offsets = n * d_n + h * d_h + rows[:, None] * d_l + cols[None, :]
        tl.store(dq_ptr + offsets, dq.to(dq_ptr.dtype.element_ty), mask=inside[:, None])
        tl.store(dk_ptr + offsets, dk.to(dk_ptr.dtype.element_ty), mask=inside[:, None])
        tl.store(dv_ptr + offsets, dv.to(dv_ptr.dtype.element_ty), mask=inside[:, None])


def _heads_last(shape: torch.Size, like: Tensor) -> Tensor:
    """An (N, H, L, D) tensor laid out as (N, L, H, D): the layout ``out.transpose(1, 2).reshape(N,
    L, H * D)`` reads without a copy."""
    n, heads, length, width = shape
    return torch.empty_strided(shape, (length * heads * width, width, heads * width, 1), dtype=like.dtype,
                               device=like.device)


def _precision(q: Tensor) -> str:
    """float32 inputs multiply in full float32 ("ieee"), not TF32; half types are exact either way."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _launcher(kernel):
    """``kernel`` as torch.compile can trace it (``wrap_triton``), or as it is under the
    interpreter, which torch 2.11's ``wrap_triton`` does not take."""
    return kernel if interpreted() else torch.library.wrap_triton(kernel)


def _mask_arguments(q: Tensor, key_padding_mask: Tensor | None) -> tuple[Tensor, int]:
    if key_padding_mask is None:
        return q, 0  # not read (HAS_MASK false)
    mask = key_padding_mask.to(torch.int8)
    return mask, mask.stride(0)


def _checked_last_stride(*tensors: Tensor) -> None:
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError(f"short_attention: expected head dimension with stride 1, got strides {t.stride()}")


@torch.library.triton_op("skysense::short_attention", mutates_args=())
def _short_attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
                     scale: float) -> tuple[Tensor, Tensor]:
    _checked_last_stride(q, k, v)
    n, heads, length, width = q.shape
    block = _block(length)
    out = _heads_last(q.shape, q)
    lse = torch.empty((n * heads, block), dtype=torch.float32, device=q.device)
    mask, mask_n = _mask_arguments(q, key_padding_mask)
    _launcher(_forward_kernel)[(n * heads,)](
        q, k, v, mask, out, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), mask_n, out.stride(0), out.stride(1), out.stride(2),
        heads, length, scale, HAS_MASK=key_padding_mask is not None, BLOCK=block, WIDTH=width,
        PRECISION=_precision(q))
    return out, lse


@torch.library.triton_op("skysense::short_attention_backward", mutates_args=())
def _short_attention_backward(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, out: Tensor,
                              grad: Tensor, lse: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    _checked_last_stride(q, k, v, out, grad)
    n, heads, length, width = q.shape
    dq, dk, dv = (_heads_last(q.shape, t) for t in (q, k, v))
    mask, mask_n = _mask_arguments(q, key_padding_mask)
    _launcher(_backward_kernel)[(n * heads,)](
        q, k, v, mask, out, grad, lse, dq, dk, dv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), mask_n, out.stride(0), out.stride(1), out.stride(2),
        grad.stride(0), grad.stride(1), grad.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
        heads, length, scale, HAS_MASK=key_padding_mask is not None, BLOCK=_block(length), WIDTH=width,
        PRECISION=_precision(q))
    return dq, dk, dv


def _setup(ctx, inputs, output) -> None:
    q, k, v, key_padding_mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, key_padding_mask, out, lse)
    ctx.scale = scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, key_padding_mask, out, lse = ctx.saved_tensors
    grad_out = grad_out.to(out.dtype)  # the products take one dtype
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    dq, dk, dv = _short_attention_backward(q, k, v, key_padding_mask, out, grad_out, lse, ctx.scale)
    return dq, dk, dv, None, None


_short_attention.register_autograd(_backward, setup_context=_setup)


def short_attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None,
                    scale: float | None = None) -> Tensor:
    """``softmax(q k^T * scale) v`` for (N, H, L, D) ``q``, ``k``, ``v`` that :func:`supports`
    takes; ``key_padding_mask`` (N, L), True where a key may be attended. Products accumulate in
    float32, the softmax runs in float32; a query with no key to attend gets zeros. The output
    is (N, H, L, D) laid out as (N, L, H, D)."""
    if not supports(q, k, v, key_padding_mask):
        raise ValueError(
            f"short_attention: expected (N, H, L, D) q, k, v of one shape and floating dtype with L <= {MAX_LENGTH} "
            f"and D in {HEAD_WIDTHS}, on CUDA, and an (N, L) boolean key-padding mask or none; got q "
            f"{tuple(q.shape)} {q.dtype} on {q.device}, k {tuple(k.shape)}, v {tuple(v.shape)}, mask "
            f"{None if key_padding_mask is None else (tuple(key_padding_mask.shape), key_padding_mask.dtype)}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _short_attention(q, k, v, key_padding_mask, scale)[0]
