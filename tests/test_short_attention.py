"""skysense.models.short_attention: the Triton kernels for short sequences, run on the CPU by
Triton's interpreter (in a subprocess: Triton reads TRITON_INTERPRET when a kernel is defined).

The interpreter's half-precision matrix products are right for float16 and wrong for bfloat16
(triton 3.8: a 16 x 16 bf16 `tl.dot` was off by 2.6e10), so the kernels' values are checked in
float32 and float16; bfloat16 runs the same code with another element type, and Triton's
compiler builds it for the H100 here, without a GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from triton_interpreter import run_interpreted

from skysense.models import short_attention
from skysense.models.attention import attention

triton = pytest.importorskip("triton")
SRC = Path(__file__).resolve().parents[1] / "src"


_interpreted = run_interpreted


@pytest.mark.slow
def test_outputs_and_gradients_match_float64_sdpa_on_strided_inputs() -> None:
    """q, k, v as the qkv projection's split makes them (strided, transposed views), with and
    without a key-padding mask, 20 tokens in a 32-row block: the output, its (N, L, H, D) layout,
    and the three gradients against SDPA in float64."""
    out = _interpreted("""
        import torch, torch.nn.functional as F
        from skysense.models.short_attention import short_attention
        torch.manual_seed(0)
        n, heads, length, width = 3, 2, 20, 32
        for dtype, tolerance in ((torch.float32, 1e-5), (torch.float16, 4e-3)):
            qkv = torch.randn(n, length, 3 * heads * width).to(dtype)
            q, k, v = (t.reshape(n, length, heads, width).transpose(1, 2).detach().requires_grad_()
                       for t in qkv.split(heads * width, -1))
            for mask in (None, torch.rand(n, length, generator=torch.Generator().manual_seed(1)) > 0.3):
                out = short_attention(q, k, v, mask, scale=0.3)
                assert out.stride() == (length * heads * width, width, heads * width, 1), out.stride()
                ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
                ref = F.scaled_dot_product_attention(*ref_in, attn_mask=None if mask is None else mask[:, None, None, :],
                                                     scale=0.3)
                grad = torch.randn_like(out)
                grads = torch.autograd.grad(out, (q, k, v), grad)
                ref_grads = torch.autograd.grad(ref, ref_in, grad.double())
                errors = [(a.double() - b).abs().max().item() for a, b in zip((out, *grads), (ref, *ref_grads))]
                assert max(errors) < tolerance, (dtype, mask is not None, errors)
                print(dtype, mask is not None, "%.1e" % max(errors))
        """)
    assert out.count("\n") == 4, out


def test_a_query_with_no_key_gets_zeros_and_no_nan() -> None:
    out = _interpreted("""
        import torch
        from skysense.models.short_attention import short_attention
        torch.manual_seed(0)
        q, k, v = (torch.randn(2, 2, 8, 16, requires_grad=True) for _ in range(3))
        mask = torch.ones(2, 8, dtype=torch.bool)
        mask[1] = False  # the second sequence has no key to attend
        out = short_attention(q, k, v, mask)
        out.sum().backward()
        assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isfinite(out).all()
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
        assert torch.equal(k.grad[1], torch.zeros_like(k.grad[1])) and torch.equal(v.grad[1], torch.zeros_like(v.grad[1]))
        print("ok")
        """)
    assert out.strip() == "ok"


@pytest.mark.slow
def test_a_traced_fusion_block_with_the_short_kernel_trains_as_with_sdpa() -> None:
    """A fusion block set to ``"short"`` under torch.compile (aot_eager: the op's fake tensors and
    autograd traced, the kernels run by the interpreter): the output and every gradient equal
    the SDPA block's, with a key-padding mask."""
    out = _interpreted("""
        import copy, torch
        from skysense.models.attention import set_attention_backends
        from skysense.models.layers import TransformerBlock
        torch.manual_seed(0)
        block = TransformerBlock(64, 4).train()
        short = copy.deepcopy(block)
        set_attention_backends(short, ["short"])
        short = torch.compile(short, backend="aot_eager", fullgraph=True)
        x = torch.randn(6, 12, 64)
        mask = torch.rand(6, 12, generator=torch.Generator().manual_seed(1)) > 0.2
        results = []
        for model in (block, short):
            x_in = x.clone().requires_grad_()
            out = model(x_in, mask)
            out.square().mean().backward()
            results.append([out, x_in.grad] + [p.grad for p in model.parameters()])
        errors = [(a - b).abs().max().item() for a, b in zip(*results)]
        assert len(errors) == 2 + len(list(block.parameters())) and max(errors) < 1e-5, errors
        print("%.1e" % max(errors))
        """)
    assert float(out) < 1e-5


