"""Oriented object detection: a Rotated Faster R-CNN on the SkySense HR pyramid.

The SkySense paper reports oriented detection on DIOR-R and FAIR1M without publishing its head.
:class:`OrientedDetectionModel`, the default detector, is the Rotated Faster R-CNN baseline (as
in mmrotate; Oriented R-CNN, ``detector="oriented_rcnn"``, is in
:mod:`skysense.downstream.oriented_rcnn`): the
encoder, FPN and horizontal region proposal network of
:class:`~skysense.downstream.detection.DetectionModel` (trained on the horizontal hulls of the
oriented boxes), RoI-align of the horizontal proposals, and a box head that classifies each RoI
and regresses an oriented box from it (:class:`OrientedRoIHead`).

* Matching: a proposal (the ground-truth hulls are added as proposals in training, as torchvision
  does) is positive for the box whose hull it overlaps most when that IoU is at least 0.5, else
  background; 512 RoIs per image, a quarter positive.
* Regression, from a horizontal proposal (centre px, py, size pw, ph) to a target rectangle
  cx, cy, w, h, angle in the form with angle in [-pi/4, pi/4) (:func:`~skysense.downstream.
  rotated_boxes.regularize`): ``10 (cx - px) / pw, 10 (cy - py) / ph, 5 log(w / pw),
  5 log(h / ph), 10 angle / (2 pi)`` (mmrotate's target standard deviations 0.1, 0.1, 0.2, 0.2,
  0.1, with its angle normalised by 2 pi, ``norm_factor=2``);
  smooth L1 (beta 1/9) summed over positives and divided by the sampled RoIs, as torchvision's
  Faster R-CNN loss.
* Test: class scores above 0.05, the 2,000 best of an image, rotated NMS at IoU 0.1 per class
  (:func:`~skysense.downstream.rotated_boxes.batched_rotated_nms`), at most 2,000 per image (mmrotate's
  settings for DOTA).

``forward(batch)`` takes ``boxes`` as (N, 8) corners and returns the four losses in training
mode, and per image ``boxes`` (N, 5) cx, cy, w, h, angle, ``corners`` (N, 8), ``scores`` and
``labels`` in evaluation mode.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, Matcher
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign, box_iou

from skysense.downstream.boxes import horizontal_boxes
from skysense.downstream.detection import ROI_LEVELS, DetectionModel
from skysense.downstream.rotated_boxes import (batched_rotated_nms, corners_to_rbox, quad_coverage, quad_iou,
                                               rbox_to_corners, regularize)

DELTA_WEIGHTS = (10.0, 10.0, 5.0, 5.0, 10.0)
ANGLE_SCALE = 2 * math.pi
MAX_LOG_SCALE = math.log(1000.0 / 16)
SCORE_THRESHOLD = 0.05
NMS_THRESHOLD = 0.1
CANDIDATES = 2000
DETECTIONS = 2000


def box_frame(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centre x, y and width, height (at least 1e-3) of horizontal ``boxes`` (N, 4)."""
    w = (boxes[:, 2] - boxes[:, 0]).clamp_min(1e-3)
    h = (boxes[:, 3] - boxes[:, 1]).clamp_min(1e-3)
    return boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h, w, h


