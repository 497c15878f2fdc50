"""Where a command runs: the device from a ``--device`` flag or config, and its compute precision."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch


def resolve_device(name: str | None, setting: str = "--device") -> torch.device:
    """``name`` as a device; None or ``"auto"``: the first CUDA device when there is one, else the CPU.

    Raises ``ValueError`` naming ``setting`` for a name torch does not know, or a CUDA device that
    this machine does not have.
    """
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"{setting}: {name!r} is not a device (expected cpu, cuda, cuda:N or auto): {error}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device.index is not None and device.index >= count or count == 0:
            raise ValueError(f"{setting}: {name!r} asked for, but this machine has {count} CUDA device(s)")
    return device


def adamw(param_groups: list[dict[str, Any]], lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW, with its fused kernel on CUDA: a step over SkySense-huge's 2B parameters is then a
    few kernels reading each parameter's state once, instead of the multi-tensor path's several
    passes (on one GPU, without FSDP, the step moves over 30 GB). Elsewhere torch's default."""
    if device.type == "cuda":
        return torch.optim.AdamW(param_groups, lr=lr, fused=True)
    return torch.optim.AdamW(param_groups, lr=lr)


def training_dtype(device: torch.device) -> torch.dtype | None:
    """The compute dtype of training on ``device``: bf16 on CUDA, None (full precision) elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else None


def training_autocast(device: torch.device) -> AbstractContextManager:
    """Autocast to :func:`training_dtype` (bf16 on CUDA, how SkySense trains on GPUs); full
    precision elsewhere."""
    dtype = training_dtype(device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on ``device``, also those in lists (per-image detection targets);
    other values as they are."""
    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, list) and value and all(isinstance(v, torch.Tensor) for v in value):
            return [v.to(device) for v in value]
        return value

    return {k: move(v) for k, v in batch.items()}
