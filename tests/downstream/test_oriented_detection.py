"""Oriented detection: quadrilateral IoU against shapely, rectangle fitting, rotated NMS, the box
coder, oriented AP, corners through crops and flips, and the Rotated Faster R-CNN task model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from skysense import SkySense
from skysense.cli import main
from skysense.data.datasets import DIORR, DOTA
from skysense.data.datasets.detection import DIOR_CLASSES
from skysense.downstream.boxes import crop_boxes, flip_boxes
from skysense.downstream.data import TrainingSamples, model_keys
from skysense.downstream.evaluate import evaluate_run
from skysense.downstream.finetune import FinetuneConfig, finetune, load_finetuned
from skysense.downstream.oriented_detection import decode, encode
from skysense.downstream.rotated_boxes import (corners_to_rbox, quad_coverage, quad_iou, rbox_to_corners, regularize,
                                               rotated_nms)
from skysense.downstream.tasks import TaskSpec, build_task_model
from skysense.evaluation.box_ap import BoxAveragePrecision

from downstream_helpers import learned_map50


def _random_rboxes(n: int, seed: int, extent: float = 60.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.rand(n, 2, generator=g) * extent, torch.rand(n, 2, generator=g) * 40 + 2,
                      (torch.rand(n, 1, generator=g) - 0.5) * 2 * math.pi], 1).double()


def test_quad_iou_and_coverage_equal_shapely():
    shapely = pytest.importorskip("shapely.geometry")
    boxes = _random_rboxes(120, 0)
    boxes[:10] = boxes[10:20]  # identical pairs
    boxes[20:30, :2], boxes[20:30, 2:4], boxes[20:30, 4] = boxes[30:40, :2], boxes[30:40, 2:4] / 2, boxes[30:40, 4]
    corners = rbox_to_corners(boxes)
    # general convex quadrilaterals too (DOTA's annotations are not always rectangles), either winding
    g = torch.Generator().manual_seed(1)
    quads = corners[40:80] + torch.rand(40, 8, generator=g, dtype=torch.float64) * 3
    quads[:20] = quads[:20].reshape(20, 4, 2).flip(1).reshape(20, 8)
    everything = torch.cat([corners, quads])
    polygons = [shapely.Polygon(q.reshape(4, 2).tolist()) for q in everything]
    assert all(p.is_valid and p.convex_hull.area == pytest.approx(p.area) for p in polygons)
    expected = torch.tensor([[p.intersection(q).area / p.union(q).area for q in polygons] for p in polygons],
                            dtype=torch.float64)
    found = quad_iou(everything, everything)
    assert (expected > 0).sum() > 2000  # many overlapping pairs, not just the diagonal
    assert torch.allclose(found, expected, atol=1e-9)
    covered = torch.tensor([[p.intersection(q).area / p.area for q in polygons] for p in polygons], dtype=torch.float64)
    assert torch.allclose(quad_coverage(everything, everything), covered, atol=1e-9)
    squares = torch.tensor([[0.0, 0, 10, 0, 10, 10, 0, 10], [10, 0, 20, 0, 20, 10, 10, 10],
                            [5, 0, 15, 0, 15, 10, 5, 10]])
    assert torch.allclose(quad_iou(squares, squares), torch.tensor([[1, 0, 1 / 3], [0, 1, 1 / 3], [1 / 3, 1 / 3, 1]]))


def test_smallest_rectangle_and_regularized_angles():
    shapely = pytest.importorskip("shapely.geometry")
    boxes = _random_rboxes(50, 2)
    fitted = corners_to_rbox(rbox_to_corners(boxes))
    assert (fitted[:, 4] >= -math.pi / 4).all() and (fitted[:, 4] < math.pi / 4).all()
    assert torch.allclose(quad_iou(rbox_to_corners(fitted), rbox_to_corners(boxes)).diagonal(),
                          torch.ones(50, dtype=torch.float64))
    assert torch.allclose(regularize(boxes)[:, 2] * regularize(boxes)[:, 3], boxes[:, 2] * boxes[:, 3])
    quad = torch.tensor([[0.0, 0, 10, 1, 9, 6, -1, 5]], dtype=torch.float64)
    area = shapely.Polygon(quad.reshape(4, 2).tolist()).minimum_rotated_rectangle.area
    fitted = corners_to_rbox(quad)
    assert float(fitted[0, 2] * fitted[0, 3]) == pytest.approx(area)


def test_rotated_nms_and_the_box_coder():
    boxes = torch.tensor([[50.0, 50, 40, 10, 0.6], [51, 50, 40, 10, 0.62], [50, 50, 40, 10, -0.6], [200, 200, 8, 8, 0]])
    # the second overlaps the first (IoU > 0.1) and goes; the third crosses it at an angle but
    # overlaps by less than 0.1 of the union... only if thin enough: check with the IoU itself
    iou = quad_iou(rbox_to_corners(boxes), rbox_to_corners(boxes))
    assert iou[0, 1] > 0.5
    kept = rotated_nms(boxes, torch.tensor([0.9, 0.8, 0.7, 0.6]), 0.1)
    expected = [0] + ([2] if iou[0, 2] <= 0.1 else []) + [3]
    assert kept.tolist() == expected
    proposals = torch.tensor([[20.0, 40, 60, 70], [70, 10, 95, 50], [0, 0, 30, 40]])
    targets = torch.tensor([[40.0, 50, 40, 12, 0.5], [80, 30, 20, 30, -1.2], [10, 10, 5, 50, 1.5]])
    assert torch.allclose(decode(encode(targets, proposals), proposals), regularize(targets), atol=1e-5)


def test_oriented_ap_counts_the_rotated_overlap():
    """A thin box at 45 degrees: its exact detection scores AP 1; its horizontal hull overlaps
    it by far less than 0.5 and scores 0."""
    truth = rbox_to_corners(torch.tensor([[50.0, 50, 60, 6, math.pi / 4]]))
    hull = torch.cat([truth[:, 0::2].amin(1), truth[:, 1::2].amin(1), truth[:, 0::2].amax(1), truth[:, 1::2].amax(1)])
    x0, y0, x1, y1 = hull.tolist()
    hull_corners = torch.tensor([[x0, y0, x1, y0, x1, y1, x0, y1]])
    label = torch.zeros(1, dtype=torch.long)
    for detection, expected in ((truth, 1.0), (hull_corners, 0.0)):
        metric = BoxAveragePrecision(1, oriented=True)
        metric.update(detection, torch.ones(1), label, truth, label)
        assert metric.compute()["map50"] == pytest.approx(expected)
    with pytest.raises(ValueError, match=r"boxes: expected \(N, 8\) corners, got shape \(1, 4\)"):
        BoxAveragePrecision(1, oriented=True).update(torch.zeros(1, 4), torch.ones(1), label, truth, label)


def test_corners_through_crops_and_flips():
    corners = torch.tensor([[10.0, 10, 30, 12, 28, 22, 8, 20], [50, 50, 70, 50, 70, 70, 50, 70]])
    sample = {"boxes": corners, "labels": torch.tensor([4, 7]), "difficult": torch.tensor([False, True])}
    cut = crop_boxes(sample, top=5, left=5, height=40, width=40)
    # the first's centre (19, 16) lies in the window: moved whole, not clipped; the second's (60, 60) does not
    assert cut["boxes"].tolist() == [[5, 5, 25, 7, 23, 17, 3, 15]] and cut["labels"].tolist() == [4]
    flipped = flip_boxes(cut["boxes"], height=40, width=40, horizontal=True, vertical=False)
    assert flipped.tolist() == [[35, 5, 15, 7, 17, 17, 37, 15]]
    assert torch.equal(flip_boxes(flipped, 40, 40, True, False), cut["boxes"])
    both = flip_boxes(cut["boxes"], 40, 40, True, True)
    assert both.tolist() == [[35, 35, 15, 33, 17, 23, 37, 25]]


@pytest.mark.parametrize("detector", [None, "oriented_rcnn"])
def test_oriented_model_trains_and_detects(tiny_model, detector):
    torch.manual_seed(0)
    model = build_task_model(tiny_model, TaskSpec("oriented_detection", 3, ("hr",), decoder_channels=32,
                                                  detector=detector))
    assert type(model).__name__ == ("OrientedRCNNModel" if detector else "OrientedDetectionModel")
    corners = rbox_to_corners(torch.tensor([[40.0, 50, 40, 12, 0.5], [80, 30, 20, 20, -1.2]]))
    batch = {"hr": torch.randn(2, 3, 100, 120), "boxes": [corners, torch.zeros(0, 8)],
             "labels": [torch.tensor([0, 2]), torch.zeros(0, dtype=torch.long)],
             "difficult": [torch.tensor([False, True]), torch.zeros(0, dtype=torch.bool)]}
    targets = model.box_targets(batch)
    assert targets[0]["labels"].tolist() == [1] and targets[0]["rboxes"].shape == (1, 5)
    model.train()
    total, terms = model.loss(model(batch), batch)
    assert set(terms) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert math.isfinite(total.item()) and terms["loss_box_reg"].item() > 0
    total.backward()
    assert model.encoder.hr_encoder.patch_embed.weight.grad.abs().sum() > 0
    assert model.roi_heads.bbox_pred.weight.grad.abs().sum() > 0
    rpn_regression = model.rpn.deltas if detector else model.rpn.head.bbox_pred
    assert rpn_regression.weight.grad.abs().sum() > 0
    model.eval()
    with torch.inference_mode():
        found = model(batch)["detections"]
    for d in found:
        n = d["scores"].shape[0]
        assert d["boxes"].shape == (n, 5) and d["corners"].shape == (n, 8) and n <= 2000
        assert ((d["labels"] >= 0) & (d["labels"] < 3)).all()
        assert torch.allclose(d["corners"], rbox_to_corners(d["boxes"]))
    batch["boxes"] = [torch.zeros(1, 4), torch.zeros(0, 4)]
    model.train()
    with pytest.raises(ValueError, match=r"image 0: boxes must be \(N, 8\) corners, got shape \(1, 4\)"):
        model(batch)


def _scene(g: torch.Generator, size: int = 96) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise with 1-2 bright rotated bars (red: class 0, green: class 1) and their corners.

    Angles within 0.6 rad of either axis: a bar near 45 degrees has two descriptions whose
    regression targets differ by a quarter turn (the representation's boundary, which every
    Rotated Faster R-CNN has somewhere), and a short run cannot learn both."""
    image = torch.randn(3, size, size, generator=g) * 0.3
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    boxes, labels = [], []
    for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
        k = int(torch.randint(0, 2, (1,), generator=g))
        w, h = float(torch.randint(28, 44, (1,), generator=g)), float(torch.randint(10, 16, (1,), generator=g))
        angle = (float(torch.rand(1, generator=g)) * 2 - 1) * 0.6
        cx, cy = (float(v) for v in torch.randint(24, size - 24, (2,), generator=g))
        u = (xs - cx) * math.cos(angle) + (ys - cy) * math.sin(angle)
        v = -(xs - cx) * math.sin(angle) + (ys - cy) * math.cos(angle)
        image[k][(u.abs() <= w / 2) & (v.abs() <= h / 2)] += 2.0
        boxes.append(rbox_to_corners(torch.tensor([[cx, cy, w, h, angle]]))[0])
        labels.append(k)
    return image, torch.stack(boxes), torch.tensor(labels)


