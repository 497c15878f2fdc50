"""Multi-crop (DINO-style local views): view geometry and sizes, the two views unchanged by the
local ones, the objective's pairing, and a pretraining run on an HR + S2 + S1 manifest with
local views in every modality."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from skysense.config import preset_config
from skysense.models import SkySense
from skysense.pretrain.config import PretrainConfig
from skysense.pretrain.data import PairMaker, collate_view_pairs
from skysense.pretrain.heads import DINOHead
from skysense.pretrain.image_contrast import InfoNCEImageContrastLoss
from skysense.pretrain.loop import pretrain
from skysense.pretrain.objective import HeadConfig, PretrainObjectiveConfig, SkySensePretrainingObjective
from skysense.pretrain.views import ViewConfig, multimodal_views
from test_multimodal_views import MANIFEST_CONFIG, VIEWS, coordinate_sample, write_manifest

# The tiny ViTs' patch is 4 px, so a local view holding S2/S1 is at least 4 px there and 128 px in HR.
LOCAL = ViewConfig(**{**VIEWS.__dict__, "local_views": 3, "local_hr_size": 128, "local_sentinel_size": 4,
                      "local_crop_scale": (0.2, 0.4)})
HR_LOCAL = ViewConfig(**{**VIEWS.__dict__, "local_views": 3, "local_hr_size": 32, "local_crop_scale": (0.2, 0.4)})


def test_local_views_follow_the_two_views_and_cover_one_ground_in_every_modality() -> None:
    sample = coordinate_sample()
    for seed in range(10):
        two = multimodal_views(sample, VIEWS, torch.Generator().manual_seed(seed))
        views = multimodal_views(sample, LOCAL, torch.Generator().manual_seed(seed))
        assert len(views) == 5
        for a, b in zip(two, views[:2]):  # drawn first: the two views do not depend on local_views
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        for local in views[2:]:
            assert "overlap" not in local
            assert local["hr"].shape == (3, 128, 128)
            assert local["s2"].shape == (3, 10, 4, 4) and local["s1"].shape == (2, 2, 4, 4)
            # Each S2/S1 pixel sees the ground of the 32 x 32 HR pixels it is fused with.
            hr_cells = F.avg_pool2d(local["hr"][None, :2], 32)[0]
            for m in ("s2", "s1"):
                # (within a sixth of a 40 m S2 pixel: a crop of 1.6-3.2 source pixels upsampled to
                # 4, with the edge pixels repeated at the footprint's border)
                torch.testing.assert_close(local[m][:, :2], hr_cells.expand_as(local[m][:, :2]), atol=40 / 6, rtol=0)
            # Side 0.2-0.4 of the 320 m footprint.
            side = float(local["hr"][0].amax() - local["hr"][0].amin()) * 128 / 127  # span of 128 pixel centres
            assert 0.2 * 320 - 3 <= side <= 0.4 * 320 + 3, side


def test_local_views_need_their_own_common_fusion_grid() -> None:
    config = preset_config("tiny")
    bad = ViewConfig(hr_size=128, sentinel_size=4, local_views=2, local_hr_size=64, local_sentinel_size=4)
    with pytest.raises(ValueError, match=r"data.local_sentinel_view_size.*data.local_view_size"):
        PairMaker(config, bad).check_grids(["hr", "s2"])
    PairMaker(config, bad).check_grids(["hr"])  # one modality: any size
    with pytest.raises(ValueError, match="local_crop_scale"):
        ViewConfig(local_crop_scale=(0.5, 0.2))


def test_infonce_pairs_local_views_with_both_teacher_views() -> None:
    torch.manual_seed(0)
    head = DINOHead(8, 16, hidden_dim=12, bottleneck_dim=6)
    maps = [torch.randn(4, 8, 2, 2) for _ in range(3)]
    teacher = [torch.randn(4, 8, 2, 2) for _ in range(2)]
    loss = InfoNCEImageContrastLoss(temperature=0.2)
    with torch.no_grad():
        emb = [loss.embed(head, m) for m in maps]
        keys = [loss.embed(head, m) for m in teacher]
        target = torch.arange(4)
        pairs = [F.cross_entropy(emb[a] @ keys[b].T / 0.2, target) for a in range(3) for b in range(2) if a != b]
        expected = torch.stack(pairs).mean()  # 4 pairs: (0, 1), (1, 0), (local, 0), (local, 1)
        torch.testing.assert_close(loss(maps, teacher, head, head), expected)
        assert len(pairs) == 4
    with pytest.raises(ValueError, match="keys='student' takes exactly two views"):
        InfoNCEImageContrastLoss(keys="student")(maps, teacher, head, head)


def test_objective_uses_local_views_at_the_image_level_only() -> None:
    config = preset_config("tiny")
    objective = SkySensePretrainingObjective(config, PretrainObjectiveConfig(
        head=HeadConfig(hidden_dim=32, bottleneck_dim=16, out_dim=32), image_loss="infonce", object_weight=0.0))
    objective.eval()  # no centre updates: the two calls below see the same state
    model = SkySense(config)
    sample = coordinate_sample()
    views = collate_view_pairs([tuple(multimodal_views({"hr": sample["hr"]}, HR_LOCAL, torch.Generator().manual_seed(s)))
                                for s in range(2)])
    with torch.no_grad():
        outputs = [model.forward_features(hr=v["hr"]) for v in views]
        total, terms = objective(outputs, outputs[:2], views)
        _, two_terms = objective(outputs[:2], outputs[:2], views[:2])
    assert terms["pixel/hr"] == two_terms["pixel/hr"]  # dense terms: the two views only
    assert terms["image/hr"] != two_terms["image/hr"]  # image level: the local views too
    assert torch.isfinite(total)
    with pytest.raises(ValueError, match="two views"):
        objective(outputs, outputs, views)


@pytest.mark.slow
def test_pretraining_with_local_views_on_hr_s2_s1_manifest(tmp_path: Path) -> None:
    root = write_manifest(tmp_path / "data")
    config = PretrainConfig.from_dict({
        **MANIFEST_CONFIG,
        "data": {**MANIFEST_CONFIG["data"], "local_views": 2, "local_view_size": 128, "local_crop_scale": [0.2, 0.4]},
        "objective": {**MANIFEST_CONFIG["objective"], "image_loss": "infonce"},
    })
    assert config.data.view_config(preset_config("tiny")).local_sentinel_size == 4
    rows = pretrain(config, tmp_path / "run", data_root=str(root), progress=False)
    assert [r["step"] for r in rows] == [0, 1]
    assert all(np.isfinite(v) for r in rows for v in r.values())
    assert {"image/hr", "image/s2", "image/fused", "cross_modal", "geo"} <= set().union(*rows)
