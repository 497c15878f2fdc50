"""``evaluate_model`` on in-memory samples: dense scores equal the metrics of the arg-max maps."""

from __future__ import annotations

import pytest
import torch
from affine import Affine
from rasterio.crs import CRS

from skysense import SkySense
from skysense.data.units import normalize
from skysense.downstream.evaluate import evaluate_model
from skysense.downstream.sliding_window import sliding_window
from skysense.downstream.tasks import TaskSpec, build_task_model
from skysense.evaluation.metrics import SemanticChangeScore, change_scores, confusion_matrix

from downstream_helpers import Samples


@pytest.fixture(scope="module")
def encoder() -> SkySense:
    torch.manual_seed(0)
    return SkySense.from_preset("tiny")


def _semantic_change_samples() -> list[dict]:
    g = torch.Generator().manual_seed(3)
    samples = []
    for i in range(2):
        before = torch.randint(0, 4, (40, 48), generator=g)
        after = torch.where(torch.rand(40, 48, generator=g) < 0.3, torch.randint(0, 4, (40, 48), generator=g), before)
        after[:3] = -1
        change = (before != after).long()
        change[after == -1] = -1
        samples.append({"hr": torch.rand(3, 40, 48, generator=g) * 255, "hr_post": torch.rand(3, 40, 48, generator=g) * 255,
                        "mask": before, "mask_post": after, "change": change, "id": f"tile/{i}",
                        "crs": CRS.from_epsg(3857), "transform": Affine(0.5, 0, 1000.0 * i, 0, -0.5, 0)})
    return samples


def test_semantic_change_scores_and_predictions(encoder, tmp_path):
    model = build_task_model(encoder, TaskSpec("change", 2, modalities=("hr",), semantic_classes=4,
                                               decoder_channels=16)).eval()
    samples = _semantic_change_samples()
    report = evaluate_model(model, Samples(samples), window=32, stride=16, predictions=tmp_path, progress=False)

    cm = torch.zeros(2, 2, dtype=torch.int64)
    scs = SemanticChangeScore(4)
    with torch.no_grad():
        for s in samples:
            batch = {k: v[None] for k, v in s.items() if isinstance(v, torch.Tensor)}
            batch["hr_post"] = normalize({"hr": batch["hr_post"]}, encoder.config)["hr"]
            normalize(batch, encoder.config)
            out = {k: v.argmax(1) for k, v in sliding_window(model, batch, 32, 16).items()}
            cm += confusion_matrix(out["change"], batch["change"], 2)
            scs.update(batch["change"], out["change"], batch["mask_post"], out["mask_post"])
    assert report["confusion_matrix"] == cm.tolist()
    for key, value in {**change_scores(cm), **scs.compute()}.items():
        assert report[key] == pytest.approx(value)
    assert report["pixels"] == int((torch.stack([s["change"] for s in samples]) >= 0).sum())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tile_0.tif", "tile_0_post.tif", "tile_1.tif",
                                                          "tile_1_post.tif"]


def test_segmentation_report_and_empty_split(encoder):
    model = build_task_model(encoder, TaskSpec("segmentation", 3, modalities=("hr",), decoder_channels=16,
                                               class_names=("a", "b", "c"))).eval()
    g = torch.Generator().manual_seed(0)
    samples = [{"hr": torch.rand(3, 64, 64, generator=g) * 255, "mask": torch.randint(-1, 3, (64, 64), generator=g)}]
    report = evaluate_model(model, Samples(samples), progress=False)
    assert set(report["iou_per_class"]) == {"a", "b", "c"} and 0 <= report["miou"] <= 1
    assert report["pixels"] == int((samples[0]["mask"] >= 0).sum())
    with pytest.raises(ValueError, match="empty"):
        evaluate_model(model, Samples([]), progress=False)
