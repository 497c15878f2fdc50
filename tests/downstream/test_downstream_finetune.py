"""The fine-tuning loop: exact resume, saved runs, evaluation, and the CLI (small AID-layout folder)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from skysense.cli import main
from skysense.downstream.evaluate import evaluate_run
from skysense.downstream.finetune import (
    HEAD_NAME,
    STATE_NAME,
    TASK_NAME,
    FinetuneConfig,
    finetune,
    load_finetuned,
)
from skysense.pretrain.loop import MetricsLog


@pytest.fixture(scope="module")
def aid_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An AID-layout folder: 3 classes x 4 textured 64 px JPEGs (2 train, 2 test per class)."""
    root = tmp_path_factory.mktemp("aid")
    rng = np.random.default_rng(0)
    for k, cls in enumerate(("Beach", "Forest", "Port")):
        (root / cls).mkdir()
        for n in range(1, 5):
            base = np.array([60 + 60 * k, 200 - 50 * k, 90], dtype=np.int64)
            noise = rng.integers(0, 40, size=(64, 64, 3))
            Image.fromarray((base + noise).clip(0, 255).astype(np.uint8)).save(root / cls / f"{cls.lower()}_{n}.jpg")
    return root


def _config(root: Path, **changes) -> FinetuneConfig:
    values = dict(task="classification", dataset="aid", data_root=str(root), preset="tiny", batch_size=3,
                  max_steps=4, checkpoint_every=2, seed=5, image_size=64, num_threads=1,
                  optim={"lr": 1e-3, "warmup_steps": 1})
    values.update(changes)
    return FinetuneConfig.from_dict(values)


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


class Interrupted(Exception):
    pass


