"""skysense.models.residual_norm: a pre-norm block's residual junctions, each differentiated by one
Triton kernel, run on the CPU by Triton's interpreter (in a subprocess) and built for the H100
without one."""

from __future__ import annotations

import pytest
import torch

from benchmark_scripts import BENCHMARKS
from triton_interpreter import run_interpreted

from skysense.models import residual_norm
from skysense.models.layers import TransformerBlock

triton = pytest.importorskip("triton")


@pytest.mark.slow
def test_junctions_match_float64_autograd() -> None:
    """The three junctions' outputs and the gradients of the residual stream, both branches, both
    branch biases and the norm's weight and bias, against float64 autograd, with a branch in
    float32 and in float16 beside a float32 stream; (3, 70, 200) with stochastic depth (one
    sample dropped, two kept at different scales) and (130, 64) without: rows that end inside a
    program's walk, widths that end inside a tile."""
    out = run_interpreted("""
        import torch, torch.nn.functional as F
        from torch import nn
        from skysense.models import residual_norm as rn
        torch.manual_seed(0)
        for shape, scaled in (((3, 70, 200), True), ((130, 64), False)):
            for dtype in (torch.float32, torch.float16):
                C = shape[-1]
                norm = nn.LayerNorm(C)
                norm.weight.data.normal_(), norm.bias.data.normal_()
                x = torch.randn(shape).requires_grad_()
                a, m = (torch.randn(shape).to(dtype).requires_grad_() for _ in range(2))
                ab, mb = (torch.randn(C, requires_grad=True) for _ in range(2))
                scale = torch.tensor([0.0, 2.0, 1.25]).to(dtype) if scaled else None
                x0, h0 = rn.layer_norm_residual(x, norm)
                x1, h1 = rn.branch_layer_norm(x, a + ab.to(dtype).detach(), scale, ab, norm)
                y = rn.branch_add(x1, m + mb.to(dtype).detach(), scale, mb)
                g0, g1, gy = (torch.randn(shape) for _ in range(3))
                ((h0.float() * g0).sum() + (h1.float() * g1).sum() + (y * gy).sum() + (x0 * gy).sum()).backward()
                X, A, M, W, B, AB, MB = (t.detach().double().requires_grad_()
                                         for t in (x, a, m, norm.weight, norm.bias, ab, mb))
                S = scale.double().view(-1, 1, 1) if scaled else 1.0
                X1 = X + (A + AB) * S
                H0, H1 = F.layer_norm(X, (C,), W, B, 1e-5), F.layer_norm(X1, (C,), W, B, 1e-5)
                Y = X1 + (M + MB) * S
                ((H0 * g0.double()).sum() + (H1 * g1.double()).sum() + (Y * gy.double()).sum()
                 + (X * gy.double()).sum()).backward()
                pairs = ((y, Y), (h1, H1), (x.grad, X.grad), (a.grad, A.grad), (m.grad, M.grad), (ab.grad, AB.grad),
                         (mb.grad, MB.grad), (norm.weight.grad, W.grad), (norm.bias.grad, B.grad))
                errors = [((p.double() - q).abs().max() / q.abs().max()).item() for p, q in pairs]
                print(dtype, a.grad.dtype, x.grad.dtype, " ".join(f"{e:.2e}" for e in errors))
    """)
    rows = [line.split() for line in out.splitlines()]
    assert len(rows) == 4, out
    for row in rows:
        dtype, branch_grad, stream_grad, *errors = row
        assert branch_grad == dtype and stream_grad == "torch.float32", out
        tolerance = 1e-6 if dtype == "torch.float32" else 2e-3  # the branch rounded to float16
        assert all(float(e) <= tolerance for e in errors), out


