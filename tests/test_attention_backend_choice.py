"""set_attention_backends: which SDPA kernel our attention layers may use, eager and compiled."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend

from skysense.compilation import compile_blocks
from skysense.config import preset_config
from skysense.models import TRANSFORMER_BLOCKS, SkySense, set_attention_backends
from skysense.models.fusion import FusionTransformer


def test_every_attention_layer_of_the_model_is_set_and_reset(sdpa_choices) -> None:
    torch.manual_seed(0)
    config = preset_config("tiny")
    model = SkySense(config).eval()
    layers = sum(config.hr.depths) + config.s2.depth + config.s1.depth + config.fusion.depth + 1  # + geo-context
    assert set_attention_backends(model, ["math"]) == layers
    chosen = sdpa_choices
    x = torch.randn(4, 8, config.fusion.embed_dim)
    fusion = FusionTransformer(config.fusion, 64).eval()
    with torch.no_grad():
        reference = fusion.blocks[0](x)
        set_attention_backends(fusion, ["math"])
        restricted = fusion.blocks[0](x)
    assert chosen == [int(SDPBackend.FLASH_ATTENTION), int(SDPBackend.MATH)]  # the CPU's default, then math
    torch.testing.assert_close(restricted, reference)
    assert set_attention_backends(model, None) == layers
    assert all(getattr(m, "sdpa_backends", None) is None for m in model.modules())


def test_unknown_backends_are_refused() -> None:
    fusion = FusionTransformer(preset_config("tiny").fusion, 64)
    with pytest.raises(ValueError, match=r"expected one or more of \['cudnn', 'flash', 'efficient', 'math'\], or one of \['explicit', 'short'\] alone, got \['fast'\]"):
        set_attention_backends(fusion, ["fast"])
    with pytest.raises(ValueError, match="got \\[\\]"):
        set_attention_backends(fusion, [])


def test_a_compiled_block_keeps_the_backend_it_was_traced_with() -> None:
    """The graph torch.compile traces holds the math path's products, not the CPU's default
    flash kernel. (Inductor's attention patterns may then rewrite such products into a fused
    kernel; ``"explicit"`` is the setting it leaves alone: tests/test_explicit_attention.py.)"""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    torch.manual_seed(0)
    config = preset_config("tiny").fusion
    fusion = FusionTransformer(config, 64)
    set_attention_backends(fusion, ["math"])
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm)

    compile_blocks(fusion, TRANSFORMER_BLOCKS, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))
    x = torch.randn(4, 8, config.embed_dim, requires_grad=True)
    fusion.blocks[0](x).sum().backward()
    targets = {str(n.target) for graph in graphs for n in graph.graph.nodes if n.op == "call_function"}
    assert len(graphs) == 2 and "aten.bmm.default" in targets, targets
    assert not any("flash" in t or "efficient" in t for t in targets), targets


def test_skysense_sets_each_named_network_and_refuses_bad_settings() -> None:
    torch.manual_seed(0)
    config = preset_config("tiny")
    model = SkySense(config)
    assert model.set_attention_backends({"fusion": ["efficient", "math"], "geo": "math"}) == config.fusion.depth + 1
    assert all(m.sdpa_backends == ("efficient", "math") for m in model.fusion.modules() if hasattr(m, "sdpa_backends"))
    assert model.geo_context.sdpa_backends == ("math",)
    assert all(getattr(m, "sdpa_backends", None) is None for m in model.hr_encoder.modules())
    with pytest.raises(ValueError, match=r"attention_backends: unknown network 'vit'; expected among \['hr', 's2', 's1', 'fusion', 'geo'\]"):
        model.set_attention_backends({"vit": ["math"]})
    with pytest.raises(ValueError, match=r"attention_backends.s1: expected one or more of .*got \['fast'\]"):
        SkySense.check_attention_backends({"s1": ["fast"]})
    with pytest.raises(ValueError, match=r"attention_backends.hr: .*got \[\]"):
        SkySense.check_attention_backends({"hr": []})
    with pytest.raises(ValueError, match="attention_backends: expected a mapping"):
        SkySense.check_attention_backends(["math"])
