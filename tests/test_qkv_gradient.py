"""skysense.models.qkv_gradient: the qkv projection's gradient assembled from SDPA's dq, dk and dv,
with the bias's gradient, by Triton kernels run under the interpreter (in a subprocess) and built
for the H100 without one."""

from __future__ import annotations

import pytest
import torch

from triton_interpreter import run_interpreted

from skysense.models import qkv_gradient
from skysense.models.layers import Attention, TransformerBlock

triton = pytest.importorskip("triton")


@pytest.mark.slow
def test_the_assembled_gradient_and_the_bias_sums_match_autograd() -> None:
    """The kernels copy each of dq, dk and dv ((N, H, L, D), contiguous or laid out as (N, L, H, D))
    into its third of the (N, L, 3C) gradient exactly, and sum the columns for the bias's gradient
    (float32, as the bias) as float64 autograd does, for 300 tokens (rows ending inside a program's
    walk) of 3 heads 50 wide (columns ending inside a tile), in float32, float16 and bfloat16."""
    out = run_interpreted("""
        import torch
        from skysense.models.qkv_gradient import split_qkv
        torch.manual_seed(0)
        n, length, heads, width = 4, 75, 3, 50
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for layout in ("heads first", "tokens first"):
                qkv = torch.randn(n, length, 3 * heads * width).to(dtype).requires_grad_()
                bias = torch.randn(3 * heads * width, requires_grad=True)
                q, k, v = split_qkv(qkv, heads, bias)
                assert q.shape == (n, heads, length, width) and q.data_ptr() == qkv.data_ptr()
                grads = [torch.randn(n, heads, length, width).to(dtype) for _ in range(3)]
                if layout == "tokens first":
                    grads = [g.transpose(1, 2).contiguous().transpose(1, 2) for g in grads]
                torch.autograd.backward((q, k, v), grads)
                expected = torch.cat([g.transpose(1, 2).reshape(n, length, -1) for g in grads], -1)
                sums = expected.double().sum((0, 1))
                bias_error = ((bias.grad.double() - sums).abs().max() / sums.abs().max()).item()
                print(dtype, layout, torch.equal(qkv.grad, expected), bias.grad.dtype, f"{bias_error:.1e}")
    """)
    rows = [line.split() for line in out.splitlines()]
    assert len(rows) == 6, out
    for row in rows:
        assert row[-3] == "True" and row[-2] == "torch.float32" and float(row[-1]) < 1e-6, out


@pytest.mark.slow
def test_blocks_with_both_kernels_train_as_without_them_eager_and_compiled() -> None:
    """A transformer block with the qkv kernel, and with the qkv and MLP kernels, with and without
    a key-padding mask, eager and compiled (``aot_eager``, ``inductor``), against the plain block:
    the output, the input gradient and every parameter's gradient in float32."""
    out = run_interpreted("""
        import copy, torch
        from skysense.models import set_mlp_kernel, set_qkv_kernel
        from skysense.models.layers import TransformerBlock
        torch.manual_seed(0)
        block = TransformerBlock(64, 4, 4.0, 0.0, 1e-6)
        x = torch.randn(4, 20, 64)
        mask = torch.rand(4, 20, generator=torch.Generator().manual_seed(1)) > 0.3
        def run(model, backend, key_mask):
            model = copy.deepcopy(model).train()
            forward = torch.compile(model, backend=backend, fullgraph=True) if backend else model
            inputs = x.clone().requires_grad_()
            out = forward(inputs, key_mask)
            out.square().mean().backward()
            return [out, inputs.grad] + [p.grad for p in model.parameters()]
        for kernels in ("qkv", "qkv+mlp"):
            ours = copy.deepcopy(block)
            print(kernels, "set", set_qkv_kernel(ours, True), set_mlp_kernel(ours, kernels == "qkv+mlp"))
            for key_mask in (None, mask):
                reference = run(block, None, key_mask)
                for backend in (None, "aot_eager", "inductor"):
                    got = run(ours, backend, key_mask)
                    assert all(g is not None for g in got)
                    print(kernels, backend, f"{max((a - b).abs().max().item() for a, b in zip(got, reference)):.2e}")
    """)
    lines = out.splitlines()
    assert "qkv set 1 1" in lines and "qkv+mlp set 1 1" in lines, out
    errors = [float(line.split()[-1]) for line in lines if " set " not in line]
    assert len(errors) == 12 and max(errors) < 1e-5, out


@pytest.mark.slow
def test_the_compiled_backward_hands_sdpa_s_gradients_to_the_kernel_uncopied() -> None:
    """In the backward graph AOTAutograd hands inductor, SDPA's dq, dk and dv go to the operator as
    SDPA wrote them: no copy into another layout first (asking their strides in the autograd
    Function's backward made dynamo copy all three), and nothing sums the qkv gradient."""
    out = run_interpreted("""
        import collections, torch
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd
        from skysense.models import set_qkv_kernel
        from skysense.models.layers import TransformerBlock
        graphs = []
        def keep(gm, _):
            graphs.append(collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function"))
            return make_boxed_func(gm)
        block = TransformerBlock(64, 4)
        for kernel in (False, True):
            set_qkv_kernel(block, kernel)
            graphs.clear()
            torch._dynamo.reset()
            compiled = torch.compile(block, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
            compiled(torch.randn(2, 10, 64, requires_grad=True)).sum().backward()
            backward = graphs[-1]
            print(kernel, backward["skysense.qkv_gradient.default"], backward["aten.clone.default"],
                  backward["aten.sum.dim_IntList"])
    """)
    (plain, plain_ops, plain_clones, plain_sums), (ours, ops, clones, sums) = [l.split() for l in out.splitlines()]
    assert (plain, plain_ops, ours, ops, clones) == ("False", "0", "True", "1", "0"), out
    assert int(sums) == int(plain_sums) - 1, out


