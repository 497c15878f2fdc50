"""Downstream metrics against hand-computed examples and torchmetrics."""

from __future__ import annotations

import math

import pytest
import torch

from skysense.evaluation.metrics import (
    ConfusionMatrix,
    SemanticChangeScore,
    change_scores,
    confusion_matrix,
    mean_f1,
    mean_iou,
    overall_accuracy,
    per_class_f1,
    per_class_iou,
    segmentation_scores,
    topk_accuracy,
)

# Eight pixels, one ignored (-1). Kept pairs (target, pred): (0,0) (1,0) (1,1) (1,1) (2,2) (0,2) (2,1).
PRED = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
TARGET = torch.tensor([0, 1, 1, 1, 2, 0, -1, 2])
HAND_MATRIX = [[1, 0, 1], [1, 2, 0], [0, 1, 1]]


def test_confusion_matrix_by_hand_skips_ignored_pixels():
    cm = confusion_matrix(PRED, TARGET, 3)
    assert cm.tolist() == HAND_MATRIX
    assert cm.dtype == torch.int64


def test_scores_by_hand():
    cm = torch.tensor(HAND_MATRIX)
    assert overall_accuracy(cm) == pytest.approx(4 / 7)
    assert per_class_iou(cm).tolist() == pytest.approx([1 / 3, 1 / 2, 1 / 3])
    assert mean_iou(cm) == pytest.approx(7 / 18)
    assert per_class_f1(cm).tolist() == pytest.approx([1 / 2, 2 / 3, 1 / 2])
    assert mean_f1(cm) == pytest.approx(5 / 9)
    assert mean_f1(cm, classes=[0, 1]) == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_absent_class_is_left_out_of_the_means():
    # Class 3 is in neither reference nor prediction: no IoU/F1; class 2 only predicted: IoU 0.
    cm = torch.tensor([[2, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    iou = per_class_iou(cm)
    assert math.isnan(iou[3]) and iou[2] == 0
    assert mean_iou(cm) == pytest.approx((2 / 3 + 1 + 0) / 3)
    scores = segmentation_scores(cm, ["a", "b", "c", "d"])
    assert scores["iou_per_class"]["d"] is None and scores["pixels"] == 4


def test_change_scores_by_hand():
    target = torch.tensor([0, 0, 1, 1, 1, 0, -1])
    pred = torch.tensor([0, 1, 1, 0, 1, 0, 1])
    scores = change_scores(confusion_matrix(pred, target, 2))  # TP 2, FP 1, FN 1, TN 2
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)
    assert scores["iou"] == pytest.approx(1 / 2)
    assert scores["oa"] == pytest.approx(4 / 6)
    empty = change_scores(confusion_matrix(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 0, 1]), 2))
    assert empty["f1"] == 0.0 and empty["precision"] == 0.0 and empty["recall"] == 0.0


def test_semantic_change_score_by_hand():
    # Binary (pixel 5 unknown): TP 2, FN 1, FP 1 -> BC = 2 / 4. Changed reference pixels 0..2:
    # classes (2, 0, 2) predicted (2, 0, 1): IoU class 0 = 1, class 2 = 1/2; class 1 is only
    # predicted, so (as in the DynamicEarthNet evaluation code) it is not in the mean: SC = 3/4.
    metric = SemanticChangeScore(num_classes=3)
    metric.update(change_target=torch.tensor([1, 1, 1, 0, 0, -1]), change_pred=torch.tensor([1, 0, 1, 1, 0, 1]),
                  semantic_target=torch.tensor([2, 0, 2, 1, 1, 1]), semantic_pred=torch.tensor([2, 0, 1, 0, 0, 0]))
    result = metric.compute()
    assert result["bc"] == pytest.approx(0.5)
    assert result["sc"] == pytest.approx(0.75)
    assert result["scs"] == pytest.approx(0.625)
    # Accumulates: the same batch again leaves every ratio unchanged.
    metric.update(torch.tensor([1, 1, 1, 0, 0, -1]), torch.tensor([1, 0, 1, 1, 0, 1]),
                  torch.tensor([2, 0, 2, 1, 1, 1]), torch.tensor([2, 0, 1, 0, 0, 0]))
    assert metric.compute() == pytest.approx(result)
    assert metric.binary.sum() == 10


def test_topk_accuracy_by_hand():
    logits = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([2, 0, 0])
    assert topk_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(logits, labels, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(logits, labels, 3) == 1.0


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="prediction shape"):
        confusion_matrix(torch.zeros(3), torch.zeros(4), 2)
    with pytest.raises(ValueError, match="target class indices"):
        confusion_matrix(torch.zeros(2, dtype=torch.long), torch.tensor([0, 5]), 3)
    with pytest.raises(ValueError, match="prediction class indices"):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="2 x 2"):
        change_scores(torch.eye(3, dtype=torch.long))
    with pytest.raises(ValueError, match="k must be"):
        topk_accuracy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 4)


def test_accumulated_matrix_equals_one_shot():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randint(0, 4, (2, 50, 50), generator=g), torch.randint(-1, 4, (2, 50, 50), generator=g)
    acc = ConfusionMatrix(4)
    acc.update(pred[0], target[0])
    acc.update(pred[1], target[1])
    assert torch.equal(acc.matrix, confusion_matrix(pred, target, 4))


def test_agrees_with_torchmetrics():
    tm = pytest.importorskip("torchmetrics.functional.classification")
    g = torch.Generator().manual_seed(1)
    target = torch.randint(-1, 5, (4000,), generator=g)
    pred = torch.where(torch.rand(4000, generator=g) < 0.6, target.clamp_min(0), torch.randint(0, 5, (4000,), generator=g))
    cm = confusion_matrix(pred, target, 5)
    assert mean_iou(cm) == pytest.approx(float(tm.multiclass_jaccard_index(pred, target, 5, average="macro",
                                                                           ignore_index=-1)), abs=1e-6)
    assert mean_f1(cm) == pytest.approx(float(tm.multiclass_f1_score(pred, target, 5, average="macro",
                                                                     ignore_index=-1)), abs=1e-6)
    assert overall_accuracy(cm) == pytest.approx(float(tm.multiclass_accuracy(pred, target, 5, average="micro",
                                                                              ignore_index=-1)), abs=1e-6)
    binary_t, binary_p = (target.clamp_min(0) > 2).long(), (pred > 2).long()
    scores = change_scores(confusion_matrix(binary_p, binary_t, 2))
    assert scores["f1"] == pytest.approx(float(tm.binary_f1_score(binary_p, binary_t)), abs=1e-6)
    assert scores["iou"] == pytest.approx(float(tm.binary_jaccard_index(binary_p, binary_t)), abs=1e-6)
    logits = torch.randn(300, 10, generator=g)
    labels = torch.randint(0, 10, (300,), generator=g)
    assert topk_accuracy(logits, labels, 5) == pytest.approx(
        float(tm.multiclass_accuracy(logits, labels, 10, top_k=5, average="micro")), abs=1e-6)
