"""A pre-norm block's residual junctions, whose backward passes each run as one Triton kernel.

A pre-norm block (:class:`~skysense.models.layers.TransformerBlock`) meets its residual
stream three times: ``h1 = LN1(x)``; ``x1 = x + s * a`` and ``h2 = LN2(x1)``, where ``a`` is
the attention's output projection and ``s`` stochastic depth's per-sample scale; and
``y = x1 + s * m``, ``m`` the MLP's second layer. Compiled by inductor, the backward pass of
these runs, besides the two LayerNorm backward kernels, a kernel summing all four LayerNorm
weight and bias gradients (a second read of both norms' inputs and output gradients) and two
reductions over the tokens for the projections' bias gradients (a second read of the bf16
gradients of ``a`` and ``m``): 14 bytes per element of a 1024-wide block's input, of the 127
element-wise bytes of a fusion block in inductor's H100 plan at 16,384 rows, where the GPU's own
fusion choices (mix-order reductions) do not join them either (``benchmarks/RESULTS.md``, session
19). With these kernels the plan moves 21.5 GB less per step of part (b) and 21.4 of part (c),
about 13 bytes per element after the float32 partial sums (``benchmarks/block_traffic.py
--plan h100 --norm-kernel``).

Each junction here computes its forward pass in torch's operators (inductor fuses them as
before: the same bytes) and its backward pass in one kernel that walks the rows of the
residual stream once:

- :func:`layer_norm_residual` (``h1 = LN1(x)``, returning ``x`` as well so that its backward
  pass receives the residual stream's gradient): writes ``dx = dx1 + LN1'(dh1)`` and sums the
  norm's weight and bias gradients;
- :func:`branch_layer_norm` (``x1 = x + s * a``, ``h2 = LN2(x1)``): recomputes ``x1``, writes
  ``dx1 = dy + LN2'(dh2)``, the branch's gradient ``s * dx1`` in its type, and sums the norm's
  weight and bias gradients and the branch bias's gradient;
- :func:`branch_add` (``y = x1 + s * m``): writes the branch's gradient ``s * dy`` in its type
  and sums the branch bias's gradient; ``x1``'s gradient is ``dy`` itself.

The norms' outputs are returned in autocast's type (the next layer's input type), so that
their gradients arrive in it. The norms' statistics are recomputed from the saved input, not
saved. A branch's bias is added by its projection with the gradient detached, and the
kernel's sums become its gradient (as :mod:`skysense.models.gelu_bias` does for the MLP's
first bias). Every sum is kept per :data:`ROWS_PER_PROGRAM` rows in float32 and added up after
the kernel (deterministic, no atomics).

It runs on CUDA, and on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``, how the
tests check it); :func:`supports` says whether a call qualifies. The backward operator is
``skysense::residual_norm_backward``, registered at the first use or by :func:`set_norm_kernel`.
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

# Rows one backward program walks, keeping float32 sums per column: one row of partial sums per
# program and per sum (3 MB per sum at part (b)'s 65,792 rows of 1024; 1.6% of its 18 bytes per
# element). Never timed on a GPU.
ROWS_PER_PROGRAM = 64
# Elements of one tile: rows of the residual stream (a power of two) times its width rounded up
# to a power of two; at width 1024, one row per step of the walk. Built for the H100 with 8 warps
# at width 1024, ptxas reports 85 registers a thread for the middle junction (74 and 30 for the
# others) and no spills; 2 rows a step take 200, 4 rows 255 (benchmarks/kernel_registers.py).
TILE_ELEMENTS = 1024
# Widest residual stream a program holds in one tile (a row is reduced whole): at 2048, 143
# registers a thread and no spills; at 4096, 254 (one program per SM). Wider streams run autograd.
MAX_WIDTH = 2048
NUM_WARPS = 8

if triton is not None:
    @triton.jit
    def _backward_kernel(x_ptr, branch_ptr, scale_ptr, dres_ptr, g_ptr, weight_ptr, dx_ptr, dbranch_ptr,
                         partial_ptr, rows, cols, sample_rows, eps,
                         ROWS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                         NORM: tl.constexpr, ADDED: tl.constexpr, BRANCH: tl.constexpr, SCALE: tl.constexpr,
                         RESIDUAL: tl.constexpr, SUMS: tl.constexpr):
        program = tl.program_id(0)
        columns = tl.arange(0, BLOCK_COLS)
        in_columns = columns < cols
        if NORM:
            weight = tl.load(weight_ptr + columns, mask=in_columns, other=0.0).to(tl.float32)
            weight_total = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
            bias_total = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
        if BRANCH:
            branch_total = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
        for start in range(0, ROWS, BLOCK_ROWS):
            row = program * ROWS + start + tl.arange(0, BLOCK_ROWS)
            inside = (row[:, None] < rows) & in_columns[None, :]
            offsets = row[:, None].to(tl.int64) * cols + columns[None, :]
            if SCALE:  # stochastic depth's scale of the row's sample, in the branch's type
                scale = tl.load(scale_ptr + row // sample_rows, mask=row < rows, other=0.0).to(tl.float32)
            if RESIDUAL:
                d = tl.load(dres_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            else:
                d = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
            if NORM:
                x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
                if ADDED:  # the norm's input x + s * a, rounded as the forward pass rounds it
                    a = tl.load(branch_ptr + offsets, mask=inside, other=0.0)
                    if SCALE:
                        a = (a.to(tl.float32) * scale[:, None]).to(branch_ptr.dtype.element_ty)
                    x = (x + a.to(tl.float32)).to(x_ptr.dtype.element_ty).to(tl.float32)
                mean = tl.sum(x, axis=1) / cols
                centred = tl.where(inside, x - mean[:, None], 0.0)
                rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / cols + eps)
                normed = centred * rstd[:, None]
                g = tl.load(g_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
                gw = g * weight[None, :]
                c1 = tl.sum(gw * normed, axis=1) / cols
                c2 = tl.sum(gw, axis=1) / cols
                d += rstd[:, None] * (gw - normed * c1[:, None] - c2[:, None])
                tl.store(dx_ptr + offsets, d.to(dx_ptr.dtype.element_ty), mask=inside)
                weight_total += g * normed
                bias_total += g
            if BRANCH:
                if SCALE:
                    d = d * scale[:, None]
                tl.store(dbranch_ptr + offsets, d.to(dbranch_ptr.dtype.element_ty), mask=inside)
                branch_total += d
        out = partial_ptr + program.to(tl.int64) * SUMS * cols + columns
        if NORM:
            tl.store(out, tl.sum(weight_total, axis=0), mask=in_columns)
            tl.store(out + cols, tl.sum(bias_total, axis=0), mask=in_columns)
        if BRANCH:  # the last sum
            tl.store(out + (SUMS - 1) * cols, tl.sum(branch_total, axis=0), mask=in_columns)


def supports(x: Tensor) -> bool:
    """Whether the junctions take a residual stream ``x``: at least 2 dimensions, contiguous,
    float32, float16 or bfloat16, at most :data:`MAX_WIDTH` wide, on CUDA (or on the CPU under
    the interpreter)."""
    if triton is None or x.dim() < 2 or not x.is_contiguous() or x.shape[-1] > MAX_WIDTH or x.numel() == 0:
        return False
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    return x.is_cuda or (short_attention.interpreted() and x.device.type == "cpu")


def _partial_rows(rows: int) -> int:
    return -(-rows // ROWS_PER_PROGRAM)


def _backward(x: Tensor, branch: Tensor | None, scale: Tensor | None, dres: Tensor | None, g: Tensor | None,
              weight: Tensor | None, eps: float, sample_rows: int,
              branch_dtype: torch.dtype | None) -> tuple[Tensor, Tensor, Tensor]:
    """The residual stream's gradient (``x``'s shape and type; empty without a norm, ``g`` None),
    the branch's (in ``branch_dtype``; empty where that is None) and the (programs, sums, columns)
    float32 partial sums: the norm's weight and bias gradients, then the branch bias's. ``branch``
    is read only to recompute the norm's input ``x + scale * branch``."""
    norm = g is not None
    cols = x.shape[-1]
    rows = x.numel() // cols
    like = x.contiguous()
    dres = None if dres is None else dres.contiguous()
    branch = None if branch is None or not norm else branch.contiguous()
    g = None if g is None else g.contiguous()
    dx = torch.empty_like(like) if norm else like.new_empty(0)
    dbranch = like.new_empty(0) if branch_dtype is None else torch.empty_like(like, dtype=branch_dtype)
    sums = 2 * norm + (branch_dtype is not None)
    programs = _partial_rows(rows)
    partial = torch.empty((programs, sums, cols), dtype=torch.float32, device=x.device)
    block_cols = triton.next_power_of_2(cols)
    block_rows = max(1, min(ROWS_PER_PROGRAM, TILE_ELEMENTS // block_cols))
    short_attention._launcher(_backward_kernel)[(programs,)](
        like, like if branch is None else branch, like if scale is None else scale.contiguous(),
        like if dres is None else dres, like if g is None else g, like if weight is None else weight,
        dx, dbranch, partial, rows, cols, max(1, sample_rows), eps,
        ROWS=ROWS_PER_PROGRAM, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, NORM=norm, ADDED=branch is not None,
        BRANCH=branch_dtype is not None, SCALE=scale is not None, RESIDUAL=dres is not None, SUMS=sums,
        num_warps=NUM_WARPS)
    return dx, dbranch, partial


def _backward_fake(x, branch, scale, dres, g, weight, eps, sample_rows, branch_dtype):
    cols = x.shape[-1]
    norm = g is not None
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if norm else x.new_empty(0)
    dbranch = (x.new_empty(0) if branch_dtype is None
               else torch.empty_like(x, dtype=branch_dtype, memory_format=torch.contiguous_format))
    sums = 2 * norm + (branch_dtype is not None)
    return dx, dbranch, x.new_empty((_partial_rows(x.numel() // cols), sums, cols), dtype=torch.float32)


_residual_norm_backward = None


def register_operators() -> bool:
    """Register ``skysense::residual_norm_backward`` with torch (once;
    :func:`~skysense.models.short_attention.kernel_operator`); whether it is registered (not
    without Triton). Done at the first junction call and by :func:`set_norm_kernel`, before
    anything compiles the blocks, not on import (a ``triton_op`` imports inductor)."""
    global _residual_norm_backward
    if _residual_norm_backward is None and triton is not None:
        _residual_norm_backward = short_attention.kernel_operator("skysense::residual_norm_backward", _backward,
                                                                  _backward_fake)
    return _residual_norm_backward is not None


def _per_sample(scale: Tensor, like: Tensor) -> Tensor:
    """A (batch,) scale as (batch, 1, ...), to multiply ``like``."""
    return scale.view(-1, *([1] * (like.dim() - 1)))


def _scaled(branch: Tensor, scale: Tensor | None) -> Tensor:
    return branch if scale is None else branch * _per_sample(scale, branch)


def _sample_rows(x: Tensor, scale: Tensor | None) -> int:
    """Rows (tokens) per sample of the residual stream: what one scale value covers."""
    return 0 if scale is None else x.numel() // x.shape[-1] // scale.shape[0]


class _ResidualNorm(torch.autograd.Function):
    """``(x + s * a, LN(x + s * a))``; without a branch ``(x, LN(x))``."""

    @staticmethod
    def forward(x: Tensor, branch: Tensor | None, scale: Tensor | None, branch_bias: Tensor | None, weight: Tensor,
                bias: Tensor | None, eps: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:  # noqa: D102
        stream = x.view_as(x) if branch is None else x + _scaled(branch, scale)
        normed = F.layer_norm(stream, (x.shape[-1],), weight, bias, eps)
        # Cast only where the type changes: compiled on torch 2.11 (the H100's), an output made by
        # a `.to()` that returns its input loses its gradient (zeros arrive; not on torch 2.14).
        return stream, normed if normed.dtype == out_dtype else normed.to(out_dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001, D102
        x, branch, scale, branch_bias, weight, bias, eps, _ = inputs
        ctx.save_for_backward(x, branch, scale, weight)
        ctx.eps, ctx.has_bias, ctx.has_branch_bias = eps, bias is not None, branch_bias is not None

    @staticmethod
    def backward(ctx, grad_stream: Tensor, grad_normed: Tensor):  # noqa: ANN001, ANN205, D102
        x, branch, scale, weight = ctx.saved_tensors
        dx, dbranch, partial = _residual_norm_backward(x, branch, scale, grad_stream, grad_normed, weight, ctx.eps,
                                                       _sample_rows(x, scale), None if branch is None else branch.dtype)
        total = partial.sum(0)
        grad_weight = total[0].to(weight.dtype)
        grad_bias = total[1].to(weight.dtype) if ctx.has_bias else None
        if branch is None:
            return dx, None, None, None, grad_weight, grad_bias, None, None
        grad_branch_bias = total[2] if ctx.has_branch_bias else None
        return dx, dbranch, None, grad_branch_bias, grad_weight, grad_bias, None, None


class _BranchAdd(torch.autograd.Function):
    """``x + s * m``."""

    @staticmethod
    def forward(x: Tensor, branch: Tensor, scale: Tensor | None, branch_bias: Tensor | None) -> Tensor:  # noqa: D102
        return x + _scaled(branch, scale)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001, D102
        x, branch, scale, branch_bias = inputs
        ctx.save_for_backward(scale)
        ctx.has_branch_bias, ctx.branch_dtype = branch_bias is not None, branch.dtype

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205, D102
        (scale,) = ctx.saved_tensors
        _, dbranch, partial = _residual_norm_backward(grad, None, scale, grad, None, None, 0.0,
                                                      _sample_rows(grad, scale), ctx.branch_dtype)
        return grad, dbranch, None, partial.sum(0)[0] if ctx.has_branch_bias else None


def _norm_output_dtype(x: Tensor) -> torch.dtype:
    """The type the next layer computes in: autocast's, where it is on for ``x``'s device."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _checked(name: str, x: Tensor, branch: Tensor | None = None, scale: Tensor | None = None) -> None:
    if not supports(x):
        raise ValueError(f"{name}: expected a contiguous float residual stream of 2+ dimensions, at most {MAX_WIDTH} "
                         f"wide, on CUDA (or the CPU under TRITON_INTERPRET=1); got {tuple(x.shape)} {x.dtype} on "
                         f"{x.device} (contiguous: {x.is_contiguous()})")
    if branch is not None and (branch.shape != x.shape or branch.device != x.device):
        raise ValueError(f"{name}: expected a branch of the residual stream's shape {tuple(x.shape)} on {x.device}, "
                         f"got {tuple(branch.shape)} on {branch.device}")
    if scale is not None and (scale.dim() != 1 or scale.shape[0] != x.shape[0] or scale.device != x.device):
        raise ValueError(f"{name}: expected a stochastic-depth scale of one value per sample, ({x.shape[0]},) on "
                         f"{x.device}, got {tuple(scale.shape)} on {scale.device}")
    if _residual_norm_backward is None and torch.compiler.is_compiling():
        raise RuntimeError(f"{name}: its operator is registered outside torch.compile: call "
                           "skysense.models.set_norm_kernel(model, True) before compiling the model")
    register_operators()


def layer_norm_residual(x: Tensor, norm: nn.LayerNorm) -> tuple[Tensor, Tensor]:
    """``(x, norm(x))``, the norm's output in autocast's type where autocast is on; the backward
    pass one kernel (see the module's docstring) that adds the norm's input gradient to the
    residual stream's. ``x``: (..., C), contiguous. Calls :func:`supports` does not take raise
    ``ValueError``."""
    _checked("layer_norm_residual", x)
    return _ResidualNorm.apply(x, None, None, None, norm.weight, norm.bias, norm.eps, _norm_output_dtype(x))


def branch_layer_norm(x: Tensor, branch: Tensor, scale: Tensor | None, branch_bias: Tensor | None,
                      norm: nn.LayerNorm) -> tuple[Tensor, Tensor]:
    """``(x1, norm(x1))`` for ``x1 = x + scale * branch``: ``branch`` (x's shape, e.g. the
    attention's projection with its bias added detached), ``scale`` stochastic depth's
    (samples,) scale or None, ``branch_bias`` the bias whose gradient the kernel sums (or None).
    The backward pass is one kernel (see the module's docstring)."""
    _checked("branch_layer_norm", x, branch, scale)
    return _ResidualNorm.apply(x, branch, scale, branch_bias, norm.weight, norm.bias, norm.eps,
                               _norm_output_dtype(x))


def branch_add(x: Tensor, branch: Tensor, scale: Tensor | None, branch_bias: Tensor | None) -> Tensor:
    """``x + scale * branch``, whose backward pass writes the branch's gradient and sums
    ``branch_bias``'s in one kernel (see the module's docstring)."""
    _checked("branch_add", x, branch, scale)
    return _BranchAdd.apply(x, branch, scale, branch_bias)


def set_norm_kernel(module: nn.Module, enabled: bool) -> int:
    """Let every pre-norm block in ``module`` (a layer with a ``norm_kernel`` setting) run its
    residual junctions through this module's kernels where :func:`supports` takes the residual
    stream (``enabled``), or as autograd differentiates them; the number of blocks set. Set it
    before compiling: a compiled graph keeps the path it traced. The values are the same
    within rounding (the norms' statistics are recomputed in the backward pass)."""
    if enabled:
        register_operators()
    layers = [m for m in module.modules() if hasattr(m, "norm_kernel")]
    for layer in layers:
        layer.norm_kernel = bool(enabled)
    return len(layers)
