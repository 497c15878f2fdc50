"""The MLP's first bias and exact GELU, whose backward pass writes both gradients in one Triton kernel.

Every transformer block's MLP computes ``fc2(gelu(x W^T + b))`` over (tokens, 4C) hidden
activations. Trained through autograd and compiled by inductor, the backward pass of the GELU
runs two kernels over them: one reads the incoming gradient and the pre-activation ``h`` and
writes the gradient of ``h``; a second reads that gradient again to sum it over the tokens,
the gradient of ``b`` (inductor does not fuse a column sum into the pointwise kernel that
produces its input; the H100 run of 2026-11-28 shows the pointwise kernel alone,
``triton_poi_fused_gelu_gelu_backward``). That second read is 8 bytes per element of the
block's input, 8 of the 146 element-wise bytes of a ViT-L/4 block in inductor's H100 plan
(``benchmarks/block_traffic.py --plan h100 --kernels``). With this kernel the plan moves 12.8 GB
less per step of part (b), 12.7 of part (c) and 2.8 of part (a) (``--mlp-kernel``;
``benchmarks/RESULTS.md``, session 18).

:func:`bias_gelu` takes the bias-free product ``u = x W^T`` and the bias: its forward pass is
``gelu(u + b)`` in torch's operators (which inductor fuses as it fused the GELU before: the
same bytes), and its backward pass one Triton kernel that recomputes ``u + b``, writes the
gradient of ``u`` and sums it over its rows into a float32 partial sum of the bias gradient
per :data:`ROWS_PER_PROGRAM` rows; the partial sums are added up after it (deterministic, no
atomics). The bias gradient is summed from the float32 products, before their rounding to
the activations' type.

It runs on CUDA, and on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``, how the
tests check it); :func:`supports` says whether a call qualifies, and :class:`~skysense.models.layers.Mlp`
uses it where :func:`set_mlp_kernel` asked for it. The backward operator is
``skysense::gelu_bias_backward``, a ``torch.library.triton_op`` registered at the first use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from skysense.models import short_attention

try:
    import triton
    import triton.language as tl
except ImportError:  # e.g. macOS wheels of torch come without Triton
    triton = None

# Rows of the hidden activations one backward program walks down, summing its columns' bias
# gradient: one float32 row of partial sums per this many rows (4 MB at part (b)'s 65,792 rows of 4096).
ROWS_PER_PROGRAM = 256
# The tile one program holds per step of that walk. Built for the H100 with 4 warps, ptxas reports
# 80 registers a thread and no spills (32 x 128: 141): more programs resident per SM for this
# memory-bound loop. Never timed on a GPU: benchmarks/bias_kernels.py times it there.
BLOCK_ROWS = 16
BLOCK_COLS = 128

if triton is not None:
    @triton.jit
    def _backward_kernel(grad_ptr, u_ptr, bias_ptr, grad_u_ptr, partial_ptr, rows, cols,
                         ROWS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        row_program = tl.program_id(0)
        columns = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        in_columns = columns < cols
        # the bias as the forward pass adds it: rounded to the activations' type
        bias = tl.load(bias_ptr + columns, mask=in_columns, other=0.0).to(u_ptr.dtype.element_ty).to(tl.float32)
        total = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)  # summed over rows once, at the end
        for start in range(0, ROWS, BLOCK_ROWS):
            row = row_program * ROWS + start + tl.arange(0, BLOCK_ROWS)
            inside = (row[:, None] < rows) & in_columns[None, :]
            offsets = row[:, None].to(tl.int64) * cols + columns[None, :]
            grad = tl.load(grad_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            h = tl.load(u_ptr + offsets, mask=inside, other=0.0).to(tl.float32) + bias[None, :]
            # d/dh of h * Phi(h): Phi(h) + h * phi(h), with phi the standard normal density
            # (0.7071... = 1 / sqrt(2), 0.3989... = 1 / sqrt(2 pi)).
            slope = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476)) + h * tl.exp(-0.5 * h * h) * 0.3989422804014327
            grad_h = grad * slope  # zero outside: grad is loaded as 0 there
            tl.store(grad_u_ptr + offsets, grad_h.to(grad_u_ptr.dtype.element_ty), mask=inside)
            total += grad_h
        tl.store(partial_ptr + row_program * cols + columns, tl.sum(total, axis=0), mask=in_columns)


def supports(u: Tensor, bias: Tensor) -> bool:
    """Whether :func:`bias_gelu` takes this call: ``u`` of at least 2 dimensions, contiguous,
    float16, bfloat16 or float32, ``bias`` a vector as long as its last dimension, both on CUDA
    (or on the CPU under the interpreter)."""
    if triton is None or u.dim() < 2 or not u.is_contiguous() or bias.dim() != 1 or bias.shape[0] != u.shape[-1]:
        return False
    if u.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not bias.is_floating_point():
        return False
    if bias.device != u.device:
        return False
    return u.is_cuda or (short_attention.interpreted() and u.device.type == "cpu")


def _backward(grad: Tensor, u: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """The gradient of ``u`` (``u``'s shape and type) and the (row programs, columns) float32
    partial sums of the bias gradient."""
    grad = grad.contiguous()  # the kernel reads it with u's (contiguous) offsets
    cols = u.shape[-1]
    rows = u.numel() // cols
    grad_u = torch.empty_like(u)
    programs = triton.cdiv(rows, ROWS_PER_PROGRAM)
    partial = torch.empty((programs, cols), dtype=torch.float32, device=u.device)
    short_attention._launcher(_backward_kernel)[(programs, triton.cdiv(cols, BLOCK_COLS))](
        grad, u, bias, grad_u, partial, rows, cols, ROWS=ROWS_PER_PROGRAM, BLOCK_ROWS=BLOCK_ROWS,
        BLOCK_COLS=BLOCK_COLS, num_warps=4)
    return grad_u, partial


def _backward_fake(grad: Tensor, u: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    cols = u.shape[-1]
    programs = -(-(u.numel() // cols) // ROWS_PER_PROGRAM)
    return torch.empty_like(u), u.new_empty((programs, cols), dtype=torch.float32)


_gelu_bias_backward = None


def register_operators() -> bool:
    """Register ``skysense::gelu_bias_backward`` with torch (once;
    :func:`~skysense.models.short_attention.kernel_operator`); whether it is registered (not
    without Triton). Done at the first :func:`bias_gelu` call and by :func:`set_mlp_kernel`,
    before anything compiles the layers, not on import (a ``triton_op`` imports inductor)."""
    global _gelu_bias_backward
    if _gelu_bias_backward is None and triton is not None:
        _gelu_bias_backward = short_attention.kernel_operator("skysense::gelu_bias_backward", _backward, _backward_fake)
    return _gelu_bias_backward is not None


def reference(u: Tensor, bias: Tensor) -> Tensor:
    """``gelu(u + bias)``, the exact GELU, with the bias cast to ``u``'s type as a linear layer
    under autocast adds it."""
    return F.gelu(u + bias.to(u.dtype))


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(u: Tensor, bias: Tensor) -> Tensor:  # noqa: D102
        return reference(u, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001, D102
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:  # noqa: ANN001, D102
        u, bias = ctx.saved_tensors
        grad_u, partial = _gelu_bias_backward(grad, u, bias)  # no stride question here (see qkv_gradient)
        return grad_u, partial.sum(0).to(bias.dtype)


def bias_gelu(u: Tensor, bias: Tensor) -> Tensor:
    """``gelu(u + bias)`` for ``u = x W^T`` (no bias), its backward pass one kernel that writes the
    gradients of ``u`` and ``bias`` (see the module's docstring). Calls :func:`supports` does not
    take raise ``ValueError``."""
    if not supports(u, bias):
        raise ValueError(f"bias_gelu: expected a contiguous float tensor of 2+ dimensions on CUDA (or the CPU "
                         f"under TRITON_INTERPRET=1) and a bias of {u.shape[-1] if u.dim() else '?'} values on its "
                         f"device; got u {tuple(u.shape)} {u.dtype} on {u.device} (contiguous: {u.is_contiguous()}), "
                         f"bias {tuple(bias.shape)} {bias.dtype} on {bias.device}")
    if _gelu_bias_backward is None and torch.compiler.is_compiling():
        raise RuntimeError("bias_gelu: its operator is registered outside torch.compile: call "
                           "skysense.models.set_mlp_kernel(model, True) before compiling the model")
    register_operators()
    return _BiasGelu.apply(u, bias)


def set_mlp_kernel(module: nn.Module, enabled: bool) -> int:
    """Let every MLP in ``module`` (a layer with a ``gelu_kernel`` setting) run its first bias and
    GELU through :func:`bias_gelu` where :func:`supports` takes the call (``enabled``), or through
    ``fc1`` and ``nn.GELU`` as autograd differentiates them; the number of MLPs set. Set it before
    compiling: a compiled graph keeps the path it traced. The values are the same within the
    activations' rounding (the bias is added after the product's rounding, not before)."""
    if enabled:
        register_operators()
    layers = [m for m in module.modules() if hasattr(m, "gelu_kernel")]
    for layer in layers:
        layer.gelu_kernel = bool(enabled)
    return len(layers)

