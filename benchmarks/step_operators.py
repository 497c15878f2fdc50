"""Operators of one pretraining step at any size, on fake tensors: where an eager step's host time goes.

On the H100, part (d)'s eager step was bound by the host (1.07 s of CPU time against 0.60 s of
GPU time at batch 2, ``device_runs/2026-11-27-h100/run6-profile-pretrain-step-batch2.txt``):
every operator costs the host tens of microseconds. This runs the step of
``benchmarks/step_memory.py`` (SkySense-huge, the paper's shapes, bf16 autocast with the CPU's
operator lists, fused AdamW) on fake tensors, and counts the operators of its second step
(the first creates AdamW's state) by ATen operator and by the line of ours that called each.

Fake tensors cannot read values back, so Sinkhorn-Knopp runs all its rounds (``--sinkhorn-
iterations``, default 10 here: the H100 step read the GPU back 27-31 times, mostly these tests).
Autocast follows the CPU's lists, so the casts differ from CUDA's somewhat, and on the CPU
``clip_grad_norm`` takes torch's per-tensor path (CUDA's is a few multi-tensor kernels).

    PYTHONPATH=src python benchmarks/step_operators.py --batch 3 --checkpointing all
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

import step_memory  # noqa: E402
from live_memory import in_package, innermost_frame, package_path  # noqa: E402

gpu_step = step_memory.gpu_step
# Operators that do no work of their own on a device (fake tensors' device queries).
IGNORED = {"device"}


class OperatorCount(TorchDispatchMode):
    """ATen operators run in its context, by name and by (name, our calling line)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_name: Counter[str] = Counter()
        self.by_line: Counter[tuple[str, str]] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in IGNORED:
            self.by_name[name] += 1
            self.by_line[name, _our_line()] += 1
        return func(*args, **(kwargs or {}))


def _our_line() -> str:
    frame = innermost_frame(in_package)
    if frame is None:
        return "(outside skysense)"
    return f"{package_path(frame.f_code.co_filename)}:{frame.f_lineno}"


def count(batch: int, checkpointing: str, sinkhorn_iterations: int,
          shapes: "gpu_step.Shapes" = gpu_step.HUGE) -> OperatorCount:
    """The operators of the second step of part (d) at ``shapes`` (see the module docstring)."""
    counter = OperatorCount()
    configure = gpu_step.pretrain_config

    def config(shapes: gpu_step.Shapes, size: int):
        config = configure(shapes, size)
        config.objective.sinkhorn_iterations = sinkhorn_iterations
        return config

    gpu_step.pretrain_config = config
    try:
        step_memory.estimate(batch, checkpointing, shapes, second_step_in=counter)
    finally:
        gpu_step.pretrain_config = configure
    return counter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=3, help="per-device batch (default 3, the paper's)")
    parser.add_argument("--checkpointing", default="all", choices=step_memory.CHECKPOINTING)
    parser.add_argument("--sinkhorn-iterations", type=int, default=10)
    parser.add_argument("--top", type=int, default=25, help="rows of each table (default 25)")
    args = parser.parse_args(argv)
    counter = count(args.batch, args.checkpointing, args.sinkhorn_iterations)
    print(f"huge, batch {args.batch}, checkpointing {args.checkpointing}, Sinkhorn-Knopp "
          f"{args.sinkhorn_iterations} rounds: {sum(counter.by_name.values()):,} operators in one step")
    for name, calls in counter.by_name.most_common(args.top):
        print(f"{calls:8,d}  {name}")
    print("by the line of ours that called them:")
    for (name, line), calls in counter.by_line.most_common(args.top):
        print(f"{calls:8,d}  {name:<28} {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
