"""ISPRS Potsdam / Vaihingen protocol: mF1 and mIoU also reported without clutter (the paper's 5-class mF1)."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from skysense.cli import main
from skysense.data.datasets.isprs import ISPRS_CLASSES
from skysense.downstream.evaluate import class_indices
from skysense.downstream.registry import REGISTRY
from skysense.evaluation.metrics import kept_classes, per_class_f1, per_class_iou, segmentation_scores

# rows = reference, columns = prediction; classes as ISPRS_CLASSES (5 = clutter)
HAND_MATRIX = torch.tensor([
    [8, 2, 0, 0, 0, 0],  # impervious: 2 pixels taken for building
    [0, 6, 0, 0, 0, 0],
    [0, 0, 4, 0, 0, 0],
    [0, 0, 0, 2, 0, 0],
    [0, 0, 0, 0, 2, 2],  # car: 2 pixels taken for clutter
    [4, 0, 0, 0, 0, 0],  # clutter: all 4 pixels taken for impervious
])
# F1 = 2 TP / (reference + predicted): impervious 16/22, building 12/14, low vegetation 8/8, tree 4/4,
# car 4/6, clutter 0/6. IoU = TP / (reference + predicted - TP): 8/14, 6/8, 1, 1, 2/4, 0.
HAND_F1 = [Fraction(16, 22), Fraction(12, 14), Fraction(1), Fraction(1), Fraction(4, 6), Fraction(0)]
HAND_IOU = [Fraction(8, 14), Fraction(6, 8), Fraction(1), Fraction(1), Fraction(2, 4), Fraction(0)]


def test_hand_computed_means_with_and_without_clutter():
    assert per_class_f1(HAND_MATRIX).tolist() == pytest.approx([float(v) for v in HAND_F1])
    assert per_class_iou(HAND_MATRIX).tolist() == pytest.approx([float(v) for v in HAND_IOU])
    scores = segmentation_scores(HAND_MATRIX, ISPRS_CLASSES, excluded_classes=[5])
    assert scores["mf1"] == pytest.approx(float(sum(HAND_F1) / 6))  # 0.7084
    assert scores["mf1_excluding"] == pytest.approx(float(sum(HAND_F1[:5]) / 5))  # 0.8501
    assert scores["miou"] == pytest.approx(float(sum(HAND_IOU) / 6))
    assert scores["miou_excluding"] == pytest.approx(float(sum(HAND_IOU[:5]) / 5))
    assert scores["excluded_classes"] == ["clutter"]
    # Clutter predicted as impervious still lowers impervious' F1: exclusion is from the mean only.
    assert scores["f1_per_class"]["impervious_surface"] == pytest.approx(16 / 22)
    plain = segmentation_scores(HAND_MATRIX, ISPRS_CLASSES)
    assert not {"mf1_excluding", "miou_excluding", "excluded_classes"} & set(plain)
    assert plain["mf1"] == scores["mf1"]


def test_excluded_class_checks():
    assert kept_classes(6, [5, 5]) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"indices \[6\] outside 0..5"):
        kept_classes(6, [6])
    with pytest.raises(ValueError, match="all 2 classes excluded"):
        kept_classes(2, [0, 1])
    assert class_indices(["clutter", "4", 5], ISPRS_CLASSES, 6) == (4, 5)
    with pytest.raises(ValueError, match=r"unknown class 'cluter'.*5 clutter"):
        class_indices(["cluter"], ISPRS_CLASSES, 6)
    with pytest.raises(ValueError, match="index 9 outside 0..5"):
        class_indices(["9"], ISPRS_CLASSES, 6)


def test_registry_protocols():
    for name in ("potsdam", "vaihingen"):
        entry = REGISTRY[(name, "segmentation")]
        assert entry.excluded_classes == ("clutter",) and entry.metric == "mf1"
        assert set(entry.excluded_classes) <= set(entry.class_names)
    assert all(not e.excluded_classes for (n, _), e in REGISTRY.items() if n not in ("potsdam", "vaihingen"))


@pytest.fixture(scope="module")
def potsdam_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Potsdam model fine-tuned for one step on one 64 px tile in mmsegmentation's flat layout."""
    root = tmp_path_factory.mktemp("potsdam")
    rng = np.random.default_rng(0)
    label = np.repeat(np.arange(1, 7, dtype=np.uint8), 11)[:64][None].repeat(64, 0)  # 6 class stripes
    label[:2] = 0  # no label
    image = (label[..., None] * 40 + rng.integers(0, 30, (64, 64, 3))).clip(0, 255).astype(np.uint8)
    for folder, array in (("img_dir", image), ("ann_dir", label)):
        (root / folder).mkdir()
        Image.fromarray(array).save(root / folder / "2_10_0_0_64_64.png")
    out = root / "run"
    assert main(["finetune", "--task", "segmentation", "--dataset", "potsdam", "--data-root", str(root),
                 "--preset", "tiny", "--out", str(out), "--max-steps", "1", "--batch-size", "1", "--crop-size", "64",
                 "--train-split", "all", "--eval-split", "all", "--decoder-channels", "8", "--threads", "1",
                 "--no-progress"]) == 0
    return out


def _evaluate(run: Path, capsys, *extra: str) -> dict:
    assert main(["evaluate", "segmentation", "--weights", str(run), "--json", "--no-progress", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_reports_mf1_with_and_without_clutter(potsdam_run, capsys):
    report = _evaluate(potsdam_run, capsys)
    cm = torch.tensor(report["confusion_matrix"])
    assert report["pixels"] == 62 * 64 and cm.shape == (6, 6)
    f1 = per_class_f1(cm)
    assert report["mf1"] == pytest.approx(float(f1.nanmean()))
    assert report["mf1_excluding"] == pytest.approx(float(f1[:5].nanmean()))
    assert report["miou_excluding"] == pytest.approx(float(per_class_iou(cm)[:5].nanmean()))
    assert report["excluded_classes"] == ["clutter"] and report["mf1_excluding"] != report["mf1"]

    chosen = _evaluate(potsdam_run, capsys, "--exclude-classes", "4,clutter")
    assert chosen["excluded_classes"] == ["car", "clutter"]
    assert chosen["mf1_excluding"] == pytest.approx(float(f1[:4].nanmean()))
    assert chosen["mf1"] == report["mf1"]
    assert "mf1_excluding" not in _evaluate(potsdam_run, capsys, "--exclude-classes", "none")

    assert main(["evaluate", "segmentation", "--weights", str(potsdam_run), "--no-progress"]) == 0
    line = capsys.readouterr().out
    assert f"mf1_excluding {report['mf1_excluding']:.4f} (excluding clutter)" in line
    assert main(["evaluate", "segmentation", "--weights", str(potsdam_run), "--no-progress",
                 "--exclude-classes", "cluter"]) == 2
    assert "unknown class 'cluter'" in capsys.readouterr().err
