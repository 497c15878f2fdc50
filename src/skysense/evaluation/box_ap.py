"""Average precision of box detections, as PASCAL VOC defines it (DIOR's mAP50, DOTA's mAP).

For each class, over the whole split: detections sorted by score (highest first; ties keep the
order they were given in), each matched to the not-yet-matched ground-truth box of its image
and class with which it overlaps most; IoU at least ``iou_threshold`` (0.5) makes it a true
positive, otherwise (or when that box was already taken) a false positive. A detection whose
best box is flagged *difficult* counts as neither, and difficult boxes are not among the
positives to recall (the VOC protocol). Precision and recall along the ranking give:

* ``map50``: the area under the precision envelope (VOC 2010 onwards; mmdetection's ``area``
  mode), the mean over classes with at least one non-difficult box in the split;
* ``map50_11point``: the VOC 2007 variant, the mean of the best precision at recall 0, 0.1, ..., 1.

With ``oriented=True`` boxes are (N, 8) corners and the IoU is that of the quadrilaterals
(:func:`skysense.downstream.rotated_boxes.quad_iou`), as DOTA's evaluation kit computes it on
polygons. A class with boxes but no detections has AP 0; a class without boxes is left out of the means
and reported as None. Coordinates are continuous (no "+1" pixel convention): box areas are
``(x1 - x0) * (y1 - y0)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) intersection over union of (N, 4) and (M, 4) boxes x0, y0, x1, y1."""
    area_a = (a[:, 2] - a[:, 0]).clamp_min(0) * (a[:, 3] - a[:, 1]).clamp_min(0)
    area_b = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp_min(0).prod(dim=2)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))


def average_precision(recall: torch.Tensor, precision: torch.Tensor, eleven_point: bool = False) -> float:
    """AP of one ranking's recall and precision (ascending recall), area or 11-point (module docstring)."""
    recall, precision = recall.double(), precision.double()
    if eleven_point:
        total = 0.0
        for t in torch.linspace(0, 1, 11, dtype=torch.float64):
            reached = precision[recall >= t - 1e-12]
            total += float(reached.max()) if reached.numel() else 0.0
        return total / 11
    r = torch.cat([recall.new_zeros(1), recall, recall.new_ones(1)])
    p = torch.cat([precision.new_zeros(1), precision, precision.new_zeros(1)])
    p = torch.flip(torch.cummax(torch.flip(p, [0]), 0).values, [0])  # the envelope
    steps = torch.nonzero(r[1:] != r[:-1]).flatten()
    return float(((r[steps + 1] - r[steps]) * p[steps + 1]).sum())


