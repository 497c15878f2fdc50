"""Self-attention over a class token and a grid of ``64 k`` tokens, the grid through a fused kernel
whose tiles it fills exactly, the class token by hand, merged exactly through the log-sum-exp.

ViT-L/4 on 64 x 64 frames attends over 257 tokens: a class token and 16 x 16 patches. The fused
kernels work in tiles of 64 or 128 tokens, so 257 queries and keys take 3 x 3 tiles of 128 where
256 would take 2 x 2: on the H100 (2026-11-28) cuDNN did this call at about 109 TFLOP/s by the
formula, where its 32-token calls ran at about 200 TFLOP/s counted over whole 128-token tiles
(``benchmarks/RESULTS.md``). Any square grid whose side is a multiple of 8 has ``64 k + 1``
tokens with its class token.

Here the fused kernel (cuDNN's, flash or memory-efficient, through their ATen operators, or the
CPU's flash kernel on the CPU) attends from the grid's queries to the grid's keys only, and
returns its rows' log-sum-exp. The rest is small: every grid query's score against the class
key, merged into the kernel's output and log-sum-exp (``lse = logaddexp(lse_grid, s_cls)``,
``out = exp(lse_grid - lse) out_grid + exp(s_cls - lse) v_cls``), and the class query's row
over all keys, computed whole. The backward pass gives the kernel's backward operator the
merged output and log-sum-exp: it recomputes ``p = exp(q k^T * scale - lse)`` and ``delta =
rowsum(dout * out)`` from them, which are then the full softmax's, so its dq, dk and dv are
exactly the grid keys' part of the full attention's gradients (as torch's context-parallel
ring attention uses these operators); the class key's and the class query's parts are added
by hand. The products by hand run in the inputs' dtype with float32 results on CUDA (``bmm``
with ``out_dtype``), and the merges in float32.

The result equals ``F.scaled_dot_product_attention`` without a mask, up to rounding; whether it
is faster is for ``benchmarks/attention_backends.py`` to measure on a GPU (not done yet). The
layers select it with the attention backend ``"split_cudnn"``, ``"split_flash"`` or
``"split_efficient"`` (:mod:`skysense.models.attention`); calls it does not take run SDPA.
"""

from __future__ import annotations

import torch
from torch import Tensor

aten = torch.ops.aten

# The grid is a multiple of this many tokens (the fused kernels' smallest tile).
TILE = 64
# The fused kernel behind each backend name.
KERNELS: tuple[str, ...] = ("cudnn", "flash", "efficient")


