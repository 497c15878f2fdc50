"""Fine-tuning and evaluating a four-band (R, G, B, NIR) encoder on Potsdam's RGBIR tiles."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from skysense import SkySense
from skysense.cli import main
from skysense.data.datasets.isprs import ISPRS_COLOURS
from skysense.downstream.finetune import build_dataset, check_hr_bands, load_finetuned
from skysense.downstream.tasks import TaskSpec


def _write(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=data.dtype, crs="EPSG:32633", transform=from_origin(368000.0, 5808000.0, 0.05, 0.05)) as dst:
        dst.write(data)


def potsdam_rgbir(root: Path, size: int = 64) -> None:
    """Two tiles (train 2_10, val 2_13), RGB and RGBIR as the release has them, whose NIR band
    alone tells the classes apart."""
    rng = np.random.default_rng(0)
    colours = np.array(list(ISPRS_COLOURS), np.uint8)
    for tile in ("2_10", "2_13"):
        blocks = rng.integers(0, 6, (size // 8, size // 8))  # a class per 8 x 8 block: not tied to position
        classes = blocks.repeat(8, 0).repeat(8, 1)
        rgb = rng.integers(0, 256, (3, size, size), dtype=np.uint8)  # noise: no class information
        nir = (classes * 40 + 20).astype(np.uint8)[None]
        _write(root / "4_Ortho_RGBIR" / f"top_potsdam_{tile}_RGBIR.tif", np.concatenate([rgb, nir]))
        _write(root / "2_Ortho_RGB" / f"top_potsdam_{tile}_RGB.tif", rgb)
        _write(root / "5_Labels_all_noBoundary" / f"top_potsdam_{tile}_label_noBoundary.tif",
               colours[classes].transpose(2, 0, 1).copy())


def test_finetune_and_evaluate_an_rgbnir_encoder_from_the_command_line(tmp_path: Path, capsys) -> None:
    potsdam_rgbir(tmp_path / "potsdam")
    out = tmp_path / "run"
    assert main(["finetune", "--task", "segmentation", "--dataset", "potsdam", "--data-root", str(tmp_path / "potsdam"),
                 "--preset", "tiny", "--with-hr-bands", "R,G,B,NIR", "--out", str(out), "--max-steps", "2",
                 "--batch-size", "1", "--crop-size", "64", "--decoder-channels", "8", "--threads", "1",
                 "--no-progress"]) == 0
    task = json.loads((out / "task.json").read_text())
    assert task["dataset_options"] == {"hr_bands": ["R", "G", "B", "NIR"]}
    model = load_finetuned(out)
    assert model.encoder.config.inputs["hr"].bands == ("R", "G", "B", "NIR")
    assert model.encoder.hr_encoder.patch_embed.weight.shape[1] == 4
    assert main(["evaluate", "segmentation", "--weights", str(out), "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["split"] == "val" and 0.0 <= report["mf1"] <= 1.0
    # resuming rebuilds the same four-band model and continues
    assert main(["finetune", "--task", "segmentation", "--dataset", "potsdam", "--data-root", str(tmp_path / "potsdam"),
                 "--preset", "tiny", "--with-hr-bands", "R,G,B,NIR", "--out", str(out), "--max-steps", "3",
                 "--batch-size", "1", "--crop-size", "64", "--decoder-channels", "8", "--threads", "1",
                 "--no-progress", "--resume"]) == 0
    assert json.loads((out / "task.json").read_text())["step"] == 3


def test_an_rgbnir_encoder_refuses_datasets_without_nir(tmp_path: Path) -> None:
    encoder = SkySense.from_preset("tiny").with_hr_bands(("R", "G", "B", "NIR"))
    spec = TaskSpec(task="segmentation", num_classes=7, modalities=("hr",))
    loveda = SimpleNamespace(name="loveda", bands={"hr": ("R", "G", "B")})
    with pytest.raises(ValueError, match=r"hr bands: segmentation on loveda reads \['R', 'G', 'B'\]; the encoder "
                                         r"takes \['R', 'G', 'B', 'NIR'\]"):
        check_hr_bands(loveda, spec, encoder)
    check_hr_bands(loveda, TaskSpec(task="segmentation", num_classes=7, modalities=("s2",)), encoder)  # no HR read
    with pytest.raises(ValueError, match=r"loveda: dataset options \['hr_bands'\] not taken; .*the datasets that "
                                         r"read other HR bands: dynamic_earthnet, manifest, potsdam, vaihingen"):
        build_dataset("loveda", "segmentation", None, tmp_path, {"hr_bands": ["R", "G", "B", "NIR"]})


@pytest.mark.slow
def test_a_four_band_encoder_learns_from_nir_alone(tmp_path: Path) -> None:
    """NIR holds the classes, R, G, B are noise: both encoders fit the training tile, but only
    the four-band one carries over to the unseen tile (random init, 150 steps each)."""
    from skysense.downstream.evaluate import evaluate_run
    from skysense.downstream.finetune import FinetuneConfig, finetune

    potsdam_rgbir(tmp_path / "potsdam")
    scores = {}
    for name, bands in (("rgb", None), ("rgbnir", ("R", "G", "B", "NIR"))):
        config = FinetuneConfig(task="segmentation", dataset="potsdam", data_root=str(tmp_path / "potsdam"),
                                preset="tiny", hr_bands=bands, max_steps=150, batch_size=1, crop_size=64,
                                decoder_channels=16, train_split="train", eval_split="val", flips=False,
                                checkpoint_every=1000)
        config.optim.lr, config.optim.warmup_steps, config.optim.layer_decay = 2e-3, 2, 1.0
        rows = finetune(config, tmp_path / name, progress=False)
        assert np.mean([r["loss"] for r in rows[-10:]]) < 0.7  # the training tile is fitted
        scores[name] = evaluate_run(tmp_path / name, progress=False)["miou"]
    assert scores["rgbnir"] > max(0.15, 2 * scores["rgb"]), scores
