"""Downstream metrics, defined as the SkySense paper's tables report them.

Every dense metric is computed from one confusion matrix accumulated over the whole evaluation
set (not averaged per image), rows = reference class, columns = predicted class, pixels whose
reference is ``ignore_index`` (-1, :data:`skysense.data.sample.IGNORE_INDEX`) left out:

* **OA** (overall accuracy): trace / total. Scene classification (AID, RESISC-45, fMoW) uses
  the same definition on per-image predictions (:func:`topk_accuracy` with ``k=1``).
* **IoU** of class c: ``TP / (TP + FP + FN)``; **mIoU**: mean over the classes whose union is
  non-zero (a class absent from both reference and prediction has no IoU and is left out; a
  class predicted but never present counts with IoU 0). This is mmsegmentation's and
  torchmetrics' ``MulticlassJaccardIndex(average="macro")`` convention.
* **F1** of class c: ``2 TP / (2 TP + FP + FN)``; **mF1**: mean over the classes with a non-zero
  denominator, optionally restricted to a list of classes (ISPRS Potsdam results are often
  given over the five classes without *clutter*; pass ``classes`` for that).
* **Means over a subset** (:func:`segmentation_scores` with ``excluded_classes``): ``mf1_excluding``
  and ``miou_excluding`` average the per-class F1 / IoU of the other classes, read from the same
  matrix: pixels of an excluded class still count (a car predicted as clutter is a false
  negative of *car*; clutter predicted as a car a false positive), only the excluded classes'
  own scores leave the mean. This is how the ISPRS Potsdam / Vaihingen mF1 of the SkySense
  paper and the works it compares with are reported (5 classes, clutter excluded).
* **change F1** (LEVIR-CD, DSIFN, OSCD): F1 of the *change* class (1) of the binary matrix,
  with its precision, recall and IoU.
* **mAP** (multi-label, BigEarthNet): macro mean over classes of the average precision, from
  :func:`skysense.evaluation.linear_probe.mean_average_precision`.
* **SCS** (semantic change segmentation score, DynamicEarthNet; Toker et al., CVPR 2022,
  checked against the authors' evaluation code ``codalab_eval/semantic_change_segmentation.py``
  in github.com/aysim/dynnet): ``SCS = (BC + SC) / 2`` with

  - **BC** (binary change): IoU of the *change* class between the reference change map and the
    predicted change map, over all evaluated pixels;
  - **SC** (semantic change): mIoU of the semantic classes of the *later* date, counted only on
    pixels whose reference changed; the mean runs over the classes present in the reference on
    those pixels (a class only predicted there adds nothing to the mean).

  Here pixels with an unknown reference change (``ignore_index``, e.g. either date unlabelled)
  are left out of both terms; the authors' code has no ignore value for the binary term.

Scores are fractions in [0, 1] (the paper prints percentages).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from skysense.data.sample import IGNORE_INDEX
from skysense.evaluation.linear_probe import mean_average_precision

__all__ = ["confusion_matrix", "ConfusionMatrix", "overall_accuracy", "per_class_iou", "mean_iou",
           "per_class_f1", "mean_f1", "change_scores", "kept_classes", "segmentation_scores", "SemanticChangeScore",
           "topk_accuracy", "mean_average_precision"]


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(K, K) int64 counts, rows = ``target`` class, columns = ``pred`` class.

    Args:
        pred: predicted class indices, any shape.
        target: reference class indices, the shape of ``pred``; ``ignore_index`` pixels skipped.

    Raises:
        ValueError: shapes differ, or a class index lies outside ``[0, num_classes)``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"confusion matrix: prediction shape {tuple(pred.shape)} differs from target "
                         f"shape {tuple(target.shape)}")
    if num_classes < 1:
        raise ValueError(f"confusion matrix: num_classes: expected >= 1, got {num_classes}")
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    for name, values in (("target", t), ("prediction", p)):
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= num_classes):
            raise ValueError(f"confusion matrix: {name} class indices: expected 0..{num_classes - 1} "
                             f"(or {ignore_index} = ignore in the target), got {int(values.min())}..{int(values.max())}")
    counts = torch.bincount((t * num_classes + p).flatten().cpu(), minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


class ConfusionMatrix:
    """Accumulates :func:`confusion_matrix` over batches."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.matrix += confusion_matrix(pred, target, self.num_classes, self.ignore_index)


