"""What the host still launches in a compiled pretraining step: the operators outside the graphs.

On the H100 (2026-11-28) part (d)'s eager step was bound by the host: 19,375 operators per step,
each costing the host tens of microseconds. Compiled block-wise, each block runs as one graph
call, but the code between blocks (patch embeddings, token assembly, the objectives,
Sinkhorn-Knopp's rounds) stays eager. This builds (d) at ``huge``'s structure with CPU-sized
widths (``gpu_step.narrow_huge_model``: the same blocks, shapes of the inputs and number of
operators, narrow tensors), compiles its blocks with ``aot_eager`` (dynamo and AOTAutograd as
under inductor, no kernels built), and profiles one step after two warm-up steps. It counts
the ATen operators called from outside any compiled graph (top-level ones: those no other ATen
operator called), and the graph calls. AdamW, gradient clipping and the EMA update are counted
apart: on CUDA they are fused or multi-tensor kernels (a few launches), on the CPU one operator
per tensor.

    PYTHONPATH=src python benchmarks/compiled_step_host.py --batch 3 --checkpointing selective
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_step  # noqa: E402  (beside this file)

from skysense.compilation import compile_blocks  # noqa: E402

# Work of (d)'s step that CUDA runs as fused or multi-tensor kernels (PretrainStep.forward).
MULTI_TENSOR = ("clip_grad_norm", "ema_update")
MULTI_TENSOR_PREFIXES = ("multi-tensor: ", "Optimizer.step")


@contextmanager
def multi_tensor_marked() -> Any:
    """gpu_step's clip_grad_norm and ema_update under profiler ranges, while in the context."""
    originals = {name: getattr(gpu_step, name) for name in MULTI_TENSOR}

    def marked(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            with record_function(f"multi-tensor: {name}"):
                return originals[name](*args, **kwargs)
        return call

    for name in MULTI_TENSOR:
        setattr(gpu_step, name, marked(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(gpu_step, name, original)


def _ancestors(event: Any) -> Any:
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def classify(events: list[Any]) -> dict[str, Any]:
    """Top-level ATen operators by where they ran: in a compiled graph, in the optimizer, clipping
    or EMA (multi-tensor on CUDA), or elsewhere (launched by the host one by one on CUDA too)."""
    places: dict[str, Counter[str]] = {"compiled": Counter(), "multi_tensor": Counter(), "outside": Counter()}
    graph_calls: Counter[str] = Counter()
    for event in events:
        if event.name in ("CompiledFunction", "CompiledFunctionBackward") or event.name.startswith("Torch-Compiled Region"):
            graph_calls[event.name.split(":")[0]] += 1
        if not event.name.startswith("aten::"):
            continue
        ancestors = [a.name for a in _ancestors(event)]
        if any(name.startswith("aten::") for name in ancestors):
            continue  # called by another operator
        if any("Compiled" in name for name in ancestors):
            places["compiled"][event.name] += 1
        elif any(name.startswith(MULTI_TENSOR_PREFIXES) for name in ancestors):
            places["multi_tensor"][event.name] += 1
        else:
            places["outside"][event.name] += 1
    return {"graph_calls": dict(graph_calls), **places}


def profile_step(batch: int, checkpointing: str, sinkhorn_rounds: int) -> dict[str, Any]:
    shapes = dataclasses.replace(gpu_step.HUGE, step_batches=(batch,))
    options = gpu_step.Options(device="cpu", dtype="fp32", shapes=shapes, sinkhorn_rounds=sinkhorn_rounds)
    model = gpu_step.narrow_huge_model(options)
    workload = gpu_step.pretrain_workload(model, batch, options)
    workload.checkpoint(checkpointing)
    torch._dynamo.reset()
    compile_blocks(model, workload.blocks, backend="aot_eager")
    try:
        with multi_tensor_marked():
            workload.step(model)  # compiles
            workload.step(model)
            with profile(activities=[ProfilerActivity.CPU]) as profiler:
                workload.step(model)
    finally:
        torch._dynamo.reset()
    return classify(list(profiler.events()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=3, help="per-device batch (default 3, the paper's)")
    parser.add_argument("--checkpointing", default="selective", choices=gpu_step.CHECKPOINTING)
    parser.add_argument("--sinkhorn-rounds", type=int, default=30)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    counted = profile_step(args.batch, args.checkpointing, args.sinkhorn_rounds)
    print(f"(d) at huge's structure, narrow widths, batch {args.batch}, checkpointing {args.checkpointing}, "
          f"{args.sinkhorn_rounds} Sinkhorn-Knopp rounds, blocks compiled (aot_eager): one step")
    print("graph calls:", ", ".join(f"{name} {calls}" for name, calls in sorted(counted["graph_calls"].items())))
    for place in ("compiled", "multi_tensor", "outside"):
        print(f"top-level ATen operators, {place}: {sum(counted[place].values()):,}")
    print("outside, by operator:")
    for name, calls in counted["outside"].most_common(args.top):
        print(f"{calls:8,d}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
