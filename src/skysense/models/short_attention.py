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

SwinV2's windows are short too (64 tokens of 8 x 8 windows; SwinV2-H's heads are 44 wide), and
their scores carry a learned position bias per head and, in shifted blocks, a mask per window.
The kernels add both (the bias with its gradient, summed over the sequences in the backward
pass) and take any head width up to 128, masking the columns past it, so SwinV2 needs neither
a materialised (windows x heads) mask nor heads padded for SDPA's kernels. They also do
SwinV2's cosine normalisation (q and k divided by their norms, q times a learned per-head
scale) on the rows they hold, with its gradients, so the normalised q and k never go to memory.

:func:`short_attention_qkv` takes the qkv projection's (N, L, 3C) output whole and returns its
gradient whole: the backward kernel writes dq, dk and dv into the one matrix the projection's
weight gradient reads, where three separate gradients would be concatenated by autograd (a
read and a write of all three). The model's layers call it; :func:`short_attention` takes q, k
and v separately.

:func:`short_attention` takes up to :data:`MAX_LENGTH` tokens, heads up to :data:`MAX_WIDTH`
wide, an optional key-padding mask, position bias and window mask; :func:`supports` (and
:func:`supports_qkv`) says whether a call qualifies. It runs on CUDA, and on the CPU under
Triton's interpreter (``TRITON_INTERPRET=1``, how the tests check it). Registered as
``skysense::short_attention`` and ``skysense::short_attention_qkv`` with
``torch.library.triton_op`` (by :func:`register_operators`, at the first use), so
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
# Widest head: a program holds q, k and v of one head, padded to a power of two (SwinV2-H's 44 in 64).
MAX_WIDTH = 128
# The backward pass adds the bias gradient of about this many programs' sequences in each
# program, then sums the programs' partial sums (see :func:`_bias_group`).
BIAS_PROGRAMS = 512