def encode(rbox: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
    """Regression targets (module docstring) of rectangles ``rbox`` (N, 5) from horizontal ``proposals`` (N, 4)."""
    rbox = regularize(rbox)
    px, py, pw, ph = box_frame(proposals)
    wx, wy, ww, wh, wa = DELTA_WEIGHTS
    return torch.stack([wx * (rbox[:, 0] - px) / pw, wy * (rbox[:, 1] - py) / ph,
                        ww * torch.log(rbox[:, 2].clamp_min(1e-3) / pw), wh * torch.log(rbox[:, 3].clamp_min(1e-3) / ph),
                        wa * rbox[:, 4] / ANGLE_SCALE], dim=1)


def decode(deltas: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
    """Rectangles (N, 5), regularized, from ``deltas`` (N, 5) and horizontal ``proposals`` (N, 4)."""
    px, py, pw, ph = box_frame(proposals)
    wx, wy, ww, wh, wa = DELTA_WEIGHTS
    d = deltas.float()
    return regularize(torch.stack([px + d[:, 0] / wx * pw, py + d[:, 1] / wy * ph,
                                   pw * torch.exp((d[:, 2] / ww).clamp(max=MAX_LOG_SCALE)),
                                   ph * torch.exp((d[:, 3] / wh).clamp(max=MAX_LOG_SCALE)), d[:, 4] / wa * ANGLE_SCALE], dim=1))


class OrientedRoIHead(nn.Module):
    """RoI head of the Rotated Faster R-CNN (module docstring); called like torchvision's ``RoIHeads``.

    Oriented R-CNN's head (:class:`skysense.downstream.oriented_rcnn.OrientedRCNNHead`) is the same
    but for what it pools and regresses from: ``pool`` (called as torchvision's
    ``MultiScaleRoIAlign``), ``class_specific`` boxes, ``target_key`` (the targets' entry that
    proposals are matched with and appended from), :meth:`overlaps`, :meth:`encode_targets` and
    :meth:`decode_deltas`.
    """

    target_key = "boxes"

    def __init__(self, channels: int, num_classes: int, pool: nn.Module | None = None,
                 class_specific: bool = True) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.class_specific = class_specific
        self.pool = pool if pool is not None else MultiScaleRoIAlign(list(ROI_LEVELS), output_size=7, sampling_ratio=2)
        self.box_head = TwoMLPHead(channels * 7 * 7, 1024)
        self.cls_score = nn.Linear(1024, num_classes + 1)
        self.bbox_pred = nn.Linear(1024, (num_classes if class_specific else 1) * 5)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)
        self.matcher = Matcher(0.5, 0.5, allow_low_quality_matches=False)
        self.sampler = BalancedPositiveNegativeSampler(512, 0.25)

    def overlaps(self, truth: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
        """(G, P) IoU of the targets' ``target_key`` boxes and the proposals: horizontal here."""
        return box_iou(truth, proposals)

    def encode_targets(self, rboxes: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
        return encode(rboxes.float(), proposals.float())

    def decode_deltas(self, deltas: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
        return decode(deltas, proposals)

    def sample(self, proposals: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]
               ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Sampled proposals per image (the targets' boxes added), their labels (0: background)
        and regression targets."""
        key = self.target_key
        proposals = [torch.cat([p.detach().float(), t[key].float()]) for p, t in zip(proposals, targets)]
        labels, matches = [], []
        for p, t in zip(proposals, targets):
            if t[key].shape[0] == 0:
                labels.append(torch.zeros(p.shape[0], dtype=torch.long, device=p.device))
                matches.append(None)
                continue
            matched = self.matcher(self.overlaps(t[key].float(), p))
            image_labels = t["labels"][matched.clamp_min(0)]
            labels.append(torch.where(matched >= 0, image_labels, torch.zeros_like(image_labels)))
            matches.append(matched.clamp_min(0))
        positive, negative = self.sampler(labels)
        kept_proposals, kept_labels, kept_targets = [], [], []
        for p, t, image_labels, matched, pos, neg in zip(proposals, targets, labels, matches, positive, negative):
            keep = torch.where(pos | neg)[0]
            kept_proposals.append(p[keep])
            kept_labels.append(image_labels[keep])
            if matched is None:
                kept_targets.append(p.new_zeros((keep.numel(), 5), dtype=torch.float32))
            else:
                kept_targets.append(self.encode_targets(t["rboxes"][matched[keep]], p[keep]))
        return kept_proposals, torch.cat(kept_labels), torch.cat(kept_targets)

    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_sizes: list[tuple[int, int]], targets: list[dict[str, torch.Tensor]] | None = None
                ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        labels = regression = None
        if self.training:
            if targets is None:
                raise ValueError("oriented RoI head: training needs targets")
            proposals, labels, regression = self.sample(proposals, targets)
        x = self.box_head(self.pool(features, proposals, image_sizes))
        logits, deltas = self.cls_score(x), self.bbox_pred(x).reshape(x.shape[0], -1, 5)
        if self.training:
            positive = torch.where(labels > 0)[0]
            predicted = deltas[positive, labels[positive] - 1 if self.class_specific else 0]
            box_loss = F.smooth_l1_loss(predicted.float(), regression[positive], beta=1 / 9,
                                        reduction="sum") / max(labels.numel(), 1)
            return [], {"loss_classifier": F.cross_entropy(logits.float(), labels), "loss_box_reg": box_loss}
        return self.postprocess(logits, deltas, proposals), {}

    def postprocess(self, logits: torch.Tensor, deltas: torch.Tensor, proposals: list[torch.Tensor]
                    ) -> list[dict[str, torch.Tensor]]:
        """Per image the detections of :func:`select_detections` from (R, classes + 1) ``logits``
        and (R, classes or 1, 5) ``deltas``."""
        scores = F.softmax(logits.float(), -1)[:, 1:]
        per_roi = deltas.shape[1]
        results = []
        start = 0
        for p in proposals:
            n = p.shape[0]
            boxes = self.decode_deltas(deltas[start:start + n].reshape(-1, 5), p.float().repeat_interleave(per_roi, 0))
            if per_roi == 1:
                boxes = boxes.repeat_interleave(self.num_classes, 0)
            results.append(select_detections(boxes, scores[start:start + n].reshape(-1), self.num_classes))
            start += n
        return results


def select_detections(boxes: torch.Tensor, scores: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """One image's detections from a rectangle ``boxes`` (R * C, 5) and ``scores`` (R * C,) per RoI
    and class (class fastest): scores above 0.05, the 2,000 best, rotated NMS per class at 0.1, at
    most 2,000; labels 1-based (0 is the background), as torchvision's heads return them."""
    classes = torch.arange(num_classes, device=boxes.device).repeat(boxes.shape[0] // num_classes)
    keep = torch.where((scores > SCORE_THRESHOLD) & (boxes[:, 2] > 1e-2) & (boxes[:, 3] > 1e-2))[0]
    keep = keep[scores[keep].argsort(descending=True)[:CANDIDATES]]
    boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
    kept = batched_rotated_nms(boxes, scores, classes, NMS_THRESHOLD)[:DETECTIONS]
    return {"boxes": boxes[kept], "corners": rbox_to_corners(boxes[kept]), "scores": scores[kept],
            "labels": classes[kept] + 1}


class OrientedDetectionModel(DetectionModel):
    """SkySense encoder + Rotated Faster R-CNN with FPN (module docstring)."""

    box_form = "(N, 8) corners"
    box_width = 8
    outline_key = "corners"
    coverage = staticmethod(quad_coverage)
    iou = staticmethod(quad_iou)
    nms_threshold = NMS_THRESHOLD

    def box_head(self, channels: int, num_classes: int) -> nn.Module:
        return OrientedRoIHead(channels, num_classes)

    @staticmethod
    def moved(found: dict[str, torch.Tensor], x: int, y: int) -> dict[str, torch.Tensor]:
        boxes, corners = found["boxes"].clone(), found["corners"]
        boxes[:, :2] += boxes.new_tensor([x, y])
        return {**found, "boxes": boxes, "corners": corners + corners.new_tensor([x, y] * 4)}

    def merged(self, found: dict[str, torch.Tensor], cap: bool = True) -> dict[str, torch.Tensor]:
        keep = batched_rotated_nms(found["boxes"], found["scores"], found["labels"], self.nms_threshold)
        return {k: v[keep[:DETECTIONS] if cap else keep] for k, v in found.items()}

    def image_targets(self, boxes: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The corners' hulls (``boxes``, for the proposal network), rectangles (``rboxes``) and ``labels``."""
        return {"boxes": horizontal_boxes(boxes), "rboxes": corners_to_rbox(boxes), "labels": labels}
