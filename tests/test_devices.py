"""Device choice (skysense.devices) and the commands that take --device."""

from __future__ import annotations

import pytest
import torch

from skysense.devices import adamw, resolve_device, to_device, training_autocast

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")


@no_gpu
def test_auto_is_the_cpu_without_a_gpu() -> None:
    assert resolve_device(None) == resolve_device("auto") == torch.device("cpu")


def test_named_devices_and_errors() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"--device: 'gpu0' is not a device \(expected cpu, cuda, cuda:N or auto\)"):
        resolve_device("gpu0")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=rf"device: 'cuda:{count}' asked for, but this machine has {count} CUDA"):
        resolve_device(f"cuda:{count}", setting="device")


def test_to_device_moves_tensors_only() -> None:
    batch = {"hr": torch.zeros(1), "name": ["a"], "step": 3}
    moved = to_device(batch, torch.device("meta"))
    assert moved["hr"].device.type == "meta" and moved["name"] == ["a"] and moved["step"] == 3


def test_training_autocast_is_bf16_on_cuda_only() -> None:
    with training_autocast(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
    cuda = training_autocast(torch.device("cuda"))  # not entered: without a GPU torch disables it
    assert isinstance(cuda, torch.autocast) and (cuda.device, cuda.fast_dtype) == ("cuda", torch.bfloat16)


@no_gpu
def test_commands_name_a_missing_gpu(tmp_path, capsys) -> None:
    from skysense.cli import main

    code = main(["evaluate", "linear-probe", "--dataset", "aid", "--data-root", str(tmp_path), "--preset", "tiny",
                 "--random-init", "--device", "cuda"])
    assert code != 0
    assert "--device: 'cuda' asked for, but this machine has 0 CUDA device(s)" in capsys.readouterr().err


def test_adamw_is_fused_on_cuda_only() -> None:
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert adamw([{"params": params}], 1e-3, torch.device("cuda")).defaults["fused"] is True
    assert not adamw([{"params": params}], 1e-3, torch.device("cpu")).defaults["fused"]