@pytest.mark.slow
def test_the_tiny_hr_encoder_with_the_short_kernel_trains_as_with_sdpa() -> None:
    """The tiny SwinV2 encoder (mask_padding: padded maps, and maps smaller than a window that
    attend over their own tokens) set to ``"short"``, at 64 x 64 and at 96 x 80 (padding): its
    features and every parameter's gradient equal the SDPA encoder's."""
    out = _interpreted("""
        import copy, torch
        from skysense import SkySense
        from skysense.models.attention import set_attention_backends
        torch.manual_seed(0)
        hr = SkySense.from_preset("tiny").train().hr_encoder
        short = copy.deepcopy(hr)
        assert set_attention_backends(short, ["short"]) == 8
        for size in ((64, 64), (96, 80)):
            x = torch.randn(2, 3, *size)
            results = []
            for encoder in (hr, short):
                encoder.zero_grad()
                features = encoder.forward_features(x)
                features.square().mean().backward()
                results.append([features] + [p.grad for p in encoder.parameters()])
            # Parameters forward_features does not use get no gradient, alike in both.
            assert [g is None for g in results[0]] == [g is None for g in results[1]]
            pairs = [(a, b) for a, b in zip(*results) if a is not None]
            assert len(pairs) > 100
            errors = [(a - b).abs().max().item() for a, b in pairs]
            assert max(errors) < 2e-5, errors
            print(size, "%.1e" % max(errors))
        """)
    assert out.count("\n") == 2, out


