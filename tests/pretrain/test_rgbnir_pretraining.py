"""Pretraining a model that takes R, G, B, NIR on a manifest of four-band HR rasters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from test_multimodal_views import HEAD, _write_tif
from skysense import SkySense
from skysense.data.datasets import ManifestDataset
from skysense.data.rasters import RasterReadError
from skysense.pretrain.config import PretrainConfig
from skysense.pretrain.data import build_sample_dataset
from skysense.pretrain.loop import pretrain


def write_rgbn_manifest(root: Path, places: int = 4) -> tuple[Path, dict[str, np.ndarray]]:
    """Four-band HR rasters: R, G, B, NIR in that order, except place-1 stored NIR first and
    saying so in its record."""
    rng = np.random.default_rng(0)
    records, images = [], {}
    for p in range(places):
        rgbn = rng.integers(0, 256, (4, 64, 64), dtype=np.uint8)
        images[f"place-{p}"] = rgbn
        record = {"id": f"place-{p}", "lat": 45.0 + p, "lon": 7.0}
        if p == 1:
            record["hr"] = _write_tif(root / "hr" / f"{p}.tif", rgbn[[3, 0, 1, 2]])
            record["hr_bands"] = ["NIR", "R", "G", "B"]
        else:
            record["hr"] = _write_tif(root / "hr" / f"{p}.tif", rgbn)
        records.append(record)
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root, images


def test_manifest_reads_the_hr_bands_asked_for(tmp_path: Path) -> None:
    root, images = write_rgbn_manifest(tmp_path)
    four = ManifestDataset(root, modalities=("hr",), hr_bands=("R", "G", "B", "NIR"))
    for index in range(2):
        sample = four[index]
        assert torch.equal(sample["hr"], torch.from_numpy(images[sample["id"]].astype(np.float32)))
    rgb = ManifestDataset(root, modalities=("hr",))  # default R, G, B: the first three bands, or named
    assert torch.equal(rgb[0]["hr"], torch.from_numpy(images["place-0"][:3].astype(np.float32)))
    assert torch.equal(rgb[1]["hr"], torch.from_numpy(images["place-1"][:3].astype(np.float32)))
    five = ManifestDataset(root, modalities=("hr",), hr_bands=("R", "G", "B", "NIR", "SWIR"))
    with pytest.raises(RasterReadError, match=r"manifest.jsonl: line 1: hr .*0.tif: 4 bands, expected at least 5 "
                                              r"\(R, G, B, NIR, SWIR as its first bands"):
        five.load(0)
    with pytest.raises(ValueError, match=r"manifest: hr_bands: .*manifest.jsonl: line 2: hr .*1.tif holds "
                                         r"\['NIR', 'R', 'G', 'B'\]; got .*\['SWIR'\] not among them"):
        five.load(1)
    with pytest.raises(ValueError, match=r"hr_bands: expected distinct band names, got \['R', 'R'\]"):
        ManifestDataset(root, hr_bands=("R", "R"))


def test_pretraining_config_hr_bands_reach_the_dataset_and_are_checked(tmp_path: Path) -> None:
    root, _ = write_rgbn_manifest(tmp_path)
    config = PretrainConfig.from_dict({"hr_bands": ["R", "G", "B", "NIR"],
                                       "data": {"dataset": "manifest", "dataset_options": {"modalities": ["hr"]}}})
    assert config.hr_bands == ("R", "G", "B", "NIR")
    assert build_sample_dataset(config, str(root))[0]["hr"].shape == (4, 64, 64)
    mismatch = PretrainConfig.from_dict({"hr_bands": ["R", "G", "B", "NIR"],
                                         "data": {"dataset": "manifest",
                                                  "dataset_options": {"modalities": ["hr"], "hr_bands": ["R", "G", "B"]}}})
    with pytest.raises(ValueError, match=r"hr_bands: the model takes \['R', 'G', 'B', 'NIR'\]; manifest reads "
                                         r"\['R', 'G', 'B'\]"):
        build_sample_dataset(mismatch, str(root))


def test_pretraining_an_rgbnir_model_trains_its_nir_filter(tmp_path: Path) -> None:
    root, _ = write_rgbn_manifest(tmp_path / "data")
    config = PretrainConfig.from_dict({
        "preset": "tiny", "hr_bands": ["R", "G", "B", "NIR"], "batch_size": 4, "max_steps": 2, "seed": 1,
        "checkpoint_every": 2,
        "data": {"dataset": "manifest", "dataset_options": {"modalities": ["hr"]}, "view_size": 64,
                 "num_workers": 0},
        "optim": {"lr": 0.001, "warmup_steps": 1}, "objective": HEAD,
    })
    rows = pretrain(config, tmp_path / "run", data_root=str(root), progress=False)
    assert [r["step"] for r in rows] == [0, 1] and all(np.isfinite(v) for r in rows for v in r.values())
    model = SkySense.from_pretrained(str(tmp_path / "run"))
    assert model.config.inputs["hr"].bands == ("R", "G", "B", "NIR")
    weight = model.hr_encoder.patch_embed.weight
    assert weight.shape[1] == 4
    assert not torch.equal(weight[:, 3], weight[:, 0])  # NIR started as red's copy and learnt on its own


def test_shard_command_writes_the_four_bands(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from skysense.cli import main
    from skysense.data.shards import ShardDataset

    root, images = write_rgbn_manifest(tmp_path / "data")
    assert main(["shard", "--dataset", "manifest", "--data-root", str(root), "--out", str(tmp_path / "shards"),
                 "--modalities", "hr", "--hr-bands", "R,G,B,NIR", "--no-progress"]) == 0
    back = {s["id"]: s["hr"] for s in ShardDataset(tmp_path / "shards", shuffle=False)}
    assert set(back) == set(images)
    for name, hr in back.items():
        assert torch.equal(hr.float(), torch.from_numpy(images[name].astype(np.float32)))
    capsys.readouterr()
    assert main(["shard", "--dataset", "aid", "--data-root", str(root), "--out", str(tmp_path / "x"),
                 "--hr-bands", "R,G,B,NIR"]) == 2
    assert "--hr-bands: aid reads R, G, B only" in capsys.readouterr().err
