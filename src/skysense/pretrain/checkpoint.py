"""Pretraining checkpoints: everything a resumed run needs, never left half-written by a kill.

The format follows ``distributed.strategy`` (:class:`skysense.pretrain.config.DistributedConfig`):

* ``ddp``: ``training_state.pt``, one file (step, module and optimizer state dicts, config)
  written by rank 0 under a temporary name and renamed; read with ``weights_only=True``.
* ``fsdp``: a folder ``checkpoint-<step>/`` written by every process with
  ``torch.distributed.checkpoint`` (DCP): each process writes its own shards of the student,
  the EMA teacher, the objective (heads, teacher heads, centres) and the AdamW moments, as
  safetensors files (DCP's HuggingFace storage, so reading a checkpoint unpickles nothing),
  next to ``training_state.json`` (step, config, which parameters have optimizer state). The
  folder is written as ``.checkpoint-<step>.tmp/`` and renamed once every process has
  written; older checkpoint folders are removed after that. DCP reshards on load, so N
  processes resume what M processes wrote (one process included). All processes must see
  the same output folder (one machine, or a shared file system).

Either way every checkpoint also writes the student as ``model.safetensors`` + ``config.json``
(loadable with ``--weights DIR``; metadata ``pretrain_step``), atomically and before the
resumable state, so the weights are never older than the latest checkpoint. Under ``fsdp`` the
student is gathered whole on rank 0 for it (:func:`save_student_weights`, in CPU memory), which
is the one place a sharded run holds the whole student.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from skysense.distributed import DistributedContext, barrier
from skysense.models import SkySense
from skysense.pretrain.config import PretrainConfig
from skysense.weights import atomic_write, save_pretrained

STATE_NAME = "training_state.pt"
SHARDED_STATE_NAME = "training_state.json"
CHECKPOINT_PREFIX = "checkpoint-"
# Settings a resumed run must share with the run it continues (others, e.g. max_steps, may change).
RESUME_KEYS = ("preset", "batch_size", "seed")

_CHECKPOINT_DIR = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def is_sharded(config: PretrainConfig) -> bool:
    """Whether this run's checkpoints are DCP folders (``distributed.strategy: fsdp``)."""
    return config.distributed.strategy == "fsdp"


def sharded_checkpoints(out: Path) -> list[Path]:
    """Complete ``checkpoint-<step>`` folders in ``out``, oldest first (temporary ones excluded)."""
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := _CHECKPOINT_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def has_checkpoint(out: Path) -> bool:
    """Whether ``out`` holds a resumable state of either format."""
    return (out / STATE_NAME).exists() or bool(sharded_checkpoints(out))


def save_checkpoint(out: Path, step: int, module: nn.Module, optimizer: torch.optim.Optimizer,
                    config: PretrainConfig, context: DistributedContext) -> Path:
    """Write the state after ``step`` steps; call on every process. Returns what was written."""
    if is_sharded(config):
        save_student_weights(out, module, step, context)
        return _save_sharded(out, step, module, optimizer, config, context)
    path = out / STATE_NAME
    if context.is_main:
        state = {"step": step, "module": module.state_dict(), "optimizer": optimizer.state_dict(),
                 "config": config.to_dict()}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        save_pretrained(module.student, out, metadata={"pretrain_step": str(step)})
        atomic_write(path, lambda p: p.write_bytes(buffer.getvalue()))
    barrier()
    return path


