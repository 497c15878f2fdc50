"""The qkv projection's gradient assembled from SDPA's dq, dk and dv, with the bias's gradient, in one pass.

Where attention runs through SDPA (ViT-L/4's 257-token frames, over the short kernel's 64), its
backward pass returns dq, dk and dv as three tensors, and the qkv projection needs them as one
(N, L, 3C) matrix: compiled by inductor, three copy kernels write them into it (4 bytes per
element of the block's input each, in bf16), and a reduction then reads the matrix again to sum
the projection bias's gradient over the tokens (6 more). In the H100 plan of a ViT-L/4 block
(``benchmarks/block_traffic.py --plan h100 --parts vit --kernels``) those are ``op28``-``op30``
and ``op34_op36``.

:func:`split_qkv` splits the projection's output into (N, H, L, D) q, k and v views, as the
layers did; its backward pass is one Triton kernel per q, k and v that copies the gradient into
its third of the (N, L, 3C) matrix and sums its columns over :data:`ROWS_PER_PROGRAM` rows into
float32 partial sums of the bias's gradient, added up after it. The projection adds its bias with
the gradient detached (``F.linear(x, w, b.detach())``) and hands the bias to :func:`split_qkv`,
whose backward pass returns that gradient. It runs on CUDA, and on the CPU under Triton's
interpreter (``TRITON_INTERPRET=1``, how the tests check it); elsewhere :func:`split_qkv` leaves
the gradients to autograd. :class:`~skysense.models.layers.Attention` uses it where
:func:`set_qkv_kernel` asked for it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from skysense.models import short_attention

try:
    import triton
    import triton.language as tl
except ImportError:  # e.g. macOS wheels of torch come without Triton
    triton = None

# Rows (tokens) one program walks down, summing its columns: one float32 row of partial sums per this many.
ROWS_PER_PROGRAM = 256
# The tile one program holds per step of that walk.
BLOCK_ROWS = 16
BLOCK_COLS = 128

if triton is not None:
    @triton.jit
    def _assemble_kernel(src_ptr, dst_ptr, partial_ptr, src_n, src_h, src_l, rows, length, width, head_width,
                         column, dst_row, BIAS_GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                         BLOCK_COLS: tl.constexpr):
        row_program = tl.program_id(0)
        columns = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        in_columns = columns < width
        head = columns // head_width
        within = columns % head_width
        source_columns = head.to(tl.int64) * src_h + within
        total = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
        for start in range(0, ROWS, BLOCK_ROWS):
            row = row_program * ROWS + start + tl.arange(0, BLOCK_ROWS)
            inside = (row[:, None] < rows) & in_columns[None, :]
            n = (row // length).to(tl.int64)
            position = (row % length).to(tl.int64)
            source = n[:, None] * src_n + position[:, None] * src_l + source_columns[None, :]
            grad = tl.load(src_ptr + source, mask=inside, other=0.0)
            tl.store(dst_ptr + row[:, None].to(tl.int64) * dst_row + column + columns[None, :], grad, mask=inside)
            if BIAS_GRAD:
                total += grad.to(tl.float32)
        if BIAS_GRAD:
            tl.store(partial_ptr + row_program * width + columns, tl.sum(total, axis=0), mask=in_columns)


def _assemble(dq: Tensor, dk: Tensor, dv: Tensor, bias_grad: bool) -> tuple[Tensor, Tensor]:
    """dq, dk and dv ((N, H, L, D), stride 1 along D) as one (N, L, 3C) tensor, and, with
    ``bias_grad``, the (3C,) float32 sums of its columns (else an empty tensor)."""
    dq, dk, dv = (g if g.stride(-1) == 1 else g.contiguous() for g in (dq, dk, dv))
    n, heads, length, head_width = dq.shape
    width = heads * head_width
    rows = n * length
    out = dq.new_empty((n, length, 3 * width))
    programs = triton.cdiv(rows, ROWS_PER_PROGRAM)
    partial = torch.empty((3, programs, width) if bias_grad else (1,), dtype=torch.float32, device=dq.device)
    for which, grad in enumerate((dq, dk, dv)):
        target = partial[which] if bias_grad else partial
        short_attention._launcher(_assemble_kernel)[(programs, triton.cdiv(width, BLOCK_COLS))](
            grad, out, target, grad.stride(0), grad.stride(1), grad.stride(2), rows, length, width, head_width,
            which * width, 3 * width, BIAS_GRAD=bias_grad, ROWS=ROWS_PER_PROGRAM, BLOCK_ROWS=BLOCK_ROWS,
            BLOCK_COLS=BLOCK_COLS, num_warps=4)
    return out, partial.sum(1).reshape(-1) if bias_grad else partial.new_empty(0)


def _assemble_fake(dq: Tensor, dk: Tensor, dv: Tensor, bias_grad: bool) -> tuple[Tensor, Tensor]:
    n, heads, length, head_width = dq.shape
    return (dq.new_empty((n, length, 3 * heads * head_width)),
            dq.new_empty((3 * heads * head_width if bias_grad else 0,), dtype=torch.float32))


_qkv_gradient = None


def register_operators() -> bool:
    """Register ``skysense::qkv_gradient`` with torch (once;
    :func:`~skysense.models.short_attention.kernel_operator`); whether it is registered (not
    without Triton). Done at the first :func:`split_qkv` call that uses it and by
    :func:`set_qkv_kernel`, not on import (a ``triton_op`` imports inductor)."""
    global _qkv_gradient
    if _qkv_gradient is None and triton is not None:
        _qkv_gradient = short_attention.kernel_operator("skysense::qkv_gradient", _assemble, _assemble_fake)
    return _qkv_gradient is not None


def supports(qkv: Tensor, heads: int) -> bool:
    """Whether :func:`split_qkv` assembles this call's gradient in the kernel: an (N, L, 3C)
    float16, bfloat16 or float32 ``qkv`` with C a multiple of ``heads``, on CUDA (or on the CPU
    under the interpreter)."""
    if triton is None or qkv.dim() != 3 or heads <= 0 or qkv.shape[-1] % (3 * heads):
        return False
    if qkv.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    return qkv.is_cuda or (short_attention.interpreted() and qkv.device.type == "cpu")


def _heads(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in qkv.split(qkv.shape[-1] // 3, -1))


class _SplitQkv(torch.autograd.Function):
    @staticmethod
    def forward(qkv: Tensor, bias: Tensor | None, heads: int) -> tuple[Tensor, Tensor, Tensor]:  # noqa: D102
        return _heads(qkv, heads)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001, D102
        ctx.bias_dtype = None if inputs[1] is None else inputs[1].dtype
        ctx.head_shape, ctx.dtype, ctx.device = output[0].shape, output[0].dtype, output[0].device

    @staticmethod
    def backward(ctx, dq: Tensor, dk: Tensor, dv: Tensor):  # noqa: ANN001, ANN205, D102
        bias_grad = ctx.bias_dtype is not None and ctx.needs_input_grad[1]
        # No question about the gradients' strides here: under torch.compile it would make dynamo
        # copy every gradient to a contiguous one first (three copies of q, k and v). The kernel
        # reads any strides.
        grads = [torch.zeros(ctx.head_shape, dtype=ctx.dtype, device=ctx.device) if g is None else g
                 for g in (dq, dk, dv)]
        dqkv, dbias = _qkv_gradient(*grads, bias_grad)
        return dqkv, dbias.to(ctx.bias_dtype) if bias_grad else None, None


def split_qkv(qkv: Tensor, heads: int, bias: Tensor | None = None, kernel: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """q, k and v of an (N, L, 3C) qkv projection's output as (N, H, L, D) views (each C wide,
    ``heads`` heads). With ``kernel`` and where :func:`supports` takes the call, the backward pass
    assembles their gradients into qkv's in the kernel, and ``bias`` (the projection's (3C,) bias,
    added to ``qkv`` with its gradient detached) gets its gradient from the kernel's column sums;
    otherwise autograd does both (``bias`` is then added as zero for its gradient)."""
    if bias is not None and bias.shape != qkv.shape[-1:]:
        raise ValueError(f"split_qkv: expected a bias of {qkv.shape[-1]} values for qkv {tuple(qkv.shape)}, got "
                         f"{tuple(bias.shape)}")
    if kernel and supports(qkv, heads):
        if _qkv_gradient is None and torch.compiler.is_compiling():
            raise RuntimeError("split_qkv: its operator is registered outside torch.compile: call "
                               "skysense.models.set_qkv_kernel(model, True) before compiling the model")
        register_operators()
        return _SplitQkv.apply(qkv, bias, heads)
    if bias is not None:  # values unchanged: the bias was added detached; this gives it its gradient
        qkv = qkv + (bias - bias.detach()).to(qkv.dtype)
    return _heads(qkv, heads)


def set_qkv_kernel(module: nn.Module, enabled: bool) -> int:
    """Let every attention layer in ``module`` with a ``qkv_kernel`` setting assemble its qkv
    gradient and sum its projection bias's gradient in :func:`split_qkv`'s kernel where that takes
    the call (``enabled``), or leave both to autograd; the number of layers set. Set it before
    compiling: a compiled graph keeps the path it traced. The short-sequence kernel's path
    (``attention_backends: [short]``) does both itself either way."""
    if enabled:
        register_operators()
    layers = [m for m in module.modules() if hasattr(m, "qkv_kernel")]
    for layer in layers:
        layer.qkv_kernel = bool(enabled)
    return len(layers)
