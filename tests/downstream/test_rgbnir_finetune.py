"""Fine-tuning and evaluating a four-band (R, G, B, NIR) encoder on Potsdam's RGBIR tiles."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from nir_band import potsdam_rgbir, train_and_score  # noqa: E402
from skysense import SkySense  # noqa: E402
from skysense.cli import main  # noqa: E402
from skysense.downstream.finetune import build_dataset, check_hr_bands, load_finetuned  # noqa: E402
from skysense.downstream.tasks import TaskSpec  # noqa: E402


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
    """NIR holds the classes, R, G, B are noise (benchmarks/nir_band.py): both encoders fit the
    training tile, but only the four-band one carries over to the unseen tile (random init,
    150 steps each)."""
    potsdam_rgbir(tmp_path / "potsdam")
    scores = {name: train_and_score(tmp_path / "potsdam", tmp_path / name, bands, steps=150)
              for name, bands in (("rgb", None), ("rgbnir", ("R", "G", "B", "NIR")))}
    assert all(s["train_loss"] < 0.7 for s in scores.values()), scores  # the training tile is fitted
    assert scores["rgbnir"]["miou"] > max(0.15, 2 * scores["rgb"]["miou"]), scores