def test_without_a_gpu_the_short_backend_runs_sdpa() -> None:
    """On the CPU (no interpreter) ``"short"`` is SDPA's default, bit for bit, and a direct call
    says what it expected."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 32, 64) for _ in range(3))
    mask = torch.rand(2, 1, 1, 32) > 0.2
    assert not short_attention.supports(q, k, v, mask[:, 0, 0])
    assert torch.equal(attention(q, k, v, mask, backends=("short",)), F.scaled_dot_product_attention(q, k, v, mask))
    with pytest.raises(ValueError, match=r"short_attention: expected .* got q \(2, 4, 32, 64\) torch.float32 on cpu"):
        short_attention.short_attention(q, k, v)


@pytest.mark.parametrize("shape, width, mask, expected", [
    ((2, 4, 64, 64), 64, None, True),
    ((2, 4, 65, 64), 64, None, False),  # longer than one program holds
    ((2, 4, 32, 44), 44, None, True),  # SwinV2-H's heads, unpadded
    ((2, 4, 32, 160), 160, None, False),  # wider than one program holds
    ((2, 4, 32, 64), 64, "bool", True),
    ((2, 4, 32, 64), 64, "additive", False),
])
def test_which_calls_it_takes(monkeypatch, shape, width, mask, expected) -> None:
    monkeypatch.setattr(short_attention, "interpreted", lambda: True)
    q = torch.empty(shape)
    key_mask = {None: None, "bool": torch.ones(shape[0], shape[2], dtype=torch.bool),
                "additive": torch.zeros(shape[0], shape[2])}[mask]
    assert short_attention.supports(q, q, q, key_mask) is expected


def test_bias_and_window_mask_shapes_it_takes(monkeypatch) -> None:
    monkeypatch.setattr(short_attention, "interpreted", lambda: True)
    q = torch.empty(6, 4, 16, 44)
    bias, window_mask = torch.zeros(4, 16, 16), torch.zeros(3, 16, 16)
    assert short_attention.supports(q, q, q, None, bias, window_mask)
    assert not short_attention.supports(q, q, q, None, torch.zeros(1, 4, 16, 16))  # (H, L, L) only
    assert not short_attention.supports(q, q, q, None, None, torch.zeros(4, 16, 16))  # 4 windows do not divide 6
    assert not short_attention.supports(q, q, q, None, None, window_mask.requires_grad_())  # no gradient to it
    with pytest.raises(ValueError, match=r"window mask \(\(4, 16, 16\), torch.float32"):
        short_attention.short_attention(q, q, q, window_mask=torch.zeros(4, 16, 16))


@pytest.mark.slow
def test_bias_and_window_mask_match_float64_sdpa_with_odd_heads_and_grouped_bias_gradients() -> None:
    """SwinV2's call: (windows x batch, heads, L, D) q, k, v from the qkv split, 11-wide heads
    (padded to 16 in the program), a per-head bias with its gradient and a per-window mask.
    With BIAS_PROGRAMS lowered, each backward program adds the bias gradient of 4 sequences,
    the last group only partly filled (6 sequences). Against SDPA in float64 with the summed mask."""
    out = _interpreted("""
        import torch, torch.nn.functional as F
        from skysense.models import short_attention as sa
        sa.BIAS_PROGRAMS = 2
        assert sa._bias_group(6, 3) == 4
        torch.manual_seed(0)
        batch, windows, heads, length, width = 3, 2, 3, 16, 11
        n = batch * windows
        for dtype, tolerance in ((torch.float32, 1e-5), (torch.float16, 5e-3)):
            qkv = torch.randn(n, length, 3 * heads * width).to(dtype)
            q, k, v = (t.reshape(n, length, heads, width).transpose(1, 2).detach().requires_grad_()
                       for t in qkv.split(heads * width, -1))
            bias = torch.randn(heads, length, length).to(dtype).requires_grad_()
            window_mask = torch.where(torch.rand(windows, length, length) > 0.7, -100.0, 0.0)
            for mask in (None, window_mask):
                out = sa.short_attention(q, k, v, None, 0.5, bias, mask)
                assert out.stride() == (length * heads * width, width, heads * width, 1), out.stride()
                ref_in = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
                added = ref_in[3][None] + (0 if mask is None else mask.double().repeat(batch, 1, 1)[:, None])
                ref = F.scaled_dot_product_attention(*ref_in[:3], attn_mask=added, scale=0.5)
                grad = torch.randn_like(out)
                grads = torch.autograd.grad(out, (q, k, v, bias), grad)
                ref_grads = torch.autograd.grad(ref, ref_in, grad.double())
                errors = [(a.double() - b).abs().max().item() for a, b in zip((out, *grads), (ref, *ref_grads))]
                assert max(errors) < tolerance, (dtype, mask is not None, errors)
                print(dtype, mask is not None, "%.1e" % max(errors))
        """)
    assert out.count("\n") == 4, out


@pytest.mark.slow
def test_the_qkv_entry_with_cosine_scores_matches_float64_sdpa() -> None:
    """short_attention_qkv on an (N, L, 3C) projection output: SwinV2's call (11-wide heads, the
    cosine normalisation and the per-head scale in the kernel, a bias with its gradient summed 4
    sequences per program, with and without a window mask) and the fusion's (a key-padding
    mask, no cosine, the projection's bias gradient summed by the kernel). The output, the
    (N, L, 3C) gradient, the bias's, the scale's and the projection bias's against F.normalize
    and SDPA in float64, each error relative to the largest reference value."""
    out = _interpreted("""
        import torch, torch.nn.functional as F
        from skysense.models import short_attention as sa
        sa.BIAS_PROGRAMS = 2
        torch.manual_seed(0)
        batch, windows, heads, length, width = 3, 2, 3, 16, 11
        n = batch * windows
        window_mask = torch.where(torch.rand(windows, length, length) > 0.7, -100.0, 0.0)
        padding = torch.rand(n, length, generator=torch.Generator().manual_seed(1)) > 0.3
        cases = (("swin", None, window_mask), ("swin", None, None), ("fusion", padding, None))
        for dtype, tolerance in ((torch.float32, 1e-5), (torch.float16, 4e-3)):
            for call, key_mask, mask in cases:
                swin = call == "swin"
                qkv = torch.randn(n, length, 3 * heads * width).to(dtype).requires_grad_()
                bias = torch.randn(heads, length, length).to(dtype).requires_grad_() if swin else None
                logit = torch.randn(heads).requires_grad_() if swin else None
                # the fusion's projection bias, added with its gradient detached: the kernel sums it
                qkv_bias = None if swin else torch.randn(3 * heads * width).requires_grad_()
                inputs = [t for t in (qkv, bias, logit) if t is not None]
                out = sa.short_attention_qkv(qkv, heads, key_mask, 1.0 if swin else 0.3, bias, mask,
                                             logit.exp() if swin else None, qkv_bias)
                assert out.shape == (n, length, heads * width) and out.is_contiguous()
                ref_in = [t.detach().double().requires_grad_() for t in inputs]
                q, k, v = (t.unflatten(-1, (heads, width)).transpose(1, 2) for t in ref_in[0].split(heads * width, -1))
                if swin:
                    q = F.normalize(q, dim=-1) * ref_in[2].exp()[:, None, None]
                    k = F.normalize(k, dim=-1)
                    added = ref_in[1][None] + (0 if mask is None else mask.double().repeat(batch, 1, 1)[:, None])
                else:
                    added = key_mask[:, None, None, :]
                ref = F.scaled_dot_product_attention(q, k, v, attn_mask=added, scale=1.0 if swin else 0.3)
                ref = ref.transpose(1, 2).reshape(n, length, -1)
                grad = torch.randn_like(out)
                grads = torch.autograd.grad(out, inputs + ([] if swin else [qkv_bias]), grad)
                assert grads[0].shape == qkv.shape and grads[0].is_contiguous()
                ref_grads = torch.autograd.grad(ref, ref_in, grad.double())
                if not swin:  # the bias's gradient: the qkv gradient summed over sequences and tokens
                    assert grads[-1].dtype == torch.float32
                    ref_grads = (*ref_grads, ref_grads[0].sum((0, 1)))
                errors = [((a.double() - b).abs().max() / b.abs().max()).item()
                          for a, b in zip((out, *grads), (ref, *ref_grads))]
                assert max(errors) < tolerance, (dtype, call, mask is not None, errors)
                print(dtype, call, mask is not None, "%.1e" % max(errors))
        """)
    assert out.count("\n") == 6, out


def test_with_the_kernel_the_graphs_neither_normalise_nor_concatenate() -> None:
    """What :func:`short_attention_qkv` takes out of a compiled training step, in the graphs
    AOTAutograd hands inductor: SwinV2's forward graph has no norm of q or k (the kernel
    normalises them), and neither block's backward graph concatenates the q, k and v gradients
    (the kernel writes them as one tensor), and the fusion's does not sum that gradient for the
    projection's bias (the kernel does). With SDPA, as a control, they are there."""
    out = _interpreted("""
        import collections, torch
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd
        from skysense.models.attention import set_attention_backends
        from skysense.models.layers import TransformerBlock
        from skysense.models.swin_v2 import SwinV2Block

        def operators(block, x):
            graphs = []
            def keep(gm, _):
                graphs.append(collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function"))
                return make_boxed_func(gm)
            compiled = torch.compile(block, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
            compiled(x.requires_grad_()).square().mean().backward()
            return graphs

        torch.manual_seed(0)
        for name, block, x in (("swin", SwinV2Block(64, 2, 4, True, 4.0, 0.0, 1e-5, False), torch.randn(2, 8, 8, 64)),
                               ("fusion", TransformerBlock(64, 4), torch.randn(6, 12, 64))):
            for backends in (None, ["short"]):
                set_attention_backends(block, backends)
                forward, backward = operators(block, x.clone())
                print(name, backends is not None, forward["aten.linalg_vector_norm.default"], backward["aten.cat.default"],
                      backward["aten.sum.dim_IntList"])
        """)
    rows = [line.split() for line in out.splitlines()]
    assert [row[:4] for row in rows] == [["swin", "False", "2", "1"], ["swin", "True", "0", "0"],
                                         ["fusion", "False", "0", "1"], ["fusion", "True", "0", "0"]], out
    # The fusion's qkv bias gradient is the kernel's column sums: one sum over the tokens fewer.
    assert int(rows[3][4]) == int(rows[2][4]) - 1, out


