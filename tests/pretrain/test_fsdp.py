"""FSDP2 pretraining: 2 sharded processes match 1 process (and DDP on multi-modal data), DCP
checkpoints resume exactly after a kill, also with another number of processes.

The 2-process runs use torchrun on the CPU (gloo). Running this file as a script is the worker
of ``test_sharded_step_matches_one_process`` (``torchrun ... test_fsdp.py OUT``).
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from torch import nn

from skysense import SkySense
from skysense.distributed import (
    apply_fsdp,
    average_gradients,
    clip_grad_norm,
    close_distributed,
    init_distributed,
)
from skysense.models.layers import TransformerBlock
from skysense.pretrain.checkpoint import SHARDED_STATE_NAME, load_checkpoint, sharded_checkpoints
from skysense.pretrain.config import PretrainConfig
from skysense.pretrain.loop import NonFiniteLossError, pretrain
from skysense.pretrain.model import PretrainingModel, parameter_groups
from skysense.pretrain.objective import SkySensePretrainingObjective
from skysense.pretrain.teacher import build_teacher, ema_update
from test_loop import CONFIG, _cli, _losses, aid_like  # noqa: F401  (aid_like is a fixture)
from test_multimodal_views import MANIFEST_CONFIG, write_manifest

FSDP_CONFIG = {**CONFIG, "distributed": {"strategy": "fsdp"}}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _write(path: Path, **changes: object) -> Path:
    path.write_text(yaml.safe_dump({**FSDP_CONFIG, **changes}))
    return path


def _torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]


def _restored(config_path: Path | PretrainConfig, out: Path) -> tuple[int, dict[str, torch.Tensor], dict]:
    """Step, module and optimizer state of the latest checkpoint in ``out``, loaded in this process."""
    config = config_path if isinstance(config_path, PretrainConfig) else PretrainConfig.from_yaml(config_path)
    module = PretrainingModel(config)
    optimizer = torch.optim.AdamW(parameter_groups(module, config.optim.weight_decay))
    step = load_checkpoint(out, module, optimizer, config)
    return step, module.state_dict(), optimizer.state_dict()


def _assert_weights_are_checkpoint_student(config: Path | PretrainConfig, out: Path) -> None:
    """``out/model.safetensors`` loads with ``--weights`` and is the latest checkpoint's student."""
    step, model_state, _ = _restored(config, out)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["pretrain_step"] == str(step)
    weights = SkySense.from_pretrained(str(out)).state_dict()
    assert weights.keys() == {k.removeprefix("student.") for k in model_state if k.startswith("student.")}
    for key, value in weights.items():
        torch.testing.assert_close(value, model_state[f"student.{key}"], rtol=0, atol=0, msg=key)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory, aid_like: Path) -> tuple[Path, Path]:  # noqa: F811
    """An uninterrupted 6-step FSDP run of 2 processes: (config file, output folder)."""
    folder = tmp_path_factory.mktemp("fsdp2")
    config = _write(folder / "config.yaml")
    out = folder / "out"
    _run(_torchrun(2, "-m", "skysense.cli", "pretrain", "--config", str(config), "--data-root", str(aid_like),
                   "--no-progress", "--out", str(out)))
    return config, out


@pytest.mark.slow
def test_two_fsdp_processes_match_one(two_process_run: tuple[Path, Path], tmp_path: Path,
                                      aid_like: Path) -> None:  # noqa: F811
    config, two = two_process_run
    one = tmp_path / "one"
    _run(_cli("pretrain", "--config", str(config), "--data-root", str(aid_like), "--no-progress", "--out", str(one)))
    assert len(_losses(two)) == 6
    np.testing.assert_allclose(_losses(two), _losses(one), rtol=0, atol=1e-4)

    # Everything the run carries: student, EMA teacher, heads, DINO centres, AdamW moments.
    step_two, model_two, optim_two = _restored(config, two)
    step_one, model_one, optim_one = _restored(config, one)
    assert step_two == step_one == 6
    assert model_two.keys() == model_one.keys()
    for key, value in model_one.items():
        np.testing.assert_allclose(model_two[key].numpy(), value.numpy(), rtol=0, atol=1e-4, err_msg=key)
    center = "objective.pixel.hr.criterion.center"
    assert model_one[center].abs().sum() > 0, "the centre never moved: the check above proves nothing"
    teacher, student = model_one["teacher.fusion.blocks.0.attn.qkv.weight"], model_one[
        "student.fusion.blocks.0.attn.qkv.weight"]
    assert not torch.equal(teacher, student), "teacher equals student: the EMA check proves nothing"
    assert optim_two["state"].keys() == optim_one["state"].keys()
    for index, state in optim_one["state"].items():
        for name, value in state.items():
            np.testing.assert_allclose(optim_two["state"][index][name].numpy(), value.numpy(), rtol=0, atol=1e-4)

    # The consolidated weights written on rank 0 are the whole student.
    weights = SkySense.from_pretrained(str(two)).state_dict()
    for key, value in weights.items():
        torch.testing.assert_close(value, model_two[f"student.{key}"], rtol=0, atol=0)


