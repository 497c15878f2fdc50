"""Horizontal object detection: the SkySense HR pyramid under a Faster R-CNN with FPN.

The SkySense paper fine-tunes a Faster R-CNN with a feature pyramid network (1x schedule) for
DIOR. :class:`DetectionModel` builds it from torchvision's parts on the task's feature pyramid
(:func:`~skysense.downstream.tasks.feature_pyramid`: the HR SwinV2's four levels, strides 4 to
32, with the fused map joined to the last when S2/S1 are inputs too):

* :class:`~torchvision.ops.FeaturePyramidNetwork` to ``decoder_channels`` channels, plus a max-pooled
  fifth level (P2 to P6);
* a region proposal network with one anchor size per level (32 to 512 pixels) and aspect ratios
  0.5, 1, 2; 2,000 proposals per level before NMS (IoU 0.7) in training and 1,000 at test, 1,000
  per image after (mmdetection's ``faster_rcnn_r50_fpn_1x`` settings);
* RoI-align of 7 x 7 on P2 to P5 by box size, two fully connected layers of 1,024, a classifier
  over the classes and background, class-specific box regression; 512 sampled RoIs per image
  (a quarter positive); at test boxes scoring at least 0.05, NMS at 0.5, 100 per image.

Images are not resized (the data pipeline crops them); each batch is padded at the bottom/right
to a multiple of 32 for the encoder, and proposals and detections are clipped to the images'
own sizes. Class indices are the dataset's (0-based); torchvision's background class 0 is
internal. Boxes flagged ``difficult`` are left out of the training targets (as mmdetection's
VOC-style datasets do) and are ignored by the evaluation (:mod:`skysense.evaluation.box_ap`).

``forward(batch)`` returns the losses in training mode (``loss_objectness``,
``loss_rpn_box_reg``, ``loss_classifier``, ``loss_box_reg``) and ``{"detections": [...]}`` (per
image ``boxes`` (N, 4), ``scores``, ``labels``) in evaluation mode.

:meth:`DetectionModel.detect` runs a scene larger than ``window`` pixels window by window
(overlapping, the last one moved back to end at the border, as
:func:`~skysense.downstream.sliding_window.sliding_window` places them) and moves each window's
detections into the scene's pixels. Before merging them with class-wise NMS at the head's
threshold (what DOTA_devkit's split-and-merge does), it drops **fragments**: a detection that
comes within ``EDGE_MARGIN`` pixels of a window edge inside the scene may show only part of its
object, and when at least ``FRAGMENT_COVERAGE`` of it lies inside an uncut detection of the same
class (another window saw the object whole) it is that object's fragment. NMS alone keeps such a
fragment whenever it outscores the whole box or overlaps it by less than the NMS threshold. An
object that every window cuts (larger than the windows' overlap) keeps its fragments, and NMS
merges them as before. ``drop_fragments=False`` gives plain NMS.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

try:
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.roi_heads import RoIHeads
    from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
    from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
except ImportError as error:  # pragma: no cover - installed with the extra
    raise ImportError(f"detection needs torchvision: pip install 'skysense[detection]' ({error})") from error

from torchvision.ops import batched_nms, box_iou

from skysense.downstream.boxes import box_coverage, cut_by_window, horizontal_boxes
from skysense.downstream.sliding_window import crop, grid_alignment, reference_size, window_starts
from skysense.downstream.tasks import SENTINEL, DownstreamModel, TaskSpec, feature_pyramid, pyramid_channels
from skysense.models import SkySense

SIZE_DIVISOR = 32
ANCHOR_SIZES = (32, 64, 128, 256, 512)
ASPECT_RATIOS = (0.5, 1.0, 2.0)
ROI_LEVELS = ("0", "1", "2", "3")
EDGE_MARGIN = 4.0
"""Pixels from a window edge inside the scene within which a detection counts as cut by that edge."""
FRAGMENT_COVERAGE = 0.6
"""A cut detection is a fragment when at least this fraction of it lies inside an uncut one of its class."""


def anchor_generator() -> AnchorGenerator:
    """Anchors of one size per pyramid level (``ANCHOR_SIZES``, P2 to P6) and three aspect ratios."""
    return AnchorGenerator(sizes=tuple((s,) for s in ANCHOR_SIZES), aspect_ratios=(ASPECT_RATIOS,) * len(ANCHOR_SIZES))


class DetectionModel(DownstreamModel):
    """SkySense encoder + Faster R-CNN with FPN (module docstring)."""

    output_keys = ("boxes",)
    # The boxes the targets hold: described in errors, and their number of coordinates.
    box_form = "horizontal (N, 4)"
    box_width = 4
    # The detections' entry whose overlaps decide fragments, and the coverage function for it.
    outline_key = "boxes"
    coverage = staticmethod(box_coverage)
    # The IoU of two sets of outlines (N, M), as the merging NMS measures it.
    iou = staticmethod(box_iou)

    def __init__(self, encoder: SkySense, spec: TaskSpec) -> None:
        super().__init__(encoder, spec)
        width = spec.decoder_channels
        self.fpn = FeaturePyramidNetwork(list(pyramid_channels(encoder.config, spec)), width,
                                         extra_blocks=LastLevelMaxPool())
        self.rpn = self.proposal_network(width)
        self.roi_heads = self.box_head(width, spec.num_classes)

    def proposal_network(self, channels: int) -> nn.Module:
        """The region proposal network on the FPN's ``channels`` (module docstring)."""
        return RegionProposalNetwork(
            anchor_generator(), RPNHead(channels, len(ASPECT_RATIOS)), fg_iou_thresh=0.7, bg_iou_thresh=0.3,
            batch_size_per_image=256, positive_fraction=0.5, pre_nms_top_n={"training": 2000, "testing": 1000},
            post_nms_top_n={"training": 1000, "testing": 1000}, nms_thresh=0.7)

    def box_head(self, channels: int, num_classes: int) -> nn.Module:
        """The RoI head on the FPN's ``channels``: torchvision's ``RoIHeads`` (module docstring)."""
        pool = MultiScaleRoIAlign(list(ROI_LEVELS), output_size=7, sampling_ratio=2)
        return RoIHeads(
            pool, TwoMLPHead(channels * 7 * 7, 1024), FastRCNNPredictor(1024, num_classes + 1),
            fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=512, positive_fraction=0.25,
            bbox_reg_weights=None, score_thresh=0.05, nms_thresh=0.5, detections_per_img=100)

    def box_targets(self, batch: Mapping[str, Any]) -> list[dict[str, torch.Tensor]]:
        """Per image the targets of :meth:`image_targets`, difficult boxes left out."""
        boxes, labels = batch.get("boxes"), batch.get("labels")
        if not isinstance(boxes, list) or not isinstance(labels, list):
            raise ValueError(f"{self.spec.task} model: targets 'boxes' and 'labels' (lists, one per image) missing "
                             f"from the batch (keys {sorted(batch)})")
        difficult = batch.get("difficult") or [None] * len(boxes)
        targets = []
        for i, (b, k, hard) in enumerate(zip(boxes, labels, difficult)):
            if b.ndim != 2 or b.shape[1] != self.box_width:
                raise ValueError(f"{self.spec.task} model: image {i}: boxes must be {self.box_form}, got shape "
                                 f"{tuple(b.shape)}")
            self.check_labels(k, i)
            keep = ~hard.bool() if hard is not None else torch.ones(b.shape[0], dtype=torch.bool, device=b.device)
            targets.append(self.image_targets(b[keep].float(), k[keep].long() + 1))
        return targets

    def image_targets(self, boxes: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """One image's ``boxes`` and its ``labels`` already shifted past torchvision's background."""
        return {"boxes": boxes, "labels": labels}

    def check_labels(self, labels: torch.Tensor, image: int) -> None:
        """Class indices of one image's boxes must lie in ``0..num_classes - 1``."""
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.spec.num_classes):
            raise ValueError(f"{self.spec.task} model: image {image}: labels must lie in 0..{self.spec.num_classes - 1}, "
                             f"got {int(labels.min())}..{int(labels.max())}")

    def targets(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {"boxes": batch.get("boxes"), "labels": batch.get("labels"), "difficult": batch.get("difficult")}

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        inputs = self.encoder_inputs(batch)
        hr = inputs["hr"]
        height, width = int(hr.shape[-2]), int(hr.shape[-1])
        pad_h, pad_w = -height % SIZE_DIVISOR, -width % SIZE_DIVISOR
        if pad_h or pad_w:
            if any(m in inputs for m in SENTINEL):
                raise ValueError(f"{self.spec.task} model: with S2/S1 inputs, hr sides must be multiples of {SIZE_DIVISOR} "
                                 f"(the grids must match), got {height} x {width}")
            inputs["hr"] = F.pad(hr, (0, pad_w, 0, pad_h))
        levels = feature_pyramid(self.encode(inputs), self.spec)
        features = self.fpn(OrderedDict((str(i), x) for i, x in enumerate(levels)))
        images = ImageList(inputs["hr"], [(height, width)] * hr.shape[0])
        targets = self.box_targets(batch) if self.training else None
        proposals, rpn_losses = self.rpn(images, features, targets)
        detections, roi_losses = self.roi_heads(features, proposals, images.image_sizes, targets)
        if self.training:
            return {**rpn_losses, **roi_losses}
        return {"detections": [{**d, "labels": d["labels"] - 1} for d in detections]}

    def detect(self, batch: Mapping[str, Any], window: int | None = None, stride: int | None = None,
               drop_fragments: bool = True) -> list[dict[str, torch.Tensor]]:
        """Detections per image (evaluation mode). With ``window``, a larger image goes through
        overlapping windows every ``stride`` pixels (default ``window // 2``); their detections are
        merged by NMS, fragments of objects cut by a window edge dropped first (module docstring)."""
        height, width = reference_size(batch)
        if window is None or (height <= window and width <= window):
            return self(batch)["detections"]
        if batch["hr"].shape[0] != 1:
            raise ValueError(f"detection windows: one image at a time, got a batch of {batch['hr'].shape[0]}")
        stride = stride or max(1, window // 2)
        align = grid_alignment(batch)
        pieces = []
        for y in window_starts(height, window, stride, align):
            for x in window_starts(width, window, stride, align):
                h, w = min(window, height - y), min(window, width - x)
                found = self(crop(batch, y, x, h, w))["detections"][0]
                cut = cut_by_window(horizontal_boxes(found[self.outline_key]), (x, y, w, h), (height, width),
                                    EDGE_MARGIN)
                pieces.append({**self.moved(found, x, y), "cut": cut})
        found = {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}
        cut = found.pop("cut")
        if drop_fragments:
            whole = ~self.fragments(found, cut)
            found = {k: v[whole] for k, v in found.items()}
        return [self.merged(found)]

    def fragments(self, found: dict[str, torch.Tensor], cut: torch.Tensor) -> torch.Tensor:
        """(N,) bool: cut detections lying at least ``FRAGMENT_COVERAGE`` inside an uncut one of their class."""
        fragment = torch.zeros_like(cut)
        if cut.any() and not cut.all():
            outlines, labels = found[self.outline_key].float(), found["labels"]
            covered = self.coverage(outlines[cut], outlines[~cut]) >= FRAGMENT_COVERAGE
            same_class = labels[cut][:, None] == labels[~cut][None]
            fragment[cut] = (covered & same_class).any(1)
        return fragment

    @staticmethod
    def moved(found: dict[str, torch.Tensor], x: int, y: int) -> dict[str, torch.Tensor]:
        """One window's detections in the pixels of the scene whose window starts at (x, y)."""
        return {**found, "boxes": found["boxes"] + found["boxes"].new_tensor([x, y, x, y])}

    @property
    def nms_threshold(self) -> float:
        """IoU above which the merging NMS keeps only the higher-scoring of two detections of a class."""
        return self.roi_heads.nms_thresh

    def merged(self, found: dict[str, torch.Tensor], cap: bool = True) -> dict[str, torch.Tensor]:
        """Detections of overlapping windows after class-wise NMS, the head's number at most
        (``cap=False``: all of them, for a scene's worth of windows)."""
        keep = batched_nms(found["boxes"].float(), found["scores"].float(), found["labels"], self.nms_threshold)
        if cap:
            keep = keep[:self.roi_heads.detections_per_img]
        return {k: v[keep] for k, v in found.items()}

    def loss(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The sum of the four Faster R-CNN losses, and each of them (training-mode outputs)."""
        if "detections" in outputs:
            raise ValueError(f"{self.spec.task} model: losses come from a forward pass in training mode (model.train())")
        terms = {k: v.float() for k, v in outputs.items()}
        return torch.stack(list(terms.values())).sum(), terms