def test_the_operators_are_registered_at_first_use_not_on_import() -> None:
    """Importing skysense registers neither operator (a ``triton_op`` imports inductor, about a
    second); selecting ``"short"`` registers both, before anything compiles the layers."""
    out = _interpreted("""
        import sys, torch
        import skysense, skysense.cli
        from skysense.models.attention import set_attention_backends
        from skysense.models.layers import TransformerBlock
        print(hasattr(torch.ops.skysense, "short_attention"), "torch._inductor" in sys.modules)
        set_attention_backends(TransformerBlock(32, 2), ["short"])
        print(hasattr(torch.ops.skysense, "short_attention"), hasattr(torch.ops.skysense, "short_attention_backward"))
        """, interpret=False)
    assert out.split() == ["False", "False", "True", "True"], out


def test_selective_checkpointing_keeps_the_kernel_s_output() -> None:
    """Under ``activation_checkpointing: selective`` the short kernel's output is saved like
    SDPA's (skysense.distributed.matmul_outputs_saved): its forward runs once per step, and
    twice when the whole block is recomputed."""
    out = _interpreted("""
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from skysense.distributed import apply_activation_checkpointing, matmul_outputs_saved
        from skysense.models.attention import set_attention_backends
        from skysense.models.layers import TransformerBlock

        class Calls(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.forward = 0
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                self.forward += func == torch.ops.skysense.short_attention_qkv.default
                return func(*args, **(kwargs or {}))

        torch.manual_seed(0)
        for context_fn in (matmul_outputs_saved(), None):
            model = torch.nn.Sequential(TransformerBlock(32, 2))
            set_attention_backends(model, ["short"])
            apply_activation_checkpointing(model, (TransformerBlock,), context_fn)
            x = torch.randn(4, 16, 32, requires_grad=True)
            with Calls() as calls:
                model(x).square().mean().backward()
            print(calls.forward)
        """)
    assert out.split() == ["1", "2"], out


