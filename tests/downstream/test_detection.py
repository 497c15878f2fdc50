"""Horizontal detection: VOC average precision, boxes through crops and flips, the Faster R-CNN
task model, and fine-tuning plus evaluation on a DIOR-layout folder and on real DOTA images."""

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
from skysense.data.datasets import DIOR, DOTA
from skysense.data.datasets.detection import DIOR_CLASSES
from skysense.downstream.boxes import box_coverage, crop_boxes, cut_by_window, flip_boxes, horizontal_boxes
from skysense.downstream.data import EvaluationSamples, TrainingSamples, model_keys
from skysense.downstream.evaluate import evaluate_run
from skysense.downstream.finetune import FinetuneConfig, finetune, load_finetuned
from skysense.downstream.tasks import TaskSpec, build_task_model
from skysense.evaluation.box_ap import BoxAveragePrecision, average_precision, box_iou

from downstream_helpers import learned_map50

# -- average precision -----------------------------------------------------------------------


def test_box_iou_of_known_overlaps():
    a = torch.tensor([[0.0, 0, 10, 10], [0, 0, 2, 2]])
    b = torch.tensor([[5.0, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]])
    expected = torch.tensor([[50 / 150, 0, 1], [0, 0, 4 / 100]])
    assert torch.allclose(box_iou(a, b), expected)


