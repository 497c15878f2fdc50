"""fMoW-Sentinel classification: samples of different sizes are resized per sample and batch together."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from skysense.config import preset_config
from skysense.data.sample import collate
from skysense.downstream.data import TrainingSamples, model_keys, resize_series
from skysense.downstream.evaluate import evaluate_run
from skysense.downstream.finetune import TASK_NAME, FinetuneConfig, build_dataset, finetune, task_spec
from skysense.downstream.registry import REGISTRY
from skysense.downstream.tasks import TaskSpec

from downstream_helpers import Samples

SIZES = {"airport": 20, "dam": 33, "zoo": 47}
"""Side of each location's images (fMoW-Sentinel images follow each location's footprint)."""


def _series(size: int, frames: int = 2, value: float = 1000.0) -> dict:
    return {"s2": torch.full((frames, 10, size, size), value), "s2_dates": torch.tensor([10, 200][:frames]),
            "s2_mask": torch.ones(frames, dtype=torch.bool), "label": torch.tensor(size % 3)}


def test_resize_series_touches_only_the_sentinel_frames():
    g = torch.Generator().manual_seed(0)
    sample = {"s2": torch.rand(3, 10, 13, 17, generator=g), "s1": torch.full((1, 2, 40, 40), -12.0),
              "hr": torch.rand(3, 64, 64, generator=g), "mask": torch.zeros(64, 64, dtype=torch.int64),
              "label": torch.tensor(4)}
    out = resize_series(sample, 24)
    assert out["s2"].shape == (3, 10, 24, 24) and out["s1"].shape == (1, 2, 24, 24)
    assert torch.allclose(out["s1"], torch.tensor(-12.0))  # a constant image stays constant
    assert out["hr"] is sample["hr"] and out["mask"] is sample["mask"] and out["label"] is sample["label"]
    # Each frame on its own: frame 1 resized alone equals frame 1 of the series resized.
    alone = resize_series({"s2": sample["s2"][1:2]}, 24)["s2"][0]
    assert torch.equal(alone, out["s2"][1])
    assert resize_series(out, 24)["s2"] is out["s2"]  # already that size: kept
    with pytest.raises(ValueError, match="sentinel_size"):
        resize_series(sample, 0)


def test_training_samples_of_different_sizes_collate_only_when_resized():
    config = preset_config("tiny")
    samples = Samples([_series(size, frames) for size, frames in zip(SIZES.values(), (2, 1, 2))])
    keys = model_keys(("s2",), False)
    resized = TrainingSamples(samples, config, "classification", keys, sentinel_size=32)
    batch = collate([resized[(i, i)] for i in range(3)])
    assert batch["s2"].shape == (3, 2, 10, 32, 32) and batch["s2_mask"].tolist() == [[True, True], [True, False],
                                                                                       [True, True]]
    assert batch["label"].tolist() == [2, 0, 2]
    as_read = TrainingSamples(samples, config, "classification", keys)
    with pytest.raises(ValueError, match="key 's2': per-frame shapes differ"):
        collate([as_read[(i, i)] for i in range(3)])
    with pytest.raises(ValueError, match="only for classification"):
        TrainingSamples(samples, config, "segmentation", keys, crop_size=32, sentinel_size=32)
    with pytest.raises(ValueError, match="sentinel_size: a positive side for classification only"):
        TaskSpec("segmentation", 3, modalities=("s2",), sentinel_size=32)


def _write_fmow(root: Path) -> Path:
    """fMoW-Sentinel layout: three locations of two dates, 13-band L1C GeoTIFFs of different sizes."""
    rng = np.random.default_rng(0)
    lines = ["category,location_id,image_id,timestamp,polygon"]
    for k, (category, size) in enumerate(SIZES.items()):
        for image, stamp in ((0, "2017-03-01T10:00:00Z"), (1, "2018-08-15T10:00:00Z")):
            lines.append(f'{category},{k},{image},{stamp},"POLYGON ((10.0 50.0, 10.1 50.0, 10.1 50.1, 10.0 50.0))"')
            path = root / "train" / category / f"{category}_{k}" / f"{category}_{k}_{image}.tif"
            path.parent.mkdir(parents=True, exist_ok=True)
            data = (800 + 600 * k + rng.integers(0, 200, (13, size, size))).astype(np.uint16)
            with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=13, dtype="uint16",
                               crs="EPSG:4326", transform=from_origin(10.0, 50.1, 1e-4, 1e-4)) as dst:
                dst.write(data)
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def fmow_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_fmow(tmp_path_factory.mktemp("fmow"))


def _config(root: Path, **changes) -> FinetuneConfig:
    values = dict(task="classification", dataset="fmow_sentinel", data_root=str(root), preset="tiny",
                  train_split="train", eval_split="train", batch_size=3, max_steps=1, checkpoint_every=1,
                  num_threads=1, optim={"warmup_steps": 1})
    values.update(changes)
    return FinetuneConfig.from_dict(values)


def test_fmow_sentinel_step_with_a_chosen_size(fmow_like, tmp_path):
    rows = finetune(_config(fmow_like, sentinel_size=32), tmp_path / "run", progress=False)
    assert len(rows) == 1 and math.isfinite(rows[0]["loss"]) and rows[0]["grad_norm"] > 0
    spec = json.loads((tmp_path / "run" / TASK_NAME).read_text())["spec"]
    assert spec["sentinel_size"] == 32 and spec["modalities"] == ["s2"]
    report = evaluate_run(tmp_path / "run", progress=False)  # evaluation resizes the same way
    assert report["samples"] == 3 and 0.0 <= report["oa"] <= 1.0

    with pytest.raises(ValueError, match="key 's2': per-frame shapes differ"):
        finetune(_config(fmow_like, sentinel_size=0), tmp_path / "as_read", progress=False)


def test_fmow_sentinel_default_size_is_the_registry_96(fmow_like):
    dataset = build_dataset("fmow_sentinel", "classification", "train", fmow_like)
    assert task_spec(_config(fmow_like), dataset).sentinel_size == 96
    assert task_spec(_config(fmow_like, sentinel_size=0), dataset).sentinel_size is None
    assert task_spec(_config(fmow_like, sentinel_size=48), dataset).sentinel_size == 48
    aid = FinetuneConfig.from_dict({"task": "classification", "dataset": "aid"})
    assert aid.sentinel_size is None and REGISTRY[("aid", "classification")].sentinel_size is None
    with pytest.raises(ValueError, match="sentinel_size: expected >= 0"):
        _config(fmow_like, sentinel_size=-1)


@pytest.mark.slow
def test_fmow_sentinel_step_at_96(fmow_like, tmp_path):
    rows = finetune(_config(fmow_like), tmp_path / "run", progress=False)
    assert math.isfinite(rows[0]["loss"])
    assert json.loads((tmp_path / "run" / TASK_NAME).read_text())["spec"]["sentinel_size"] == 96
