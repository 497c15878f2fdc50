"""Quick forms (for CI) of the pretraining evidence runs in benchmarks/RESULTS.md, on real data.

AID: the committed ``configs/pretrain/aid-tiny.yaml`` for 3 steps, then the linear probe
command on 4 images per class. OSCD: ``configs/pretrain/oscd-s2-tiny.yaml`` for 2 steps, then
the frozen-feature change probe on one train and one test city. They check that the full runs'
commands work end to end; the numbers come from the full runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset

from skysense import SkySense
from skysense.cli import main
from skysense.data.datasets import DATASETS
from skysense.evaluation.change_probe import change_probe

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "pretrain"


@pytest.mark.slow
def test_aid_pretrain_and_probe_quick(data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "aid"
    assert main(["pretrain", "--config", str(CONFIGS / "aid-tiny.yaml"), "--out", str(out), "--max-steps", "3",
                 "--data-root", str(data_root / "aid"), "--no-progress"]) == 0
    assert (out / "model.safetensors").is_file()
    capsys.readouterr()
    assert main(["evaluate", "linear-probe", "--dataset", "aid", "--data-root", str(data_root / "aid"),
                 "--weights", str(out), "--limit-per-class", "4", "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["train_count"] == result["test_count"] == 120
    assert 0.0 <= result["accuracy"] <= 1.0


@pytest.mark.slow
def test_oscd_pretrain_and_change_probe_quick(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "oscd"
    assert main(["pretrain", "--config", str(CONFIGS / "oscd-s2-tiny.yaml"), "--out", str(out), "--max-steps", "2",
                 "--data-root", str(data_root / "oscd"), "--no-progress"]) == 0
    model = SkySense.from_pretrained(out)
    root = data_root / "oscd"
    train = Subset(DATASETS["oscd"](root, split="train"), [3])  # bercy: a small scene
    test = Subset(DATASETS["oscd"](root, split="test"), [1])  # pisa
    result = change_probe(model, train, test, train_pixels=5000, weight_decays=(1e-3,), progress=False)
    assert 0.0 <= result.f1 <= 1.0 and result.test_pixels > 0
    assert result.train_pixels > 4000 and torch.isfinite(torch.tensor(result.threshold))


def test_paper_scale_config_builds_the_paper_setup() -> None:
    """configs/pretrain/huge-paper.yaml: the huge model, 3 sequences per GPU on 80 GPUs, 20 S2
    and 10 S1 frames, views on one fusion grid, FSDP2 with selective checkpointing and compiled blocks."""
    from skysense.config import preset_config
    from skysense.pretrain.config import PretrainConfig
    from skysense.pretrain.data import PairMaker

    config = PretrainConfig.from_yaml(CONFIGS / "huge-paper.yaml")
    assert (config.preset, config.batch_size // 80, config.max_steps) == ("huge", 3, 875_000)
    assert (config.data.s2_frames, config.data.s1_frames) == (20, 10)
    assert (config.distributed.strategy, config.activation_checkpointing, config.compile) == ("fsdp", "selective", "blocks")
    model = preset_config("huge")
    views = config.data.view_config(model)
    assert (views.hr_size, views.sentinel_size) == (512, 16)
    PairMaker(model, views).check_grids(["hr", "s2", "s1"])  # raises if they miss one grid
