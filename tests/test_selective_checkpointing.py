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


def test_a_compiled_block_keeps_its_matmul_outputs() -> None:
    """Under compile_blocks the checkpoint moves inside each block's graph, where torch.compile
    applies the policy: the forward graph runs once per block (a checkpoint around the compiled
    block would run it again in the backward pass), the backward graphs hold as many matmuls as
    without checkpointing (none recomputed), and the gradients are the same."""
    import dataclasses

    from functorch.compile import min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    from skysense.compilation import compile_blocks

    def matmuls(graph) -> int:
        return sum(1 for node in graph.graph.nodes if node.op == "call_function" and "mm" in str(node.target))

    config = dataclasses.replace(preset_config("tiny").s2, depth=2)
    counts, grads = {}, {}
    for setting in ("off", "selective"):
        torch._dynamo.reset()
        seen = {"forward": 0, "backward": 0, "forward_runs": 0}

        def forward_graph(graph, inputs):
            seen["forward"] += matmuls(graph)

            def run(*args):
                seen["forward_runs"] += 1
                return graph(*args)

            return run

        def backward_graph(graph, inputs):
            seen["backward"] += matmuls(graph)
            return graph

        backend = aot_autograd(fw_compiler=forward_graph, bw_compiler=backward_graph,
                               partition_fn=min_cut_rematerialization_partition)
        torch.manual_seed(0)
        model = VisionTransformer(config).train()
        if setting == "selective":
            apply_activation_checkpointing(model, TRANSFORMER_BLOCKS, context_fn=matmul_outputs_saved())
        compile_blocks(model, TRANSFORMER_BLOCKS, backend=backend)
        model(torch.randn(4, 10, 16, 16)).square().mean().backward()
        counts[setting] = dict(seen)
        grads[setting] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch._dynamo.reset()
    assert counts["selective"] == counts["off"] and counts["off"]["backward"] > 0, counts
    for name, grad in grads["off"].items():
        torch.testing.assert_close(grads["selective"][name], grad, rtol=1e-5, atol=1e-6, msg=name)


class _DroppedBlock(nn.Module):
    """A linear layer under stochastic depth: its backward pass must use the forward's mask."""

    def __init__(self) -> None:
        super().__init__()
        from skysense.models.layers import DropPath

        self.lin = nn.Linear(8, 8)
        self.drop_path = DropPath(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path(self.lin(x).relu() + 1.0)


@pytest.mark.slow
@pytest.mark.parametrize("backend", [None, "aot_eager", "inductor"])
def test_recomputed_stochastic_depth_uses_the_forward_mask(backend: str | None) -> None:
    """Selective checkpointing recomputes the random mask of stochastic depth (eager) or traces
    it inside the compiled block: either way the gradients follow the mask the forward used."""
    from skysense.compilation import compile_blocks

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(_DroppedBlock()).train()
    apply_activation_checkpointing(model, (_DroppedBlock,), context_fn=matmul_outputs_saved())
    if backend is not None:
        compile_blocks(model, (_DroppedBlock,), backend=backend)
    x = torch.randn(64, 8)
    y = model(x)
    y.sum().backward()
    torch._dynamo.reset()
    block = model[0]
    with torch.no_grad():
        pre = block.lin(x)
        scale = y / (pre.relu() + 1.0)  # per sample: 0 (dropped) or 2 (kept, 1 / 0.5)
        expected = (scale * (pre > 0)).sum(0)  # d sum(y) / d lin.bias
    kept = int((scale[:, 0] > 0).sum())
    assert 0 < kept < 64, "no sample dropped, or none kept: the check proves nothing"
    torch.testing.assert_close(block.lin.bias.grad, expected, rtol=1e-5, atol=1e-5)


def test_a_setting_per_network_checkpoints_each_networks_blocks_its_way() -> None:
    """``{hr: true, s2: true, s1: true, fusion: selective}``: the encoders' blocks recompute their
    whole forward, the fusion's keep their matmul outputs; a network not named is left alone, and
    a wrong network or value is an error naming its key."""
    from skysense.distributed import block_checkpointing, checkpoint_blocks
    from skysense.models import SkySense

    model = SkySense(preset_config("tiny"))
    setting = {"hr": True, "s2": True, "fusion": "selective"}
    blocks = {name: [m for m in model.network(name).modules() if isinstance(m, TRANSFORMER_BLOCKS)]
              for name in ("hr", "s2", "s1", "fusion")}
    assert checkpoint_blocks(model, TRANSFORMER_BLOCKS, setting) == sum(len(blocks[n]) for n in setting)
    for name, expected in (("hr", "full"), ("s2", "full"), ("s1", "off"), ("fusion", "selective")):
        assert {block_checkpointing(b) for b in blocks[name]} == {expected}, name
    # A deep copy (how the EMA teacher is made) runs its own blocks, not the original's.
    copy = __import__("copy").deepcopy(model.fusion)
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(0.5)
    x = torch.randn(2, 4, model.fusion.blocks[0].norm1.normalized_shape[0])
    assert not torch.allclose(copy.blocks[0](x), model.fusion.blocks[0](x))
    with pytest.raises(ValueError, match=r"activation_checkpointing\.fusion: expected true, false or 'selective', got 'some'"):
        checkpoint_blocks(model, TRANSFORMER_BLOCKS, {"fusion": "some"})
    with pytest.raises(ValueError, match=r"activation_checkpointing: unknown network 'vit'; expected among \['hr', 's2'"):
        checkpoint_blocks(model, TRANSFORMER_BLOCKS, {"vit": True})
    with pytest.raises(ValueError, match="a mapping of networks needs a SkySense model, got VisionTransformer"):
        checkpoint_blocks(model.s2_encoder, TRANSFORMER_BLOCKS, {"s2": True})
    block = model.s1_encoder.blocks[0]
    block.forward = torch.compile(block.forward)  # compiled before checkpointing: the wrong order
    with pytest.raises(ValueError, match="forward was already replaced .*checkpoint the blocks before compiling"):
        checkpoint_blocks(model, TRANSFORMER_BLOCKS, {"s1": "selective"})


@pytest.mark.parametrize("setting", [True, "selective"])
def test_checkpointed_blocks_run_under_fsdp_with_bf16_gathers(setting) -> None:
    """FSDP2 casts each unit's inputs to the gathered parameters' dtype (bf16 on CUDA) in a
    forward pre-hook. Selective checkpointing by the composable checkpoint reran that hook inside
    its replay of the forward, where the cast's operators had not been recorded: the backward
    pass failed ("profiler._record_function_enter_new.default encountered during backward but
    not found in storage"). A process group of two ranks whose collectives do nothing stands in
    for a second process, so only that the step runs, and what it reaches, is checked."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from skysense.distributed import DistributedContext, apply_fsdp, checkpoint_blocks
    from skysense.models.layers import TransformerBlock

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(TransformerBlock(16, 2, 2.0), TransformerBlock(16, 2, 2.0))
        assert checkpoint_blocks(model, (TransformerBlock,), setting) == 2
        apply_fsdp(model, DistributedContext(rank=0, world_size=2), (TransformerBlock,), torch.bfloat16)
        seen = []
        model[1].norm1.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
        model(torch.randn(2, 5, 16)).float().sum().backward()
        assert seen == [torch.bfloat16] * 2  # the forward pass and its recomputation
        assert all(p.grad is not None for p in model.parameters())
    finally:
        dist.destroy_process_group()