def _check_matrix(cm: torch.Tensor) -> torch.Tensor:
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix: expected a square (K, K) matrix, got shape {tuple(cm.shape)}")
    return cm.double()


def overall_accuracy(cm: torch.Tensor) -> float:
    """Correct / counted; NaN when nothing was counted."""
    cm = _check_matrix(cm)
    total = cm.sum()
    return float(cm.diagonal().sum() / total) if total > 0 else float("nan")


def per_class_iou(cm: torch.Tensor) -> torch.Tensor:
    """(K,) float64 ``TP / (TP + FP + FN)``; NaN where the class is in neither reference nor prediction."""
    cm = _check_matrix(cm)
    tp = cm.diagonal()
    union = cm.sum(0) + cm.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


def mean_iou(cm: torch.Tensor, classes: Sequence[int] | None = None) -> float:
    """Mean of :func:`per_class_iou` over ``classes`` (default all) that have one."""
    iou = per_class_iou(cm)
    if classes is not None:
        iou = iou[list(classes)]
    return float(iou.nanmean())


def per_class_f1(cm: torch.Tensor) -> torch.Tensor:
    """(K,) float64 ``2 TP / (2 TP + FP + FN)``; NaN where the denominator is zero."""
    cm = _check_matrix(cm)
    tp = cm.diagonal()
    denominator = cm.sum(0) + cm.sum(1)
    return torch.where(denominator > 0, 2 * tp / denominator.clamp_min(1), torch.full_like(tp, float("nan")))


def mean_f1(cm: torch.Tensor, classes: Sequence[int] | None = None) -> float:
    """Mean of :func:`per_class_f1` over ``classes`` (default all) that have one."""
    f1 = per_class_f1(cm)
    if classes is not None:
        f1 = f1[list(classes)]
    return float(f1.nanmean())


def change_scores(cm: torch.Tensor) -> dict[str, float]:
    """F1, precision, recall and IoU of the change class (1) of a 2 x 2 matrix, and OA.

    Precision (recall) is 0 when nothing was predicted (present) as change; F1 is 0 when both
    are 0 (the usual change-detection reporting, so an empty prediction scores 0, not NaN).
    """
    cm = _check_matrix(cm)
    if cm.shape != (2, 2):
        raise ValueError(f"change scores: expected a 2 x 2 (no change, change) matrix, got {tuple(cm.shape)}")
    tp, fp, fn = cm[1, 1], cm[0, 1], cm[1, 0]
    precision = float(tp / (tp + fp)) if tp + fp > 0 else 0.0
    recall = float(tp / (tp + fn)) if tp + fn > 0 else 0.0
    f1 = float(2 * tp / (2 * tp + fp + fn)) if tp > 0 else 0.0
    iou = float(tp / (tp + fp + fn)) if tp > 0 else 0.0
    return {"f1": f1, "precision": precision, "recall": recall, "iou": iou, "oa": overall_accuracy(cm)}


def kept_classes(num_classes: int, excluded: Sequence[int]) -> list[int]:
    """``0..num_classes-1`` without ``excluded``.

    Raises:
        ValueError: an excluded index outside ``[0, num_classes)``, or every class excluded.
    """
    bad = sorted({int(c) for c in excluded if not 0 <= int(c) < num_classes})
    if bad:
        raise ValueError(f"excluded classes: indices {bad} outside 0..{num_classes - 1}")
    kept = [c for c in range(num_classes) if c not in {int(e) for e in excluded}]
    if not kept:
        raise ValueError(f"excluded classes: all {num_classes} classes excluded, nothing left to average")
    return kept