@pytest.mark.slow
def test_multimodal_fsdp_matches_ddp(tmp_path: Path) -> None:
    """HR + S2 + S1 with lat/lon: every encoder, cross-modal alignment (a 0-d learnable
    temperature, which FSDP leaves whole) and geo prototypes (a buffer, which every process
    updates identically from all-reduced sums; test_global_batch_objectives.py compares with
    one process)."""
    root = write_manifest(tmp_path / "data")
    runs = {}
    for strategy in ("ddp", "fsdp"):
        config = tmp_path / f"{strategy}.yaml"
        config.write_text(yaml.safe_dump({**MANIFEST_CONFIG, "max_steps": 3, "checkpoint_every": 3,
                                          "distributed": {"strategy": strategy}}))
        runs[strategy] = (config, tmp_path / strategy)
        _run(_torchrun(2, "-m", "skysense.cli", "pretrain", "--config", str(config), "--data-root", str(root),
                       "--no-progress", "--out", str(tmp_path / strategy)))
    rows = {}
    for strategy, (_, out) in runs.items():
        with (out / "metrics.csv").open() as f:
            rows[strategy] = list(csv.DictReader(f))
    assert {"cross_modal", "geo", "pixel/s2", "object/s1"} <= set(rows["fsdp"][0])
    assert rows["fsdp"][0].keys() == rows["ddp"][0].keys()
    # Modality dropout leaves some terms out of some steps (empty cells): the same ones in both.
    for key in rows["ddp"][0]:
        fsdp = [float(r[key]) if r[key] else np.nan for r in rows["fsdp"]]
        ddp = [float(r[key]) if r[key] else np.nan for r in rows["ddp"]]
        # Relative too: the gradient norm is in the thousands, where one float32 step is 1.2e-4.
        np.testing.assert_allclose(fsdp, ddp, rtol=1e-6, atol=1e-4, err_msg=key)
    _, fsdp_model, _ = _restored(*runs["fsdp"])
    ddp_model = torch.load(runs["ddp"][1] / "training_state.pt", weights_only=True)["module"]
    assert fsdp_model.keys() == ddp_model.keys()
    for key, value in ddp_model.items():
        np.testing.assert_allclose(fsdp_model[key].numpy(), value.numpy(), rtol=0, atol=1e-4, err_msg=key)
    temperature = "objective.cross_modal.log_logit_scale"
    initial = PretrainingModel(PretrainConfig.from_yaml(runs["fsdp"][0])).state_dict()[temperature]
    assert fsdp_model[temperature].ndim == 0 and fsdp_model[temperature] != initial, "the temperature never trained"


