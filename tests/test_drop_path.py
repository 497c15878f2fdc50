"""Stochastic depth (skysense.models.layers.DropPath): per-sample drop, scale, and its cost."""

from __future__ import annotations

import pytest
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


def test_blocks_with_different_rates_share_one_compiled_graph() -> None:
    """Stochastic depth gives every block its own rate (a linear schedule). Compiled block-wise,
    a rate read as a Python float was a guarded constant: one graph per block, and at `huge` the
    fullgraph compile of the pretraining step hit dynamo's recompile limit (H100, 2026-11-28:
    FailOnRecompileLimitHit on `self._modules['drop_path'].p == 0.1956...`)."""
    from skysense.compilation import compile_blocks
    from skysense.models.layers import TransformerBlock, drop_path_rates

    torch.manual_seed(0)
    torch._dynamo.reset()
    rates = drop_path_rates(0.3, 5)  # 0, 0.075, ..., 0.3: the first block's rate is zero
    blocks = torch.nn.Sequential(*(TransformerBlock(16, 2, drop_path=rate) for rate in rates)).train()
    assert len({block.drop_path.p for block in blocks}) == 5 and rates[0] == 0.0
    compile_blocks(blocks, (TransformerBlock,), backend="eager")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    x = torch.randn(64, 5, 16, requires_grad=True)
    blocks(x).sum().backward()
    # One graph for the rate-zero block (no mask drawn), one shared by the four others.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 2
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_compiled_drop_path_keeps_its_own_rate() -> None:
    """Compiled, the rate is a tensor: each sample is still kept with probability 1 - p and
    scaled by 1 / (1 - p); p = 0 keeps the input as it is."""
    torch.manual_seed(0)
    x = torch.ones(4096, 3)
    for p in (0.0, 0.25):
        out = torch.compile(DropPath(p).train(), backend="eager", fullgraph=True)(x)
        kept = out[:, 0] != 0
        assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / (1 - p)))
        assert torch.all(out[~kept] == 0)
        assert abs(kept.float().mean().item() - (1 - p)) < 0.03


def test_the_rate_stays_float32_when_the_model_changes_dtype() -> None:
    drop = DropPath(0.3).to(torch.bfloat16)
    assert drop.keep_prob.dtype == torch.float32 and drop.keep_prob.item() == torch.tensor(0.7).item()
    assert "keep_prob" not in drop.state_dict()


def test_a_rate_built_on_the_meta_device_moves_with_the_model() -> None:
    """Models are built on the meta device and loaded with ``assign=True`` (skysense.weights): the
    rate is not in the file, so a move to a real device makes it anew, exact and float32."""
    with torch.device("meta"):
        drop = DropPath(0.3)
    assert drop.keep_prob.is_meta
    drop = drop.to("cpu")
    assert drop.keep_prob.device.type == "cpu" and drop.keep_prob.item() == torch.tensor(0.7).item()
    drop.to_empty(device="cpu")
    assert drop.keep_prob.item() == torch.tensor(0.7).item()  # not left uninitialised


def test_from_pretrained_makes_the_rates_on_the_map_location(tmp_path) -> None:
    from skysense import SkySense
    from skysense.config import preset_config
    from skysense.weights import from_pretrained, save_pretrained

    config = preset_config("tiny")
    config.s2.drop_path_rate = 0.2
    save_pretrained(SkySense(config), tmp_path)
    model = from_pretrained(tmp_path)
    rates = [m for m in model.modules() if isinstance(m, DropPath)]
    assert rates and all(not m.keep_prob.is_meta and m.keep_prob.item() == torch.tensor(1 - m.p).item() for m in rates)
    assert max(m.p for m in rates) > 0
    model.to("cpu")  # moved as a whole without 'Cannot copy out of meta tensor'


def test_setting_the_rate_updates_what_the_compiled_path_reads() -> None:
    drop = DropPath(0.0)
    assert not drop.active and drop.keep_prob.item() == 1.0
    drop.p = 0.4
    assert drop.active and drop.keep_prob.item() == torch.tensor(0.6).item()
    with pytest.raises(ValueError, match=r"drop path rate: expected 0 <= p < 1, got 1.5"):
        drop.p = 1.5