def load_checkpoint(out: Path, module: nn.Module, optimizer: torch.optim.Optimizer,
                    config: PretrainConfig) -> int:
    """Restore module and optimizer from the latest checkpoint in ``out``; returns its step.

    Under ``fsdp`` call on every process, after sharding and building the optimizer; it also
    works in a single process on an unsharded module (e.g. to inspect a checkpoint).
    """
    sharded = sharded_checkpoints(out)
    if is_sharded(config):
        if not sharded:
            hint = f"; {out / STATE_NAME} is a ddp checkpoint: set distributed.strategy: ddp" if (
                out / STATE_NAME).is_file() else ""
            raise FileNotFoundError(f"{out}: nothing to resume from: no {CHECKPOINT_PREFIX}<step> folder{hint}")
        return _load_sharded(sharded[-1], module, optimizer, config)
    path = out / STATE_NAME
    if not path.is_file():
        hint = f"; {sharded[-1]} is an fsdp checkpoint: set distributed.strategy: fsdp" if sharded else ""
        raise FileNotFoundError(f"{path}: nothing to resume from{hint}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    _check_resumable(path, state["config"], config)
    module.load_state_dict(state["module"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def save_student_weights(out: Path, module: nn.Module, step: int, context: DistributedContext) -> None:
    """The student as ``model.safetensors`` + ``config.json``, gathered whole on rank 0.

    Call on every process: gathering sharded parameters is a collective.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    student = module.student
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(student, options=options) if dist.is_initialized() else student.state_dict()
    if context.is_main:
        with torch.device("meta"):
            whole = SkySense(student.config)
        whole.load_state_dict(state, strict=True, assign=True)
        save_pretrained(whole, out, metadata={"pretrain_step": str(step)})
    barrier()


@contextmanager
def _single_process_quietly() -> Iterator[None]:
    """DCP warns that it assumes one process whenever no process group exists; here we mean it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _check_resumable(path: Path, saved: dict, config: PretrainConfig) -> None:
    for key in RESUME_KEYS:
        if saved[key] != getattr(config, key):
            raise ValueError(f"{path}: cannot resume: {key} was {saved[key]!r}, now {getattr(config, key)!r}")


def _save_sharded(out: Path, step: int, module: nn.Module, optimizer: torch.optim.Optimizer,
                  config: PretrainConfig, context: DistributedContext) -> Path:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = out / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = out / f".{final.name}.tmp"
    if context.is_main:
        for stale in out.glob(f".{CHECKPOINT_PREFIX}*.tmp"):  # left by a run killed while saving
            shutil.rmtree(stale)
        tmp.mkdir(parents=True)
    barrier()
    model_state, optimizer_state = get_state_dict(module, optimizer)
    # Only tensors go through DCP; the optimizer's hyper-parameters come from the config.
    with _single_process_quietly():
        dcp.save({"model": model_state, "optimizer": optimizer_state["state"]},
                 storage_writer=dcp.HuggingFaceStorageWriter(str(tmp), save_distributed=True),
                 no_dist=not dist.is_initialized())
    # dcp.save returns on rank 0 only after every process has reported its files written.
    if context.is_main:
        info = {"step": step, "world_size": context.world_size, "config": config.to_dict(),
                "optimizer_state": sorted(optimizer_state["state"])}
        (tmp / SHARDED_STATE_NAME).write_text(json.dumps(info, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for older in sharded_checkpoints(out):
            if older != final:
                shutil.rmtree(older)
    barrier()
    return final


def _load_sharded(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer, config: PretrainConfig) -> int:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    info_path = path / SHARDED_STATE_NAME
    if not info_path.is_file():
        raise FileNotFoundError(f"{info_path}: missing; {path} is not a checkpoint written by skysense pretrain")
    info = json.loads(info_path.read_text())
    _check_resumable(info_path, info["config"], config)
    model_state, optimizer_state = get_state_dict(module, optimizer)
    # Parameters that never had a gradient (e.g. the encoder of a modality absent from the
    # data) have no AdamW state in the saved run; they get none here either.
    saved = set(info["optimizer_state"])
    unknown = sorted(saved - set(optimizer_state["state"]))
    if unknown:
        raise ValueError(f"{info_path}: optimizer state for parameters this model lacks: {unknown[:5]}")
    optimizer_state["state"] = {k: v for k, v in optimizer_state["state"].items() if k in saved}
    with _single_process_quietly():
        dcp.load({"model": model_state, "optimizer": optimizer_state["state"]},
                 storage_reader=dcp.HuggingFaceStorageReader(str(path)), no_dist=not dist.is_initialized())
    # strict=False only lets parameters without saved optimizer state stay without it: a
    # model key absent from the checkpoint has already failed in dcp.load.
    set_state_dict(module, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(strict=False))
    return int(info["step"])
