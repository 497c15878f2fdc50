"""Oriented R-CNN (Xie et al., ICCV 2021) on the SkySense HR pyramid: oriented proposals, rotated RoI features.

The detector that remote-sensing backbones are commonly compared with on DIOR-R and DOTA
(mmrotate's ``oriented_rcnn_r50_fpn_1x`` with angles in [-pi/2, pi/2), whose settings are used
here). The SkySense paper does not publish its oriented head; ``detector="oriented_rcnn"``
selects this one, the default remains the Rotated Faster R-CNN of
:mod:`skysense.downstream.oriented_detection`. Both share the encoder, the FPN (P2 to P6) and the
anchors of :class:`~skysense.downstream.detection.DetectionModel`.

* **Oriented RPN** (:class:`OrientedRPN`): a 3 x 3 conv, then per anchor an objectness logit and
  six *midpoint-offset* deltas (:func:`midpoint_encode`): the centre and size of the oriented
  box's horizontal hull relative to the anchor (``dx, dy, log dw, log dh``), and where the box
  touches the hull's top edge (``da``, along x) and right edge (``db``, along y), as fractions of
  the hull's width and height from its centre (divided by the coder's standard deviation 0.5);
  the right-edge vertex is taken as the one after the top vertex clockwise, so a rectangle at a
  tiny angle, whose two top vertices nearly tie, still gets a consistent pair.
  Decoding gives a parallelogram; its vertices are pushed out along their diagonals to the
  longer one's length, which makes it a rectangle. Anchors are matched to the hulls of the
  ground-truth rectangles (IoU >= 0.7 positive, < 0.3 negative, each box's best anchors too),
  256 sampled per image, half positive; binary cross-entropy and smooth L1 (beta 1/9) over the
  sampled anchors.
* **Proposals**: per level the 2,000 highest-scoring anchors, decoded; NMS at IoU 0.8 on the
  proposals' horizontal hulls within each level; the 2,000 best per image, in training and at test.
* **Rotated RoI-align** (:func:`rotated_roi_align`): 7 x 7 bins along the proposal's own axes, 2 x 2
  bilinear samples per bin (``grid_sample``, sample centres aligned to pixel centres), on P2 to P5
  by the proposal's size: level ``floor(log2(sqrt(w h) / 56))`` clamped to 0..3 (mmdetection's rule).
* **RoI head** (:class:`OrientedRCNNHead`): two fully connected layers of 1,024, a classifier
  over the classes and background, and one class-agnostic rectangle regressed in the proposal's
  frame (:func:`rotated_encode`): ``10 (dx cos a + dy sin a) / pw``, ``10 (-dx sin a + dy cos a) /
  ph``, ``5 log(w / pw)``, ``5 log(h / ph)``, ``10 da``, of the two descriptions of the target
  (w, h, angle) and (h, w, angle + pi/2) the one that turns less from the proposal. Proposals
  (with the ground truth added) are matched by the rotated IoU of their rectangles (>= 0.5
  positive, else background), 512 per image, a quarter positive.
* **Test**: class scores above 0.05, rotated NMS per class at 0.1, at most 2,000 per image
  (:func:`~skysense.downstream.oriented_detection.select_detections`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, Matcher
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import batched_nms, box_iou

from skysense.downstream.boxes import horizontal_boxes
from skysense.downstream.detection import ASPECT_RATIOS, ROI_LEVELS, anchor_generator
from skysense.downstream.oriented_detection import MAX_LOG_SCALE, OrientedDetectionModel, OrientedRoIHead, box_frame
from skysense.downstream.rotated_boxes import corners_to_rbox, quad_iou, rbox_to_corners, regularize

PROPOSALS_PER_LEVEL = 2000
PROPOSALS_PER_IMAGE = 2000
PROPOSAL_NMS = 0.8
OFFSET_STD = 0.5
"""Standard deviation of the midpoint offsets ``da``, ``db`` (the others' is 1)."""
ROI_DELTA_WEIGHTS = (10.0, 10.0, 5.0, 5.0, 10.0)
ROI_SIZE = 7
ROI_SAMPLES = 2
FINEST_SCALE = 56.0
"""RoIs of sqrt(w h) below 2 x this are pooled from P2, each doubling one level up."""
LEVEL_STRIDES = (4, 8, 16, 32)
"""Strides of P2 to P5 (the SkySense HR pyramid after padding to a multiple of 32)."""


def midpoint_encode(rbox: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(N, 6) midpoint-offset deltas (module docstring) of rectangles ``rbox`` (N, 5) from ``anchors`` (N, 4)."""
    corners = rbox_to_corners(rbox.float()).reshape(-1, 4, 2)
    xs, ys = corners[..., 0], corners[..., 1]
    x0, y0, x1, y1 = xs.amin(1), ys.amin(1), xs.amax(1), ys.amax(1)
    gw, gh = (x1 - x0).clamp_min(1e-3), (y1 - y0).clamp_min(1e-3)
    gx, gy = (x0 + x1) / 2, (y0 + y1) / 2
    # the vertex on the hull's top edge, and the next one clockwise, on its right edge (of a level
    # rectangle's two top vertices either will do: the pair is consistent, so decoding is exact)
    first = ys.argmin(1, keepdim=True)
    top = xs.gather(1, first)[:, 0]
    right = ys.gather(1, (first + 1) % 4)[:, 0]
    px, py, pw, ph = box_frame(anchors.float())
    return torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph),
                        (top - gx) / gw / OFFSET_STD, (right - gy) / gh / OFFSET_STD], dim=1)


def midpoint_decode(deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Rectangles (N, 5), regularized, from midpoint-offset ``deltas`` (N, 6) and ``anchors`` (N, 4)."""
    d = deltas.float()
    px, py, pw, ph = box_frame(anchors.float())
    gx, gy = px + d[:, 0] * pw, py + d[:, 1] * ph
    gw = pw * torch.exp(d[:, 2].clamp(max=MAX_LOG_SCALE))
    gh = ph * torch.exp(d[:, 3].clamp(max=MAX_LOG_SCALE))
    top = gx + (d[:, 4] * OFFSET_STD).clamp(-0.5, 0.5) * gw
    right = gy + (d[:, 5] * OFFSET_STD).clamp(-0.5, 0.5) * gh
    vertices = torch.stack([torch.stack([top, gy - gh / 2], -1), torch.stack([gx + gw / 2, right], -1),
                            torch.stack([2 * gx - top, gy + gh / 2], -1), torch.stack([gx - gw / 2, 2 * gy - right], -1)],
                           dim=1)  # (N, 4, 2): a parallelogram around (gx, gy)
    centre = torch.stack([gx, gy], -1)[:, None]
    arms = vertices - centre
    length = arms.norm(dim=-1, keepdim=True)
    rectangle = centre + arms * (length.amax(1, keepdim=True) / length.clamp_min(1e-6))
    return corners_to_rbox(rectangle.reshape(-1, 8))


def _half_turn(angle: torch.Tensor) -> torch.Tensor:
    """``angle`` wrapped into [-pi/2, pi/2)."""
    return angle - math.pi * torch.floor((angle + math.pi / 2) / math.pi)


def rotated_encode(rbox: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
    """(N, 5) deltas (module docstring) of rectangles ``rbox`` (N, 5) from rectangle ``proposals`` (N, 5)."""
    g, p = rbox.float(), proposals.float()
    pw, ph = p[:, 2].clamp_min(1e-3), p[:, 3].clamp_min(1e-3)
    c, s = torch.cos(p[:, 4]), torch.sin(p[:, 4])
    dx, dy = g[:, 0] - p[:, 0], g[:, 1] - p[:, 1]
    turn, turn_swapped = _half_turn(g[:, 4] - p[:, 4]), _half_turn(g[:, 4] + math.pi / 2 - p[:, 4])
    swap = turn_swapped.abs() < turn.abs()
    gw, gh = torch.where(swap, g[:, 3], g[:, 2]), torch.where(swap, g[:, 2], g[:, 3])
    wx, wy, ww, wh, wa = ROI_DELTA_WEIGHTS
    return torch.stack([wx * (c * dx + s * dy) / pw, wy * (-s * dx + c * dy) / ph,
                        ww * torch.log(gw.clamp_min(1e-3) / pw), wh * torch.log(gh.clamp_min(1e-3) / ph),
                        wa * torch.where(swap, turn_swapped, turn)], dim=1)


def rotated_decode(deltas: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
    """Rectangles (N, 5), regularized, from ``deltas`` (N, 5) and rectangle ``proposals`` (N, 5)."""
    d, p = deltas.float(), proposals.float()
    pw, ph = p[:, 2].clamp_min(1e-3), p[:, 3].clamp_min(1e-3)
    c, s = torch.cos(p[:, 4]), torch.sin(p[:, 4])
    wx, wy, ww, wh, wa = ROI_DELTA_WEIGHTS
    u, v = d[:, 0] / wx * pw, d[:, 1] / wy * ph
    return regularize(torch.stack([p[:, 0] + u * c - v * s, p[:, 1] + u * s + v * c,
                                   pw * torch.exp((d[:, 2] / ww).clamp(max=MAX_LOG_SCALE)),
                                   ph * torch.exp((d[:, 3] / wh).clamp(max=MAX_LOG_SCALE)), p[:, 4] + d[:, 4] / wa], dim=1))


def rotated_roi_align(levels: list[torch.Tensor], rois: list[torch.Tensor]) -> torch.Tensor:
    """Features (R, C, 7, 7) of the rectangles ``rois`` (one (n_i, 5) tensor per image) from the
    pyramid ``levels`` P2..P5 (each (B, C, H, W), strides ``LEVEL_STRIDES``); module docstring."""
    boxes = torch.cat(rois).float()
    image = torch.cat([torch.full((r.shape[0],), i, dtype=torch.long, device=boxes.device) for i, r in enumerate(rois)])
    size = (boxes[:, 2] * boxes[:, 3]).clamp_min(1e-6).sqrt()
    level = torch.floor(torch.log2(size / FINEST_SCALE + 1e-6)).clamp(0, len(levels) - 1).long()
    points = ROI_SIZE * ROI_SAMPLES
    steps = (torch.arange(points, device=boxes.device, dtype=torch.float32) + 0.5) / points - 0.5
    channels = levels[0].shape[1]
    out = levels[0].new_zeros((boxes.shape[0], channels, ROI_SIZE, ROI_SIZE), dtype=torch.float32)
    for k, (features, stride) in enumerate(zip(levels, LEVEL_STRIDES)):
        height, width = features.shape[-2:]
        for b in range(features.shape[0]):
            index = torch.where((level == k) & (image == b))[0]
            if index.numel() == 0:
                continue
            r = boxes[index]
            along = steps[None, None, :] * r[:, 2, None, None]   # (n, 1, points): along w
            across = steps[None, :, None] * r[:, 3, None, None]  # (n, points, 1): along h
            c, s = torch.cos(r[:, 4])[:, None, None], torch.sin(r[:, 4])[:, None, None]
            x = r[:, 0, None, None] + along * c - across * s
            y = r[:, 1, None, None] + along * s + across * c
            grid = torch.stack([2 * x / (stride * width) - 1, 2 * y / (stride * height) - 1], dim=-1)
            sampled = F.grid_sample(features[b:b + 1].float(), grid.reshape(1, -1, points, 2), align_corners=False)
            sampled = sampled.reshape(channels, index.numel(), points, points).transpose(0, 1)
            out[index] = F.avg_pool2d(sampled, ROI_SAMPLES)
    return out


class OrientedRPN(nn.Module):
    """Oriented region proposal network (module docstring); called like torchvision's RPN."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.anchors = anchor_generator()
        count = len(ASPECT_RATIOS)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.objectness = nn.Conv2d(channels, count, 1)
        self.deltas = nn.Conv2d(channels, count * 6, 1)
        for layer in (self.conv, self.objectness, self.deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)
        self.matcher = Matcher(0.7, 0.3, allow_low_quality_matches=True)
        self.sampler = BalancedPositiveNegativeSampler(256, 0.5)

    def forward(self, images: ImageList, features: dict[str, torch.Tensor],
                targets: list[dict[str, torch.Tensor]] | None = None) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        maps = list(features.values())
        scores, deltas, counts = [], [], []
        for x in maps:
            hidden = F.relu(self.conv(x))
            logits, offsets = self.objectness(hidden), self.deltas(hidden)
            b, a, h, w = logits.shape
            # anchors run over (y, x, anchor) of each level: torchvision's AnchorGenerator order
            scores.append(logits.permute(0, 2, 3, 1).reshape(b, -1))
            deltas.append(offsets.reshape(b, a, 6, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, 6))
            counts.append(h * w * a)
        anchors = self.anchors(images, maps)
        scores_all, deltas_all = torch.cat(scores, 1), torch.cat(deltas, 1)
        proposals = [self.propose(s, d, a, counts) for s, d, a in
                     zip(scores_all.detach().float(), deltas_all.detach().float(), anchors)]
        if not self.training:
            return proposals, {}
        if targets is None:
            raise ValueError("oriented RPN: training needs targets")
        return proposals, self.loss(scores_all, deltas_all, anchors, targets)

    def propose(self, scores: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor, counts: list[int]
                ) -> torch.Tensor:
        """One image's proposals (P, 5) from its anchors' scores, deltas and the anchors per level."""
        picked, levels = [], []
        start = 0
        for k, n in enumerate(counts):
            best = scores[start:start + n].topk(min(PROPOSALS_PER_LEVEL, n)).indices + start
            picked.append(best)
            levels.append(torch.full_like(best, k))
            start += n
        index, level = torch.cat(picked), torch.cat(levels)
        rbox = midpoint_decode(deltas[index], anchors[index])
        valid = torch.where((rbox[:, 2] > 1e-3) & (rbox[:, 3] > 1e-3))[0]
        hulls = horizontal_boxes(rbox_to_corners(rbox[valid]))
        keep = batched_nms(hulls, scores[index[valid]], level[valid], PROPOSAL_NMS)[:PROPOSALS_PER_IMAGE]
        return rbox[valid[keep]]

    def loss(self, scores: torch.Tensor, deltas: torch.Tensor, anchors: list[torch.Tensor],
             targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        labels, matches = [], []
        for image_anchors, t in zip(anchors, targets):
            if t["rboxes"].shape[0] == 0:
                labels.append(torch.zeros(image_anchors.shape[0], device=image_anchors.device))
                matches.append(None)
                continue
            hulls = horizontal_boxes(rbox_to_corners(t["rboxes"].float()))
            matched = self.matcher(box_iou(hulls, image_anchors))
            image_labels = (matched >= 0).float()
            image_labels[matched == Matcher.BETWEEN_THRESHOLDS] = -1.0
            labels.append(image_labels)
            matches.append(matched)
        positive, negative = self.sampler(labels)
        # regression targets of the sampled positive anchors only (an image has up to ~10^5 anchors)
        predicted, regression = [], []
        for image_deltas, image_anchors, t, matched, pos in zip(deltas, anchors, targets, matches, positive):
            index = torch.where(pos.bool())[0]
            if matched is not None and index.numel():
                predicted.append(image_deltas[index])
                regression.append(midpoint_encode(t["rboxes"][matched[index]], image_anchors[index]))
        sampled = torch.where(torch.cat(positive).bool() | torch.cat(negative).bool())[0]
        box_loss = (F.smooth_l1_loss(torch.cat(predicted).float(), torch.cat(regression), beta=1 / 9, reduction="sum")
                    if predicted else deltas.sum() * 0.0) / max(sampled.numel(), 1)
        objectness = F.binary_cross_entropy_with_logits(scores.reshape(-1)[sampled].float(), torch.cat(labels)[sampled])
        return {"loss_objectness": objectness, "loss_rpn_box_reg": box_loss}


class RotatedRoIAlign(nn.Module):
    """:func:`rotated_roi_align` on P2..P5, called as torchvision's ``MultiScaleRoIAlign``."""

    def forward(self, features: dict[str, torch.Tensor], rois: list[torch.Tensor],
                image_sizes: list[tuple[int, int]]) -> torch.Tensor:
        levels = [features[k] for k in ROI_LEVELS]
        return rotated_roi_align(levels, rois).to(levels[0].dtype)


class OrientedRCNNHead(OrientedRoIHead):
    """RoI head of Oriented R-CNN (module docstring): rotated RoI-align, one class-agnostic
    rectangle per RoI regressed in the proposal's frame, proposals matched by rotated IoU."""

    target_key = "rboxes"

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__(channels, num_classes, pool=RotatedRoIAlign(), class_specific=False)

    def overlaps(self, truth: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
        return quad_iou(rbox_to_corners(truth), rbox_to_corners(proposals))

    def encode_targets(self, rboxes: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
        return rotated_encode(rboxes, proposals)

    def decode_deltas(self, deltas: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
        return rotated_decode(deltas, proposals)


class OrientedRCNNModel(OrientedDetectionModel):
    """SkySense encoder + Oriented R-CNN with FPN (module docstring)."""

    def proposal_network(self, channels: int) -> nn.Module:
        return OrientedRPN(channels)

    def box_head(self, channels: int, num_classes: int) -> nn.Module:
        return OrientedRCNNHead(channels, num_classes)
