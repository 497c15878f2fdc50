"""The backward pass assembles the q, k, v gradients for the qkv weight's gradient with one copy.

Unbinding q, k and v from an (N, L, 3, heads, d) view of the qkv projection makes the backward
pass stack their gradients and then copy the stack into the (N, L, 3C) layout the weight
gradient's matmul reads: two passes over 3C values per token, about 7% of a ViT-L block's
element-wise traffic in a compiled training step (``benchmarks/block_traffic.py``). Splitting
the projection along its channels instead leaves one ``cat`` that writes that layout directly.
"""

from __future__ import annotations

import collections

import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from skysense.models.layers import TransformerBlock
from skysense.models.swin_v2 import SwinV2Block


def backward_operators(block: torch.nn.Module, x: torch.Tensor) -> collections.Counter:
    """ATen operators of ``block``'s backward graph as AOTAutograd traces it."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm)

    compiled = torch.compile(block, backend=aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm), bw_compiler=keep),
                             fullgraph=True)
    compiled(x.requires_grad_()).square().mean().backward()
    assert len(graphs) == 1
    return collections.Counter(str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function")


def test_vit_block_backward_writes_the_qkv_gradient_in_one_cat() -> None:
    torch.manual_seed(0)
    ops = backward_operators(TransformerBlock(64, 4), torch.randn(2, 5, 64))
    assert ops["aten.cat.default"] == 1 and ops["aten.stack.default"] == 0, ops
    assert ops["aten.clone.default"] == 0, ops  # no copy of a permuted stack


def test_swin_block_backward_does_not_stack_the_qkv_gradients() -> None:
    torch.manual_seed(0)
    ops = backward_operators(SwinV2Block(64, 2, 4, True, 4.0, 0.0, 1e-5, False), torch.randn(2, 8, 8, 64))
    assert ops["aten.stack.default"] == 0 and ops["aten.cat.default"] >= 1, ops
