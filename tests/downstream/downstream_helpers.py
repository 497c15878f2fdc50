"""Helpers shared by the downstream tests."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from window_merge import Scene, tiny_detector, train_detector  # noqa: E402


class Samples(torch.utils.data.Dataset):
    """A list of sample dicts as a dataset (each item a shallow copy)."""

    def __init__(self, samples: list[dict]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return dict(self.samples[index])


def learned_map50(task: str, scene: Scene, steps: int, detector: str | None = None) -> tuple[float, float]:
    """mAP50 on 12 unseen scenes of a ``tiny`` detector (FPN 64, random init, seed 0) before
    and after ``steps`` AdamW steps (lr 1e-3) on batches of 4 fresh scenes."""
    from skysense.evaluation.box_ap import BoxAveragePrecision

    oriented = task == "oriented_detection"

    def score(model: torch.nn.Module) -> float:
        metric, g = BoxAveragePrecision(2, oriented=oriented), torch.Generator().manual_seed(99)
        model.eval()
        with torch.inference_mode():
            for _ in range(12):
                image, boxes, labels = scene(g)
                found = model({"hr": image[None]})["detections"][0]
                metric.update(found["corners" if oriented else "boxes"], found["scores"], found["labels"], boxes,
                              labels)
        return metric.compute()["map50"]

    model = tiny_detector(task, detector)
    before = score(model)
    train_detector(model, scene, steps)
    after = score(model)
    print(f"{task} ({detector or 'default'}): mAP50 untrained {before:.4f}, after {steps} steps {after:.4f}")
    return before, after
