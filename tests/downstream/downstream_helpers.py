"""Helpers shared by the downstream tests."""

from __future__ import annotations

from collections.abc import Callable

import torch


class Samples(torch.utils.data.Dataset):
    """A list of sample dicts as a dataset (each item a shallow copy)."""

    def __init__(self, samples: list[dict]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return dict(self.samples[index])


Scene = Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""A synthetic detection scene from a generator: image (3, H, W), boxes, labels (2 classes)."""


def learned_map50(task: str, scene: Scene, steps: int) -> tuple[float, float]:
    """mAP50 on 12 unseen scenes of a ``tiny`` detector (FPN 64, random init, seed 0) before
    and after ``steps`` AdamW steps (lr 1e-3) on batches of 4 fresh scenes."""
    from skysense import SkySense
    from skysense.downstream.tasks import TaskSpec, build_task_model
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

    torch.manual_seed(0)
    model = build_task_model(SkySense.from_preset("tiny"), TaskSpec(task, 2, ("hr",), decoder_channels=64))
    before = score(model)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        items = [scene(g) for _ in range(4)]
        batch = {"hr": torch.stack([i[0] for i in items]), "boxes": [i[1] for i in items],
                 "labels": [i[2] for i in items]}
        total, _ = model.loss(model(batch), batch)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    after = score(model)
    print(f"{task}: mAP50 untrained {before:.4f}, after {steps} steps {after:.4f}")
    return before, after