def interpreted() -> bool:
    """Whether Triton runs its kernels in the interpreter (on the CPU), as the tests do."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supports(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None, bias: Tensor | None = None,
             window_mask: Tensor | None = None) -> bool:
    """Whether :func:`short_attention` takes this call: 4-D (N, H, L, D) self-attention of at
    most :data:`MAX_LENGTH` tokens and heads at most :data:`MAX_WIDTH` wide, one floating dtype,
    on CUDA (or under the interpreter); optionally an (N, L) boolean key-padding mask, an
    (H, L, L) floating ``bias`` and a (W, L, L) floating ``window_mask`` without gradient, W
    dividing N."""
    if triton is None or q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        return False
    if not (q.is_cuda or (interpreted() and q.device.type == "cpu")):
        return False
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    n, heads, length, width = q.shape
    if length > MAX_LENGTH or width > MAX_WIDTH:
        return False
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or tuple(key_padding_mask.shape) != (n, length)):
        return False
    if bias is not None and (not bias.is_floating_point() or tuple(bias.shape) != (heads, length, length)):
        return False
    if window_mask is not None and (not window_mask.is_floating_point() or window_mask.requires_grad
                                    or window_mask.dim() != 3 or tuple(window_mask.shape[1:]) != (length, length)
                                    or window_mask.shape[0] == 0 or n % window_mask.shape[0] != 0):
        return False
    return all(t is None or t.device == q.device for t in (key_padding_mask, bias, window_mask))


def _tile(size: int) -> int:
    """A program's rows (``BLOCK``, from the length) or columns (``WIDTH``, from the head width):
    the next power of two, at least 16 (``tl.dot``'s smallest)."""
    return max(16, triton.next_power_of_2(size))


def _bias_group(sequences: int, heads: int) -> int:
    """Sequences per backward program when the bias needs a gradient: a power of two (at most 64)
    that leaves about :data:`BIAS_PROGRAMS` programs, each writing one float32 (L x L) partial sum
    of its head's bias gradient. At SwinV2-H's stage 3 (128 windows of 32 heads) that is 8
    windows a program: the partial sums move a quarter of the bytes of a bf16 gradient of the bias
    expanded to every window and head (what SDPA's memory-efficient backward writes before it is
    summed, as far as we read torch's code). The number is a guess: never timed on a GPU."""
    group = 1
    while group < 64 and (sequences // (2 * group)) * heads >= BIAS_PROGRAMS:
        group *= 2
    return group


if triton is not None:

    @triton.jit
    def _load_rows(ptr, offset, row_stride, rows, cols, inside, width):
        """One head's (BLOCK, WIDTH) rows, zeros past the sequence and past the head width."""
        return tl.load(ptr + offset + rows[:, None] * row_stride + cols[None, :],
                       mask=inside[:, None] & (cols[None, :] < width), other=0.0)

    @triton.jit
    def _head_inputs(q_ptr, k_ptr, v_ptr, q_n, q_h, q_l, k_n, k_h, k_l, v_n, v_h, v_l, n, h, rows, cols, inside,
                     width):
        """Sequence n's q, k and v of head h."""
        q = _load_rows(q_ptr, n * q_n + h * q_h, q_l, rows, cols, inside, width)
        k = _load_rows(k_ptr, n * k_n + h * k_h, k_l, rows, cols, inside, width)
        v = _load_rows(v_ptr, n * v_n + h * v_h, v_l, rows, cols, inside, width)
        return q, k, v

    @triton.jit
    def _store_rows(ptr, offset, row_stride, rows, cols, inside, width, value):
        tl.store(ptr + offset + rows[:, None] * row_stride + cols[None, :], value.to(ptr.dtype.element_ty),
                 mask=inside[:, None] & (cols[None, :] < width))

    @triton.jit
    def _scores(q, k, scale, n, h, rows, inside, length, mask_ptr, mask_n, bias_ptr, window_ptr, windows,
                HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WINDOW_MASK: tl.constexpr,
                PRECISION: tl.constexpr):
        """``q k^T * scale + bias[h] + window_mask[n % W]`` in float32, and which keys may be attended."""
        keys = inside
        if HAS_MASK:
            keys = keys & (tl.load(mask_ptr + n * mask_n + rows, mask=inside, other=0) != 0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        pairs = rows[:, None] * length + rows[None, :]  # in a contiguous (L, L) bias or window mask
        both = inside[:, None] & inside[None, :]
        if HAS_BIAS:
            scores += tl.load(bias_ptr + h * length * length + pairs, mask=both, other=0.0).to(tl.float32)
        if HAS_WINDOW_MASK:
            scores += tl.load(window_ptr + (n % windows) * length * length + pairs,
                              mask=both, other=0.0).to(tl.float32)
        return scores, keys

    @triton.jit
    def _row_norms(x):
        """The L2 norms of x's rows in float32, at least 1e-12 (``F.normalize``'s divisors)."""
        x = x.to(tl.float32)
        return tl.maximum(tl.sqrt(tl.sum(x * x, 1)), 1e-12)

    @triton.jit
    def _unit_rows(x):
        """x's rows divided by their :func:`_row_norms`, in float32."""
        return x.to(tl.float32) / _row_norms(x)[:, None]

    @triton.jit
    def _unit_rows_backward(grad, unit, norm):
        """The gradient of ``x / max(|x|, 1e-12)`` with respect to x, from its result's gradient
        ``grad``, its result ``unit`` and the divisors ``norm``."""
        along = tl.where(norm > 1e-12, tl.sum(grad * unit, 1), 0.0)
        return (grad - unit * along[:, None]) / norm[:, None]

    @triton.jit
    def _forward_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, bias_ptr, window_ptr, cos_ptr, out_ptr, lse_ptr,
                        q_n, q_h, q_l, k_n, k_h, k_l, v_n, v_h, v_l, mask_n, out_n, out_h, out_l,
                        heads, length, width, windows, scale,
                        HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WINDOW_MASK: tl.constexpr,
                        COSINE: tl.constexpr, ONE_LAYOUT: tl.constexpr, BLOCK: tl.constexpr, WIDTH: tl.constexpr,
                        PRECISION: tl.constexpr):
        if ONE_LAYOUT:  # see _backward_kernel
            k_n, k_h, k_l, v_n, v_h, v_l = q_n, q_h, q_l, q_n, q_h, q_l
        program = tl.program_id(0)
        n = program // heads
        h = program % heads
        rows = tl.arange(0, BLOCK)
        cols = tl.arange(0, WIDTH)
        inside = rows < length
        q, k, v = _head_inputs(q_ptr, k_ptr, v_ptr, q_n, q_h, q_l, k_n, k_h, k_l, v_n, v_h, v_l, n, h, rows, cols,
                               inside, width)
        if COSINE:  # SwinV2: unit q and k, q times the head's scale, rounded to the inputs' type
            q = (_unit_rows(q) * tl.load(cos_ptr + h).to(tl.float32)).to(v.dtype)
            k = _unit_rows(k).to(v.dtype)
        scores, keys = _scores(q, k, scale, n, h, rows, inside, length, mask_ptr, mask_n, bias_ptr, window_ptr,
                               windows, HAS_MASK, HAS_BIAS, HAS_WINDOW_MASK,
                               PRECISION)
        scores = tl.where(keys[None, :], scores, float("-inf"))
        top = tl.max(scores, 1)
        top = tl.where(top == float("-inf"), 0.0, top)  # a row with no key: zeros, not NaN
        p = tl.exp(scores - top[:, None])
        total = tl.sum(p, 1)
        total = tl.where(total == 0.0, 1.0, total)
        p = p / total[:, None]
        out = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        _store_rows(out_ptr, n * out_n + h * out_h, out_l, rows, cols, inside, width, out)
        tl.store(lse_ptr + program * BLOCK + rows, top + tl.log(total))

    @triton.jit
    def _backward_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, bias_ptr, window_ptr, cos_ptr, out_ptr, grad_ptr, lse_ptr,
                         d_ptr, dbias_ptr, dcos_ptr, dqkvb_ptr,
                         q_n, q_h, q_l, k_n, k_h, k_l, v_n, v_h, v_l, mask_n, out_n, out_h, out_l, g_n, g_h, g_l,
                         d_n, d_h, d_l, dq_off, dk_off, dv_off,
                         sequences, heads, length, width, windows, scale,
                         HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WINDOW_MASK: tl.constexpr,
                         COSINE: tl.constexpr, BIAS_GRAD: tl.constexpr, SCALE_GRAD: tl.constexpr,
                         QKV_BIAS_GRAD: tl.constexpr, ONE_LAYOUT: tl.constexpr, GROUP: tl.constexpr,
                         BLOCK: tl.constexpr, WIDTH: tl.constexpr, PRECISION: tl.constexpr):
        if ONE_LAYOUT:
            # q, k, v and their gradients have one set of strides, out and grad another (the qkv
            # entry's layouts): one tile of row offsets for each set stays live through the loop
            # instead of one per tensor (ptxas spilled less: benchmarks/RESULTS.md, session 15).
            k_n, k_h, k_l, v_n, v_h, v_l = q_n, q_h, q_l, q_n, q_h, q_l
            d_n, d_h, d_l = q_n, q_h, q_l
            g_n, g_h, g_l = out_n, out_h, out_l
        # Program (group, h) takes head h of sequences group * GROUP ... group * GROUP + GROUP - 1,
        # adding their score gradients into one partial sum of the bias gradient (and of the
        # cosine scale's). dq, dk and dv go to one buffer, at dq_off, dk_off and dv_off. With
        # QKV_BIAS_GRAD their column sums over the group's rows go to a partial sum of the gradient
        # of the qkv projection's bias (rows and columns outside the sequence and head are zero).
        program = tl.program_id(0)
        group = program // heads
        h = program % heads
        rows = tl.arange(0, BLOCK)
        cols = tl.arange(0, WIDTH)
        dbias = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        dcos = tl.sum(tl.zeros((BLOCK,), dtype=tl.float32), 0)
        dq_sum = tl.zeros((WIDTH,), dtype=tl.float32)
        dk_sum = tl.zeros((WIDTH,), dtype=tl.float32)
        dv_sum = tl.zeros((WIDTH,), dtype=tl.float32)
        for s in range(GROUP):
            n = group * GROUP + s
            inside = (rows < length) & (n < sequences)
            q, k, v = _head_inputs(q_ptr, k_ptr, v_ptr, q_n, q_h, q_l, k_n, k_h, k_l, v_n, v_h, v_l, n, h, rows,
                                   cols, inside, width)
            if COSINE:  # as the forward pass, keeping q and k as loaded and their norms for the gradients
                q_in, k_in = q, k
                q_norm = _row_norms(q_in)
                k_norm = _row_norms(k_in)
                cos = tl.load(cos_ptr + h).to(tl.float32)
                q = (q_in.to(tl.float32) / q_norm[:, None] * cos).to(v.dtype)
                k = (k_in.to(tl.float32) / k_norm[:, None]).to(v.dtype)
            # Each result is stored as soon as it is complete, and out is read only for delta:
            # fewer (BLOCK, WIDTH) tiles live at once (the registers run out: ptxas spills).
            out = _load_rows(out_ptr, n * out_n + h * out_h, out_l, rows, cols, inside, width)
            grad = _load_rows(grad_ptr, n * g_n + h * g_h, g_l, rows, cols, inside, width)
            delta = tl.sum(out.to(tl.float32) * grad.to(tl.float32), 1)
            lse = tl.load(lse_ptr + (n * heads + h) * BLOCK + rows, mask=inside, other=0.0)
            scores, keys = _scores(q, k, scale, n, h, rows, inside, length, mask_ptr, mask_n, bias_ptr, window_ptr,
                                   windows, HAS_MASK, HAS_BIAS, HAS_WINDOW_MASK,
                                   PRECISION)
            p = tl.where(keys[None, :] & inside[:, None], tl.exp(scores - lse[:, None]), 0.0)
            offset = n * d_n + h * d_h
            dv = tl.dot(tl.trans(p.to(grad.dtype)), grad, input_precision=PRECISION)
            _store_rows(d_ptr, dv_off + offset, d_l, rows, cols, inside, width, dv)
            if QKV_BIAS_GRAD:
                dv_sum += tl.sum(dv, 0)
            dp = tl.dot(grad, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            if BIAS_GRAD:
                dbias += ds
            dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * scale
            if COSINE:  # through q = unit(q) * cos
                q_unit = q_in.to(tl.float32) / q_norm[:, None]
                if SCALE_GRAD:
                    dcos += tl.sum(tl.sum(dq * q_unit, 1), 0)
                dq = _unit_rows_backward(dq * cos, q_unit, q_norm)
            _store_rows(d_ptr, dq_off + offset, d_l, rows, cols, inside, width, dq)
            if QKV_BIAS_GRAD:
                dq_sum += tl.sum(dq, 0)
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION) * scale
            if COSINE:  # through k = unit(k)
                dk = _unit_rows_backward(dk, k_in.to(tl.float32) / k_norm[:, None], k_norm)
            _store_rows(d_ptr, dk_off + offset, d_l, rows, cols, inside, width, dk)
            if QKV_BIAS_GRAD:
                dk_sum += tl.sum(dk, 0)
        if QKV_BIAS_GRAD:  # (programs, 3, WIDTH): q's, k's and v's columns of head h
            tl.store(dqkvb_ptr + program * 3 * WIDTH + cols, dq_sum)
            tl.store(dqkvb_ptr + program * 3 * WIDTH + WIDTH + cols, dk_sum)
            tl.store(dqkvb_ptr + program * 3 * WIDTH + 2 * WIDTH + cols, dv_sum)
        if BIAS_GRAD:
            tl.store(dbias_ptr + program * BLOCK * BLOCK + rows[:, None] * BLOCK + rows[None, :], dbias)
        if SCALE_GRAD:
            tl.store(dcos_ptr + program, dcos)


def backward_warps(block: int) -> int:
    """Warps of a backward program: 8 for 64-row sequences (SwinV2's windows), 4 below. Built for
    the H100 with 4, SwinV2-H's backward kernel (bias and cosine gradients, shift mask) needed
    more than 255 registers a thread and ptxas spilled 1972 bytes a thread to local memory; with
    8, 424 bytes (``benchmarks/kernel_registers.py --warps 4,8``, session 15). Not timed on a GPU."""
    return 8 if block >= 64 else 4


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


def _extra_inputs(q: Tensor, key_padding_mask: Tensor | None, bias: Tensor | None, window_mask: Tensor | None,
                  cosine_scale: Tensor | None) -> tuple[list[Tensor], list[int], dict[str, bool]]:
    """The mask, bias, window-mask and cosine-scale pointers (q stands in for an absent one, never
    read; the bias and window mask contiguous, as the kernels read them), the mask's sequence
    stride, and the kernels' switches."""
    mask = q if key_padding_mask is None else key_padding_mask.to(torch.int8)
    bias_in = q if bias is None else bias.contiguous()
    window = q if window_mask is None else window_mask.contiguous()
    cos = q if cosine_scale is None else cosine_scale.contiguous()
    strides = [0 if key_padding_mask is None else mask.stride(0)]
    switches = {"HAS_MASK": key_padding_mask is not None, "HAS_BIAS": bias is not None,
                "HAS_WINDOW_MASK": window_mask is not None, "COSINE": cosine_scale is not None}
    return [mask, bias_in, window, cos], strides, switches


def _checked_last_stride(*tensors: Tensor) -> None:
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError(f"short_attention: expected head dimension with stride 1, got strides {t.stride()}")


def _windows(window_mask: Tensor | None) -> int:
    return 1 if window_mask is None else window_mask.shape[0]


def _split_heads(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """q, k and v of an (N, L, 3C) qkv projection's output as (N, H, L, D) views."""
    q, k, v = qkv.split(qkv.shape[-1] // 3, -1)
    return tuple(t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))


def _launch_forward(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, bias: Tensor | None,
                    window_mask: Tensor | None, cosine_scale: Tensor | None, scale: float, out: Tensor,
                    out_strides: tuple[int, int, int]) -> Tensor:
    """Run the forward kernel on (N, H, L, D) q, k, v, writing ``out`` (sequence, head and row
    strides ``out_strides``); the rows' log-sum-exp, (N * H, BLOCK)."""
    _checked_last_stride(q, k, v)
    n, heads, length, width = q.shape
    block = _tile(length)
    lse = torch.empty((n * heads, block), dtype=torch.float32, device=q.device)
    extra, extra_strides, switches = _extra_inputs(q, key_padding_mask, bias, window_mask, cosine_scale)
    one_layout = q.stride() == k.stride() == v.stride()
    _launcher(_forward_kernel)[(n * heads,)](
        q, k, v, *extra, out, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *extra_strides, *out_strides,
        heads, length, width, _windows(window_mask), scale, **switches, ONE_LAYOUT=one_layout, BLOCK=block,
        WIDTH=_tile(width), PRECISION=_precision(q))
    return lse


def _launch_backward(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, bias: Tensor | None,
                     window_mask: Tensor | None, cosine_scale: Tensor | None, out: Tensor,
                     out_strides: tuple[int, int, int], grad: Tensor, grad_strides: tuple[int, int, int], lse: Tensor,
                     scale: float, bias_grad: bool, scale_grad: bool, gradients: Tensor,
                     gradient_strides: tuple[int, int, int], offsets: tuple[int, int, int],
                     qkv_bias_grad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Run the backward kernel, writing dq, dk and dv into ``gradients`` (one buffer, at
    ``offsets``, each with sequence, head and row strides ``gradient_strides``); the bias's and
    the cosine scale's gradients, and with ``qkv_bias_grad`` the float32 (3, H, D) sums of dq, dk
    and dv over the sequences and rows (empty where not asked for)."""
    _checked_last_stride(q, k, v, out, grad)
    n, heads, length, width = q.shape
    block = _tile(length)
    bias_grad = bias_grad and bias is not None
    scale_grad = scale_grad and cosine_scale is not None
    group = _bias_group(n, heads) if bias_grad or scale_grad else 1
    programs = -(-n // group) * heads
    partial = torch.empty((programs if bias_grad else 1, block, block), dtype=torch.float32, device=q.device)
    cos_partial = torch.empty((programs if scale_grad else 1,), dtype=torch.float32, device=q.device)
    wide = _tile(width)
    qkv_partial = torch.empty((programs if qkv_bias_grad else 1, 3, wide), dtype=torch.float32, device=q.device)
    extra, extra_strides, switches = _extra_inputs(q, key_padding_mask, bias, window_mask, cosine_scale)
    one_layout = (q.stride() == k.stride() == v.stride() and tuple(q.stride()[:3]) == tuple(gradient_strides)
                  and tuple(out_strides) == tuple(grad_strides))
    _launcher(_backward_kernel)[(programs,)](
        q, k, v, *extra, out, grad, lse, gradients, partial, cos_partial, qkv_partial,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *extra_strides, *out_strides, *grad_strides, *gradient_strides,
        *offsets, n, heads, length, width, _windows(window_mask), scale, **switches, BIAS_GRAD=bias_grad,
        SCALE_GRAD=scale_grad, QKV_BIAS_GRAD=qkv_bias_grad, ONE_LAYOUT=one_layout, GROUP=group, BLOCK=block,
        WIDTH=wide, PRECISION=_precision(q), num_warps=backward_warps(block))
    dbias = q.new_empty(0)
    if bias_grad:
        dbias = partial.reshape(-1, heads, block, block).sum(0)[:, :length, :length].to(bias.dtype).contiguous()
    dcos = cos_partial.reshape(-1, heads).sum(0).to(cosine_scale.dtype) if scale_grad else q.new_empty(0)
    dqkv_bias = (qkv_partial.reshape(-1, heads, 3, wide).sum(0)[..., :width].transpose(0, 1) if qkv_bias_grad
                 else qkv_partial.new_empty(0))
    return dbias, dcos, dqkv_bias


def _forward(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, bias: Tensor | None,
             window_mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    out = _heads_last(q.shape, q)
    lse = _launch_forward(q, k, v, key_padding_mask, bias, window_mask, None, scale, out, out.stride()[:3])
    return out, lse


def _backward(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, bias: Tensor | None,
              window_mask: Tensor | None, out: Tensor, grad: Tensor, lse: Tensor, scale: float,
              bias_grad: bool) -> tuple[Tensor, Tensor]:
    """dq, dk and dv stacked in one (3, N, L, H, D) buffer (an operator's outputs may not be views
    of one another: :func:`_gradients` takes them apart), and the bias's gradient."""
    n, heads, length, width = q.shape
    gradients = torch.empty((3, n, length, heads, width), dtype=q.dtype, device=q.device)
    one = n * length * heads * width
    dbias, _, _ = _launch_backward(q, k, v, key_padding_mask, bias, window_mask, None, out, out.stride()[:3], grad,
                                grad.stride()[:3], lse, scale, bias_grad, False, gradients,
                                (length * heads * width, width, heads * width), (0, one, 2 * one))
    return gradients, dbias


def _qkv_forward(qkv: Tensor, heads: int, key_padding_mask: Tensor | None, bias: Tensor | None,
                 window_mask: Tensor | None, cosine_scale: Tensor | None, scale: float,
                 qkv_bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """The attention output and the rows' log-sum-exp; ``qkv_bias`` is only there for its gradient."""
    n, length, width3 = qkv.shape
    width = width3 // 3
    out = qkv.new_empty((n, length, width))
    lse = _launch_forward(*_split_heads(qkv, heads), key_padding_mask, bias, window_mask, cosine_scale, scale, out,
                          (length * width, width // heads, width))
    return out, lse


def _qkv_backward(qkv: Tensor, heads: int, key_padding_mask: Tensor | None, bias: Tensor | None,
                  window_mask: Tensor | None, cosine_scale: Tensor | None, out: Tensor, grad: Tensor, lse: Tensor,
                  scale: float, bias_grad: bool, scale_grad: bool,
                  qkv_bias_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The qkv projection output's gradient, (N, L, 3C) like it, the bias's and the cosine
    scale's gradients, and the (3C,) float32 column sums of the first (the gradient of a bias the
    projection added)."""
    n, length, width3 = qkv.shape
    width = width3 // 3
    gradients = qkv.new_empty((n, length, width3))
    dbias, dcos, dqkv_bias = _launch_backward(
        *_split_heads(qkv, heads), key_padding_mask, bias, window_mask, cosine_scale, out,
        (out.stride(0), width // heads, out.stride(1)), grad, (grad.stride(0), width // heads, grad.stride(1)), lse,
        scale, bias_grad, scale_grad, gradients, (length * width3, width // heads, width3), (0, width, 2 * width),
        qkv_bias_grad)
    return gradients, dbias, dcos, dqkv_bias.reshape(-1)


def _kernel_ready(grad: Tensor, like: Tensor) -> Tensor:
    """The output's gradient in the output's dtype (the products take one), with stride 1 along
    the channels."""
    grad = grad.to(like.dtype)
    return grad if grad.stride(-1) == 1 else grad.contiguous()


def _setup(ctx, inputs, output) -> None:
    q, k, v, key_padding_mask, bias, window_mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, key_padding_mask, bias, window_mask, out, lse)
    ctx.scale = scale


def _gradients(ctx, grad_out, grad_lse):
    q, k, v, key_padding_mask, bias, window_mask, out, lse = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[4]
    gradients, dbias = _short_attention_backward(q, k, v, key_padding_mask, bias, window_mask, out,
                                                 _kernel_ready(grad_out, out), lse, ctx.scale, bias_grad)
    dq, dk, dv = gradients.transpose(2, 3).unbind(0)  # (N, H, L, D) views laid out as (N, L, H, D)
    return dq, dk, dv, None, dbias if bias_grad else None, None, None


def _qkv_setup(ctx, inputs, output) -> None:
    qkv, heads, key_padding_mask, bias, window_mask, cosine_scale, scale, qkv_bias = inputs
    out, lse = output
    ctx.save_for_backward(qkv, key_padding_mask, bias, window_mask, cosine_scale, out, lse)
    ctx.heads, ctx.scale = heads, scale
    ctx.qkv_bias_dtype = None if qkv_bias is None else qkv_bias.dtype


def _qkv_gradients(ctx, grad_out, grad_lse):
    qkv, key_padding_mask, bias, window_mask, cosine_scale, out, lse = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[3]
    scale_grad = cosine_scale is not None and ctx.needs_input_grad[5]
    qkv_bias_grad = ctx.qkv_bias_dtype is not None and ctx.needs_input_grad[7]
    dqkv, dbias, dcos, dqkv_bias = _short_attention_qkv_backward(
        qkv, ctx.heads, key_padding_mask, bias, window_mask, cosine_scale, out, _kernel_ready(grad_out, out), lse,
        ctx.scale, bias_grad, scale_grad, qkv_bias_grad)
    return (dqkv, None, None, dbias if bias_grad else None, None, dcos if scale_grad else None, None,
            dqkv_bias.to(ctx.qkv_bias_dtype) if qkv_bias_grad else None)


# The four operators, registered by :func:`register_operators`.
_short_attention = None
_short_attention_backward = None
_short_attention_qkv = None
_short_attention_qkv_backward = None


def kernel_operator(name: str, implementation, fake):
    """``implementation`` registered as the operator ``name`` (``"skysense::..."``), without side
    effects: on a GPU a ``triton_op``, which torch.compile traces into, putting the kernels in its
    graph; under the interpreter, whose kernels are plain Python calls that tracing would run on
    fake tensors, an opaque ``custom_op`` whose output shapes and layouts ``fake`` gives."""
    if interpreted():
        operator = torch.library.custom_op(name, mutates_args=())(implementation)
        operator.register_fake(fake)
        return operator
    return torch.library.triton_op(name, mutates_args=())(implementation)


def _fake_lse(q: Tensor, sequences: int, heads: int, length: int) -> Tensor:
    return q.new_empty((sequences * heads, _tile(length)), dtype=torch.float32)


def _fake_partial(wanted: bool, t: Tensor | None, like: Tensor) -> Tensor:
    return t.new_empty(t.shape) if wanted and t is not None else like.new_empty(0)


def _forward_fake(q, k, v, key_padding_mask, bias, window_mask, scale):
    n, heads, length, _ = q.shape
    return _heads_last(q.shape, q), _fake_lse(q, n, heads, length)


def _backward_fake(q, k, v, key_padding_mask, bias, window_mask, out, grad, lse, scale, bias_grad):
    n, heads, length, width = q.shape
    return q.new_empty((3, n, length, heads, width)), _fake_partial(bias_grad, bias, q)


def _qkv_forward_fake(qkv, heads, key_padding_mask, bias, window_mask, cosine_scale, scale, qkv_bias):
    n, length, width3 = qkv.shape
    return qkv.new_empty((n, length, width3 // 3)), _fake_lse(qkv, n, heads, length)


def _qkv_backward_fake(qkv, heads, key_padding_mask, bias, window_mask, cosine_scale, out, grad, lse, scale,
                       bias_grad, scale_grad, qkv_bias_grad):
    return (qkv.new_empty(qkv.shape), _fake_partial(bias_grad, bias, qkv),
            _fake_partial(scale_grad, cosine_scale, qkv),
            qkv.new_empty((qkv.shape[-1] if qkv_bias_grad else 0,), dtype=torch.float32))


def register_operators() -> bool:
    """Register ``skysense::short_attention``, ``skysense::short_attention_qkv`` and their
    backward operators with torch (once; later calls do nothing; :func:`kernel_operator`);
    whether they are registered (not without Triton). :func:`short_attention` and
    :func:`short_attention_qkv` do it at their first call and
    :func:`skysense.models.attention.set_attention_backends` when it selects ``"short"``, so that
    ``torch.compile`` finds them registered. It is not done on import: registering a
    ``triton_op`` imports inductor (about a second), which a process that never runs the kernel
    need not pay.
    """
    global _short_attention, _short_attention_backward, _short_attention_qkv, _short_attention_qkv_backward
    if _short_attention is not None or triton is None:
        return _short_attention is not None
    forward = kernel_operator("skysense::short_attention", _forward, _forward_fake)
    backward = kernel_operator("skysense::short_attention_backward", _backward, _backward_fake)
    forward.register_autograd(_gradients, setup_context=_setup)
    qkv_forward = kernel_operator("skysense::short_attention_qkv", _qkv_forward, _qkv_forward_fake)
    qkv_backward = kernel_operator("skysense::short_attention_qkv_backward", _qkv_backward, _qkv_backward_fake)
    qkv_forward.register_autograd(_qkv_gradients, setup_context=_qkv_setup)
    _short_attention_backward, _short_attention_qkv_backward = backward, qkv_backward
    _short_attention, _short_attention_qkv = forward, qkv_forward
    return True


def _described(t: Tensor | None) -> object:
    return None if t is None else (tuple(t.shape), t.dtype, "requires grad" if t.requires_grad else "")


def short_attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None,
                    scale: float | None = None, bias: Tensor | None = None,
                    window_mask: Tensor | None = None) -> Tensor:
    """``softmax(q k^T * scale + bias[h] + window_mask[n % W]) v`` for (N, H, L, D) ``q``, ``k``,
    ``v`` that :func:`supports` takes.

    ``key_padding_mask`` (N, L): True where a key may be attended. ``bias`` (H, L, L): added to
    every sequence's scores of head h, with a gradient (SwinV2's position bias). ``window_mask``
    (W, L, L): added to sequence n's scores as ``window_mask[n % W]``, without a gradient
    (SwinV2's shifted-window mask, its windows the fastest-varying part of N). Products
    accumulate in float32 and the softmax runs in float32; a query with no key to attend gets
    zeros. The output is (N, H, L, D) laid out as (N, L, H, D).
    """
    if not supports(q, k, v, key_padding_mask, bias, window_mask):
        raise ValueError(
            f"short_attention: expected (N, H, L, D) q, k, v of one shape and floating dtype with L <= {MAX_LENGTH} "
            f"and D <= {MAX_WIDTH}, on CUDA, an (N, L) boolean key-padding mask or none, an (H, L, L) bias or none "
            f"and a (W, L, L) window mask without gradient, W dividing N, or none; got q {tuple(q.shape)} {q.dtype} "
            f"on {q.device}, k {tuple(k.shape)}, v {tuple(v.shape)}, mask {_described(key_padding_mask)}, bias "
            f"{_described(bias)}, window mask {_described(window_mask)}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if _short_attention is None:
        register_operators()
    return _short_attention(q, k, v, key_padding_mask, bias, window_mask, scale)[0]


def supports_qkv(qkv: Tensor, heads: int, key_padding_mask: Tensor | None = None, bias: Tensor | None = None,
                 window_mask: Tensor | None = None, cosine_scale: Tensor | None = None) -> bool:
    """Whether :func:`short_attention_qkv` takes this call: an (N, L, 3C) ``qkv`` with stride 1
    along its channels, C a multiple of ``heads``, whose q, k and v :func:`supports` takes with
    the masks and bias, and a floating ``cosine_scale`` of one value per head or none."""
    if qkv.dim() != 3 or heads <= 0 or qkv.shape[-1] % (3 * heads) or qkv.stride(-1) != 1:
        return False
    if cosine_scale is not None and (not cosine_scale.is_floating_point() or tuple(cosine_scale.shape) != (heads,)
                                     or cosine_scale.device != qkv.device):
        return False
    return supports(*_split_heads(qkv, heads), key_padding_mask, bias, window_mask)


def short_attention_qkv(qkv: Tensor, heads: int, key_padding_mask: Tensor | None = None,
                        scale: float | None = None, bias: Tensor | None = None, window_mask: Tensor | None = None,
                        cosine_scale: Tensor | None = None, qkv_bias: Tensor | None = None) -> Tensor:
    """:func:`short_attention` of the q, k and v in an (N, L, 3C) qkv projection's output (q, k,
    v one after the other along the channels, each ``heads`` heads wide), as (N, L, C).

    Taking the projection's output whole, the backward pass writes its gradient as one (N, L, 3C)
    tensor, the matrix the projection's weight gradient reads, instead of three that autograd
    then concatenates. With ``cosine_scale`` (H,) the scores are SwinV2's cosine attention:
    q and k are divided by their L2 norms (at least 1e-12, as ``F.normalize``) in float32, q
    multiplied by its head's scale, both rounded to qkv's dtype, then ``q k^T * scale`` as
    before; the scale gets its gradient. The normalised q and k never leave the kernel.

    ``qkv_bias`` (3C,): the bias the projection added to ``qkv`` with its gradient detached
    (``F.linear(x, w, b.detach())``). It is not read; the backward kernel sums the gradient's
    columns as it writes them and returns the sums as its gradient, so that nothing reads the
    (N, L, 3C) gradient again for them.
    """
    if not supports_qkv(qkv, heads, key_padding_mask, bias, window_mask, cosine_scale):
        raise ValueError(
            f"short_attention_qkv: expected an (N, L, 3C) qkv with stride 1 along the channels, C a multiple of the "
            f"heads, L <= {MAX_LENGTH}, heads at most {MAX_WIDTH} wide, on CUDA, an (N, L) boolean key-padding mask "
            f"or none, an (H, L, L) bias or none, a (W, L, L) window mask without gradient, W dividing N, or none, "
            f"and an (H,) cosine scale or none; got qkv {tuple(qkv.shape)} strides {qkv.stride()} {qkv.dtype} on "
            f"{qkv.device}, {heads} heads, mask {_described(key_padding_mask)}, bias {_described(bias)}, window mask "
            f"{_described(window_mask)}, cosine scale {_described(cosine_scale)}")
    scale = (qkv.shape[-1] // (3 * heads)) ** -0.5 if scale is None else scale
    if _short_attention_qkv is None:
        register_operators()
    if qkv_bias is not None and (qkv_bias.shape != qkv.shape[-1:] or qkv_bias.device != qkv.device):
        raise ValueError(f"short_attention_qkv: expected a qkv bias of {qkv.shape[-1]} values on {qkv.device}, got "
                         f"{_described(qkv_bias)} on {qkv_bias.device}")
    return _short_attention_qkv(qkv, heads, key_padding_mask, bias, window_mask, cosine_scale, scale, qkv_bias)[0]