class BoxAveragePrecision:
    """Accumulates detections and ground truth image by image; :meth:`compute` gives the APs."""

    def __init__(self, num_classes: int, iou_threshold: float = 0.5,
                 class_names: Sequence[str] | None = None, oriented: bool = False) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes: expected >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names: {len(class_names)} names for {num_classes} classes")
        self.num_classes, self.iou_threshold = num_classes, iou_threshold
        self.width = 8 if oriented else 4
        if oriented:
            from skysense.downstream.rotated_boxes import quad_iou

            self.iou = quad_iou
        else:
            self.iou = box_iou
        self.class_names = tuple(class_names) if class_names else tuple(str(k) for k in range(num_classes))
        # Per class: (score, is_true_positive, is_ignored) of every detection; positives to recall.
        self.scores: list[list[torch.Tensor]] = [[] for _ in range(num_classes)]
        self.true: list[list[torch.Tensor]] = [[] for _ in range(num_classes)]
        self.ignored: list[list[torch.Tensor]] = [[] for _ in range(num_classes)]
        self.positives = [0] * num_classes
        self.images = 0

    def update(self, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, gt_boxes: torch.Tensor,
               gt_labels: torch.Tensor, gt_difficult: torch.Tensor | None = None) -> None:
        """One image: detections ``boxes`` (N, 4) (or (N, 8) corners when oriented), ``scores``
        (N,), ``labels`` (N,) and its ground truth ``gt_boxes``, ``gt_labels`` (M,),
        ``gt_difficult`` (M,) bool."""
        kind = "(N, 8) corners" if self.width == 8 else "(N, 4) horizontal boxes"
        for name, value in (("boxes", boxes), ("gt_boxes", gt_boxes)):
            if value.ndim != 2 or value.shape[1] != self.width:
                raise ValueError(f"{name}: expected {kind}, got shape {tuple(value.shape)}")
        if scores.shape != (boxes.shape[0],) or labels.shape != (boxes.shape[0],):
            raise ValueError(f"scores / labels: expected ({boxes.shape[0]},) each, got {tuple(scores.shape)} and "
                             f"{tuple(labels.shape)}")
        if gt_labels.shape != (gt_boxes.shape[0],):
            raise ValueError(f"gt_labels: expected ({gt_boxes.shape[0]},), got {tuple(gt_labels.shape)}")
        for name, value in (("labels", labels), ("gt_labels", gt_labels)):
            if value.numel() and (int(value.min()) < 0 or int(value.max()) >= self.num_classes):
                raise ValueError(f"{name}: class indices must lie in 0..{self.num_classes - 1}, got "
                                 f"{int(value.min())}..{int(value.max())}")
        difficult = (torch.zeros(gt_boxes.shape[0], dtype=torch.bool) if gt_difficult is None
                     else gt_difficult.bool().cpu())
        boxes, scores, labels = boxes.detach().float().cpu(), scores.detach().float().cpu(), labels.cpu()
        gt_boxes, gt_labels = gt_boxes.detach().float().cpu(), gt_labels.cpu()
        self.images += 1
        for k in range(self.num_classes):
            gt = gt_labels == k
            self.positives[k] += int((gt & ~difficult).sum())
            mine = labels == k
            if not mine.any():
                continue
            det_scores = scores[mine]
            order = torch.argsort(det_scores, descending=True, stable=True)
            det_boxes, det_scores = boxes[mine][order], det_scores[order]
            true = torch.zeros(det_scores.shape[0], dtype=torch.bool)
            ignored = torch.zeros_like(true)
            if gt.any():
                overlaps = self.iou(det_boxes, gt_boxes[gt])
                hard = difficult[gt]
                taken = torch.zeros(overlaps.shape[1], dtype=torch.bool)
                best, index = overlaps.max(dim=1)
                for d in range(det_scores.shape[0]):
                    if best[d] < self.iou_threshold:
                        continue
                    j = int(index[d])
                    if hard[j]:
                        ignored[d] = True
                    elif not taken[j]:
                        true[d], taken[j] = True, True
            self.scores[k].append(det_scores)
            self.true[k].append(true)
            self.ignored[k].append(ignored)

    def class_ap(self, k: int, eleven_point: bool = False) -> float | None:
        """AP of class ``k``; None when the split holds no non-difficult box of it."""
        if self.positives[k] == 0:
            return None
        if not self.scores[k]:
            return 0.0
        scores = torch.cat(self.scores[k])
        order = torch.argsort(scores, descending=True, stable=True)
        kept = ~torch.cat(self.ignored[k])[order]
        true = torch.cat(self.true[k])[order][kept].double()
        tp = torch.cumsum(true, 0)
        fp = torch.cumsum(1 - true, 0)
        recall = tp / self.positives[k]
        precision = tp / (tp + fp).clamp_min(torch.finfo(torch.float64).eps)
        return average_precision(recall, precision, eleven_point)

    def compute(self) -> dict[str, Any]:
        """``map50``, ``map50_11point``, ``ap50_per_class`` (name -> AP or None), counts."""
        area = [self.class_ap(k) for k in range(self.num_classes)]
        eleven = [self.class_ap(k, eleven_point=True) for k in range(self.num_classes)]
        scored = [a for a in area if a is not None]
        return {
            "map50": sum(scored) / len(scored) if scored else float("nan"),
            "map50_11point": (sum(a for a in eleven if a is not None) / len(scored)) if scored else float("nan"),
            "ap50_per_class": dict(zip(self.class_names, area)),
            "classes_scored": len(scored),
            "objects": sum(self.positives),
            "images": self.images,
        }
