"""Selective activation checkpointing (skysense.distributed.matmul_outputs_saved): the same
gradients as no checkpointing, and no matrix product recomputed in the backward pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from skysense.config import preset_config
from skysense.distributed import apply_activation_checkpointing, matmul_outputs_saved
from skysense.models import TRANSFORMER_BLOCKS
from skysense.models.swin_v2 import SwinTransformerV2
from skysense.models.vit import VisionTransformer


def _model(encoder: str) -> tuple[nn.Module, torch.Tensor]:
    config = preset_config("tiny")
    torch.manual_seed(0)
    if encoder == "hr":
        return SwinTransformerV2(config.hr).train(), torch.randn(2, 3, 64, 64)
    return VisionTransformer(config.s2).train(), torch.randn(4, 10, 16, 16)


def _step(model: nn.Module, x: torch.Tensor) -> tuple[int, dict[str, torch.Tensor]]:
    """FLOPs of one forward + backward (recomputation included) and the gradients."""
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        sum(o.square().mean() for o in outs).backward()
    return counter.get_total_flops(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("encoder", ["hr", "s2"])
def test_selective_checkpointing_recomputes_no_matmul_and_keeps_the_gradients(encoder: str) -> None:
    model, x = _model(encoder)
    plain_flops, plain = _step(model, x)
    selective_model, _ = _model(encoder)
    assert apply_activation_checkpointing(selective_model, TRANSFORMER_BLOCKS, context_fn=matmul_outputs_saved()) > 0
    selective_flops, selective = _step(selective_model, x)
    full_model, _ = _model(encoder)
    apply_activation_checkpointing(full_model, TRANSFORMER_BLOCKS)
    full_flops, _ = _step(full_model, x)
    assert selective_flops == plain_flops < full_flops, "selective recomputed a matmul, or full recomputed none"
    assert selective.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(selective[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_a_block_compiled_on_its_own_shows_the_policy_only_its_external_kernels(monkeypatch) -> None:
    """The documented limit of ``matmul_outputs_saved`` under ``compile: blocks``: inside a
    compiled block the matmuls reach the policy as inductor's ``out=`` kernels, which it does
    not keep, so they are recomputed; eager, the policy sees (and keeps) ``addmm``."""
    import dataclasses
    from collections import Counter

    from torch.utils import checkpoint as torch_checkpoint

    from skysense.compilation import compile_blocks

    create = torch_checkpoint.create_selective_checkpoint_contexts
    asked: Counter[str] = Counter()

    def spied(policy, *args, **kwargs):
        def asking(ctx, op, *a, **k):
            asked[str(op)] += 1
            return policy(ctx, op, *a, **k)
        return create(asking, *args, **kwargs)

    monkeypatch.setattr(torch_checkpoint, "create_selective_checkpoint_contexts", spied)
    config = dataclasses.replace(preset_config("tiny").s2, depth=2)
    for compiled in (False, True):
        torch._dynamo.reset()
        asked.clear()
        torch.manual_seed(0)
        model = VisionTransformer(config).train()
        apply_activation_checkpointing(model, TRANSFORMER_BLOCKS, context_fn=matmul_outputs_saved())
        if compiled:
            compile_blocks(model, TRANSFORMER_BLOCKS)
        model(torch.randn(4, 10, 16, 16)).square().mean().backward()
        matmuls = {op: n for op, n in asked.items() if "mm" in op}
        assert matmuls == ({"aten.addmm.out": 8} if compiled else {"aten.addmm.default": 8}), (compiled, matmuls)
    torch._dynamo.reset()