def _worker_pids(parent: int) -> list[int]:
    """Processes whose parent is ``parent`` (torchrun's workers)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.slow
def test_fsdp_resume_after_kill_equals_uninterrupted_run(two_process_run: tuple[Path, Path], tmp_path: Path,
                                                         aid_like: Path) -> None:  # noqa: F811
    config, straight = two_process_run
    killed = tmp_path / "killed"
    common = ["-m", "skysense.cli", "pretrain", "--config", str(config), "--data-root", str(aid_like),
              "--no-progress", "--out", str(killed)]
    process = subprocess.Popen(_torchrun(2, *common), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.monotonic() + 180
    while not sharded_checkpoints(killed) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    # torchrun starts each worker in its own session: kill the workers themselves, as a crash would.
    workers = _worker_pids(process.pid)
    assert len(workers) == 2, f"expected 2 running workers, found {workers}"
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode != 0, "the run finished before it could be killed"
    checkpoint = sharded_checkpoints(killed)[-1]
    step = int(checkpoint.name.split("-")[1])
    assert 2 <= step < 6
    assert (checkpoint / SHARDED_STATE_NAME).is_file()
    _assert_weights_are_checkpoint_student(config, killed)  # gathered from the 2 processes' shards

    # The same checkpoint resumed by 2 processes and, resharded, by 1.
    alone = tmp_path / "alone"
    shutil.copytree(killed, alone)
    _run(_torchrun(2, *common, "--resume"))
    _run(_cli("pretrain", "--config", str(config), "--data-root", str(aid_like), "--no-progress",
              "--out", str(alone), "--resume"))
    assert len(_losses(killed)) == len(_losses(alone)) == 6
    np.testing.assert_allclose(_losses(killed), _losses(straight), rtol=0, atol=1e-5)
    np.testing.assert_allclose(_losses(alone), _losses(straight), rtol=0, atol=1e-4)
    assert [p.name for p in killed.iterdir() if p.name.startswith((".checkpoint", "checkpoint"))] == [
        "checkpoint-00000006"]


@pytest.mark.slow
def test_one_process_fsdp_stop_and_resume(tmp_path: Path, aid_like: Path, monkeypatch) -> None:  # noqa: F811
    """One process writes the same DCP checkpoints (unsharded); a stopped run resumes exactly."""
    config = PretrainConfig.from_dict({**FSDP_CONFIG, "max_steps": 4})
    straight = pretrain(config, tmp_path / "straight", data_root=str(aid_like), progress=False)

    stopped = tmp_path / "stopped"
    stale = stopped / ".checkpoint-00000008.tmp"  # as left by a kill while saving
    stale.mkdir(parents=True)
    (stale / "junk.safetensors").write_bytes(b"half")
    original = SkySensePretrainingObjective.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        total, terms = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4:
            total = total * float("nan")
        return total, terms

    monkeypatch.setattr(SkySensePretrainingObjective, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="step 3"):
        pretrain(PretrainConfig.from_dict({**FSDP_CONFIG, "max_steps": 4}), stopped, data_root=str(aid_like),
                 progress=False)
    assert [p.name for p in sharded_checkpoints(stopped)] == ["checkpoint-00000002"]
    assert not stale.exists()
    # Written with the checkpoint, not only at the end of the run.
    _assert_weights_are_checkpoint_student(PretrainConfig.from_dict({**FSDP_CONFIG, "max_steps": 4}), stopped)
    monkeypatch.setattr(SkySensePretrainingObjective, "forward", original)

    with pytest.raises(ValueError, match="exists: pass --resume"):
        pretrain(PretrainConfig.from_dict({**FSDP_CONFIG, "max_steps": 4}), stopped, data_root=str(aid_like),
                 progress=False)
    with pytest.raises(FileNotFoundError, match="set distributed.strategy: fsdp"):
        pretrain(PretrainConfig.from_dict({**CONFIG, "max_steps": 4}), stopped, data_root=str(aid_like),
                 progress=False, resume=True)
    resumed = pretrain(PretrainConfig.from_dict({**FSDP_CONFIG, "max_steps": 4}), stopped,
                       data_root=str(aid_like), progress=False, resume=True)
    assert [r["step"] for r in resumed] == [2, 3]
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in straight[2:]], rtol=0, atol=1e-5)
    assert [p.name for p in stopped.iterdir() if "checkpoint" in p.name] == ["checkpoint-00000004"]
    assert SkySense.from_pretrained(str(stopped)).config.preset == "tiny"


def test_unknown_strategy_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "distributed": {"strategy": "zero3"}}))
    with pytest.raises(ValueError, match=r"bad.yaml: distributed.strategy: expected one of \['ddp', 'fsdp'\], "
                                         r"got 'zero3'"):
        PretrainConfig.from_yaml(path)


class _Toy(nn.Module):
    """Two FSDP units, a root-group head and a 0-d parameter (which fully_shard refuses)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(12, 2) for _ in range(2))
        self.head = nn.Linear(12, 5)
        self.log_scale = nn.Parameter(torch.tensor(0.3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x).mean(1) * self.log_scale.exp()


class _StudentTeacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.student = _Toy()
        self.teacher = build_teacher(self.student)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.teacher(x.flip(1))
        return (self.student(x) - target).pow(2).mean() + self.student(x * 0.5).pow(2).mean()


def _toy_steps(rank: int, world_size: int, shard: bool) -> dict[str, torch.Tensor]:
    """Three steps on this rank's share of a global batch of 8: grads averaged, clipped, SGD, EMA."""
    torch.manual_seed(0)
    module = _StudentTeacher()
    replicated: list[nn.Parameter] = []
    if shard:
        replicated = apply_fsdp(module, init_distributed(), (TransformerBlock,))
    params = list(module.student.parameters())
    # SGD, not AdamW: Adam's normalisation turns the rounding noise of gradients that are zero in
    # exact arithmetic (the attention's key bias) into visible, order-dependent steps.
    optimizer = torch.optim.SGD(params, lr=0.05)
    norms = []
    for step in range(3):
        x = torch.randn(8, 6, 12, generator=torch.Generator().manual_seed(step)).chunk(world_size)[rank]
        optimizer.zero_grad()
        module(x).backward()
        average_gradients(replicated)
        norms.append(clip_grad_norm(params, 0.05))
        optimizer.step()
        ema_update(module.teacher, module.student, 0.7)
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in module.state_dict().items()}
    return {**full, "grad_norms": torch.stack(norms)}


