"""Pretraining objectives: each loss can be optimised, Sinkhorn balance, exact EMA, end to end."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from skysense import SkySense
from skysense.config import GeoContextConfig
from skysense.models.geo_context import GeoContextPrototypes
from skysense.pretrain import (
    CrossModalAlignment,
    DINOHead,
    GeoPrototypeLoss,
    HeadConfig,
    ImageContrastLoss,
    ObjectContrastLoss,
    PixelContrastLoss,
    PretrainObjectiveConfig,
    SkySensePretrainingObjective,
    build_teacher,
    cosine_momentum,
    ema_update,
    resample_to_overlap,
)

DIM, OUT = 16, 32


def _heads(seed: int = 0) -> tuple[DINOHead, DINOHead]:
    torch.manual_seed(seed)
    student = DINOHead(DIM, OUT, hidden_dim=32, bottleneck_dim=16)
    return student, build_teacher(student)


def _maps(seed: int, views: int = 2, shape: tuple[int, ...] = (2, DIM, 4, 4)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(views)]


def _optimise(loss_fn, params: list[torch.Tensor], steps: int = 60, lr: float = 0.05) -> tuple[float, float]:
    optimiser = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    return losses[0], losses[-1]


def test_head_dense_maps_match_per_pixel_vectors() -> None:
    head, _ = _heads()
    maps = _maps(1, views=1)[0]
    dense = head(maps)
    vectors = head(maps.permute(0, 2, 3, 1).reshape(-1, DIM)).reshape(2, 4, 4, OUT).permute(0, 3, 1, 2)
    assert dense.shape == (2, OUT, 4, 4)
    torch.testing.assert_close(dense, vectors)
    # Scores are cosines with unit prototypes: bounded by 1 whatever the prototype scale.
    with torch.no_grad():
        head.prototypes.mul_(10.0)
    assert head(maps).abs().max() <= 1.0 + 1e-5


def test_ema_update_is_exact_and_copies_buffers() -> None:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3))
    teacher = build_teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student.train()(torch.randn(8, 5))  # moves the BatchNorm running statistics
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    m = 0.9
    ema_update(teacher, student, m)
    student_params = dict(student.named_parameters())
    for name, p in teacher.named_parameters():
        expected = m * before[name] + (1 - m) * student_params[name].detach()
        assert torch.allclose(p, expected, rtol=0, atol=1e-7), name
        assert not torch.equal(p, before[name]), name
    for name, b in teacher.named_buffers():
        assert torch.equal(b, dict(student.named_buffers())[name]), name


def test_ema_update_rejects_mismatched_modules() -> None:
    with pytest.raises(ValueError, match="differ"):
        ema_update(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)), 0.9)


def test_teacher_receives_no_gradient() -> None:
    student_head, teacher_head = _heads()
    assert not any(p.requires_grad for p in teacher_head.parameters())
    student_maps = [m.requires_grad_() for m in _maps(2)]
    teacher_maps = [m.requires_grad_() for m in _maps(3)]
    PixelContrastLoss(OUT)(student_maps, teacher_maps, student_head, teacher_head).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student_head.parameters())
    assert all(p.grad is None for p in teacher_head.parameters())
    assert all(m.grad is None for m in teacher_maps)


def test_cosine_momentum_schedule() -> None:
    values = [cosine_momentum(step, 100) for step in range(101)]
    assert values[0] == pytest.approx(0.996) and values[-1] == pytest.approx(1.0)
    assert values[50] == pytest.approx(0.998)
    assert all(a <= b for a, b in zip(values, values[1:]))


GRANULARITIES = {
    "pixel": lambda: PixelContrastLoss(OUT),
    "object": lambda: ObjectContrastLoss(OUT, num_clusters=4, rounds=1),  # fewer Sinkhorn runs: faster
    "image": lambda: ImageContrastLoss(OUT),
}


@pytest.mark.parametrize("level", GRANULARITIES)
def test_multi_granularity_loss_decreases(level: str) -> None:
    student_head, teacher_head = _heads()
    criterion = GRANULARITIES[level]()
    student_maps = [nn.Parameter(m) for m in _maps(4)]
    teacher_maps = _maps(5)
    first, last = _optimise(lambda: criterion(student_maps, teacher_maps, student_head, teacher_head), student_maps)
    assert last < 0.6 * first, (first, last)
    # The centre followed the teacher's scores during training.
    assert criterion.criterion.center.abs().sum() > 0


def test_object_assignment_is_balanced() -> None:
    maps = _maps(6, views=1, shape=(3, DIM, 6, 5))[0]
    assignment = ObjectContrastLoss(OUT, num_clusters=5).assign(maps)
    assert assignment.shape == (3, 30, 5)
    torch.testing.assert_close(assignment.sum(2), torch.ones(3, 30), rtol=0, atol=1e-3)
    torch.testing.assert_close(assignment.sum(1), torch.full((3, 5), 6.0), rtol=0, atol=1e-3)
    # Not a uniform spread: pixels are mostly assigned to one cluster.
    assert assignment.max(2).values.mean() > 0.5


def test_sources_with_as_many_pixels_are_clustered_together_with_the_assignments_of_each_alone(monkeypatch) -> None:
    from skysense.pretrain import object_contrast

    loss = ObjectContrastLoss(OUT, num_clusters=4, rounds=2)
    g = torch.Generator().manual_seed(3)
    maps = [torch.randn(3, 12, 6, 5, generator=g), torch.randn(2, 7, 5, 6, generator=g)]  # 30 pixels each
    calls = []
    sinkhorn = object_contrast.sinkhorn_knopp
    monkeypatch.setattr(object_contrast, "sinkhorn_knopp", lambda s, *a, **k: calls.append(s.shape[0]) or sinkhorn(s, *a, **k))
    together = loss.assign_together(maps)
    assert calls == [5, 5, 5]  # both sources' problems in each of the 1 + 2 rounds
    calls.clear()
    alone = [loss.assign(m) for m in maps]
    assert calls == [3, 3, 3, 2, 2, 2]
    for a, b in zip(together, alone, strict=True):
        # The tolerance is 1e-4 of the column sums (30 / 4): more rounds for one source move it less.
        torch.testing.assert_close(a, b, rtol=0, atol=5e-3)
        torch.testing.assert_close(a.sum(1), torch.full((a.shape[0], 4), 7.5), rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match=r"the same number of pixels, got \[30, 16\]"):
        loss.assign_together([maps[0], torch.randn(2, 7, 4, 4)])


def test_objective_clusters_the_sources_in_groups_of_equal_pixel_counts(monkeypatch) -> None:
    objective = SkySensePretrainingObjective(SkySense.from_preset("tiny").config, SMALL)
    grouped = []
    original = ObjectContrastLoss.assign_together
    monkeypatch.setattr(ObjectContrastLoss, "assign_together",
                        lambda self, maps: grouped.append([m.shape[-2:] for m in maps]) or original(self, maps))
    g = torch.Generator().manual_seed(0)
    sizes = {"hr": 4, "s2": 2, "s1": 2, "fused": 4}
    aligned = {s: [torch.randn(2, 8, n, n, generator=g) for _ in range(2)] for s, n in sizes.items()}
    found = objective.object_assignments(aligned)
    assert grouped == [[(4, 4), (4, 4)], [(2, 2), (2, 2)]]  # hr with fused, s2 with s1
    k = objective.config.num_clusters
    assert {s: tuple(a.shape) for s, a in found.items()} == {s: (2, n * n, k) for s, n in sizes.items()}


def test_resample_to_overlap_aligns_views() -> None:
    scene = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    view_a, view_b = scene[..., :6, :6], scene[..., 2:, 2:]
    a = resample_to_overlap(view_a, torch.tensor([[2 / 6, 2 / 6, 1.0, 1.0]]), (4, 4))
    b = resample_to_overlap(view_b, torch.tensor([[0.0, 0.0, 4 / 6, 4 / 6]]), (4, 4))
    torch.testing.assert_close(a, scene[..., 2:6, 2:6])
    torch.testing.assert_close(b, scene[..., 2:6, 2:6])


def _modality_features(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"hr": torch.randn(8, 12, generator=g), "s2": torch.randn(8, 10, generator=g),
            "s1": torch.randn(8, 6, generator=g)}


def test_cross_modal_alignment_decreases() -> None:
    torch.manual_seed(0)
    alignment = CrossModalAlignment({"hr": 12, "s2": 10, "s1": 6}, embed_dim=16)
    features = {k: nn.Parameter(v) for k, v in _modality_features(8).items()}
    params = list(features.values()) + list(alignment.parameters())
    first, last = _optimise(lambda: alignment(features), params, steps=40, lr=0.02)
    assert last < 0.5 * first, (first, last)
    assert alignment.log_logit_scale.requires_grad


def test_cross_modal_alignment_skips_absent_modalities() -> None:
    torch.manual_seed(0)
    alignment = CrossModalAlignment({"hr": 12, "s2": 10, "s1": 6}, embed_dim=16, learnable_temperature=False)
    assert not any(p is alignment.log_logit_scale for p in alignment.parameters())
    features = _modality_features(9)
    pair = alignment({"hr": features["hr"], "s2": features["s2"]})
    unit = {m: nn.functional.normalize(alignment.projections[m](features[m]), dim=-1) for m in ("hr", "s2")}
    torch.testing.assert_close(pair, alignment.pair_loss(unit["hr"], unit["s2"]))
    assert alignment({"s1": features["s1"]}).item() == 0.0
    with pytest.raises(ValueError, match="unknown modalities"):
        alignment({"rgb": features["hr"]})


def test_geo_prototype_loss_decreases_and_prototypes_follow_teacher() -> None:
    torch.manual_seed(0)
    bank = GeoContextPrototypes(GeoContextConfig(lat_bands=2, lon_bins=2, num_prototypes=4), dim=DIM)
    lat, lon = torch.tensor([45.0, -45.0]), torch.tensor([90.0, 90.0])  # two of the four regions
    criterion = GeoPrototypeLoss()
    student_maps = [nn.Parameter(m) for m in _maps(10)]
    teacher_maps = _maps(11)
    first, last = _optimise(lambda: criterion(student_maps, teacher_maps, lat, lon, bank), student_maps)
    assert last < 0.6 * first, (first, last)
    before = bank.prototypes.clone()
    criterion.update_prototypes(bank)
    present = bank.regions(lat, lon)
    absent = [r for r in range(4) if r not in present.tolist()]
    assert not torch.equal(bank.prototypes[present], before[present])
    assert torch.equal(bank.prototypes[absent], before[absent])
    with pytest.raises(RuntimeError, match="no forward"):
        criterion.update_prototypes(bank)


def _view(seed: int, overlap: list[list[float]], modalities: tuple[str, ...] = ("hr", "s2", "s1")) -> dict:
    """Two samples: HR 128 px with S2/S1 4 px (one fusion grid of 4x4), two frames each."""
    g = torch.Generator().manual_seed(seed)
    view = {
        "hr": torch.randn(2, 3, 128, 128, generator=g),
        "s2": torch.randn(2, 2, 10, 4, 4, generator=g),
        "s2_dates": torch.randint(1, 367, (2, 2), generator=g),
        "s2_mask": torch.tensor([[True, False], [True, True]]),
        "s1": torch.randn(2, 2, 2, 4, 4, generator=g),
        "s1_dates": torch.randint(1, 367, (2, 2), generator=g),
        "lat": torch.tensor([48.1, -33.9]),
        "lon": torch.tensor([11.6, 151.2]),
        "overlap": torch.tensor(overlap),
    }
    return {k: v for k, v in view.items() if k.split("_")[0] in modalities + ("lat", "lon", "overlap")}


SMALL = PretrainObjectiveConfig(head=HeadConfig(hidden_dim=64, bottleneck_dim=32, out_dim=128))


def test_objective_end_to_end_on_tiny_preset() -> None:
    torch.manual_seed(0)
    student = SkySense.from_preset("tiny")
    teacher = build_teacher(student)
    objective = SkySensePretrainingObjective(student.config, SMALL)
    views = [_view(1, [[0.0, 0.0, 0.75, 0.75], [0.25, 0.25, 1.0, 1.0]]),
             _view(2, [[0.25, 0.25, 1.0, 1.0], [0.0, 0.0, 0.75, 0.75]])]
    student_out = [student.forward_features(**v) for v in views]
    with torch.no_grad():
        teacher_out = [teacher.forward_features(**v) for v in views]
    total, terms = objective(student_out, teacher_out, views, student.geo_context)
    expected = {f"{level}/{s}" for level in ("pixel", "object", "image") for s in ("hr", "s2", "s1", "fused")}
    assert set(terms) == expected | {"cross_modal", "geo"}
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in terms.values())
    total.backward()
    for name in ("hr_encoder", "s2_encoder", "s1_encoder", "fusion"):
        grads = [p.grad for p in getattr(student, name).parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in objective.teacher_heads.parameters())
    heads_before = [p.clone() for p in objective.teacher_heads.parameters()]
    prototypes_before = student.geo_context.prototypes.clone()
    torch.optim.AdamW([p for p in list(student.parameters()) + list(objective.parameters()) if p.requires_grad],
                      lr=1e-3).step()
    objective.update_prototypes(student.geo_context)
    objective.update_teacher_heads(0.9)
    ema_update(teacher, student, 0.9)
    assert not torch.equal(student.geo_context.prototypes, prototypes_before)
    assert torch.equal(teacher.geo_context.prototypes, student.geo_context.prototypes)
    assert any(not torch.equal(a, b) for a, b in zip(objective.teacher_heads.parameters(), heads_before))


def test_objective_uses_only_the_sources_present() -> None:
    torch.manual_seed(0)
    student = SkySense.from_preset("tiny")
    teacher = build_teacher(student)
    objective = SkySensePretrainingObjective(student.config, SMALL)
    views = [_view(seed, [[0.0, 0.0, 1.0, 1.0]] * 2, modalities=("s2",)) for seed in (3, 4)]
    student_out = [student.forward_features(**v) for v in views]
    with torch.no_grad():
        teacher_out = [teacher.forward_features(**v) for v in views]
    total, terms = objective(student_out, teacher_out, views)  # no prototype bank: no geo term
    assert set(terms) == {f"{level}/{s}" for level in ("pixel", "object", "image") for s in ("s2", "fused")}
    total.backward()
    assert all(p.grad is None for p in student.hr_encoder.parameters())
    assert any(p.grad is not None for p in student.s2_encoder.parameters())


def test_pretraining_model_keeps_teacher_in_eval_mode():
    from skysense.pretrain.config import PretrainConfig
    from skysense.pretrain.model import PretrainingModel

    module = PretrainingModel(PretrainConfig.from_dict({"preset": "tiny"}))
    module.train()
    assert module.student.training and module.objective.training
    assert not any(m.training for m in module.teacher.modules())
