"""Scale applied from outside the model: process groups, DDP, activation checkpointing, compile.

The model code knows nothing of ranks. One code path serves a plain ``python`` process and
``torchrun --nproc-per-node N``: the backend is NCCL on CUDA and gloo on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistributedContext:
    """Join the process group that torchrun describes in the environment, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def mean_across_processes(value: torch.Tensor) -> torch.Tensor:
    """Average a tensor over all processes (identity in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def wrap_data_parallel(module: nn.Module, context: DistributedContext) -> nn.Module:
    """DDP over all processes; unused heads (absent modalities) are allowed."""
    if not context.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True)


def apply_activation_checkpointing(model: nn.Module, block_types: tuple[type[nn.Module], ...]) -> int:
    """Recompute the activations of every block of the given types in the backward pass.

    Returns the number of wrapped blocks.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing as apply,
        checkpoint_wrapper,
    )

    count = sum(isinstance(m, block_types) for m in model.modules())
    apply(model, checkpoint_wrapper_fn=checkpoint_wrapper, check_fn=lambda m: isinstance(m, block_types))
    return count
