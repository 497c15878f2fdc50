"""Task heads, task models on every encoder subset, and layer-wise LR decay (tiny preset, random inputs)."""

from __future__ import annotations

import pytest
import torch

from skysense import SkySense
from skysense.downstream.heads import UperNetHead
from skysense.downstream.lr_decay import decays_weight, layer_of, lr_scale, parameter_groups
from skysense.downstream.tasks import (
    TaskSpec,
    bitemporal_inputs,
    build_task_model,
    feature_pyramid,
    labelled_cross_entropy,
    pyramid_channels,
)


@pytest.fixture(scope="module")
def encoder() -> SkySense:
    torch.manual_seed(0)
    return SkySense.from_preset("tiny")


def _series(b: int, t: int, c: int, size: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(b, t, c, size, size, generator=g), "dates": torch.randint(1, 366, (b, t), generator=g),
            "mask": torch.ones(b, t, dtype=torch.bool)}


def _batch(hr: int | None = None, s2: int | None = None, s1: int | None = None, frames: int = 2, b: int = 2,
           seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch: dict[str, torch.Tensor] = {}
    if hr:
        batch["hr"] = torch.randn(b, 3, hr, hr, generator=g)
        batch["hr_post"] = torch.randn(b, 3, hr, hr, generator=g)
    for name, size, channels in (("s2", s2, 10), ("s1", s1, 2)):
        if size:
            series = _series(b, frames, channels, size, seed + channels)
            batch[name], batch[f"{name}_dates"], batch[f"{name}_mask"] = series["x"], series["dates"], series["mask"]
    batch["lat"], batch["lon"] = torch.tensor([48.1, -33.9][:b]), torch.tensor([11.6, 151.2][:b])
    return batch


def test_upernet_shapes_and_checks():
    head = UperNetHead((8, 16, 32, 64), num_classes=5, channels=16)
    levels = [torch.randn(2, c, 32 // 2**i, 32 // 2**i) for i, c in enumerate((8, 16, 32, 64))]
    assert head(levels).shape == (2, 5, 32, 32)
    head.train()
    assert head([x[:1] for x in levels]).shape == (1, 5, 32, 32)  # batch 1 trains (GroupNorm)
    with pytest.raises(ValueError, match="level 2"):
        head([levels[0], levels[1], torch.randn(2, 7, 8, 8), levels[3]])


def test_classification_single_and_multilabel(encoder):
    spec = TaskSpec("classification", 7, modalities=("hr",))
    model = build_task_model(encoder, spec)
    batch = {**_batch(hr=150), "label": torch.tensor([1, 6])}
    out = model(batch)
    assert out["label"].shape == (2, 7)
    total, terms = model.loss(out, batch)
    total.backward()
    assert set(terms) == {"label"}
    assert model.head.linear.weight.grad is not None
    assert model.encoder.hr_encoder.patch_embed.weight.grad.abs().sum() > 0  # fine-tuning reaches the encoder
    model.zero_grad()

    multi = build_task_model(encoder, TaskSpec("classification", 19, modalities=("s2", "s1"), multilabel=True))
    batch = {**_batch(s2=16, s1=16), "label": (torch.rand(2, 19) > 0.7).float()}
    out = multi(batch)
    assert out["label"].shape == (2, 19)
    total, _ = multi.loss(out, batch)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(out["label"], batch["label"])
    assert torch.allclose(total, expected)


def test_segmentation_pyramids_for_each_input_subset(encoder):
    d = encoder.config.fusion.embed_dim
    hr_only = TaskSpec("segmentation", 4, modalities=("hr",))
    assert pyramid_channels(encoder.config, hr_only) == encoder.config.hr.out_dims
    fused = TaskSpec("segmentation", 4, modalities=("hr", "s2"))
    assert pyramid_channels(encoder.config, fused)[-1] == encoder.config.hr.out_dims[-1] + d
    sentinel = TaskSpec("segmentation", 4, modalities=("s2", "s1"))
    assert pyramid_channels(encoder.config, sentinel) == (d,) * 4

    for spec, batch, size in ((hr_only, _batch(hr=64), 64), (fused, _batch(hr=128, s2=4), 128),
                              (sentinel, _batch(s2=24, s1=24), 24)):
        model = build_task_model(encoder, spec).eval()
        with torch.no_grad():
            out = model(batch)
            levels = feature_pyramid(model.encode(model.encoder_inputs(batch)), spec)
        assert out["mask"].shape == (2, 4, size, size)
        assert [x.shape[1] for x in levels] == list(pyramid_channels(encoder.config, spec))


def test_geo_context_needs_lat_lon_and_uses_them(encoder):
    spec = TaskSpec("segmentation", 3, modalities=("s2",), geo_context=True)
    assert pyramid_channels(encoder.config, spec) == (2 * encoder.config.fusion.embed_dim,) * 4
    model = build_task_model(encoder, spec).eval()
    batch = _batch(s2=16)
    with torch.no_grad():
        a = model(batch)["mask"]
        moved = {**batch, "lat": torch.tensor([-60.0, 70.0]), "lon": torch.tensor([100.0, -120.0])}
        b = model(moved)["mask"]
    assert not torch.allclose(a, b)  # another region's prototypes
    without = {k: v for k, v in batch.items() if k not in ("lat", "lon")}
    with pytest.raises(ValueError, match="geo_context"):
        model(without)


def test_change_model_siamese_differences(encoder):
    spec = TaskSpec("change", 2, modalities=("hr",))
    model = build_task_model(encoder, spec).eval()
    batch = {**_batch(hr=64), "mask": torch.randint(0, 2, (2, 64, 64))}
    with torch.no_grad():
        out = model(batch)["change"]
        same = model({**batch, "hr_post": batch["hr"]})["change"]
    assert out.shape == (2, 2, 64, 64)
    # Identical dates: every difference is zero, so the decoder sees no spatial structure.
    assert torch.allclose(same, same[..., :1, :1].expand_as(same), atol=1e-5)
    assert not torch.allclose(out, out[..., :1, :1].expand_as(out), atol=1e-5)
    total, terms = model.loss(model(batch), batch)
    assert set(terms) == {"change"} and torch.isfinite(total)

    with pytest.raises(ValueError, match="hr_post"):
        model({k: v for k, v in batch.items() if k != "hr_post"})


def test_change_on_sentinel_pairs_and_semantic_change(encoder):
    spec = TaskSpec("change", 2, modalities=("s2",), semantic_classes=5)
    model = build_task_model(encoder, spec)
    batch = _batch(s2=16, frames=2)
    before, after = bitemporal_inputs(model.encoder_inputs(batch), spec.modalities)
    assert before["s2"].shape == (2, 1, 10, 16, 16) and torch.equal(after["s2_dates"], batch["s2_dates"][:, 1:])
    batch.update(mask=torch.randint(-1, 5, (2, 16, 16)), mask_post=torch.randint(0, 5, (2, 16, 16)),
                 change=torch.randint(-1, 2, (2, 16, 16)))
    out = model(batch)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"change": (2, 2, 16, 16), "mask": (2, 5, 16, 16),
                                                           "mask_post": (2, 5, 16, 16)}
    total, terms = model.loss(out, batch)
    assert set(terms) == {"change", "mask", "mask_post"}
    assert torch.allclose(total, terms["change"] + terms["mask"] + terms["mask_post"])
    with pytest.raises(ValueError, match="expected 2 frames"):
        model(_batch(s2=16, frames=3))


def test_loss_ignores_unlabelled_pixels_and_weights_classes(encoder):
    spec = TaskSpec("segmentation", 3, modalities=("s2",), class_weights=(1.0, 2.0, 3.0))
    model = build_task_model(encoder, spec)
    batch = _batch(s2=8)
    out = model(batch)
    target = torch.full((2, 8, 8), -1)
    target[:, :4] = 2
    loss, _ = model.loss(out, {**batch, "mask": target})
    expected = torch.nn.functional.cross_entropy(out["mask"][:, :, :4], target[:, :4],
                                                 weight=torch.tensor([1.0, 2.0, 3.0]))
    assert torch.allclose(loss, expected, atol=1e-6)
    nothing, _ = model.loss(out, {**batch, "mask": torch.full((2, 8, 8), -1)})
    assert nothing.item() == 0.0


@pytest.mark.parametrize("weight", [None, torch.tensor([0.5, 2.0, 3.0])])
def test_labelled_cross_entropy_is_the_mean_over_labelled_targets_and_zero_without_any(weight):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 5, generator=g, requires_grad=True)
    target = torch.randint(-1, 3, (2, 5, 5), generator=g)  # about a quarter unlabelled (-1)
    expected = torch.nn.functional.cross_entropy(logits, target, weight=weight, ignore_index=-1)
    torch.testing.assert_close(labelled_cross_entropy(logits, target, weight), expected)
    nothing = labelled_cross_entropy(logits, torch.full_like(target, -1), weight)
    nothing.backward()
    assert nothing.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_task_spec_validation_and_round_trip():
    spec = TaskSpec("change", 2, modalities=("s2", "hr"), semantic_classes=7, class_names=("a", "b"))
    assert spec.modalities == ("hr", "s2")  # fusion order
    assert TaskSpec.from_dict(spec.to_dict()) == spec
    for kwargs, message in ((dict(task="instance_segmentation", num_classes=2), "task"),
                            (dict(task="change", num_classes=3), "num_classes"),
                            (dict(task="segmentation", num_classes=2, multilabel=True), "multilabel"),
                            (dict(task="segmentation", num_classes=2, modalities=("rgb",)), "modalities"),
                            (dict(task="segmentation", num_classes=2, class_names=("a",)), "class_names")):
        with pytest.raises(ValueError, match=message):
            TaskSpec(**kwargs)
    with pytest.raises(ValueError, match="unknown keys"):
        TaskSpec.from_dict({"task": "segmentation", "num_classes": 2, "colour": 1})


def test_layer_ids_and_scales(encoder):
    cfg = encoder.config  # tiny: Swin depths (2, 2, 2, 2), ViT depth 4, fusion depth 2
    assert layer_of("encoder.hr_encoder.patch_embed.weight", cfg) == ("hr", 0, 8)
    assert layer_of("encoder.hr_encoder.stages.0.blocks.1.attn.qkv.weight", cfg) == ("hr", 2, 8)
    assert layer_of("encoder.hr_encoder.stages.2.downsample.reduction.weight", cfg) == ("hr", 5, 8)
    assert layer_of("encoder.hr_encoder.stages.3.blocks.1.mlp.fc1.weight", cfg) == ("hr", 8, 8)
    assert layer_of("encoder.hr_encoder.out_norms.1.weight", cfg) == ("hr", 4, 8)
    assert layer_of("encoder.s2_encoder.pos_embed", cfg) == ("s2", 0, 4)
    assert layer_of("encoder.s1_encoder.blocks.3.mlp.fc2.weight", cfg) == ("s1", 4, 4)
    assert layer_of("encoder.s2_projection.conv.weight", cfg) == ("fusion", 0, 2)
    assert layer_of("encoder.fusion.blocks.1.attn.qkv.weight", cfg) == ("fusion", 2, 2)
    assert layer_of("head.classifier.weight", cfg)[0] == "head"
    assert lr_scale("encoder.hr_encoder.patch_embed.weight", cfg, 0.5) == 0.5**9
    assert lr_scale("encoder.hr_encoder.stages.3.blocks.1.mlp.fc1.weight", cfg, 0.5) == 0.5
    assert lr_scale("head.classifier.weight", cfg, 0.5) == 1.0
    assert not decays_weight("encoder.s2_encoder.pos_embed", 3)
    assert not decays_weight("encoder.hr_encoder.stages.0.blocks.0.attn.logit_scale", 3)
    assert not decays_weight("encoder.fusion.blocks.0.norm1.weight", 1)
    assert decays_weight("encoder.fusion.blocks.0.attn.qkv.weight", 2)


def test_parameter_groups_cover_every_trainable_parameter_once(encoder):
    model = build_task_model(encoder, TaskSpec("segmentation", 3, modalities=("hr", "s2")))
    groups = parameter_groups(model, encoder.config, weight_decay=0.05, layer_decay=0.8)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)
    scales = {g["lr_scale"] for g in groups}
    assert max(scales) == 1.0 and min(scales) == pytest.approx(0.8**9)
    assert all(g["weight_decay"] == 0.0 for g in groups if any(n.endswith("bias") for n in g["names"]))
    model.encoder.requires_grad_(False)
    frozen = parameter_groups(model, encoder.config, 0.05, 0.8)
    assert all(n.startswith("head.") for g in frozen for n in g["names"])
    model.encoder.requires_grad_(True)
    with pytest.raises(ValueError, match="layer_decay"):
        parameter_groups(model, encoder.config, 0.05, 0.0)