def segmentation_scores(cm: torch.Tensor, class_names: Sequence[str] | None = None,
                        f1_classes: Sequence[int] | None = None,
                        excluded_classes: Sequence[int] | None = None) -> dict[str, object]:
    """OA, mIoU, mF1 and per-class IoU / F1 (keyed by ``class_names`` when given) of a matrix.

    With ``excluded_classes`` (class indices, non-empty) also ``mf1_excluding`` and
    ``miou_excluding``, the means over the other classes (module docstring), and
    ``excluded_classes`` (their names); ``mf1`` and ``miou`` stay over all classes.
    """
    iou, f1 = per_class_iou(cm), per_class_f1(cm)
    names = list(class_names) if class_names is not None else [str(i) for i in range(cm.shape[0])]
    if len(names) != cm.shape[0]:
        raise ValueError(f"segmentation scores: {len(names)} class names for a {cm.shape[0]}-class matrix")

    def finite(x: float) -> float | None:
        return None if x != x else x

    scores: dict[str, object] = {
        "oa": overall_accuracy(cm),
        "miou": mean_iou(cm),
        "mf1": mean_f1(cm, f1_classes),
    }
    if excluded_classes:
        kept = kept_classes(cm.shape[0], excluded_classes)
        scores["mf1_excluding"] = finite(mean_f1(cm, kept))
        scores["miou_excluding"] = finite(mean_iou(cm, kept))
        scores["excluded_classes"] = [names[c] for c in sorted({int(e) for e in excluded_classes})]
    scores.update({
        "iou_per_class": {n: finite(float(v)) for n, v in zip(names, iou)},
        "f1_per_class": {n: finite(float(v)) for n, v in zip(names, f1)},
        "pixels": int(cm.sum()),
    })
    return scores


class SemanticChangeScore:
    """SCS = (BC + SC) / 2 of DynamicEarthNet, accumulated over the evaluation set (module docstring)."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.binary = torch.zeros(2, 2, dtype=torch.int64)
        self.semantic = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, change_target: torch.Tensor, change_pred: torch.Tensor, semantic_target: torch.Tensor,
               semantic_pred: torch.Tensor) -> None:
        """Add one batch.

        Args:
            change_target: reference change map (1 change, 0 no change, ``ignore_index`` unknown).
            change_pred: predicted change map (0/1), same shape.
            semantic_target: reference classes of the later date, same shape (``ignore_index``
                allowed where unlabelled).
            semantic_pred: predicted classes of the later date, same shape.
        """
        shapes = {tuple(t.shape) for t in (change_target, change_pred, semantic_target, semantic_pred)}
        if len(shapes) != 1:
            raise ValueError(f"semantic change score: inputs must share one shape, got {sorted(shapes)}")
        known = change_target != self.ignore_index
        self.binary += confusion_matrix(change_pred.long(), change_target, 2, self.ignore_index)
        changed = known & (change_target == 1)
        self.semantic += confusion_matrix(semantic_pred[changed], semantic_target[changed], self.num_classes,
                                          self.ignore_index)

    def compute(self) -> dict[str, float]:
        """``{"bc", "sc", "scs"}``; SC is 0 when no reference pixel changed."""
        tp = self.binary[1, 1].double()
        union = tp + self.binary[0, 1] + self.binary[1, 0]
        bc = float(tp / union) if union > 0 else 0.0
        cm = self.semantic.double()
        present = cm.sum(1) > 0
        tp_c = cm.diagonal()
        iou = tp_c / (cm.sum(0) + cm.sum(1) - tp_c).clamp_min(1)
        sc = float(iou[present].mean()) if bool(present.any()) else 0.0
        return {"bc": bc, "sc": sc, "scs": 0.5 * (bc + sc)}


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Fraction of samples whose label is among the ``k`` highest-scoring classes (top-1 = OA)."""
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"top-k accuracy: expected logits (N, K) and labels (N,), got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"top-k accuracy: k must be in 1..{logits.shape[1]}, got {k}")
    top = logits.topk(k, dim=1).indices
    return float((top == labels[:, None]).any(dim=1).double().mean())
