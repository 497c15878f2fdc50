"""``skysense demo --quick`` end to end on the embedded BigEarthNet examples, and its probe parts."""

from __future__ import annotations

import json

import pytest
import torch

from skysense.demo import leave_one_scene_out_map, probe_crops


def test_probe_crops_grid_and_labels():
    sample = {"s2": torch.arange(1 * 10 * 120 * 120, dtype=torch.float32).reshape(1, 10, 120, 120),
              "s1": torch.zeros(1, 2, 120, 120), "s2_dates": torch.tensor([10]), "s2_mask": torch.tensor([True]),
              "s1_dates": torch.tensor([11]), "s1_mask": torch.tensor([True]), "label": torch.tensor([1, 0, 1])}
    crops, scene = probe_crops([sample, sample])
    assert len(crops) == 18 and scene == [0] * 9 + [1] * 9
    assert crops[4]["s2"].shape == (1, 10, 40, 40)
    assert torch.equal(crops[4]["s2"], sample["s2"][..., 40:80, 40:80])  # the centre crop
    assert torch.equal(crops[0]["label"], sample["label"])


def test_leave_one_scene_out_separable_classes_score_one():
    # Scenes 0-2 carry class 0, scenes 3-5 class 1; the feature says which: a perfect probe.
    scene = [s for s in range(6) for _ in range(3)]
    labels = torch.tensor([[1.0, 0.0] if s < 3 else [0.0, 1.0] for s in scene])
    features = labels @ torch.randn(2, 8) + 0.01 * torch.randn(len(scene), 8)
    assert leave_one_scene_out_map(features, labels, scene) == pytest.approx(1.0)
    # A class in one scene only cannot be scored and is left out; none left is an error.
    with pytest.raises(ValueError, match="two scenes"):
        leave_one_scene_out_map(features, torch.eye(6)[scene], scene)


@pytest.mark.slow
def test_demo_quick_writes_report_and_plots(tmp_path, monkeypatch):
    monkeypatch.setenv("SKYSENSE_CACHE", str(tmp_path / "cache"))
    from skysense.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["all_finite"] is True
    assert report["pretraining"]["steps"] == 4
    for name in ("random init", "pretrained"):
        scores = report["probe"]["scores"][name]
        assert 0.0 <= scores["leave_one_scene_out_mAP"] <= 1.0 and 0.0 <= scores["cross_modal_top1"] <= 1.0
    for name in ("loss_curves.png", "probe.png", "embeddings.safetensors", "pretrain/model.safetensors",
                 "pretrain/config.json", "pretrain/metrics.csv"):
        assert (out / name).is_file(), name
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