@pytest.mark.parametrize("spec,inputs", [
    (TaskSpec("classification", 7, modalities=("hr", "s2", "s1"), geo_context=True), dict(hr=128, s2=4, s1=4)),
    (TaskSpec("segmentation", 3, modalities=("hr", "s2"), class_weights=(1.0, 2.0, 3.0)), dict(hr=256, s2=8)),
    (TaskSpec("change", 2, modalities=("s2",), semantic_classes=5), dict(s2=16)),
])
def test_task_models_create_their_tensors_on_the_inputs_device(encoder, spec, inputs):
    """Fine-tuning on a GPU (never run here) must not build tensors on the CPU mid-step. With the
    default device set to ``meta`` after model and batch exist, a tensor made without
    ``device=`` lands on ``meta`` and the first operation mixing it with real tensors fails there.
    The sliding-window evaluation runs too."""
    from skysense.downstream.sliding_window import sliding_window

    model = build_task_model(encoder, spec)
    batch = _batch(**inputs)
    size = inputs.get("hr", inputs["s2"])
    targets = {"classification": {"label": torch.tensor([1, 6])},
               "segmentation": {"mask": torch.randint(-1, 3, (2, size, size))},
               "change": {"mask": torch.randint(-1, 5, (2, size, size)), "mask_post": torch.randint(0, 5, (2, size, size)),
                          "change": torch.randint(-1, 2, (2, size, size))}}[spec.task]
    batch.update(targets)
    torch.set_default_device("meta")
    try:
        total, _ = model.loss(model(batch), batch)
        total.backward()
        if spec.task != "classification":
            with torch.no_grad():
                sliding_window(model.eval(), batch, size // 2, size // 4)
    finally:
        torch.set_default_device(None)
        model.zero_grad()
