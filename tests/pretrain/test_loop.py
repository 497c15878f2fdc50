"""The pretraining loop: resume after a real kill, 2 processes vs 1, NaN handling, outputs."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from skysense import SkySense
from skysense.pretrain.config import PretrainConfig
from skysense.pretrain.loop import STATE_NAME, NonFiniteLossError, pretrain
from skysense.pretrain.objective import SkySensePretrainingObjective

CONFIG = {
    "preset": "tiny",
    "batch_size": 4,
    "max_steps": 6,
    "seed": 3,
    "checkpoint_every": 2,
    "data": {"dataset": "aid", "split": "train", "view_size": 64, "num_workers": 0},
    "optim": {"lr": 0.001, "warmup_steps": 2},
    "objective": {"head": {"hidden_dim": 64, "bottleneck_dim": 32, "out_dim": 128},
                  "num_clusters": 2, "cluster_rounds": 1, "sinkhorn_iterations": 20},
}


@pytest.fixture(scope="module")
def aid_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small AID-layout folder: 2 classes x 6 real-looking textured JPEGs."""
    root = tmp_path_factory.mktemp("aid")
    rng = np.random.default_rng(0)
    for cls in ("Farmland", "Port"):
        (root / cls).mkdir()
        for n in range(1, 7):
            base = rng.integers(0, 255, size=(3,), dtype=np.uint8)
            noise = rng.integers(0, 60, size=(72, 72, 3), dtype=np.uint8)
            Image.fromarray((base + noise).astype(np.uint8)).save(root / cls / f"{cls.lower()}_{n}.jpg")
    return root


def _write_config(path: Path, **changes: object) -> Path:
    config = {**CONFIG, **changes}
    path.write_text(yaml.safe_dump(config))
    return path


def _losses(out: Path) -> list[float]:
    with (out / "metrics.csv").open() as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "skysense.cli", *args]


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted_run(tmp_path: Path, aid_like: Path) -> None:
    config = _write_config(tmp_path / "config.yaml")
    common = ["pretrain", "--config", str(config), "--data-root", str(aid_like), "--no-progress"]
    subprocess.run(_cli(*common, "--out", str(tmp_path / "straight")), check=True, capture_output=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen(_cli(*common, "--out", str(killed)), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / STATE_NAME).exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    state = torch.load(killed / STATE_NAME, weights_only=True)
    assert 2 <= state["step"] < 6
    subprocess.run(_cli(*common, "--out", str(killed), "--resume"), check=True, capture_output=True)

    straight, resumed = _losses(tmp_path / "straight"), _losses(killed)
    assert len(straight) == len(resumed) == 6
    np.testing.assert_allclose(resumed, straight, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path: Path, aid_like: Path) -> None:
    config = _write_config(tmp_path / "config.yaml", max_steps=3, checkpoint_every=3)
    common = ["pretrain", "--config", str(config), "--data-root", str(aid_like), "--no-progress"]
    subprocess.run(_cli(*common, "--out", str(tmp_path / "one")), check=True, capture_output=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "skysense.cli", *common, "--out", str(tmp_path / "two")]
    result = subprocess.run(torchrun, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(_losses(tmp_path / "two"), _losses(tmp_path / "one"), rtol=0, atol=1e-4)


def test_outputs_load_as_weights_and_refuse_overwrite(tmp_path: Path, aid_like: Path) -> None:
    config = PretrainConfig.from_dict({**CONFIG, "max_steps": 2})
    rows = pretrain(config, tmp_path, data_root=str(aid_like), progress=False)
    assert [r["step"] for r in rows] == [0, 1]
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert {"pixel/hr", "object/fused", "image/hr", "monitor/feature_std"} <= set(rows[0])
    model = SkySense.from_pretrained(str(tmp_path))
    assert model.config.preset == "tiny"
    with pytest.raises(ValueError, match="exists: pass --resume"):
        pretrain(PretrainConfig.from_dict(CONFIG), tmp_path, data_root=str(aid_like), progress=False)


def test_nan_loss_stops_naming_step_and_term(tmp_path: Path, aid_like: Path, monkeypatch) -> None:
    config = PretrainConfig.from_dict({**CONFIG, "checkpoint_every": 1})
    original = SkySensePretrainingObjective.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        total, terms = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            terms["object/hr"] = torch.tensor(float("nan"))
            total = total + terms["object/hr"]
        return total, terms

    monkeypatch.setattr(SkySensePretrainingObjective, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 2: loss is nan \(non-finite terms: object/hr\)"):
        pretrain(config, tmp_path, data_root=str(aid_like), progress=False)
    state = torch.load(tmp_path / STATE_NAME, weights_only=True)
    assert state["step"] == 2
    assert _losses(tmp_path) and len(_losses(tmp_path)) == 2


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "optim": {"lrate": 1.0}}))
    with pytest.raises(ValueError, match=r"bad.yaml: unknown keys \['lrate'\] in 'config.optim'"):
        PretrainConfig.from_yaml(path)


