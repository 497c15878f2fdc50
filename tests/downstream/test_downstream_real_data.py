"""Quick forms of the downstream runs on the real samples under ``$SKYSENSE_DATA``.

Each case fine-tunes the ``tiny`` preset (random init) for one or two steps on a few real samples
of its dataset and evaluates it end to end (sliding windows, metrics, GeoTIFF predictions). No
accuracy is claimed: the scores only have to be valid. BigEarthNet uses the six v1 example pairs
that the ``bigearthnet-common`` package ships.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import rasterio
from rasterio.errors import NotGeoreferencedWarning

from skysense.data.datasets import DATASETS, dataset_root
from skysense.downstream.evaluate import evaluate_run
from skysense.downstream.finetune import FinetuneConfig, finetune

pytestmark = [pytest.mark.real_data, pytest.mark.slow]

CASES = {
    # name: (task, FinetuneConfig fields, evaluation window, headline metric, georeferenced)
    "aid": ("classification", dict(image_size=64, limit_train=4, batch_size=2), None, "oa", False),
    "oscd": ("change", dict(crop_size=32, cache_samples=True, class_weights=(1.0, 10.0)), 128, "f1", True),
    "levir_cd": ("change", dict(crop_size=64), 128, "f1", False),
    "dsifn": ("change", dict(crop_size=64, train_split="unlisted", eval_split="unlisted"), 128, "f1", False),
    "loveda": ("segmentation", dict(crop_size=64, train_split="all", eval_split="all"), 512, "miou", False),
    "potsdam": ("segmentation", dict(crop_size=64, train_split="all", eval_split="all"), 256, "mf1", False),
    "vaihingen": ("segmentation", dict(crop_size=64, train_split="all", eval_split="all"), 256, "mf1", False),
    "sen1floods11": ("segmentation", dict(crop_size=32, train_split="unlisted", eval_split="unlisted"), 256, "miou",
                     True),
    "eurosat_ms": ("classification", dict(batch_size=3), None, "oa", False),
    "bigearthnet_mm": ("classification", dict(batch_size=2, train_split="train", eval_split="train"), None, "map",
                       False),
}


def _root(name: str, data_root: Path | None) -> Path:
    if name == "bigearthnet_mm":
        from skysense.data.examples import bigearthnet_example_root

        try:
            return bigearthnet_example_root()
        except FileNotFoundError as error:
            pytest.skip(str(error))
    assert data_root is not None
    return dataset_root(name, None)


@pytest.mark.parametrize("name", sorted(CASES))
def test_quick_finetune_and_evaluate(name, tmp_path, monkeypatch, request):
    task, fields, window, metric, georeferenced = CASES[name]
    data_root = None if name == "bigearthnet_mm" else request.getfixturevalue("data_root")
    if data_root is not None:
        monkeypatch.setenv("SKYSENSE_DATA", str(data_root))
    root = _root(name, data_root)
    config = FinetuneConfig.from_dict({"task": task, "dataset": name, "data_root": str(root), "preset": "tiny",
                                       "max_steps": 2, "batch_size": 2, "checkpoint_every": 2, "num_threads": 1,
                                       "decoder_channels": 32, **fields})
    rows = finetune(config, tmp_path / "run", progress=False)
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)

    predictions = tmp_path / "pred"
    report = evaluate_run(tmp_path / "run", limit=1 if task != "classification" else 4, window=window,
                          stride=window, predictions=predictions if task != "classification" else None,
                          progress=False)
    assert 0.0 <= report[metric] <= 1.0
    if task == "classification":
        return
    files = sorted(predictions.glob("*.tif"))
    assert len(files) == report["predictions_written"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(files[0]) as src:
            values = src.read(1)
            crs, transform, shape = src.crs, src.transform, (src.height, src.width)
    assert int(values.max()) < (2 if task == "change" else len(report["iou_per_class"]))
    split = config.splits()[1]
    dataset = DATASETS[name](root, split=split)
    sample = dataset[0]
    assert shape == tuple(sample["mask"].shape)
    assert report["pixels"] == int((sample["mask"] >= 0).sum())
    if georeferenced:
        assert crs == sample["crs"] and transform == sample["transform"]
    else:
        assert crs is None
