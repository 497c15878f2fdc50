"""InfoNCE image-level contrast (selectable image_loss) and the optional view augmentations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from skysense import SkySense
from skysense.pretrain import HeadConfig, PretrainObjectiveConfig, SkySensePretrainingObjective, build_teacher
from skysense.pretrain.heads import DINOHead
from skysense.pretrain.image_contrast import InfoNCEImageContrastLoss
from skysense.pretrain.views import ViewAugment, two_views

DIM = 16


def _maps(seed: int, shape: tuple[int, ...] = (8, DIM, 3, 3)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(2)]


@pytest.mark.parametrize("keys", ["teacher", "student"])
def test_infonce_image_loss_decreases_on_a_fixed_batch(keys: str) -> None:
    torch.manual_seed(0)
    student_head = DINOHead(DIM, 32, hidden_dim=32, bottleneck_dim=16)
    teacher_head = build_teacher(student_head)
    criterion = InfoNCEImageContrastLoss(temperature=0.2, keys=keys)
    student_maps = [nn.Parameter(m) for m in _maps(1)]
    teacher_maps = _maps(2)
    params = student_maps + list(student_head.parameters())
    optimiser = torch.optim.Adam(params, lr=0.02)
    losses = []
    for _ in range(60):
        loss = criterion(student_maps, teacher_maps, student_head, teacher_head)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    # Chance level is log(B) (teacher keys) or log(2B - 1) (student keys); it must fall well below.
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    assert all(p.grad is None for p in teacher_head.parameters())


def test_infonce_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="keys"):
        InfoNCEImageContrastLoss(keys="queue")
    with pytest.raises(ValueError, match="temperature"):
        InfoNCEImageContrastLoss(temperature=0.0)


def test_objective_with_infonce_skips_zero_weight_levels() -> None:
    torch.manual_seed(0)
    student = SkySense.from_preset("tiny")
    teacher = build_teacher(student)
    config = PretrainObjectiveConfig(head=HeadConfig(hidden_dim=64, bottleneck_dim=32, out_dim=128),
                                     image_loss="infonce", pixel_weight=0.0, object_weight=0.0)
    objective = SkySensePretrainingObjective(student.config, config)
    g = torch.Generator().manual_seed(3)
    views = [{"hr": torch.randn(4, 3, 64, 64, generator=g)} for _ in range(2)]
    student_out = [student.forward_features(**v) for v in views]
    with torch.no_grad():
        teacher_out = [teacher.forward_features(**v) for v in views]
    total, terms = objective(student_out, teacher_out, views)
    assert set(terms) == {"image/hr", "image/fused"}
    assert torch.isfinite(total)
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.hr_encoder.parameters())
    with pytest.raises(ValueError, match="image_loss"):
        SkySensePretrainingObjective(student.config, PretrainObjectiveConfig(image_loss="byol"))


def test_view_augment_off_matches_basic_views_and_is_seeded() -> None:
    image = torch.randn(3, 40, 40, generator=torch.Generator().manual_seed(0))

    def views(augment: ViewAugment | None, seed: int = 5) -> list[dict[str, torch.Tensor]]:
        return two_views(image, 24, (0.4, 1.0), torch.Generator().manual_seed(seed), augment)

    for a, b in zip(views(None), views(ViewAugment())):
        assert torch.equal(a["hr"], b["hr"]) and torch.equal(a["overlap"], b["overlap"])
    strong = ViewAugment(color_jitter_prob=1.0, grayscale_prob=0.5, blur_prob=1.0, blur_sigma=(0.05, 0.1))
    first, again, plain = views(strong), views(strong), views(None)
    for a, b in zip(first, again):
        assert torch.equal(a["hr"], b["hr"]) and torch.equal(a["overlap"], b["overlap"])  # same seed, same views
        assert a["hr"].shape == (3, 24, 24) and torch.isfinite(a["hr"]).all()
    # The first view's geometry is drawn before its photometric augmentation: same crop and box.
    assert torch.equal(first[0]["overlap"], plain[0]["overlap"])
    assert not torch.equal(first[0]["hr"], plain[0]["hr"])
