"""Detection over windows: plain NMS against dropping fragments, on scenes larger than a window.

Trains a ``tiny`` detector from random init (FPN 64, seed 0, AdamW lr 1e-3, batches of 4) on
96-pixel scenes of noise with red and green squares (or, ``--task oriented_detection``, rotated
bars), then scores unseen 256-pixel scenes with more objects three ways: the whole scene in one
pass (the reference: nothing is cut), windows of 96 pixels every 64 merged by plain NMS, and the
same windows with fragments dropped before NMS
(:meth:`skysense.downstream.detection.DetectionModel.detect`). Prints mAP50 and the number of
detections per scene of each, and writes them as JSON with ``--out``.

    python benchmarks/window_merge.py --steps 150
    python benchmarks/window_merge.py --task oriented_detection --steps 200
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

from skysense import SkySense
from skysense.downstream.rotated_boxes import rbox_to_corners
from skysense.downstream.tasks import TaskSpec, build_task_model
from skysense.evaluation.box_ap import BoxAveragePrecision


def scene(g: torch.Generator, size: int, objects: tuple[int, int], sides: tuple[int, int], oriented: bool
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise with coloured squares (horizontal boxes) or bars (corners): image (3, size, size), boxes, labels."""
    image = torch.randn(3, size, size, generator=g) * 0.3
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    boxes, labels = [], []
    for _ in range(int(torch.randint(objects[0], objects[1] + 1, (1,), generator=g))):
        k = int(torch.randint(0, 2, (1,), generator=g))
        side = int(torch.randint(sides[0], sides[1] + 1, (1,), generator=g))
        if oriented:
            w, h = float(side), float(side) / 3
            angle = float(torch.rand(1, generator=g)) * math.pi - math.pi / 2
            reach = (abs(w * math.cos(angle)) + abs(h * math.sin(angle))) / 2 + 1
            reach_y = (abs(w * math.sin(angle)) + abs(h * math.cos(angle))) / 2 + 1
            cx = reach + float(torch.rand(1, generator=g)) * (size - 2 * reach)
            cy = reach_y + float(torch.rand(1, generator=g)) * (size - 2 * reach_y)
            c, s = math.cos(angle), math.sin(angle)
            u, v = (xs - cx) * c + (ys - cy) * s, -(xs - cx) * s + (ys - cy) * c
            image[k] += 2.0 * ((u.abs() <= w / 2) & (v.abs() <= h / 2))
            boxes.append(rbox_to_corners(torch.tensor([[cx, cy, w, h, angle]]))[0])
        else:
            x, y = (int(v) for v in torch.randint(0, size - side, (2,), generator=g))
            image[k, y:y + side, x:x + side] += 2.0
            boxes.append(torch.tensor([x, y, x + side, y + side], dtype=torch.float32))
        labels.append(k)
    return image, torch.stack(boxes).float(), torch.tensor(labels)


Scene = Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""A synthetic detection scene from a generator: image (3, H, W), boxes, labels (2 classes)."""


def tiny_detector(task: str, detector: str | None = None) -> torch.nn.Module:
    """A ``tiny`` SkySense detector for 2 classes, FPN 64, random init from seed 0."""
    torch.manual_seed(0)
    return build_task_model(SkySense.from_preset("tiny"), TaskSpec(task, 2, ("hr",), decoder_channels=64,
                                                                   detector=detector))


def train_detector(model: torch.nn.Module, scenes: Scene, steps: int, progress: bool = False) -> None:
    """``steps`` AdamW steps (lr 1e-3) on batches of 4 fresh scenes drawn from seed 1."""
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in tqdm(range(steps), desc="training", disable=not progress):
        items = [scenes(g) for _ in range(4)]
        batch = {"hr": torch.stack([i[0] for i in items]), "boxes": [i[1] for i in items],
                 "labels": [i[2] for i in items]}
        total, _ = model.loss(model(batch), batch)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("detection", "oriented_detection"), default="detection")
    parser.add_argument("--detector", default=None, help="oriented_detection: rotated_faster_rcnn or oriented_rcnn")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--scenes", type=int, default=24, help="evaluation scenes")
    parser.add_argument("--scene-size", type=int, default=256)
    parser.add_argument("--window", type=int, default=96)
    parser.add_argument("--stride", type=int, default=64)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    oriented = args.task == "oriented_detection"
    model = tiny_detector(args.task, args.detector)
    start = time.perf_counter()
    train_detector(model, lambda g: scene(g, 96, (1, 2), (16, 48), oriented), args.steps, progress=True)
    trained = time.perf_counter() - start
    model.eval()
    ways = {"whole scene": {}, "windows, plain NMS": {"window": args.window, "stride": args.stride,
                                                       "drop_fragments": False},
            "windows, fragments dropped": {"window": args.window, "stride": args.stride}}
    metrics = {name: BoxAveragePrecision(2, oriented=oriented) for name in ways}
    counts = {name: 0 for name in ways}
    g = torch.Generator().manual_seed(99)
    key = "corners" if oriented else "boxes"
    with torch.inference_mode():
        for _ in tqdm(range(args.scenes), desc="scoring"):
            image, boxes, labels = scene(g, args.scene_size, (6, 10), (16, 48), oriented)
            for name, options in ways.items():
                found = model.detect({"hr": image[None]}, **options)[0]
                metrics[name].update(found[key], found["scores"], found["labels"], boxes, labels)
                counts[name] += found["scores"].numel()
    results = {"task": args.task, "detector": args.detector, "steps": args.steps, "training_s": round(trained, 1), "scenes": args.scenes,
               "scene_size": args.scene_size, "window": args.window, "stride": args.stride, "ways": {}}
    print(f"{args.task} ({args.detector or 'default detector'}): {args.steps} training steps ({trained:.0f} s); {args.scenes} scenes of "
          f"{args.scene_size} px, windows {args.window} every {args.stride}")
    print(f"{'':28s} {'mAP50':>7s} {'detections/scene':>17s}")
    for name in ways:
        score = metrics[name].compute()["map50"]
        per_scene = counts[name] / args.scenes
        results["ways"][name] = {"map50": round(score, 4), "detections_per_scene": round(per_scene, 2)}
        print(f"{name:28s} {score:7.4f} {per_scene:17.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
