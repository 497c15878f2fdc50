"""The class-token split (skysense.models.class_token_attention): SDPA's values and gradients, eager
and compiled, on the CPU's flash kernel; and the CUDA kernels where a GPU is there."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from skysense.compilation import compile_blocks
from skysense.config import preset_config
from skysense.models import TRANSFORMER_BLOCKS, set_attention_backends
from skysense.models.attention import SPLIT, attention, check_attention_backends
from skysense.models.class_token_attention import KERNELS, class_token_attention, supports
from skysense.models.vit import VisionTransformer


def _qkv(n: int, heads: int, length: int, width: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    """An (N, L, 3C) projection output and its q, k, v as the blocks make them: (N, H, L, D) views."""
    g = torch.Generator(device=device).manual_seed(seed)
    qkv = torch.randn(n, length, 3 * heads * width, generator=g, dtype=dtype, device=device).requires_grad_()
    return qkv


def _views(qkv: torch.Tensor, heads: int):
    n, length, width3 = qkv.shape
    return [t.reshape(n, length, heads, -1).transpose(1, 2) for t in qkv.split(width3 // 3, -1)]


def _run(fn, qkv: torch.Tensor, heads: int, grad: torch.Tensor, **kwargs):
    out = fn(*_views(qkv, heads), **kwargs)
    (dqkv,) = torch.autograd.grad(out, qkv, grad)
    return out, dqkv


@pytest.mark.parametrize("length", [65, 129])
def test_values_and_gradients_are_sdpas_in_float64(length: int) -> None:
    qkv = _qkv(2, 3, length, 8, torch.float64)
    grad = torch.randn(2, 3, length, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours, ours_grad = _run(class_token_attention, qkv, 3, grad, scale=0.4)
    reference, reference_grad = _run(F.scaled_dot_product_attention, qkv, 3, grad, scale=0.4)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours_grad, reference_grad, rtol=0, atol=1e-12)
    # The output is laid out as (N, L, H, D), as the projection after attention reads it.
    assert ours.transpose(1, 2).is_contiguous()


def test_bfloat16_is_as_close_to_float64_as_sdpa() -> None:
    qkv = _qkv(2, 4, 129, 16, torch.bfloat16)
    grad = torch.randn(2, 4, 129, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    exact, exact_grad = _run(F.scaled_dot_product_attention, qkv.detach().double().requires_grad_(), 4,
                             grad.double())
    ours, ours_grad = _run(class_token_attention, qkv, 4, grad)
    sdpa, sdpa_grad = _run(F.scaled_dot_product_attention, qkv, 4, grad)
    for a, b, ref in ((ours, sdpa, exact), (ours_grad, sdpa_grad, exact_grad)):
        error, sdpa_error = (a.double() - ref).abs().max(), (b.double() - ref).abs().max()
        assert error <= 2 * sdpa_error + 1e-3, (error.item(), sdpa_error.item())


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_it_keeps_sdpas_values_and_gradients(backend: str) -> None:
    # float32: torch 2.11's fake CPU flash kernel says its log-sum-exp is float32 for float64
    # inputs too (the kernel returns float64), so compiled float64 reads it wrongly there.
    qkv = _qkv(2, 3, 65, 8, torch.float32)
    grad = torch.randn(2, 3, 65, 8, generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(class_token_attention, backend=backend, fullgraph=True)
    ours, ours_grad = _run(compiled, qkv, 3, grad, kernel="cudnn")
    reference, reference_grad = _run(F.scaled_dot_product_attention, qkv, 3, grad)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_grad, reference_grad, rtol=0, atol=1e-5)


def test_which_calls_it_takes() -> None:
    q, k, v = _views(_qkv(1, 2, 65, 8, torch.float32), 2)
    assert supports(q, k, v, None, "cudnn")
    assert not supports(q, k, v, None, "math")  # not one of its kernels
    assert not supports(q, k, v, torch.ones(1, 1, 1, 65, dtype=torch.bool), "cudnn")  # a mask
    assert not supports(q[:, :, :64], k[:, :, :64], v[:, :, :64], None, "cudnn")  # no class token
    assert not supports(q[:, :, :33], k[:, :, :33], v[:, :, :33], None, "cudnn")  # no whole tile
    q6, k6, v6 = _views(_qkv(1, 2, 65, 6, torch.float32), 2)
    assert not supports(q6, k6, v6, None, "cudnn")  # heads not a multiple of 8
    with pytest.raises(ValueError, match=r"L = 64 k \+ 1.*got q \(1, 2, 64, 8\)"):
        class_token_attention(q[:, :, :64], k[:, :, :64], v[:, :, :64])


def test_the_backend_runs_sdpa_on_calls_it_does_not_take() -> None:
    q, k, v = (t.detach() for t in _views(_qkv(2, 2, 40, 8, torch.float64), 2))
    mask = torch.rand(2, 1, 40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for m in (None, mask):
        torch.testing.assert_close(attention(q, k, v, m, backends=("split_cudnn",)),
                                   F.scaled_dot_product_attention(q, k, v, attn_mask=m))
    assert set(SPLIT) == {f"split_{kernel}" for kernel in KERNELS}
    with pytest.raises(ValueError, match="alone"):
        check_attention_backends(["split_cudnn", "cudnn"])


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_vit_with_a_class_token_trains_as_with_sdpa(compiled: bool) -> None:
    # 32 x 32 frames in patches of 4: a class token and 8 x 8 patches, 65 tokens. Compiled: block
    # by block with inductor, as the benchmark and the pretraining loop compile (float32, see above).
    config = dataclasses.replace(preset_config("tiny").s2, pos_grid=8)
    dtype, tolerance = (torch.float32, 2e-5) if compiled else (torch.float64, 1e-12)
    torch.manual_seed(0)
    reference = VisionTransformer(config).to(dtype)
    split = VisionTransformer(config).to(dtype)
    split.load_state_dict(reference.state_dict())
    assert set_attention_backends(split, ["split_flash"]) == config.depth
    if compiled:
        assert compile_blocks(split, TRANSFORMER_BLOCKS) == config.depth
    x = torch.randn(2, config.in_chans, 32, 32, dtype=dtype)
    outputs = [model(x) for model in (reference, split)]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=tolerance)
    for out in outputs:
        out.square().mean().backward()
    for (name, a), b in zip(reference.named_parameters(), split.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=tolerance, msg=name)


@pytest.mark.parametrize("kernel", KERNELS)
def test_each_cuda_kernels_operators_trace_on_the_meta_device(kernel: str) -> None:
    """The CUDA path without a GPU: each kernel's ATen operators with their own outputs (cuDNN's
    (N, H, L, 1) log-sum-exp, the random state kept for the backward operator), the products
    with float32 results, eager and traced by AOTAutograd; shapes, dtypes and layouts only."""
    from skysense.models.class_token_attention import _ClassTokenAttention

    qkv = torch.empty(2, 257, 3 * 4 * 64, device="meta", dtype=torch.bfloat16, requires_grad=True)

    def run(q, k, v):
        return _ClassTokenAttention.apply(q, k, v, kernel, 0.125)

    for fn in (run, torch.compile(run, backend="aot_eager", fullgraph=True)):
        out = fn(*_views(qkv, 4))
        assert out.shape == (2, 4, 257, 64) and out.dtype == torch.bfloat16 and out.transpose(1, 2).is_contiguous()
        (grad,) = torch.autograd.grad(out, qkv, torch.empty_like(out))
        assert grad.shape == qkv.shape and grad.dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels need a GPU")
@pytest.mark.parametrize("kernel", KERNELS)
def test_the_cuda_kernels_give_sdpas_values_in_bfloat16(kernel: str) -> None:
    qkv = _qkv(4, 4, 257, 64, torch.bfloat16, "cuda")
    grad = torch.randn(4, 4, 257, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    grad = grad.to(torch.bfloat16)
    exact, exact_grad = _run(F.scaled_dot_product_attention, qkv.detach().double().requires_grad_(), 4,
                             grad.double())
    ours, ours_grad = _run(class_token_attention, qkv, 4, grad, kernel=kernel)
    sdpa, sdpa_grad = _run(F.scaled_dot_product_attention, qkv, 4, grad)
    for a, b, ref in ((ours, sdpa, exact), (ours_grad, sdpa_grad, exact_grad)):
        error, sdpa_error = (a.double() - ref).abs().max(), (b.double() - ref).abs().max()
        assert error <= 2 * sdpa_error + 1e-3, (kernel, error.item(), sdpa_error.item())