@pytest.mark.slow
def test_swin_blocks_with_the_short_kernel_train_as_with_sdpa() -> None:
    """A SwinV2 block (44-wide heads, 4 x 4 windows) set to ``"short"``, eager and under
    torch.compile (aot_eager), shifted and not: the output, the input's gradient and every
    parameter's (the position-bias MLP's and the logit scale's through the bias gradient) equal
    the SDPA block's."""
    out = _interpreted("""
        import copy, torch
        from skysense.models.attention import set_attention_backends
        from skysense.models.swin_v2 import SwinV2Block
        torch.manual_seed(0)
        for shifted in (False, True):
            block = SwinV2Block(88, 2, 4, shifted, 4.0, 0.0, 1e-5, False).train()
            short = copy.deepcopy(block)
            set_attention_backends(short, ["short"])
            x = torch.randn(2, 8, 8, 88)
            results = []
            for model in (block, short, torch.compile(short, backend="aot_eager", fullgraph=True)):
                model.zero_grad()
                x_in = x.clone().requires_grad_()
                out = model(x_in)
                out.square().mean().backward()
                results.append([out, x_in.grad] + [p.grad for p in model.parameters()])
            assert all(g is not None for g in results[0])
            for other in results[1:]:
                errors = [(a - b).abs().max().item() for a, b in zip(results[0], other)]
                assert len(errors) == 2 + len(list(block.parameters())) and max(errors) < 2e-5, errors
                print(shifted, "%.1e" % max(errors))
        """)
    assert out.count("\n") == 4, out