@pytest.mark.slow
def test_oriented_detection_learns_rotated_bars():
    """From random init, 150 steps on noise with rotated bars: mAP50 of the quadrilaterals on
    unseen scenes well above an untrained model's."""
    before, after = learned_map50("oriented_detection", _scene, 150)
    # measured 0.42 after 150 steps (0.41, mean best IoU per bar 0.63, before the head's init changed); an untrained model finds nothing
    assert before < 0.05 and after > 0.25, (before, after)


@pytest.fixture(scope="module")
def dior_r_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DIOR-R-layout folder: 6 images of 96 px with 1-2 rotated bars each."""
    root = tmp_path_factory.mktemp("dior_r")
    images, lists = root / "JPEGImages-trainval", root / "ImageSets" / "Main"
    annotations = root / "Annotations" / "Oriented Bounding Boxes"
    for folder in (images, annotations, lists):
        folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(3)
    fields = ("x_left_top", "y_left_top", "x_right_top", "y_right_top", "x_right_bottom", "y_right_bottom",
              "x_left_bottom", "y_left_bottom")
    ids = []
    for n in range(6):
        image, boxes, labels = _scene(g)
        pixels = ((image.clamp(-1, 3) + 1) * 60).byte().permute(1, 2, 0).numpy()
        objects = ""
        for box, label in zip(boxes.tolist(), labels.tolist()):
            values = "".join(f"<{f}>{v:.2f}</{f}>" for f, v in zip(fields, box))
            objects += f"<object><name>{DIOR_CLASSES[18 * label]}</name><robndbox>{values}</robndbox></object>"
        ids.append(f"{n + 1:05d}")
        Image.fromarray(np.ascontiguousarray(pixels)).save(images / f"{ids[-1]}.png")
        (annotations / f"{ids[-1]}.xml").write_text(f"<annotation>{objects}</annotation>")
    (lists / "train.txt").write_text("\n".join(ids[:4]) + "\n")
    (lists / "test.txt").write_text("\n".join(ids[4:]) + "\n")
    return root


def test_augmented_corners_still_frame_their_bars(dior_r_like):
    model = SkySense.from_preset("tiny")
    samples = TrainingSamples(DIORR(dior_r_like, split="train"), model.config, "oriented_detection",
                              model_keys(("hr",), False), crop_size=64)
    seen = 0
    for seed in range(8):
        sample = samples[(0, seed)]
        assert sample["boxes"].shape[1] == 8
        for box in sample["boxes"]:
            cx, cy = (int(v) for v in (box[0::2].mean(), box[1::2].mean()))
            assert 0 <= cx < 64 and 0 <= cy < 64
            # the bar's centre pixel is bright in its class's band
            assert float(sample["hr"][:, cy, cx].amax()) > 0.5  # background: about -1.1
            seen += 1
    assert seen >= 4


@pytest.mark.slow
def test_finetune_and_evaluate_on_a_dior_r_layout(dior_r_like, tmp_path):
    config = FinetuneConfig.from_dict(dict(task="oriented_detection", dataset="dior_r", data_root=str(dior_r_like),
                                           preset="tiny", batch_size=2, max_steps=2, checkpoint_every=2,
                                           crop_size=64, decoder_channels=32, num_threads=1))
    rows = finetune(config, tmp_path / "run", progress=False)
    assert all(math.isfinite(r["loss/loss_box_reg"]) for r in rows)
    assert type(load_finetuned(tmp_path / "run")).__name__ == "OrientedDetectionModel"
    report = evaluate_run(tmp_path / "run", predictions=tmp_path / "pred", progress=False)
    dataset = DIORR(dior_r_like, split="test")
    objects = sum(int(dataset[i]["boxes"].shape[0]) for i in range(len(dataset)))
    assert report["task"] == "oriented_detection" and report["objects"] == objects and 0 <= report["map50"] <= 1
    written = json.loads((tmp_path / "pred" / "00005.json").read_text())
    assert len(written["corners"]) == len(written["boxes"]) == len(written["scores"])


@pytest.mark.real_data
@pytest.mark.slow
def test_quick_oriented_detection_on_real_dota_images(data_root, tmp_path):
    root = data_root / "samples" / "dota"
    config = FinetuneConfig.from_dict(dict(task="oriented_detection", dataset="dota", data_root=str(root),
                                           preset="tiny", train_split="all", eval_split="all", batch_size=2,
                                           max_steps=2, checkpoint_every=2, crop_size=256, decoder_channels=32,
                                           num_threads=1))
    rows = finetune(config, tmp_path / "run", progress=False)
    assert all(math.isfinite(r["loss"]) for r in rows)
    # the larger image (1111 x 1182) goes through 512-px windows merged by rotated NMS
    report = evaluate_run(tmp_path / "run", window=512, stride=400, progress=False)
    dataset = DOTA(root)
    objects = sum(int((~dataset[i]["difficult"]).sum()) for i in range(len(dataset)))
    assert report["images"] == 2 and report["objects"] == objects and 0.0 <= report["map50"] <= 1.0
    assert report["window"] == 512


@pytest.mark.slow
def test_oriented_rcnn_from_the_command_line(dior_r_like, tmp_path, capsys):
    """``--detector oriented_rcnn`` trains Oriented R-CNN, saves the choice, and evaluation rebuilds it."""
    out = tmp_path / "run"
    assert main(["finetune", "--task", "oriented_detection", "--dataset", "dior_r", "--data-root", str(dior_r_like),
                 "--detector", "oriented_rcnn", "--preset", "tiny", "--out", str(out), "--max-steps", "2",
                 "--batch-size", "2", "--crop-size", "64", "--decoder-channels", "16", "--threads", "1",
                 "--no-progress"]) == 0
    assert json.loads((out / "task.json").read_text())["spec"]["detector"] == "oriented_rcnn"
    assert type(load_finetuned(out)).__name__ == "OrientedRCNNModel"
    capsys.readouterr()
    assert main(["evaluate", "oriented_detection", "--weights", str(out), "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["task"] == "oriented_detection" and 0.0 <= report["map50"] <= 1.0