def test_the_kernel_compiles_for_hopper_without_a_gpu() -> None:
    """Triton's compiler builds the copy-and-sum kernel for sm_90 (the H100) in bf16, with and
    without the bias's sums, with the tile it launches."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if qkv_gradient.triton is None or not hasattr(qkv_gradient, "_assemble_kernel"):
        pytest.skip("Triton is not installed")
    kernel = qkv_gradient._assemble_kernel
    for bias_grad in (True, False):
        constants = {"BIAS_GRAD": bias_grad, "ROWS": qkv_gradient.ROWS_PER_PROGRAM,
                     "BLOCK_ROWS": qkv_gradient.BLOCK_ROWS, "BLOCK_COLS": qkv_gradient.BLOCK_COLS}
        signature = {name: "constexpr" if name in constants else ("*fp32" if name == "partial_ptr" else "*bf16")
                     if name.endswith("_ptr") else "i32" for name in kernel.arg_names}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        assert "cubin" in compiled.asm


def test_without_the_kernel_autograd_gives_the_same_gradients() -> None:
    """On the CPU without the interpreter the kernel never runs: a layer set to it adds the bias as
    before and the values and every gradient are the plain layer's; in evaluation, too."""
    torch.manual_seed(0)
    plain = Attention(32, 4)
    ours = Attention(32, 4)
    ours.load_state_dict(plain.state_dict())
    assert qkv_gradient.set_qkv_kernel(ours, True) == 1 and not qkv_gradient.supports(torch.zeros(2, 5, 96), 4)
    x = torch.randn(3, 7, 32)
    for module in (plain, ours):
        module(x).square().sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), plain(x), rtol=0, atol=0)
    for (name, a), b in zip(ours.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-5, msg=name)
    assert qkv_gradient.set_qkv_kernel(TransformerBlock(32, 4), False) == 1
    with pytest.raises(ValueError, match=r"a bias of 96 values for qkv \(2, 5, 96\), got \(95,\)"):
        qkv_gradient.split_qkv(torch.zeros(2, 5, 96), 4, torch.zeros(95))


@pytest.mark.slow
def test_a_kernel_switched_on_without_its_setter_fails_under_compile_saying_what_to_do() -> None:
    """A layer whose kernel flag was set by hand, not by ``set_qkv_kernel`` / ``set_mlp_kernel`` /
    ``set_norm_kernel``, reaches torch.compile with the operator unregistered: the error says
    which setter to call."""
    out = run_interpreted("""
        import torch
        from skysense.models.layers import Attention, Mlp, TransformerBlock
        for layer, x, setter in ((Attention(32, 4), torch.randn(2, 5, 32), "set_qkv_kernel"),
                                 (Mlp(32, 64), torch.randn(10, 32), "set_mlp_kernel"),
                                 (TransformerBlock(32, 4), torch.randn(2, 5, 32), "set_norm_kernel")):
            layer.qkv_kernel = layer.gelu_kernel = layer.norm_kernel = True
            try:
                torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
                print("compiled")
            except Exception as error:
                print(setter in str(error))
    """)
    assert out.split() == ["True", "True", "True"], out


@pytest.mark.slow
def test_checkpointed_blocks_with_the_kernels_train_as_plain_ones() -> None:
    """Under activation checkpointing, selective (matmul and attention outputs kept) and full, eager
    and compiled block-wise after it (``aot_eager``, as pretraining compiles), a transformer block
    with the qkv, MLP and residual-junction kernels gives the plain block's output and every
    gradient: the views the qkv split and the first junction return, and the biases added with
    their gradients detached, survive the recomputation."""
    out = run_interpreted("""
        import copy, torch
        from skysense.compilation import compile_blocks
        from skysense.distributed import apply_activation_checkpointing, matmul_outputs_saved
        from skysense.models import set_mlp_kernel, set_norm_kernel, set_qkv_kernel
        from skysense.models.layers import TransformerBlock
        torch.manual_seed(0)
        plain = torch.nn.Sequential(TransformerBlock(32, 2))
        x = torch.randn(4, 16, 32)
        def run(model, backend):
            if backend:
                compile_blocks(model, (TransformerBlock,), backend=backend)
            inputs = x.clone().requires_grad_()
            out = model(inputs)
            out.square().mean().backward()
            return [out, inputs.grad] + [p.grad for p in model.parameters()]
        reference = run(copy.deepcopy(plain), None)
        for policy in ("selective", "full"):
            for backend in (None, "aot_eager"):
                model = copy.deepcopy(plain)
                set_qkv_kernel(model, True), set_mlp_kernel(model, True), set_norm_kernel(model, True)
                apply_activation_checkpointing(model, (TransformerBlock,), matmul_outputs_saved() if policy == "selective" else None)
                got = run(model, backend)
                print(policy, backend, f"{max((a - b).abs().max().item() for a, b in zip(got, reference)):.2e}")
    """)
    errors = [float(line.split()[-1]) for line in out.splitlines()]
    assert len(errors) == 4 and max(errors) < 1e-5, out
