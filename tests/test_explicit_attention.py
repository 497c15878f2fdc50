"""skysense::explicit_attention: SDPA's results and gradients, one opaque operator under compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from skysense.compilation import compile_blocks
from skysense.config import preset_config
from skysense.models import TRANSFORMER_BLOCKS, SkySense, set_attention_backends
from skysense.models.attention import _explicit_attention, check_attention_backends, explicit_attention
from skysense.models.fusion import FusionTransformer
from model_inputs import tiny_inputs


def _inputs(mask: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(3, 4, 10, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    if mask == "none":
        return q, k, v, None
    if mask == "bool":  # key padding, broadcast over heads and queries
        valid = torch.ones(3, 1, 1, 10, dtype=torch.bool)
        valid[0, ..., 7:] = False
        return q, k, v, valid
    # additive with a gradient, broadcast over the batch (SwinV2's position bias)
    return q, k, v, torch.randn(1, 4, 10, 10, generator=g, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("mask", ["none", "bool", "additive"])
def test_outputs_and_gradients_are_sdpas(mask: str) -> None:
    q, k, v, m = _inputs(mask)
    grad = torch.randn(3, 4, 10, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = explicit_attention(q, k, v, m, scale=0.3)
    leaves = [t for t in (q, k, v, m) if t is not None and t.requires_grad]
    ours_grads = torch.autograd.grad(ours, leaves, grad)
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.3)
    reference_grads = torch.autograd.grad(reference, leaves, grad)
    torch.testing.assert_close(ours, reference)
    for a, b in zip(ours_grads, reference_grads, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(explicit_attention(q, k, v, m), F.scaled_dot_product_attention(q, k, v, attn_mask=m))


def test_the_operator_passes_torchs_checks() -> None:
    q, k, v, m = _inputs("additive")
    torch.library.opcheck(_explicit_attention, (q, k, v, m, 0.3))


@pytest.mark.slow
def test_compiled_blocks_keep_it_and_train_like_sdpa() -> None:
    from torch._inductor.utils import run_and_get_code

    config = preset_config("tiny").fusion
    torch.manual_seed(0)
    reference = FusionTransformer(config, 64)
    explicit = FusionTransformer(config, 64)
    explicit.load_state_dict(reference.state_dict())
    set_attention_backends(explicit, ["explicit"])
    compile_blocks(explicit, TRANSFORMER_BLOCKS)
    x = torch.randn(4, 8, config.embed_dim)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    expected = reference.blocks[0](xs[0])
    out, code = run_and_get_code(lambda: explicit.blocks[0](xs[1]))
    expected.square().sum().backward()
    out.square().sum().backward()
    code = "\n".join(code)
    # Inductor would turn a plain softmax(q k^T) v back into SDPA; the operator stays itself.
    assert "explicit_attention" in code and "scaled_dot_product" not in code
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-4, atol=1e-5)


def test_skysense_with_explicit_attention_everywhere_matches_sdpa() -> None:
    torch.manual_seed(0)
    model = SkySense(preset_config("tiny")).eval()
    with torch.no_grad():
        reference = model(**tiny_inputs())
        model.set_attention_backends({name: ["explicit"] for name in SkySense.ATTENTION_NETWORKS})
        torch.testing.assert_close(model(**tiny_inputs()), reference, rtol=1e-4, atol=1e-5)


def test_explicit_is_named_alone() -> None:
    assert check_attention_backends("explicit") == ("explicit",)
    with pytest.raises(ValueError, match=r"fusion: expected one or more of .*or one of \['explicit', 'short'\] alone, got \['explicit', 'math'\]"):
        check_attention_backends(["explicit", "math"], "fusion")


def test_selective_checkpointing_keeps_its_outputs() -> None:
    """Like SDPA's kernels, the operator's outputs are kept: the recomputation does not run it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from skysense.distributed import checkpoint_blocks

    class Calls(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func == torch.ops.skysense.explicit_attention.default:
                Calls.count += 1
            return func(*args, **(kwargs or {}))

    config = preset_config("tiny").fusion
    torch.manual_seed(0)
    plain = FusionTransformer(config, 64)
    checkpointed = FusionTransformer(config, 64)
    checkpointed.load_state_dict(plain.state_dict())
    for model in (plain, checkpointed):
        set_attention_backends(model, ["explicit"])
    assert checkpoint_blocks(checkpointed, TRANSFORMER_BLOCKS, "selective") == config.depth
    x = torch.randn(4, 8, config.embed_dim)
    grads = []
    for model in (plain, checkpointed):
        Calls.count = 0
        with Calls():
            for block in model.blocks:
                x_in = x.clone().requires_grad_()
                block(x_in).square().sum().backward()
                grads.append(x_in.grad)
        assert Calls.count == config.depth  # once per block: none in the backward pass
    for a, b in zip(grads[: config.depth], grads[config.depth :], strict=True):
        torch.testing.assert_close(a, b)