def supports(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, kernel: str) -> bool:
    """Whether :func:`class_token_attention` takes this call: (N, H, L, D) self-attention without a
    mask, ``L = 64 k + 1`` with k >= 1, heads a multiple of 8 and at most 128 wide, all on one
    device, stride 1 along the heads; on CUDA in float16 or bfloat16 (float32 too for the
    memory-efficient kernel), on the CPU in any floating dtype."""
    if kernel not in KERNELS or attn_mask is not None or q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        return False
    length, width = q.shape[-2:]
    if length <= TILE or length % TILE != 1 or width % 8 or width > 128:
        return False
    if k.dtype != q.dtype or v.dtype != q.dtype or not q.is_floating_point():
        return False
    if k.device != q.device or v.device != q.device or any(t.stride(-1) != 1 for t in (q, k, v)):
        return False
    if q.device.type == "cuda":
        return q.dtype in (torch.float16, torch.bfloat16) or (kernel == "efficient" and q.dtype == torch.float32)
    return q.device.type == "cpu"


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, else the type itself (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def _product(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` over (N, H) in float32 or wider: off the CPU (on CUDA; on the meta device, where
    the tests trace the CUDA path) the half-precision product accumulates in float32 and is
    written in float32 (``bmm`` with ``out_dtype``), on the CPU in the inputs' dtype."""
    if a.device.type != "cpu" and a.dtype in (torch.float16, torch.bfloat16):
        out = torch.bmm(a.flatten(0, 1), b.flatten(0, 1), out_dtype=torch.float32)
        return out.unflatten(0, a.shape[:2])
    return torch.matmul(a, b).to(_accumulation(a.dtype))


def _dot(rows: Tensor, one: Tensor) -> Tensor:
    """(N, H, L, D) ``rows`` times one (N, H, 1, D) row: (N, H, L) in float32 or wider. Compiled,
    an element-wise product and a sum that inductor fuses into one pass over ``rows``; eager,
    a batched product (a copy of strided rows, but no float32 temporaries)."""
    if torch.compiler.is_compiling():
        acc = _accumulation(rows.dtype)
        return (rows.to(acc) * one.to(acc)).sum(-1)
    return _product(rows, one.transpose(-2, -1))[..., 0]


def _weighted_sum(weights: Tensor, rows: Tensor) -> Tensor:
    """``sum_l weights[..., l] rows[..., l, :]`` for (N, H, L) float ``weights`` and (N, H, L, D)
    ``rows``: (N, H, D) in float32 or wider (fused when compiled, as :func:`_dot`; eager, the
    weights rounded to the rows' dtype for a batched product)."""
    if torch.compiler.is_compiling():
        return (weights[..., None] * rows.to(weights.dtype)).sum(-2)
    return _product(weights[..., None, :].to(rows.dtype), rows)[..., 0, :]


def _first_and_rest(first: Tensor, rest: Tensor) -> Tensor:
    """(N, H, 1 + L', D) from an (N, H, D) first row and (N, H, L', D) others: element-wise
    (two paddings and a sum), so that inductor computes it inside whatever reads it instead of
    materialising a concatenation."""
    return (torch.nn.functional.pad(rest, (0, 0, 1, 0))
            + torch.nn.functional.pad(first[:, :, None], (0, 0, 0, rest.shape[2])))


def _kernel_forward(kernel: str, q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor, tuple]:
    """The fused kernel on the grid: its output, its rows' log-sum-exp as (N, H, L) float32, and
    what its backward operator needs besides (the log-sum-exp's own shape among it)."""
    if q.device.type == "cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        return out, lse, (tuple(lse.shape),)
    if kernel == "cudnn":
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, False, False, scale=scale)
        return out, lse.reshape(lse.shape[:3]), (tuple(lse.shape), seed, offset, cum_q, cum_k, max_q, max_k)
    if kernel == "flash":
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, False, False, scale=scale)
        return out, lse, (tuple(lse.shape), seed, offset, cum_q, cum_k, max_q, max_k)
    out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False,
                                                                          scale=scale)
    # Its log-sum-exp is padded to a multiple of 32 rows.
    return out, lse[..., :q.shape[-2]], (tuple(lse.shape), seed, offset)


def _kernel_lse(lse: Tensor, state: tuple) -> Tensor:
    """An (N, H, L) float32 log-sum-exp in the shape the kernel's backward operator takes."""
    shape = state[0]
    if tuple(lse.shape) == shape:
        return lse.contiguous()
    if len(shape) == 4:  # cuDNN's (N, H, L, 1)
        return lse.reshape(shape).contiguous()
    padded = lse.new_zeros(shape)  # the memory-efficient kernel's rows padded to a multiple of 32
    padded[..., :lse.shape[-1]] = lse
    return padded


def _kernel_backward(kernel: str, grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                     state: list, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of the grid's part of the attention, given the full attention's output and
    log-sum-exp on the grid's rows."""
    lse = _kernel_lse(lse, state)
    if q.device.type == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(grad, q, k, v, out, lse, 0.0, False,
                                                                          scale=scale)
    if kernel == "cudnn":
        _, seed, offset, cum_q, cum_k, max_q, max_k = state
        return aten._scaled_dot_product_cudnn_attention_backward(grad, q, k, v, out, lse, seed, offset, None, cum_q,
                                                                  cum_k, max_q, max_k, 0.0, False, scale=scale)
    if kernel == "flash":
        _, seed, offset, cum_q, cum_k, max_q, max_k = state
        return aten._scaled_dot_product_flash_attention_backward(grad, q, k, v, out, lse, cum_q, cum_k, max_q, max_k,
                                                                  0.0, False, seed, offset, scale=scale)
    _, seed, offset = state
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        grad, q, k, v, None, out, lse, seed, offset, 0.0, [True, True, True, False], False, scale=scale)
    return dq, dk, dv


def _heads_last(shape: torch.Size, like: Tensor) -> Tensor:
    """An empty (N, H, L, D) tensor laid out as (N, L, H, D): the layout the projection after
    attention reads without a copy."""
    n, heads, length, width = shape
    return torch.empty((n, length, heads, width), dtype=like.dtype, device=like.device).transpose(1, 2)


class _ClassTokenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, kernel: str, scale: float) -> Tensor:  # noqa: ANN001
        acc = _accumulation(q.dtype)
        q_cls, q_grid = q[:, :, :1], q[:, :, 1:]
        k_cls, k_grid = k[:, :, :1], k[:, :, 1:]
        v_cls, v_grid = v[:, :, :1], v[:, :, 1:]
        out_grid, lse_grid, state = _kernel_forward(kernel, q_grid, k_grid, v_grid, scale)
        # The grid's queries against the class key, merged into the kernel's rows.
        s_cls = _dot(q_grid, k_cls) * scale  # (N, H, L - 1)
        lse_rows = torch.logaddexp(lse_grid, s_cls)
        p_rows = torch.exp(s_cls - lse_rows)  # the class key's probability in each grid row
        merged = out_grid.to(acc) * torch.exp(lse_grid - lse_rows)[..., None] + p_rows[..., None] * v_cls.to(acc)
        # The class query against every key.
        p_cls = torch.softmax(_dot(k, q_cls) * scale, -1)  # (N, H, L)
        out_cls = _weighted_sum(p_cls, v)  # (N, H, D)
        if torch.compiler.is_compiling():  # one element-wise kernel writes the output, heads last
            out = _first_and_rest(out_cls, merged).to(q.dtype).transpose(1, 2).contiguous().transpose(1, 2)
        else:
            out = _heads_last(q.shape, q)
            out[:, :, 0] = out_cls
            out[:, :, 1:] = merged
        # Saved besides the inputs: the output, the grid rows' log-sum-exp, and the two sets of
        # probabilities computed by hand ((N, H, L) in all), which the backward pass would
        # otherwise recompute from q and k, a read of each.
        # The kernel's random seed and offset are tensors: saved as such, the rest kept as it is.
        ctx.slots = [i for i, t in enumerate(state) if isinstance(t, Tensor)]
        ctx.save_for_backward(q, k, v, out, lse_rows, p_rows, p_cls, *(state[i] for i in ctx.slots))
        ctx.state = [None if i in ctx.slots else t for i, t in enumerate(state)]
        ctx.kernel, ctx.scale = kernel, scale
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        q, k, v, out, lse_rows, p_rows, p_cls, *state_tensors = ctx.saved_tensors
        state = list(ctx.state)
        for i, t in zip(ctx.slots, state_tensors):
            state[i] = t
        scale, dtype, acc = ctx.scale, q.dtype, _accumulation(q.dtype)
        grad = grad.to(dtype)
        q_cls, q_grid = q[:, :, :1], q[:, :, 1:]
        k_cls, k_grid = k[:, :, :1], k[:, :, 1:]
        v_cls, v_grid = v[:, :, :1], v[:, :, 1:]
        g_cls, g_grid = grad[:, :, :1], grad[:, :, 1:]
        delta = (grad.to(acc) * out.to(acc)).sum(-1)  # rowsum(dout * out), (N, H, L)
        delta_cls, delta_rows = delta[..., 0], delta[..., 1:]
        out_grid = out[:, :, 1:]
        if g_grid.stride() != out_grid.stride():  # one layout for both, as the kernels write them
            g_grid, out_grid = g_grid.contiguous(), out_grid.contiguous()
        dq_grid, dk_grid, dv_grid = _kernel_backward(ctx.kernel, g_grid, q_grid, k_grid, v_grid, out_grid, lse_rows,
                                                     state, scale)
        # The grid's queries x the class key: (N, H, L - 1) score gradients, (N, H, D) sums.
        ds = p_rows * (_dot(g_grid, v_cls) - delta_rows)
        dv_cls = _weighted_sum(p_rows, g_grid)
        dk_cls = _weighted_sum(ds, q_grid) * scale
        # The class query x every key: (N, H, L) score gradients.
        ds_cls = p_cls * (_dot(v, g_cls) - delta_cls[..., None])
        dq_cls = _weighted_sum(ds_cls, k) * scale
        # Each gradient as the grid's part, the class token's row, and the class query's rank-one
        # part over every key, summed element-wise.
        dq = _first_and_rest(dq_cls, dq_grid.to(acc) + ds[..., None] * (k_cls.to(acc) * scale))
        dk = _first_and_rest(dk_cls, dk_grid.to(acc)) + ds_cls[..., None] * (q_cls.to(acc) * scale)
        dv = _first_and_rest(dv_cls, dv_grid.to(acc)) + p_cls[..., None] * g_cls.to(acc)
        return dq.to(dtype), dk.to(dtype), dv.to(dtype), None, None


def class_token_attention(q: Tensor, k: Tensor, v: Tensor, kernel: str = "cudnn",
                          scale: float | None = None) -> Tensor:
    """``softmax(q k^T * scale) v`` for (N, H, 64 k + 1, D) ``q``, ``k``, ``v`` whose first token
    is a class token (any token will do: the split is exact), the other 64 k through ``kernel``
    (one of :data:`KERNELS`; the CPU's flash kernel on the CPU). The output is (N, H, L, D) laid
    out as (N, L, H, D). ``ValueError`` for a call :func:`supports` does not take."""
    if not supports(q, k, v, None, kernel):
        raise ValueError(
            f"class_token_attention: expected (N, H, L, D) q, k, v of one shape, dtype and device with L = 64 k + 1 "
            f"(k >= 1), D a multiple of 8 up to 128, stride 1 along D, and kernel one of {list(KERNELS)} (half "
            f"precision on CUDA); got q {tuple(q.shape)} {q.dtype} on {q.device}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}, kernel {kernel!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _ClassTokenAttention.apply(q, k, v, kernel, scale)