@pytest.mark.slow
def test_the_benchmark_counts_its_flops_as_sdpa_s() -> None:
    """benchmarks/gpu_step.py's FLOP count of a block step is the same with the short kernel as
    with SDPA for a fusion block, and for a shifted SwinV2 block at its own head width up to the
    recomputed scores FlopCounterMode counts for fused backward passes (FlopCounterMode does not
    know our operators: gpu_step maps them)."""
    out = _interpreted(f"""
        import copy, sys, torch
        sys.path.insert(0, {str(SRC.parent / "benchmarks")!r})
        import gpu_step
        from skysense.models.attention import set_attention_backends
        from skysense.models.layers import TransformerBlock
        torch.manual_seed(0)
        block = TransformerBlock(64, 4).train()
        short = copy.deepcopy(block)
        set_attention_backends(short, ["short"])
        x = torch.randn(6, 12, 64)
        counts = []
        for model in (block, short):
            with gpu_step.ModelFlopCounter(display=False, custom_mapping=gpu_step.attention_flop_formulas()) as counter:
                model(x).square().mean().backward()
            counts.append(counter.get_total_flops())
        attention = 3 * 4 * 6 * 12 * 12 * 64  # forward and backward (3x): 4 N L^2 C
        assert counts[0] == counts[1] and counts[0] > attention, counts
        from skysense.models.swin_v2 import SwinV2Block
        swin = SwinV2Block(88, 2, 4, True, 4.0, 0.0, 1e-5, False).train()  # 44-wide heads, shifted windows
        swin_short = copy.deepcopy(swin)
        set_attention_backends(swin_short, ["short"])
        x = torch.randn(2, 8, 8, 88)
        swin_counts = []
        for model in (swin, swin_short):
            with gpu_step.unpadded_heads(model), gpu_step.ModelFlopCounter(
                    display=False, custom_mapping=gpu_step.attention_flop_formulas()) as counter:
                model(x).square().mean().backward()
            swin_counts.append(counter.get_total_flops())
        # On the CPU SwinV2's SDPA call (a mask with a gradient) runs the math path, whose backward
        # does not recompute the scores; FlopCounterMode counts that recomputation for fused
        # kernels (CUDA's, and ours): 2 N L^2 C more, 8 windows x 16 tokens x 88 channels here.
        recomputed_scores = 2 * 8 * 16 * 16 * 88
        assert swin_counts[1] - swin_counts[0] == recomputed_scores and swin_counts[0] > 3 * 4 * 8 * 16 * 16 * 88, swin_counts
        print(counts[1], swin_counts[1])
        """)
    assert all(int(count) > 0 for count in out.split())


