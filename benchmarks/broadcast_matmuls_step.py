"""Broadcast matmuls in one real pretraining step at the paper's shapes, on this CPU.

F.linear on a strided input of more than two dimensions, where the weight takes no gradient
(the EMA teacher), runs as a batched matmul over one weight repeated per leading index: a copy
of the weight per location at ``huge``. This runs part (d)'s step of ``benchmarks/gpu_step.py``
(student, teacher, every objective, backward, AdamW) for real, every transformer stack cut to
``--max-depth`` blocks so it fits a small machine (widths, heads, windows and input shapes are
the paper's), every student block checkpointed, SwinV2's heads padded to 48 as on CUDA, and
prints each such matmul (``tests/broadcast_matmuls.py``'s mode) with the lines that ran it.

    PYTHONPATH=src python benchmarks/broadcast_matmuls_step.py --batch 3
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]

import step_memory  # noqa: E402
from live_memory import in_package  # noqa: E402
from broadcast_matmuls import BroadcastMatmuls  # noqa: E402

from skysense.distributed import apply_activation_checkpointing  # noqa: E402
from skysense.models import swin_v2  # noqa: E402
from skysense.models.layers import TransformerBlock  # noqa: E402
from skysense.models.swin_v2 import SwinV2Block  # noqa: E402
from skysense.validation import checked_on_host  # noqa: E402


class Located(BroadcastMatmuls):
    """:class:`BroadcastMatmuls` that also prints where each one ran."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        seen = len(self.broadcast)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if len(self.broadcast) > seen:
            node = torch._C._current_autograd_node()
            lines = [f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in traceback.extract_stack()
                     if in_package(f.filename)]
            print(f"  {self.broadcast[-1]} in {node.name() if node else 'the forward'} at {lines[-3:]}", flush=True)
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=3, help="per-device batch (default 3, the paper's)")
    parser.add_argument("--max-depth", type=int, default=1, help="blocks per transformer stack (default 1)")
    args = parser.parse_args(argv)
    gpu_step = step_memory.gpu_step
    with step_memory.stacks_capped("huge", args.max_depth):
        options = gpu_step.Options(device="cpu", dtype="bf16", shapes=gpu_step.HUGE)
        torch.manual_seed(0)
        model = gpu_step.PretrainStep(gpu_step.pretrain_config(gpu_step.HUGE, args.batch), options)
        model.pretraining.train()
        apply_activation_checkpointing(model.pretraining.student, (TransformerBlock, SwinV2Block))
        views = gpu_step.pretrain_views(gpu_step.HUGE, args.batch, torch.device("cpu"), torch.Generator().manual_seed(0))
        model.views = tuple(checked_on_host(view) for view in views)
        padding = swin_v2.fused_head_multiple
        swin_v2.fused_head_multiple = lambda device: 8  # SwinV2-H's heads 44 -> 48, as on CUDA
        try:
            started = time.perf_counter()
            with Located() as seen:
                model()
        finally:
            swin_v2.fused_head_multiple = padding
    print(f"huge, stacks cut to {args.max_depth} block(s), batch {args.batch}: {len(seen.broadcast)} broadcast "
          f"matmuls in one step ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
