"""skysense.models.gelu_bias: the MLP's GELU backward pass and first bias gradient in one Triton
kernel, run on the CPU by Triton's interpreter (in a subprocess) and built for the H100 without one."""

from __future__ import annotations

import pytest
import torch

from triton_interpreter import run_interpreted

from skysense.models import gelu_bias
from skysense.models.layers import Mlp, TransformerBlock

triton = pytest.importorskip("triton")


@pytest.mark.slow
def test_values_and_gradients_match_float64_autograd() -> None:
    """``gelu(u + bias)`` and the gradients of ``u`` and ``bias`` against float64 autograd, in
    float32, float16 and bfloat16 (no matrix product here, so the interpreter's bf16 is right),
    for (3, 300, 200) and (70, 130) inputs: rows that end inside a program's walk and columns
    that end inside a tile. The bias gradient is float32, as the bias."""
    out = run_interpreted("""
        import torch, torch.nn.functional as F
        from skysense.models.gelu_bias import bias_gelu
        torch.manual_seed(0)
        for shape in ((3, 300, 200), (70, 130)):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                u = (2 * torch.randn(shape)).to(dtype).requires_grad_()
                bias = torch.randn(shape[-1], requires_grad=True)
                grad = torch.randn(shape).to(dtype)
                out = bias_gelu(u, bias)
                out.backward(grad)
                u64, bias64 = u.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
                rounded = bias64 + (bias64.to(dtype).double() - bias64).detach()  # as added, its gradient exact
                ref = F.gelu(u64 + rounded)
                ref.backward(grad.double())
                errors = [((a.double() - b).abs().max() / b.abs().max()).item()
                          for a, b in ((out, ref), (u.grad, u64.grad), (bias.grad, bias64.grad))]
                print(shape, dtype, out.dtype, u.grad.dtype, bias.grad.dtype, *(f"{e:.2e}" for e in errors))
    """)
    rows = [line.split() for line in out.splitlines()]
    assert len(rows) == 6, out
    # The bias gradient sums float32 products, float32-exact in float32 and float16. In bfloat16 the
    # interpreter's float32 -> bf16 cast of the bias does not round as torch's does (1000 normal
    # values: 0.0156 apart at most), so the slopes differ by up to a bf16 step there.
    tolerance = {"torch.float32": (1e-6, 1e-6, 1e-6), "torch.float16": (2e-3, 2e-3, 1e-6),
                 "torch.bfloat16": (1.6e-2, 1.6e-2, 1e-2)}
    for row in rows:
        dtype, out_dtype, grad_dtype, bias_dtype = row[-7:-3]
        assert out_dtype == grad_dtype == dtype and bias_dtype == "torch.float32", out
        assert all(float(e) <= t for e, t in zip(row[-3:], tolerance[dtype])), out


@pytest.mark.slow
def test_blocks_with_the_kernel_train_as_without_it_eager_and_compiled() -> None:
    """A ViT/fusion block and a shifted SwinV2 block with ``set_mlp_kernel``, eager and compiled
    (``aot_eager`` and ``inductor``, where the operator stays opaque), against the same blocks
    without it: the output, the input gradient and every parameter's gradient (fc1's bias
    included, now from the kernel's partial sums) in float32."""
    out = run_interpreted("""
        import copy, torch
        from skysense.models.gelu_bias import set_mlp_kernel
        from skysense.models.layers import TransformerBlock
        from skysense.models.swin_v2 import SwinV2Block
        torch.manual_seed(0)
        cases = {"transformer": (TransformerBlock(64, 4, 4.0, 0.0, 1e-6), torch.randn(4, 20, 64)),
                 "swin": (SwinV2Block(32, 2, 4, True, 4.0, 0.0, 1e-5, False), torch.randn(2, 8, 8, 32))}
        for name, (block, x) in cases.items():
            def run(model, backend):
                model = copy.deepcopy(model).train()
                forward = torch.compile(model, backend=backend, fullgraph=True) if backend else model
                inputs = x.clone().requires_grad_()
                out = forward(inputs)
                out.square().mean().backward()
                return [out, inputs.grad] + [p.grad for p in model.parameters()]
            reference = run(block, None)
            ours = copy.deepcopy(block)
            print(name, "set", set_mlp_kernel(ours, True))
            for backend in (None, "aot_eager", "inductor"):
                got = run(ours, backend)
                assert len(got) == len(reference) and all(g is not None for g in got)
                print(name, backend, f"{max((a - b).abs().max().item() for a, b in zip(got, reference)):.2e}")
    """)
    lines = out.splitlines()
    assert "transformer set 1" in lines and "swin set 1" in lines, out
    errors = [float(line.split()[-1]) for line in lines if "set" not in line]
    assert len(errors) == 6 and max(errors) < 1e-5, out


def test_the_kernel_compiles_for_hopper_without_a_gpu() -> None:
    """Triton's compiler builds the backward kernel for sm_90 (the H100) down to machine code, in
    bf16 (the activations of part (b)-(c)'s MLPs) and float32, with the tile it launches."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if gelu_bias.triton is None or not hasattr(gelu_bias, "_backward_kernel"):
        pytest.skip("Triton is not installed")
    kernel = gelu_bias._backward_kernel
    constants = {"ROWS": gelu_bias.ROWS_PER_PROGRAM, "BLOCK_ROWS": gelu_bias.BLOCK_ROWS,
                 "BLOCK_COLS": gelu_bias.BLOCK_COLS}
    for dtype in ("bf16", "fp32"):
        pointers = {"bias_ptr": "*fp32", "partial_ptr": "*fp32"}
        signature = {name: "constexpr" if name in constants else pointers.get(name, f"*{dtype}")
                     if name.endswith("_ptr") else "i32" for name in kernel.arg_names}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        assert "cubin" in compiled.asm and compiled.metadata.num_warps == 4


def test_where_the_kernel_cannot_run_the_mlp_computes_the_same_values() -> None:
    """On the CPU without the interpreter :func:`gelu_bias.supports` refuses every call, and an MLP
    set to the kernel adds the bias after the product: the same output and gradients as the
    plain MLP within float32 rounding, in training and evaluation."""
    torch.manual_seed(0)
    mlp = Mlp(16, 64)
    ours = Mlp(16, 64)
    ours.load_state_dict(mlp.state_dict())
    assert gelu_bias.set_mlp_kernel(ours, True) == 1 and ours.gelu_kernel
    x = torch.randn(5, 7, 16)
    assert not gelu_bias.supports(torch.zeros(5, 64), ours.fc1.bias)
    for train in (False, True):  # training last: its path is the one differentiated below
        mlp.train(train), ours.train(train)
        out, expected = ours(x), mlp(x)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    out.sum().backward()
    expected.sum().backward()
    for (name, a), b in zip(ours.named_parameters(), mlp.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-5, msg=name)
    assert gelu_bias.set_mlp_kernel(TransformerBlock(16, 2, 4.0, 0.0, 1e-6), False) == 1


def test_a_call_the_kernel_does_not_take_is_refused_with_its_shapes() -> None:
    """:func:`gelu_bias.bias_gelu` names what it got when the call does not qualify."""
    u = torch.zeros(4, 8)
    assert not gelu_bias.supports(u, torch.zeros(7))  # the bias is not as long as a row
    assert not gelu_bias.supports(u.t(), torch.zeros(4))  # not contiguous
    assert not gelu_bias.supports(u.to(torch.int32), torch.zeros(8))
    with pytest.raises(ValueError, match=r"u \(4, 8\) torch.float32 on cpu .*bias \(7,\)"):
        gelu_bias.bias_gelu(u, torch.zeros(7))
