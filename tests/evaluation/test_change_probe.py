"""The frozen-feature change probe: pixel sampling, threshold choice and an end-to-end run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from skysense.evaluation.change_probe import best_threshold, change_probe, s2_feature_map, sample_pixel_features
from skysense.models import SkySense


def test_pixel_features_equal_bilinear_upsampling() -> None:
    torch.manual_seed(0)
    diff = torch.randn(5, 6, 7)
    patch = 4
    full = F.interpolate(diff[None], scale_factor=patch, mode="bilinear", align_corners=False)[0]
    rows = torch.tensor([0, 3, 10, 23, 17])
    cols = torch.tensor([0, 27, 5, 14, 1])
    got = sample_pixel_features(diff, rows, cols, patch)
    torch.testing.assert_close(got, full[:, rows, cols].T, atol=1e-5, rtol=1e-5)


def test_best_threshold_maximises_f1() -> None:
    prob = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.2, 0.1])
    truth = torch.tensor([True, True, False, True, False, False])
    threshold, f1 = best_threshold(prob, truth)
    # Predicting the top 4 as change: tp 3, fp 1, fn 0 -> F1 6/7, better than the top 2 (4/5).
    assert abs(threshold - 0.6) < 1e-6
    assert abs(f1 - 6 / 7) < 1e-6


def test_feature_map_stitches_windows_like_one_pass() -> None:
    torch.manual_seed(0)
    model = SkySense.from_preset("tiny").eval()
    s2 = torch.randn(2, 10, 40, 72)
    with torch.inference_mode():
        stitched = s2_feature_map(model, s2, tile=8)
        first_window = model.encode_frames("s2", s2[:, None, :, :8, :8], torch.ones(2, 1, dtype=torch.bool))[:, 0]
    assert stitched.shape == (2, model.config.s2.embed_dim, 10, 18)
    torch.testing.assert_close(stitched[..., :2, :2], first_window)


def _scene(seed: int, size: int = 48) -> dict:
    g = torch.Generator().manual_seed(seed)
    before = torch.rand(10, size, size, generator=g) * 3000
    after = before + torch.randn(10, size, size, generator=g) * 30
    mask = torch.zeros(size, size, dtype=torch.int64)
    y0, x0 = (torch.randint(0, size - 16, (2,), generator=g)).tolist()
    mask[y0:y0 + 16, x0:x0 + 16] = 1
    after[:, mask.bool()] = 6000.0  # a new bright surface
    return {"id": f"scene{seed}", "s2": torch.stack([before, after]), "s2_mask": torch.ones(2, dtype=torch.bool), "mask": mask}


def test_change_probe_finds_a_strong_change() -> None:
    torch.manual_seed(0)
    model = SkySense.from_preset("tiny")
    train = [_scene(i) for i in range(3)]
    test = [_scene(10 + i) for i in range(2)]
    result = change_probe(model, train, test, tile=16, train_pixels=3000, weight_decays=(1e-3,), progress=False)
    assert result.f1 > 0.8, result
    assert set(result.per_scene_f1) == {"scene10", "scene11"}
    assert result.test_pixels == 2 * 48 * 48
    assert model.training  # mode restored


@pytest.mark.slow
def test_change_probe_command_on_real_oscd(data_root, capsys) -> None:
    import json

    from skysense.cli import main

    assert main(["evaluate", "change-probe", "--data-root", str(data_root / "oscd"), "--preset", "tiny",
                 "--random-init", "--tile", "32", "--train-pixels", "3000", "--threads", "1", "--no-progress",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["per_scene_f1"]) == {"paris", "pisa", "rennes", "saclay_e"}
    assert 0.0 <= report["f1"] <= 1.0 and report["train_pixels"] > 2900