@pytest.mark.slow
def test_blocks_with_the_kernel_train_as_without_it_eager_and_compiled() -> None:
    """A transformer block with ``set_norm_kernel``, eager and compiled (``aot_eager`` and
    ``inductor``), against the same block without it compiled the same way: the output, the input
    gradient and every parameter's gradient (the norms', and the projections' biases now from the
    kernel's sums), without and with stochastic depth (the same samples dropped: the junctions
    draw in the block's order), alone and with the qkv, MLP and short-attention kernels."""
    out = run_interpreted("""
        import copy, torch
        torch._dynamo.config.recompile_limit = 64
        from skysense.models import set_attention_backends, set_mlp_kernel, set_norm_kernel, set_qkv_kernel
        from skysense.models.layers import TransformerBlock
        torch.manual_seed(0)
        x = torch.randn(4, 20, 64)
        for rate, others in ((0.0, ""), (0.3, ""), (0.3, "mlp+qkv"), (0.0, "short+mlp")):
            block = TransformerBlock(64, 4, 4.0, rate, 1e-6)
            ours = copy.deepcopy(block)
            count = set_norm_kernel(ours, True)
            for model in (block, ours):
                set_mlp_kernel(model, "mlp" in others), set_qkv_kernel(model, "qkv" in others)
                set_attention_backends(model, ["short"] if "short" in others else None)
            def run(model, backend):
                model = copy.deepcopy(model).train()
                forward = torch.compile(model, backend=backend, fullgraph=True) if backend else model
                inputs = x.clone().requires_grad_()
                torch.manual_seed(1)
                out = forward(inputs)
                out.square().mean().backward()
                return [out, inputs.grad] + [p.grad for p in model.parameters()]
            for backend in (None, "aot_eager", "inductor"):
                got, reference = run(ours, backend), run(block, backend)
                assert len(got) == len(reference) and all(g is not None for g in got)
                error = max((a - b).abs().max().item() for a, b in zip(got, reference))
                print(count, rate, others or "-", backend, f"{error:.2e}")
    """)
    rows = [line.split() for line in out.splitlines()]
    assert len(rows) == 12 and all(row[0] == "1" for row in rows), out
    assert max(float(row[-1]) for row in rows) < 1e-5, out


@pytest.mark.slow
def test_blocks_with_the_kernel_under_bf16_autocast_match_within_its_rounding() -> None:
    """Under bf16 autocast, as on CUDA (the norms' outputs cast to bf16 inside the junctions, their
    gradients arriving in bf16), eager and compiled, without and with stochastic depth: the output
    and every gradient within 2e-2 of the plain block's largest value (bf16 rounds to 3.9e-3; the
    kernel sums in float32 what autograd sums from bf16 copies). A gradient lost on the way (as
    torch 2.11's compiled path lost a norm's through a cast that returned its input) is 1.0 off."""
    out = run_interpreted("""
        import copy, torch
        torch._dynamo.config.recompile_limit = 64
        from skysense.models import set_norm_kernel
        from skysense.models.layers import TransformerBlock
        torch.manual_seed(0)
        x = torch.randn(4, 20, 64)
        for rate in (0.0, 0.3):
            block = TransformerBlock(64, 4, 4.0, rate, 1e-6)
            ours = copy.deepcopy(block)
            set_norm_kernel(ours, True)
            def run(model, backend):
                model = copy.deepcopy(model).train()
                forward = torch.compile(model, backend=backend, fullgraph=True) if backend else model
                inputs = x.clone().requires_grad_()
                torch.manual_seed(1)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = forward(inputs)
                out.float().square().mean().backward()
                return {"out": out, "x": inputs.grad, **{n: p.grad for n, p in model.named_parameters()}}
            for backend in (None, "aot_eager", "inductor"):
                got, reference = run(ours, backend), run(block, backend)
                errors = {k: ((got[k].float() - v.float()).abs().max() / v.float().abs().max()).item()
                          for k, v in reference.items()}
                print(rate, backend, len(errors), f"{max(errors.values()):.2e}")
    """)
    rows = [line.split() for line in out.splitlines()]
    assert len(rows) == 6 and all(row[2] == "14" for row in rows), out
    assert max(float(row[-1]) for row in rows) < 2e-2, out


@pytest.mark.slow
def test_a_dropped_sample_gets_no_branch_gradient() -> None:
    """With stochastic depth at 0.99 (every sample dropped in both branches, for seed 3), the block
    is the identity, the output projection and both branch biases get zero gradient, and the
    stream's gradient passes through unchanged."""
    out = run_interpreted("""
        import torch
        from skysense.models import set_norm_kernel
        from skysense.models.layers import TransformerBlock
        torch.manual_seed(0)
        block = TransformerBlock(32, 2, 4.0, 0.99, 1e-6).train()
        set_norm_kernel(block, True)
        x = torch.randn(3, 8, 32, requires_grad=True)
        torch.manual_seed(3)
        out = block(x)
        out.sum().backward()
        print((out - x).abs().max().item(), block.attn.proj.weight.grad.abs().max().item(),
              block.attn.proj.bias.grad.abs().max().item(), block.mlp.fc2.bias.grad.abs().max().item(),
              (x.grad - 1).abs().max().item())
    """)
    values = [float(v) for v in out.split()]
    assert values == [0.0, 0.0, 0.0, 0.0, 0.0], out