@pytest.mark.slow
def test_sharded_step_matches_one_process(tmp_path: Path) -> None:
    """apply_fsdp + average_gradients + clip_grad_norm + EMA on DTensor shards = one process."""
    _run(_torchrun(2, __file__, str(tmp_path / "sharded.pt")))
    sharded = torch.load(tmp_path / "sharded.pt", weights_only=True)
    reference = _toy_steps(0, 1, shard=False)
    assert sharded.keys() == reference.keys()
    assert (reference["grad_norms"] > 0.05).all(), "clipping never acted: the check proves nothing"
    assert not torch.equal(reference["student.log_scale"], torch.tensor(0.3))
    for key, value in reference.items():
        torch.testing.assert_close(sharded[key], value, rtol=0, atol=1e-5, msg=key)


if __name__ == "__main__":
    try:
        result = _toy_steps(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), shard=True)
        if int(os.environ["RANK"]) == 0:
            torch.save(result, sys.argv[1])
    finally:
        close_distributed()


@pytest.mark.slow
def test_fsdp_runs_with_compiled_checkpointed_blocks_match_eager(tmp_path: Path, aid_like: Path) -> None:  # noqa: F811
    """`compile: blocks` with activation checkpointing (full, then selective: traced inside each
    compiled block) under 2-process FSDP2 (inductor for real) gives the losses of a 1-process
    eager run of the same global batch.

    32 px views (SwinV2 maps of 8, 4, 2 and 1 tokens, 10 graphs) rather than the 64 px of the
    other runs (12 graphs): each process compiles every graph from a cold cache, which took
    125-146 s per setting on 2 cores at 64 px. Both settings run in this one test, one after the
    other after one eager run, so the second compiles the kernels it shares with the first from
    the first's cache: 154 s from empty caches on 2 cores, against 166 + 112 s when they were
    two tests that two workers ran at once (benchmarks/RESULTS.md, session 14)."""
    eager = tmp_path / "eager"
    data = {**FSDP_CONFIG["data"], "view_size": 32}
    config = _write(tmp_path / "eager.yaml", max_steps=3, data=data, distributed={"strategy": "ddp"})
    _run(_cli("pretrain", "--config", str(config), "--data-root", str(aid_like), "--no-progress", "--out", str(eager)))
    for checkpointing in (True, "selective"):
        compiled = tmp_path / f"compiled-{checkpointing}"
        config = _write(tmp_path / f"compiled-{checkpointing}.yaml", max_steps=3, data=data, compile="blocks",
                        activation_checkpointing=checkpointing)
        _run(_torchrun(2, "-m", "skysense.cli", "pretrain", "--config", str(config), "--data-root", str(aid_like),
                       "--no-progress", "--out", str(compiled)))
        assert len(_losses(compiled)) == 3, checkpointing
        # Seen: relative differences of 2e-6 (kernel order), far below the step-to-step changes.
        assert _losses(compiled) == pytest.approx(_losses(eager), rel=1e-4), checkpointing


def test_fsdp_gathers_parameters_in_the_given_dtype_and_keeps_float32_shards() -> None:
    """``apply_fsdp(param_dtype=bf16)`` (the loop's choice on CUDA): weights reach the forward
    in bf16, while the shards the optimizer updates stay float32. A process group of two ranks
    whose collectives do nothing stands in for a second process."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from skysense.distributed import DistributedContext, apply_fsdp
    from skysense.models.layers import TransformerBlock

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        model = nn.Sequential(TransformerBlock(16, 2, 2.0), TransformerBlock(16, 2, 2.0))
        seen = []
        model[0].mlp.fc1.register_forward_pre_hook(lambda module, args: seen.append(module.weight.dtype))
        apply_fsdp(model, DistributedContext(rank=0, world_size=2), (TransformerBlock,), torch.bfloat16)
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        model(torch.randn(3, 5, 16)).float().sum().backward()
        assert seen == [torch.bfloat16]
        assert {p.grad.dtype for p in model.parameters()} == {torch.float32}
    finally:
        dist.destroy_process_group()
