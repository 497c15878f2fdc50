"""A dispatch mode that records batched matmuls repeating one matrix over the batch."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class BroadcastMatmuls(TorchDispatchMode):
    """Batched matmuls whose operand repeats one matrix over the batch (a stride-0 batch dim)."""

    def __init__(self) -> None:
        super().__init__()
        self.broadcast: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default):
            for operand in args:
                if isinstance(operand, torch.Tensor) and operand.dim() == 3 and operand.shape[0] > 1 \
                        and operand.stride(0) == 0:
                    self.broadcast.append((str(func), tuple(operand.shape)))
        return func(*args, **(kwargs or {}))