def test_the_kernel_compiles_for_hopper_without_a_gpu() -> None:
    """Triton's compiler builds each junction's backward kernel for sm_90 (the H100) down to
    machine code, at width 1024 in bf16 under a float32 stream, with the tile and warps it launches."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if residual_norm.triton is None or not hasattr(residual_norm, "_backward_kernel"):
        pytest.skip("Triton is not installed")
    kernel = residual_norm._backward_kernel
    float32 = {"x_ptr", "dres_ptr", "dx_ptr", "weight_ptr", "partial_ptr"}
    junctions = ((True, False, False, False, True, 2), (True, True, True, True, True, 3),
                 (False, False, True, True, True, 1))
    for norm, added, branch, scale, residual, sums in junctions:
        constants = {"ROWS": residual_norm.ROWS_PER_PROGRAM, "BLOCK_ROWS": 1, "BLOCK_COLS": 1024, "NORM": norm,
                     "ADDED": added, "BRANCH": branch, "SCALE": scale, "RESIDUAL": residual, "SUMS": sums}
        signature = {}
        for name in kernel.arg_names:
            if name in constants:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = "*fp32" if name in float32 else "*bf16"
            else:
                signature[name] = "fp32" if name == "eps" else "i32"
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": residual_norm.NUM_WARPS})
        assert "cubin" in compiled.asm and compiled.metadata.num_warps == residual_norm.NUM_WARPS


def test_where_the_kernel_cannot_run_the_block_computes_the_same_values() -> None:
    """On the CPU without the interpreter :func:`residual_norm.supports` refuses every stream, and a
    block set to the kernel runs the plain path: the same output and gradients, in training (with
    stochastic depth) and evaluation."""
    torch.manual_seed(0)
    block = TransformerBlock(16, 2, 4.0, 0.2, 1e-6)
    ours = TransformerBlock(16, 2, 4.0, 0.2, 1e-6)
    ours.load_state_dict(block.state_dict())
    assert residual_norm.set_norm_kernel(ours, True) == 1 and ours.norm_kernel
    x = torch.randn(5, 7, 16)
    assert not residual_norm.supports(x)
    for train in (False, True):  # training last: its path is the one differentiated below
        block.train(train), ours.train(train)
        torch.manual_seed(1)
        expected = block(x)
        torch.manual_seed(1)
        out = ours(x)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.sum().backward()
    expected.sum().backward()
    for (name, a), b in zip(ours.named_parameters(), block.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)
    assert residual_norm.set_norm_kernel(torch.nn.Sequential(block, ours), False) == 2 and not ours.norm_kernel


def test_a_stream_the_kernel_does_not_take_is_refused_with_its_shape() -> None:
    """The junctions name what they got when a call does not qualify."""
    norm = torch.nn.LayerNorm(8)
    assert not residual_norm.supports(torch.zeros(4, 8).t())  # not contiguous
    assert not residual_norm.supports(torch.zeros(4, residual_norm.MAX_WIDTH + 1))
    assert not residual_norm.supports(torch.zeros(4, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"layer_norm_residual: .*got \(4, 8\) torch.float32 on cpu"):
        residual_norm.layer_norm_residual(torch.zeros(4, 8), norm)


@pytest.mark.slow
def test_the_huge_pretraining_step_with_the_kernel_compiles_into_as_few_graphs() -> None:
    """(d) at huge's structure with narrow widths (as ``test_gpu_step_benchmark``'s graph count),
    every pre-norm block on the junction kernels, selectively checkpointed and compiled
    block-wise (``aot_eager``): still 27 graphs, no graph break, and a second step compiles
    nothing. The kernel's operator returns zeros here (its shapes, not its values: under the
    interpreter the real kernel would take minutes at these depths)."""
    out = run_interpreted("""
        import dataclasses, functools, sys
        sys.path.insert(0, BENCHMARKS)
        import torch
        from torch import Tensor  # the operator's annotations name it
        import gpu_step
        from skysense.compilation import compile_blocks
        from skysense.models import residual_norm, set_norm_kernel
        real = residual_norm._backward
        @functools.wraps(real)
        def zeros(*args):
            return tuple(t.zero_() for t in residual_norm._backward_fake(*args))
        residual_norm._backward = zeros
        options = gpu_step.Options(device="cpu", dtype="fp32", shapes=dataclasses.replace(gpu_step.HUGE, step_batches=(1,)),
                                   sinkhorn_rounds=30)
        model = gpu_step.narrow_huge_model(options)
        print("blocks", set_norm_kernel(model, True))
        workload = gpu_step.pretrain_workload(model, 1, options)
        workload.checkpoint("selective")
        counters = torch._dynamo.utils.counters
        print("compiled", compile_blocks(model, workload.blocks, backend="aot_eager"))
        workload.step(model)
        graphs = counters["stats"]["unique_graphs"]
        workload.step(model)
        print("graphs", graphs, counters["stats"]["unique_graphs"], "breaks", len(counters["graph_break"]))
    """.replace("BENCHMARKS", repr(str(BENCHMARKS))))
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    assert lines["blocks"] == "144" and lines["compiled"] == "192", out  # ViTs and fusion, student and teacher
    assert lines["graphs"] == "27 27 breaks 0", out
