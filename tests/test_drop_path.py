"""Stochastic depth (skysense.models.layers.DropPath): per-sample drop, scale, and its cost."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from skysense.models.layers import DropPath


class _FullSizeOutputs(TorchDispatchMode):
    """Counts the operators that write a new tensor as large as ``numel`` (not views or aliases)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        if isinstance(out, torch.Tensor) and out.numel() == self.numel and out.untyped_storage().data_ptr() not in inputs:
            self.count += 1
        return out


def test_each_sample_is_dropped_or_scaled_by_the_keep_probability() -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 3, 4) + 5.0
    out = DropPath(0.25).train()(x)
    ratio = (out / x).flatten(1)
    kept = ratio[:, 0] != 0
    assert torch.allclose(ratio[kept], torch.full_like(ratio[kept], 1 / 0.75))
    assert torch.all(ratio[~kept] == 0)
    assert 0.65 < kept.float().mean().item() < 0.85, "about 3 in 4 samples kept"
    assert torch.equal(DropPath(0.25).eval()(x), x)


def test_one_pass_over_the_input_forward_and_backward() -> None:
    """The scale joins the per-sample mask, so the (B, ...) input is read once each way."""
    x = torch.randn(8, 16, 32, requires_grad=True)
    with _FullSizeOutputs(x.numel()) as forward:
        out = DropPath(0.5).train()(x)
    assert forward.count == 1
    grad = torch.ones_like(out)
    with _FullSizeOutputs(x.numel()) as backward:
        out.backward(grad)
    assert backward.count == 1
    assert x.grad is not None