@pytest.mark.slow
def test_resume_repeats_an_uninterrupted_run(aid_like, tmp_path, monkeypatch):
    whole = finetune(_config(aid_like), tmp_path / "whole", progress=False)
    assert [r["step"] for r in whole] == [0, 1, 2, 3]

    original = MetricsLog.add

    def crash_at_step_3(self, step, values):
        if step == 3:
            raise Interrupted
        original(self, step, values)

    monkeypatch.setattr(MetricsLog, "add", crash_at_step_3)
    with pytest.raises(Interrupted):
        finetune(_config(aid_like), tmp_path / "split", progress=False)
    monkeypatch.setattr(MetricsLog, "add", original)
    assert int(torch.load(tmp_path / "split" / STATE_NAME, weights_only=True)["step"]) == 2
    with pytest.raises(ValueError, match="--resume"):
        finetune(_config(aid_like), tmp_path / "split", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        finetune(_config(aid_like, batch_size=2), tmp_path / "split", resume=True, progress=False)
    resumed = finetune(_config(aid_like), tmp_path / "split", resume=True, progress=False)
    assert [r["step"] for r in resumed] == [2, 3]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole[2:]]
    assert [r["loss"] for r in _rows(tmp_path / "split")] == [r["loss"] for r in _rows(tmp_path / "whole")]
    for name in ("model.safetensors", HEAD_NAME):
        a, b = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "split" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_saved_run_reloads_and_evaluates(aid_like, tmp_path):
    out = tmp_path / "run"
    finetune(_config(aid_like, max_steps=2), out, progress=False)
    task = json.loads((out / TASK_NAME).read_text())
    assert task["spec"]["task"] == "classification" and task["spec"]["class_names"] == ["Beach", "Forest", "Port"]
    assert task["step"] == 2 and task["eval_split"] == "test"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind
    model = load_finetuned(out)
    assert model.spec.num_classes == 3 and not model.training
    report = evaluate_run(out, progress=False)
    assert report["samples"] == 6 and 0.0 <= report["oa"] <= 1.0 and report["split"] == "test"
    with pytest.raises(ValueError, match="not segmentation"):
        evaluate_run(out, task="segmentation", progress=False)
    (out / HEAD_NAME).write_bytes((out / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="does not match"):
        load_finetuned(out)


def test_learning_to_separate_three_colours(aid_like, tmp_path):
    """A head on the frozen encoder learns the colour classes: training loss falls, train OA is high."""
    out = tmp_path / "run"
    rows = finetune(_config(aid_like, max_steps=30, batch_size=6, freeze_encoder=True, checkpoint_every=30,
                            optim={"lr": 3e-2, "warmup_steps": 1, "layer_decay": 1.0}), out, progress=False)
    assert np.mean([r["loss"] for r in rows[-5:]]) < 0.5 * np.mean([r["loss"] for r in rows[:3]])
    assert evaluate_run(out, split="train", progress=False)["oa"] >= 0.8


def test_cli_finetune_then_evaluate(aid_like, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["finetune", "--task", "classification", "--dataset", "aid", "--data-root", str(aid_like),
                 "--preset", "tiny", "--out", str(out), "--max-steps", "2", "--batch-size", "2",
                 "--image-size", "64", "--threads", "1", "--no-progress", "--evaluate", "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["samples"] == 6 and "oa" in printed and "top5" not in printed  # 3 classes: no top-5
    assert json.loads((out / "eval.json").read_text())["oa"] == printed["oa"]
    code = main(["evaluate", "classification", "--weights", str(out), "--split", "train", "--json", "--no-progress"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["split"] == "train" and report["samples"] == 6
    assert main(["evaluate", "change", "--weights", str(out), "--no-progress"]) == 2
    assert "not change" in capsys.readouterr().err
    assert main(["finetune", "--dataset", "aid", "--out", str(tmp_path / "x")]) == 2
    assert main(["finetune", "--task", "segmentation", "--dataset", "aid", "--data-root", str(aid_like),
                 "--out", str(tmp_path / "y")]) == 2
    assert "supports: classification" in capsys.readouterr().err


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task: change\ndataset: oscd\ncrop_size: 64\nclass_weights: [1.0, 10.0]\n"
                    "optim:\n  lr: 0.001\n  layer_decay: 0.9\n")
    config = FinetuneConfig.from_yaml(path)
    assert config.class_weights == (1.0, 10.0) and config.optim.layer_decay == 0.9 and config.crop_size == 64
    assert config.splits() == ("train", "test")
    path.write_text("task: change\ndataset: oscd\nwarmup: 3\n")
    with pytest.raises(ValueError, match="unknown keys"):
        FinetuneConfig.from_yaml(path)
    from skysense.commands.finetune import build_config, register
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["finetune", "--config", str(path.with_name("d.yaml")), "--lr", "0.01"])
    path.with_name("d.yaml").write_text("task: segmentation\ndataset: loveda\nweights: some/dir\n")
    config = build_config(args)
    assert config.optim.lr == 0.01 and config.weights == "some/dir" and config.task == "segmentation"
    args = parser.parse_args(["finetune", "--config", str(path.with_name("d.yaml")), "--preset", "tiny",
                              "--modalities", "hr"])
    config = build_config(args)
    assert config.weights is None and config.modalities == ("hr",)
    for flags, expected in ((["--activation-checkpointing"], True),
                            (["--activation-checkpointing", "selective"], "selective"), ([], False)):
        args = parser.parse_args(["finetune", "--config", str(path.with_name("d.yaml")), *flags])
        assert build_config(args).activation_checkpointing == expected, flags


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [True, "selective", {"hr": "selective", "fusion": True}],
                         ids=["all", "selective", "per-network"])
def test_compiled_checkpointed_encoder_trains_like_eager(aid_like, tmp_path, monkeypatch, checkpointing):
    """`compile: blocks` with activation checkpointing (full, selective, or one per network) gives the eager run's
    losses (compiled with the aot_eager backend here: the graph capture without minutes of
    inductor on a CPU)."""
    import skysense.downstream.finetune as finetune_module
    from skysense.compilation import compile_blocks

    calls = []

    def traced(model, blocks):
        calls.append(compile_blocks(model, blocks, backend="aot_eager"))
        return calls[-1]

    monkeypatch.setattr(finetune_module, "compile_blocks", traced)
    eager = finetune(_config(aid_like, max_steps=3, device="cpu"), tmp_path / "eager", progress=False)
    compiled = finetune(_config(aid_like, max_steps=3, compile="blocks", activation_checkpointing=checkpointing),
                        tmp_path / "compiled", progress=False)
    torch._dynamo.reset()
    assert calls and calls[0] > 0
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=1e-4)
    with pytest.raises(ValueError, match=r"compile: expected one of \['off', 'blocks'\], got 'model'"):
        _config(aid_like, compile="model")
    with pytest.raises(ValueError, match="activation_checkpointing: expected true, false or 'selective'.*, got 'some'"):
        _config(aid_like, activation_checkpointing="some")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_a_missing_gpu_is_named(aid_like, tmp_path):
    with pytest.raises(ValueError, match=r"device: 'cuda' asked for, but this machine has 0 CUDA device\(s\)"):
        finetune(_config(aid_like, device="cuda"), tmp_path / "run", progress=False)


def test_the_kernel_settings_reach_every_layer_of_the_encoder(aid_like, tmp_path, monkeypatch):
    """``mlp_kernel``, ``qkv_kernel`` and ``norm_kernel`` set the encoder's MLPs, attention layers
    and pre-norm blocks before compiling, as in pretraining; on the CPU, where the kernels cannot
    run, the losses are those of the plain run."""
    from skysense.downstream import finetune as module

    calls = []
    for name in ("set_mlp_kernel", "set_qkv_kernel", "set_norm_kernel"):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda network, enabled, name=name, original=original: calls.append(
            (name, enabled, original(network, enabled))))
    losses = {}
    for enabled in (False, True):
        config = _config(aid_like, max_steps=2, device="cpu", mlp_kernel=enabled, qkv_kernel=enabled,
                         norm_kernel=enabled)
        losses[enabled] = [r["loss"] for r in finetune(config, tmp_path / str(enabled), progress=False)]
    assert [(name, enabled) for name, enabled, _ in calls] == [
        (name, enabled) for enabled in (False, True) for name in ("set_mlp_kernel", "set_qkv_kernel", "set_norm_kernel")]
    counts = {name: count for name, enabled, count in calls if enabled}
    # every block has an MLP; only the ViTs' and the fusion's are pre-norm (SwinV2's are post-norm)
    assert counts["set_mlp_kernel"] > counts["set_norm_kernel"] > 0 and counts["set_qkv_kernel"] > 0, counts
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_attention_backends_reach_the_encoder(aid_like, tmp_path, sdpa_choices):
    """Every network restricted to the math path: every attention call of a fine-tuning run
    takes it (the CPU's default for the fusion's unmasked sequences is its flash kernel), and
    the losses are those of torch's own choice."""
    default = finetune(_config(aid_like, max_steps=2, device="cpu"), tmp_path / "default", progress=False)
    assert int(torch.nn.attention.SDPBackend.FLASH_ATTENTION) in sdpa_choices
    sdpa_choices.clear()
    everywhere = {network: ["math"] for network in ("hr", "s2", "s1", "fusion", "geo")}
    restricted = finetune(_config(aid_like, max_steps=2, device="cpu", attention_backends=everywhere),
                          tmp_path / "math", progress=False)
    assert sdpa_choices and set(sdpa_choices) == {int(torch.nn.attention.SDPBackend.MATH)}
    assert [r["loss"] for r in restricted] == pytest.approx([r["loss"] for r in default], rel=1e-4)
    with pytest.raises(ValueError, match="attention_backends.hr: expected one or more of"):
        _config(aid_like, attention_backends={"hr": ["flashy"]})