@pytest.mark.parametrize("dtype, block, width, mask, swin", [
    ("bf16", 32, 64, False, False), ("bf16", 32, 64, True, False), ("fp32", 32, 64, False, False),
    ("bf16", 64, 64, False, True),  # SwinV2-H's windows: 64 tokens, 44-wide heads, bias, shift mask, cosine
])
def test_the_kernels_compile_for_hopper_without_a_gpu(dtype: str, block: int, width: int, mask: bool,
                                                      swin: bool) -> None:
    """Triton's own compiler builds both kernels for sm_90 (the H100) down to machine code, bf16
    included, which the interpreter cannot check: the fusion's 32 x 64 heads with and without a
    mask, in float32 with full-precision products, and SwinV2-H's windows with the bias, the
    shift mask and the cosine normalisation, the bias's and the scale's gradients summed over 4
    sequences per program, within the H100's shared memory. (The largest case, 64 tokens of 128-wide float32 heads, builds too, in 147,456 bytes
    of shared memory, but takes over a minute to compile here.)"""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if short_attention.triton is None or not hasattr(short_attention, "_forward_kernel"):
        pytest.skip("Triton is not installed")
    # The qkv bias's column sums as the layers ask for them: the fusion's calls, not SwinV2's.
    constants = {"HAS_MASK": mask, "HAS_BIAS": swin, "HAS_WINDOW_MASK": swin, "COSINE": swin, "BIAS_GRAD": swin,
                 "SCALE_GRAD": swin, "QKV_BIAS_GRAD": mask and not swin, "ONE_LAYOUT": swin or mask,
                 "GROUP": 4 if swin else 1, "BLOCK": block, "WIDTH": width,
                 "PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    pointers = {"mask_ptr": "*i8", "lse_ptr": "*fp32", "window_ptr": "*fp32", "dbias_ptr": "*fp32", "cos_ptr": "*fp32",
                "dcos_ptr": "*fp32", "dqkvb_ptr": "*fp32"}
    for kernel in (short_attention._forward_kernel, short_attention._backward_kernel):
        signature = {}
        for name in kernel.arg_names:
            if name in constants:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = pointers.get(name, f"*{dtype}")
            else:
                signature[name] = "fp32" if name == "scale" else "i32"
        used = {name: value for name, value in constants.items() if name in kernel.arg_names}
        warps = 4 if kernel is short_attention._forward_kernel else short_attention.backward_warps(block)
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=used),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        assert "cubin" in compiled.asm and 0 < compiled.metadata.shared <= 227 * 1024
        print(kernel.__name__, dict(used), compiled.metadata.shared, compiled.metadata.num_warps)


@pytest.mark.slow
def test_swin_s_backward_kernel_spills_less_with_the_warps_it_is_given() -> None:
    """benchmarks/kernel_registers.py reads ptxas's report for the kernels built for the H100: the
    backward kernel of SwinV2-H's shifted windows (bias, cosine, 8 windows a program) runs out of
    registers, and with the warps ``backward_warps`` gives it spills fewer bytes than with 4."""
    sys.path.insert(0, str(SRC.parent / "benchmarks"))
    import kernel_registers

    switches = kernel_registers.calls()["swin stage 3"]
    assert switches["GROUP"] == 8 and switches["COSINE"] and switches["BLOCK"] == 64
    warps = short_attention.backward_warps(switches["BLOCK"])
    chosen, four = (kernel_registers.build(short_attention._backward_kernel, switches, w) for w in (warps, 4))
    assert warps == 8 and chosen["spill_stores"] < four["spill_stores"], (chosen, four)
    assert chosen["shared"] <= 227 * 1024


def test_the_attention_benchmark_checks_and_times_the_kernel_as_the_layers_call_it() -> None:
    """benchmarks/attention_backends.py's check before timing: the short kernel's (N, L, C)
    output and (N, L, 3C) gradient, compared with SDPA's float32 math, pass; scaled by 1.01
    they are refused."""
    out = _interpreted(f"""
        import sys, torch
        sys.path.insert(0, {str(SRC.parent / "benchmarks")!r})
        import attention_backends as ab
        call = ab.AttentionCall((3, 2, 20, 16), (3, 2, 20, 16), None, False, None)
        inputs = ab.AttentionInputs.make(call, torch.device("cpu"), torch.float32)
        print("timed", ab.time_backend(call, inputs, "short", torch.device("cpu"), 0, 1) > 0)
        right = ab.short_attention.short_attention_qkv
        ab.short_attention.short_attention_qkv = lambda *args: right(*args) * 1.01
        try:
            ab.check_values(call, inputs, "short")
        except RuntimeError as error:
            print("refused", error)
    """)
    assert "timed True" in out
    assert "refused short: wrong values: output off by" in out