def test_attention_backends_reach_the_student_and_the_teacher(tmp_path: Path, aid_like: Path, sdpa_choices) -> None:
    """Every network restricted to the math path: every attention call of the step takes it (the
    CPU's default is its flash kernel), and the losses are those of torch's own choice."""
    networks = ("hr", "s2", "s1", "fusion", "geo")
    runs = {}
    for name, setting in (("default", {}), ("math", {network: ["math"] for network in networks})):
        sdpa_choices.clear()
        config = PretrainConfig.from_dict({**CONFIG, "max_steps": 2, "attention_backends": setting})
        rows = pretrain(config, tmp_path / name, data_root=str(aid_like), progress=False)
        runs[name] = ([r["loss"] for r in rows], set(sdpa_choices))
    math, flash = int(torch.nn.attention.SDPBackend.MATH), int(torch.nn.attention.SDPBackend.FLASH_ATTENTION)
    assert flash in runs["default"][1] and runs["math"][1] == {math}
    np.testing.assert_allclose(runs["math"][0], runs["default"][0], rtol=1e-4)
    with pytest.raises(ValueError, match="attention_backends.fusion"):
        PretrainConfig.from_dict({**CONFIG, "attention_backends": {"fusion": ["fastest"]}})


@pytest.mark.parametrize("setting, attribute", [("mlp_kernel", "gelu_kernel"), ("qkv_kernel", "qkv_kernel"),
                                                ("norm_kernel", "norm_kernel")])
def test_the_bias_kernel_settings_reach_every_layer_of_both_networks(tmp_path: Path, aid_like: Path, monkeypatch,
                                                                     setting: str, attribute: str) -> None:
    """``mlp_kernel: true`` sets every MLP, ``qkv_kernel: true`` every attention layer,
    ``norm_kernel: true`` every pre-norm block, of the student and of the teacher before compiling; on the CPU, where the kernels cannot run, the layers
    compute the same values another way, and the losses are those of the plain run."""
    from skysense.pretrain import loop

    calls = []
    name = {"mlp_kernel": "set_mlp_kernel", "qkv_kernel": "set_qkv_kernel", "norm_kernel": "set_norm_kernel"}[setting]
    original = getattr(loop, name)
    monkeypatch.setattr(loop, name, lambda network, enabled: calls.append(
        (enabled, original(network, enabled), sum(1 for m in network.modules() if getattr(m, attribute, False)))))
    losses = {}
    for enabled in (False, True):
        config = PretrainConfig.from_dict({**CONFIG, "max_steps": 2, setting: enabled})
        losses[enabled] = [r["loss"] for r in pretrain(config, tmp_path / str(enabled), data_root=str(aid_like),
                                                       progress=False)]
    assert [c[0] for c in calls] == [False, False, True, True]  # student and teacher, each run
    assert all(count > 0 for _, count, _ in calls) and [c[2] for c in calls] == [0, 0, calls[2][1], calls[3][1]]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)


def test_checkpointed_runs_match_a_plain_one(tmp_path: Path, aid_like: Path) -> None:
    """Every block recomputed (true), only its element-wise work ("selective"), or a setting per
    network (the encoders recomputed, the fusion selective): the same losses."""
    losses = {}
    per_network = {"hr": True, "s2": True, "s1": True, "fusion": "selective"}
    for name, setting in (("off", False), ("all", True), ("selective", "selective"), ("per-network", per_network)):
        config = PretrainConfig.from_dict({**CONFIG, "max_steps": 3, "activation_checkpointing": setting})
        rows = pretrain(config, tmp_path / name, data_root=str(aid_like), progress=False)
        losses[name] = [r["loss"] for r in rows]
    for name in ("all", "selective", "per-network"):
        np.testing.assert_allclose(losses[name], losses["off"], rtol=0, atol=1e-5, err_msg=name)
    assert PretrainConfig.from_dict(config.to_dict()).activation_checkpointing == per_network  # as checkpoints keep it
    with pytest.raises(ValueError, match="activation_checkpointing: expected true, false or 'selective'.*, got 'some'"):
        PretrainConfig.from_dict({**CONFIG, "activation_checkpointing": "some"})
