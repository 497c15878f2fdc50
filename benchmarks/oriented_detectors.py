"""Rotated Faster R-CNN against Oriented R-CNN, trained the same way on rotated bars.

Each detector starts from the same random init (``tiny``, FPN 64, seed 0) and takes the same
AdamW steps (lr 1e-3, batches of 4 scenes from seed 1) on 96-pixel noise scenes with 1-2 bars of
16-48 x 5-16 pixels at any angle (the scenes of ``benchmarks/window_merge.py``); then mAP50 of
the quadrilaterals on unseen scenes of several sizes and object counts (seed 99), each in one
pass. Prints a table and writes JSON with ``--out``.

    python benchmarks/oriented_detectors.py --steps 150
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from skysense.evaluation.box_ap import BoxAveragePrecision
from window_merge import scene, tiny_detector, train_detector

DETECTORS = ("rotated_faster_rcnn", "oriented_rcnn")
EVALUATIONS = ((96, (1, 2)), (96, (3, 4)), (160, (1, 2)), (256, (1, 2)), (256, (6, 10)))
"""(scene side, (fewest, most) objects) of each evaluation."""


def score(model: torch.nn.Module, size: int, objects: tuple[int, int], scenes: int) -> tuple[float, float]:
    """mAP50 over ``scenes`` unseen scenes and the mean number of detections per scene."""
    metric, g, found_total = BoxAveragePrecision(2, oriented=True), torch.Generator().manual_seed(99), 0
    model.eval()
    with torch.inference_mode():
        for _ in range(scenes):
            image, boxes, labels = scene(g, size, objects, (16, 48), True)
            found = model({"hr": image[None]})["detections"][0]
            found_total += found["scores"].numel()
            metric.update(found["corners"], found["scores"], found["labels"], boxes, labels)
    return metric.compute()["map50"], found_total / scenes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--scenes", type=int, default=12, help="unseen scenes per evaluation")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    results = {"steps": args.steps, "scenes": args.scenes, "detectors": {}}
    for detector in DETECTORS:
        model = tiny_detector("oriented_detection", detector)
        start = time.perf_counter()
        train_detector(model, lambda g: scene(g, 96, (1, 2), (16, 48), True), args.steps, progress=True)
        trained = time.perf_counter() - start
        rows = {}
        for size, objects in EVALUATIONS:
            start = time.perf_counter()
            map50, per_scene = score(model, size, objects, args.scenes)
            rows[f"{size}px, {objects[0]}-{objects[1]} objects"] = {
                "map50": round(map50, 4), "detections_per_scene": round(per_scene, 2),
                "seconds": round(time.perf_counter() - start, 1)}
        results["detectors"][detector] = {"training_s": round(trained, 1), "evaluations": rows}
    print(f"{args.steps} training steps; mAP50 (detections per scene) on {args.scenes} unseen scenes each")
    names = list(results["detectors"][DETECTORS[0]]["evaluations"])
    print(f"{'':22s}" + "".join(f"{d:>24s}" for d in DETECTORS))
    for name in names:
        cells = [results["detectors"][d]["evaluations"][name] for d in DETECTORS]
        print(f"{name:22s}" + "".join(f"{c['map50']:>15.4f} ({c['detections_per_scene']:5.1f})" for c in cells))
    print(f"{'training seconds':22s}" + "".join(f"{results['detectors'][d]['training_s']:>24.1f}" for d in DETECTORS))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
