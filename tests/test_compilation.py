"""Block-wise compilation (skysense.compilation): same numbers as eager, hooks around it, clear errors.

These tests trace with dynamo and AOTAutograd but run the graphs eagerly (backend ``aot_eager``),
so they check the graph capture (one graph per block, no break) without inductor's minutes of
C++ compilation on a CPU. ``tests/pretrain/test_fsdp.py`` compiles for real inside a 2-process
FSDP pretraining run.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from skysense import SkySense, compilation
from skysense.compilation import RECOMPILE_LIMIT, compile_blocks
from skysense.config import preset_config
from skysense.distributed import apply_activation_checkpointing
from skysense.models.layers import TransformerBlock
from skysense.models.swin_v2 import SwinTransformerV2, SwinV2Block
from skysense.models.vit import VisionTransformer
from skysense.pretrain.config import PretrainConfig

BLOCKS = (TransformerBlock, SwinV2Block)


def _forward_backward(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    sum(o.square().mean() for o in outs).backward()
    return [o.detach() for o in outs], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("encoder", [pytest.param("hr", marks=pytest.mark.slow), "s2"])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_compiled_blocks_match_eager(encoder: str, checkpointed: bool) -> None:
    config = preset_config("tiny")
    torch.manual_seed(0)
    if encoder == "hr":
        model, x = SwinTransformerV2(config.hr), torch.randn(2, 3, 64, 64)
    else:
        model, x = VisionTransformer(config.s2), torch.randn(4, 10, 16, 16)
    reference_out, reference_grads = _forward_backward(model, x)
    if checkpointed:
        apply_activation_checkpointing(model, BLOCKS)
    compiled = compile_blocks(model, BLOCKS, backend="aot_eager")
    assert compiled == sum(isinstance(m, BLOCKS) for m in model.modules()) > 0
    from torch._dynamo.utils import counters

    counters.clear()
    out, grads = _forward_backward(model, x)
    # Every block ran through a compiled graph, none broke.
    assert counters["stats"]["unique_graphs"] > 0 and not counters["graph_break"], dict(counters["graph_break"])
    assert grads.keys() == reference_grads.keys()
    for a, b in zip(out, reference_out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_recompile_limit_covers_every_swin_variant() -> None:
    """SwinV2's blocks share one forward whose variants (stage shapes, shift, training or not)
    exceed dynamo's default limit of 8; compile_blocks raises it so none falls back to eager."""
    compile_blocks(SwinTransformerV2(preset_config("tiny").hr), BLOCKS, backend="aot_eager")
    config = torch._dynamo.config
    limit = config.recompile_limit if hasattr(config, "recompile_limit") else config.cache_size_limit
    assert limit >= RECOMPILE_LIMIT


def test_a_model_without_blocks_is_an_error() -> None:
    with pytest.raises(ValueError, match="Linear holds no block of the types TransformerBlock, SwinV2Block"):
        compile_blocks(nn.Linear(2, 2), BLOCKS)


def test_compile_setting_accepts_scopes_and_booleans() -> None:
    assert PretrainConfig.from_dict({"compile": True}).compile == "model"
    assert PretrainConfig.from_dict({"compile": False}).compile == "off"
    assert PretrainConfig.from_dict({"compile": "blocks"}).compile == "blocks"
    with pytest.raises(ValueError, match=r"compile: expected one of \['off', 'blocks', 'model'\].*'graph'"):
        PretrainConfig.from_dict({"compile": "graph"})


@pytest.mark.parametrize("encoder", ["hr", "s2"])
def test_compiled_blocks_under_bf16_autocast_match_fp32_eager(encoder: str) -> None:
    """The GPU benchmark's path (compiled blocks inside bf16 autocast) against the fp32 eager
    reference, within bf16 tolerance."""
    config = preset_config("tiny")
    torch.manual_seed(0)
    if encoder == "hr":
        model, x = SwinTransformerV2(config.hr).eval(), torch.randn(2, 3, 64, 64)
    else:
        model, x = VisionTransformer(config.s2).eval(), torch.randn(4, 10, 16, 16)
    with torch.no_grad():
        reference = model(x)
        compile_blocks(model, BLOCKS, backend="aot_eager")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    reference = reference if isinstance(reference, (list, tuple)) else [reference]
    low = low if isinstance(low, (list, tuple)) else [low]
    for a, b in zip(low, reference):
        error = ((a.float() - b).norm() / b.norm()).item()
        assert 0 < error < 10 * 2**-8, f"{encoder}: bf16 compiled differs from fp32 eager by {error:.4f}"


@pytest.mark.parametrize("release, backend, swin_compiled", [
    ((2, 11), "inductor", False),   # pytorch/pytorch#179135: SwinV2 blocks stay eager on the CPU
    ((2, 11), "aot_eager", True),   # another backend: not affected
    ((2, 14), "inductor", True),
])
def test_blocks_the_cpu_inductor_cannot_build_stay_eager_with_a_warning(monkeypatch, release, backend,
                                                                        swin_compiled) -> None:
    monkeypatch.setattr(compilation, "torch_release", lambda: release)
    model = SkySense.from_preset("tiny")
    swin = [m for m in model.modules() if isinstance(m, SwinV2Block)]
    others = [m for m in model.modules() if isinstance(m, TransformerBlock)]
    eager_forward = swin[0].forward
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = compile_blocks(model, BLOCKS, backend=backend)  # lazy: nothing is built here
    assert compiled == len(others) + (len(swin) if swin_compiled else 0)
    assert (swin[0].forward == eager_forward) is not swin_compiled
    messages = [str(w.message) for w in caught if "stays eager" in str(w.message)]
    if swin_compiled:
        assert messages == []
    else:
        assert len(messages) == 1 and "SwinV2Block stays eager on the CPU" in messages[0]
        assert "pytorch/pytorch#179135" in messages[0] and "2.13 or newer" in messages[0]