def test_ap_of_a_ranking_with_a_duplicate():
    """Two boxes; detections .9 on box 1 (TP), .8 on box 1 again (FP), .7 on box 2 (TP).
    Precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1: area 1/2 * 1 + 1/2 * 2/3; 11-point
    (6 * 1 + 5 * 2/3) / 11."""
    metric = BoxAveragePrecision(1)
    gt = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    det = torch.tensor([[0.0, 0, 10, 10], [1, 0, 10, 10], [20, 21, 30, 30]])
    metric.update(det, torch.tensor([0.9, 0.8, 0.7]), torch.zeros(3, dtype=torch.long), gt,
                  torch.zeros(2, dtype=torch.long))
    report = metric.compute()
    assert report["map50"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert report["map50_11point"] == pytest.approx((6 + 5 * 2 / 3) / 11)
    assert report["objects"] == 2 and report["images"] == 1


def test_ranking_runs_over_images_and_a_missed_box_caps_recall():
    """Image A: a box found at .6; image B: a box found at .9 and one never found, plus a
    false positive at .95. Ranked: FP .95, TP .9, TP .6 over 3 boxes: recall 0, 1/3, 2/3 at
    precision 0, 1/2, 2/3: AP = 1/3 * 2/3 + 1/3 * 2/3."""
    metric = BoxAveragePrecision(1)
    zero1, zero2 = torch.zeros(1, dtype=torch.long), torch.zeros(2, dtype=torch.long)
    metric.update(torch.tensor([[0.0, 0, 4, 4]]), torch.tensor([0.6]), zero1, torch.tensor([[0.0, 0, 4, 4]]), zero1)
    metric.update(torch.tensor([[50.0, 50, 60, 60], [10, 10, 20, 20]]), torch.tensor([0.95, 0.9]), zero2,
                  torch.tensor([[10.0, 10, 20, 20], [30, 30, 40, 40]]), zero2)
    assert metric.compute()["map50"] == pytest.approx(2 * (1 / 3) * (2 / 3))


def test_difficult_boxes_are_neither_found_nor_missed():
    metric = BoxAveragePrecision(1)
    gt = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    det = torch.tensor([[20.0, 20, 30, 30], [0, 0, 10, 10]])  # the first hits the difficult box
    metric.update(det, torch.tensor([0.9, 0.5]), torch.zeros(2, dtype=torch.long), gt,
                  torch.zeros(2, dtype=torch.long), torch.tensor([False, True]))
    report = metric.compute()
    assert report["objects"] == 1 and report["map50"] == pytest.approx(1.0)


def test_classes_without_boxes_are_left_out_and_unfound_classes_score_zero():
    metric = BoxAveragePrecision(3, class_names=("a", "b", "c"))
    gt = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    # class a found exactly, class b never detected, class c detected but has no box
    metric.update(torch.tensor([[0.0, 0, 10, 10], [40, 40, 50, 50]]), torch.tensor([0.9, 0.8]),
                  torch.tensor([0, 2]), gt, torch.tensor([0, 1]))
    report = metric.compute()
    assert report["ap50_per_class"] == {"a": 1.0, "b": 0.0, "c": None}
    assert report["map50"] == pytest.approx(0.5) and report["classes_scored"] == 2


def test_average_precision_envelope_and_bad_input():
    # a non-monotonic curve: precision rises again at the end, the envelope carries it back
    recall = torch.tensor([0.25, 0.5, 0.75, 1.0])
    precision = torch.tensor([1.0, 0.5, 0.6, 0.8])
    assert average_precision(recall, precision) == pytest.approx(0.25 * 1 + 0.75 * 0.8)
    metric = BoxAveragePrecision(2)
    with pytest.raises(ValueError, match=r"labels: class indices must lie in 0..1, got 5..5"):
        metric.update(torch.zeros(1, 4), torch.ones(1), torch.tensor([5]), torch.zeros(0, 4),
                      torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"gt_boxes: expected \(N, 4\) horizontal boxes, got shape \(1, 8\)"):
        metric.update(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(1, 8),
                      torch.zeros(1, dtype=torch.long))


# -- boxes through the sample transforms -------------------------------------------------------


def test_horizontal_hull_crop_and_flip():
    corners = torch.tensor([[1.0, 1, 9, 2, 8, 6, 0, 5]])
    assert horizontal_boxes(corners).tolist() == [[0, 1, 9, 6]]
    sample = {"boxes": torch.tensor([[10.0, 10, 30, 20], [0, 0, 5, 5], [40, 40, 41.5, 60]]),
              "labels": torch.tensor([1, 2, 3]), "difficult": torch.tensor([False, True, False])}
    cut = crop_boxes(sample, top=8, left=4, height=32, width=32)
    # box 1 moves; box 2 is left 1 x 0 pixels and goes; box 3 lies outside the window and goes
    assert cut["boxes"].tolist() == [[6, 2, 26, 12]] and cut["labels"].tolist() == [1]
    assert cut["difficult"].tolist() == [False]
    flipped = flip_boxes(torch.tensor([[6.0, 2, 26, 12]]), height=32, width=32, horizontal=True, vertical=True)
    assert flipped.tolist() == [[6, 20, 26, 30]]


@pytest.fixture(scope="module")
def dior_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DIOR-layout folder: 6 images of 96 px, noise with 1-2 bright squares of two classes."""
    root = tmp_path_factory.mktemp("dior")
    images = root / "JPEGImages-trainval"
    annotations = root / "Annotations" / "Horizontal Bounding Boxes"
    lists = root / "ImageSets" / "Main"
    for folder in (images, annotations, lists):
        folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = {0: "airplane", 18: "vehicle"}
    ids = []
    for n in range(6):
        image = rng.integers(40, 80, size=(96, 96, 3)).astype(np.uint8)
        objects = ""
        for k, (cls, colour) in enumerate(((0, (250, 40, 40)), (18, (40, 250, 40)))[: 1 + n % 2]):
            x, y, s = 8 + 40 * k + n, 10 + 30 * k, 20 + 2 * n
            image[y:y + s, x:x + s] = colour
            objects += (f"<object><name>{names[cls]}</name><bndbox><xmin>{x}</xmin><ymin>{y}</ymin>"
                        f"<xmax>{x + s}</xmax><ymax>{y + s}</ymax></bndbox></object>")
        sample_id = f"{n + 1:05d}"
        ids.append(sample_id)
        Image.fromarray(image).save(images / f"{sample_id}.png")
        (annotations / f"{sample_id}.xml").write_text(f"<annotation>{objects}</annotation>")
    (lists / "train.txt").write_text("\n".join(ids[:4]) + "\n")
    (lists / "test.txt").write_text("\n".join(ids[4:]) + "\n")
    return root


def test_augmented_boxes_still_frame_their_objects(dior_like):
    """Random crops and flips of a DIOR sample: each box still encloses a bright square."""
    model = SkySense.from_preset("tiny")
    samples = TrainingSamples(DIOR(dior_like, split="train"), model.config, "detection", model_keys(("hr",), False),
                              crop_size=64)
    seen = 0
    for seed in range(8):
        sample = samples[(1, seed)]
        assert sample["hr"].shape == (3, 64, 64) and sample["boxes"].shape[1] == 4
        for box in sample["boxes"]:
            x0, y0, x1, y1 = (int(round(float(v))) for v in box)
            inside = sample["hr"][:, y0:y1, x0:x1]
            rim = sample["hr"][:, max(0, y0 - 3):y1 + 3, max(0, x0 - 3):x1 + 3]
            # the object is saturated in R or G: its pixels are far above the dark background
            assert inside.amax(0).mean() > rim.amax(0).mean() - 1e-6 and inside.amax(0).mean() > 1.0
            seen += 1
    assert seen >= 8


# -- the task model ---------------------------------------------------------------------------


def _batch() -> dict:
    return {"hr": torch.randn(2, 3, 100, 72),
            "boxes": [torch.tensor([[10.0, 20, 40, 60], [50, 50, 70, 90]]), torch.zeros(0, 4)],
            "labels": [torch.tensor([0, 2]), torch.zeros(0, dtype=torch.long)],
            "difficult": [torch.tensor([False, True]), torch.zeros(0, dtype=torch.bool)]}


def test_detection_model_trains_and_detects(tiny_model):
    torch.manual_seed(0)
    model = build_task_model(tiny_model, TaskSpec("detection", 3, ("hr",), decoder_channels=32))
    batch = _batch()
    targets = model.box_targets(batch)
    assert targets[0]["labels"].tolist() == [1] and targets[0]["boxes"].tolist() == [[10, 20, 40, 60]]
    model.train()
    outputs = model(batch)
    total, terms = model.loss(outputs, batch)
    assert set(terms) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert math.isfinite(total.item()) and terms["loss_box_reg"].item() > 0
    total.backward()
    encoder_grad = model.encoder.hr_encoder.patch_embed.weight.grad
    assert encoder_grad is not None and encoder_grad.abs().sum() > 0
    assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    model.eval()
    with torch.inference_mode():
        found = model(batch)["detections"]
    assert len(found) == 2
    for d in found:
        assert d["boxes"].shape[1] == 4 and d["boxes"].shape[0] == d["scores"].shape[0] <= 100
        assert (d["boxes"][:, 2] <= 72).all() and (d["boxes"][:, 3] <= 100).all() and (d["boxes"] >= 0).all()
        assert ((d["labels"] >= 0) & (d["labels"] < 3)).all()
    with pytest.raises(ValueError, match=r"losses come from a forward pass in training mode"):
        model.loss({"detections": found}, batch)


def test_detection_model_bad_input(tiny_model):
    model = build_task_model(tiny_model, TaskSpec("detection", 3, ("hr",), decoder_channels=32)).train()
    batch = _batch()
    batch["boxes"] = [torch.zeros(1, 8), torch.zeros(0, 8)]
    with pytest.raises(ValueError, match=r"image 0: boxes must be horizontal \(N, 4\), got shape \(1, 8\)"):
        model(batch)
    batch = _batch()
    batch["labels"] = [torch.tensor([0, 3]), torch.zeros(0, dtype=torch.long)]
    with pytest.raises(ValueError, match=r"image 0: labels must lie in 0..2, got 0..3"):
        model(batch)
    with pytest.raises(ValueError, match=r"'hr' must be among the modalities, got \('s2',\)"):
        TaskSpec("detection", 3, ("s2",))


@pytest.mark.slow
def test_detection_learns_squares():
    """Fine-tuned from random init on noise with red and green squares, the model finds them
    on unseen images: mAP50 well above what an untrained model gets."""
    def scene(g: torch.Generator, size: int = 96) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = torch.randn(3, size, size, generator=g) * 0.3
        boxes, labels = [], []
        for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
            k = int(torch.randint(0, 2, (1,), generator=g))
            s = int(torch.randint(16, 36, (1,), generator=g))
            x, y = (int(v) for v in torch.randint(0, size - s, (2,), generator=g))
            image[k, y:y + s, x:x + s] += 2.0
            boxes.append([x, y, x + s, y + s])
            labels.append(k)
        return image, torch.tensor(boxes, dtype=torch.float32), torch.tensor(labels)

    before, after = learned_map50("detection", scene, 100)
    assert before < 0.05 and after > 0.6, (before, after)



# -- fine-tuning, evaluation, the command line --------------------------------------------------


@pytest.mark.slow
def test_finetune_evaluate_and_cli_on_a_dior_layout(dior_like, tmp_path, capsys):
    config = FinetuneConfig.from_dict(dict(task="detection", dataset="dior", data_root=str(dior_like), preset="tiny",
                                           batch_size=2, max_steps=2, checkpoint_every=2, crop_size=64,
                                           decoder_channels=32, num_threads=1))
    rows = finetune(config, tmp_path / "run", progress=False)
    assert len(rows) == 2 and all(math.isfinite(r["loss/loss_classifier"]) for r in rows)
    model = load_finetuned(tmp_path / "run")
    assert model.spec.task == "detection" and model.spec.class_names == DIOR_CLASSES
    report = evaluate_run(tmp_path / "run", predictions=tmp_path / "pred", progress=False)
    assert report["split"] == "test" and report["samples"] == 2 and report["images"] == 2
    assert report["objects"] == 3 and report["classes_scored"] == 2 and 0.0 <= report["map50"] <= 1.0
    assert report["predictions_written"] == 2 and report["drop_fragments"] is True
    written = json.loads((tmp_path / "pred" / "00005.json").read_text())
    assert set(written) == {"boxes", "scores", "labels", "classes"}
    assert all(c in DIOR_CLASSES for c in written["classes"])
    assert main(["evaluate", "detection", "--weights", str(tmp_path / "run"), "--no-progress", "--json",
                 "--keep-fragments"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["map50"] == pytest.approx(report["map50"]) and printed["task"] == "detection"
    assert printed["drop_fragments"] is False
    samples = EvaluationSamples(DIOR(dior_like, split="test"), model.config, model_keys(("hr",), False),
                                task="detection")
    assert samples[0]["boxes"].shape == (1, 4)


@pytest.mark.real_data
@pytest.mark.slow
def test_quick_detection_on_real_dota_images(data_root, tmp_path):
    """Two steps on the real DOTA sample images (oriented boxes as horizontal hulls), then the
    evaluation over both images: valid scores over every labelled object."""
    root = data_root / "samples" / "dota"
    config = FinetuneConfig.from_dict(dict(task="detection", dataset="dota", data_root=str(root), preset="tiny",
                                           train_split="all", eval_split="all", batch_size=2, max_steps=2,
                                           checkpoint_every=2, crop_size=256, decoder_channels=32, num_threads=1))
    rows = finetune(config, tmp_path / "run", progress=False)
    assert all(math.isfinite(r["loss"]) for r in rows)
    report = evaluate_run(tmp_path / "run", window=512, stride=400, predictions=tmp_path / "pred", progress=False)
    dataset = DOTA(root)
    objects = sum(int((~dataset[i]["difficult"]).sum()) for i in range(len(dataset)))
    assert report["images"] == len(dataset) == 2 and report["objects"] == objects
    assert 0.0 <= report["map50"] <= 1.0 and report["predictions_written"] == 2


def _coordinate_image(height: int, width: int) -> torch.Tensor:
    """A (1, 3, H, W) image whose band 0 holds each pixel's x and band 1 its y: a window knows where it is."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    return torch.stack([xs, ys, torch.zeros_like(xs)])[None]


def _as_task_output(found: dict[str, torch.Tensor], task: str) -> dict[str, torch.Tensor]:
    """A fake detector's horizontal ``boxes`` as ``task``'s model reports them (oriented: rectangles at angle 0
    and their corners)."""
    if task != "oriented_detection":
        return found
    box = found["boxes"]
    return {**found, "corners": box[:, [0, 1, 2, 1, 2, 3, 0, 3]],
            "boxes": torch.cat([(box[:, :2] + box[:, 2:]) / 2, box[:, 2:] - box[:, :2], torch.zeros(box.shape[0], 1)], 1)}


@pytest.mark.parametrize("task", ["detection", "oriented_detection"])
def test_windows_move_detections_into_the_scene_and_merge_duplicates(tiny_model, task, monkeypatch):
    """Every window that wholly holds the object (scene pixels 60..80 x 40..60) reports it in its
    own pixels; merged, the scene has it once, at its place."""
    model = build_task_model(tiny_model, TaskSpec(task, 3, ("hr",), decoder_channels=32)).eval()
    windows = []

    def fake_forward(batch):
        x, y = int(batch["hr"][0, 0, 0, 0]), int(batch["hr"][0, 1, 0, 0])
        h, w = batch["hr"].shape[-2:]
        windows.append((x, y, w, h))
        inside = x <= 60 and y <= 40 and x + w >= 80 and y + h >= 60
        box = torch.tensor([[60.0 - x, 40 - y, 80 - x, 60 - y]])[:int(inside)]
        found = {"boxes": box, "scores": torch.full((box.shape[0],), 0.9 - 0.001 * len(windows)),
                 "labels": torch.full((box.shape[0],), 2)}
        return {"detections": [_as_task_output(found, task)]}

    monkeypatch.setattr(model, "forward", fake_forward)
    found = model.detect({"hr": _coordinate_image(100, 160)}, window=64, stride=48)[0]
    assert windows == [(x, y, 64, 64) for y in (0, 36) for x in (0, 48, 96)]
    assert sum(1 for x, y, w, h in windows if x <= 60 and y <= 40 and x + w >= 80 and y + h >= 60) == 2
    assert found["labels"].tolist() == [2] and found["scores"].tolist() == [pytest.approx(0.898)]  # the 2nd window's, the best
    if task == "detection":
        assert found["boxes"].tolist() == [[60, 40, 80, 60]]
    else:
        assert found["boxes"].tolist() == [[70, 50, 20, 20, 0]]
        assert found["corners"].tolist() == [[60, 40, 80, 40, 80, 60, 60, 60]]
    # an image no larger than the window runs whole
    windows.clear()
    model.detect({"hr": _coordinate_image(64, 64)}, window=64)
    assert windows == [(0, 0, 64, 64)]


@pytest.mark.parametrize("task", ["detection", "oriented_detection"])
def test_windows_drop_fragments_of_objects_another_window_sees_whole(tiny_model, task, monkeypatch):
    """A fake detector reports what each window shows of two objects, a part outscoring the whole.
    Object A (20..56 x 10..30) fits in the first window; the second shows its right end, which plain NMS
    keeps (IoU 0.22) and the merge drops as a fragment. Object B (40..120 x 70..90) is wider than
    the windows' overlap, so every window cuts it: its parts are all it has, and none is dropped."""
    model = build_task_model(tiny_model, TaskSpec(task, 3, ("hr",), decoder_channels=32)).eval()
    objects = torch.tensor([[20.0, 10, 56, 30], [40, 70, 120, 90]])

    def fake_forward(batch):
        x, y = int(batch["hr"][0, 0, 0, 0]), int(batch["hr"][0, 1, 0, 0])
        h, w = batch["hr"].shape[-2:]
        low = torch.maximum(objects[:, :2], torch.tensor([x, y]))
        high = torch.minimum(objects[:, 2:], torch.tensor([x + w, y + h]))
        seen = (high > low).all(1)
        box = torch.cat([low, high], 1)[seen] - torch.tensor([x, y, x, y])
        whole = (box[:, 2:] - box[:, :2] == objects[seen, 2:] - objects[seen, :2]).all(1)
        found = {"boxes": box, "scores": torch.where(whole, 0.9, 0.95), "labels": torch.tensor([0, 1])[seen]}
        return {"detections": [_as_task_output(found, task)]}

    monkeypatch.setattr(model, "forward", fake_forward)
    scene = {"hr": _coordinate_image(100, 160)}
    key = "corners" if task == "oriented_detection" else "boxes"

    def outlines(found, label):
        return sorted(horizontal_boxes(found[key][found["labels"] == label]).tolist())

    merged = model.detect(scene, window=64, stride=48)[0]
    assert outlines(merged, 0) == [[20, 10, 56, 30]]
    # B's parts: only NMS merges them (the oriented head's threshold, 0.1, takes the middle one)
    parts = [[40, 70, 64, 90], [48, 70, 112, 90], [96, 70, 120, 90]]
    assert outlines(merged, 1) == (parts if task == "detection" else parts[::2])
    plain = model.detect(scene, window=64, stride=48, drop_fragments=False)[0]
    # plain NMS keeps A's fragment beside it (IoU 0.22 < 0.5), or instead of it (> 0.1, and it scores higher)
    assert outlines(plain, 0) == ([[20, 10, 56, 30], [48, 10, 56, 30]] if task == "detection" else [[48, 10, 56, 30]])
    assert outlines(plain, 1) == outlines(merged, 1)


def test_cut_by_window_and_box_coverage():
    hulls = torch.tensor([[0.0, 10, 20, 20], [30, 30, 40, 62], [10, 10, 20, 20]])
    # a window at (32, 0) of 64 x 64 in a 64-high scene: its left edge is inside, its bottom is the scene's
    assert cut_by_window(hulls, (32, 0, 64, 64), (64, 200), 4.0).tolist() == [True, False, False]
    # the same window in a taller scene: the bottom edge is inside too
    assert cut_by_window(hulls, (32, 0, 64, 64), (128, 200), 4.0).tolist() == [True, True, False]
    # the first window of the scene: only its right and bottom edges can cut
    assert cut_by_window(hulls, (0, 0, 64, 64), (64, 64), 4.0).tolist() == [False, False, False]
    part, whole = torch.tensor([[0.0, 0, 10, 10], [5, 5, 5, 9]]), torch.tensor([[5.0, 0, 20, 10], [0, 0, 1, 1]])
    assert box_coverage(part, whole).tolist() == [[0.5, pytest.approx(0.01)], [0.0, 0.0]]
    with pytest.raises(ValueError, match=r"box_coverage: whole: expected \(N, 4\) boxes, got shape \(2, 8\)"):
        box_coverage(part, torch.zeros(2, 8))


@pytest.mark.parametrize("oriented", [False, True])
def test_window_merge_benchmark_scenes_frame_their_objects(oriented):
    """The scenes of benchmarks/window_merge.py: every object lies in the image, bright in its class's band."""
    from window_merge import scene

    g = torch.Generator().manual_seed(5)
    for _ in range(5):
        image, boxes, labels = scene(g, 128, (3, 6), (16, 48), oriented)
        assert image.shape == (3, 128, 128) and 3 <= labels.numel() <= 6
        assert boxes.shape == (labels.numel(), 8 if oriented else 4)
        hulls = horizontal_boxes(boxes)
        assert hulls.min() >= 0 and hulls.max() <= 128
        centres = ((hulls[:, :2] + hulls[:, 2:]) / 2).long()
        assert (image[labels, centres[:, 1], centres[:, 0]] > 1.0).all()
