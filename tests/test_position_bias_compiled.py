"""SwinV2's continuous position bias compiled by inductor on the CPU: no boolean ReLU mask.

Out of place, the CPB MLP's ReLU made inductor store a boolean mask in the forward pass, and
its CPU kernel for that store (torch 2.14, AVX-512) ran about 50x slower than the ReLU: 1.3 ms
per block call (``benchmarks/position_bias_relu.py`` times a whole step). In place, as
``CompiledInPlaceReLU`` does under torch.compile, the backward pass reads the ReLU's output
instead."""

from __future__ import annotations

import re

import pytest
import torch

from skysense.models.swin_v2 import WindowAttentionV2


@pytest.mark.slow
def test_compiled_position_bias_writes_no_boolean_mask_and_keeps_its_values() -> None:
    from torch._inductor.utils import run_fw_bw_and_get_code

    torch.manual_seed(0)
    attention = WindowAttentionV2(16, 2, 4)
    eager = attention.position_bias()
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in attention.cpb_mlp.parameters()]
    attention.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(attention.position_bias, fullgraph=True)
    out, (forward_code, _) = run_fw_bw_and_get_code(compiled)  # forward, then backward of the sum
    torch._dynamo.reset()
    kernels = re.findall(r"^(\w+) = async_compile\.cpp_pybinding\(\[(.*?)\]", forward_code, re.M)
    assert kernels, "no C++ kernel found in the forward code: the check proves nothing"
    assert not [name for name, arguments in kernels if "bool*" in arguments], kernels
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    for grad, eager_grad in zip((p.grad for p in attention.cpb_mlp.parameters()), eager_grads):
        torch.testing.assert_close(grad, eager_grad, rtol=1e-5, atol=1e-6)
