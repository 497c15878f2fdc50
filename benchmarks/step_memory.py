"""Peak memory of one pretraining step at any size, estimated on the CPU without allocating it.

Part (d) of ``benchmarks/gpu_step.py`` (student and EMA teacher on two multi-modal views, every
objective, clipping, AdamW, the prototype and EMA updates) runs on fake tensors
(``torch._subclasses.fake_tensor.FakeTensorMode``): every operator computes its output's shape
and dtype only, so SkySense-huge's step at the paper's shapes runs in a minute on a laptop. A
dispatch mode adds up the bytes of every storage alive at each moment (freed when its last
tensor goes) and keeps the peak; the model state (parameters, buffers, gradients, AdamW's
moments) is measured after a step, and the peak during the second step (the first has no
optimizer state yet).

How it differs from a GPU run, so read the result as an estimate:

* bf16 autocast runs with the CPU's operator lists, which match CUDA's for the matmuls,
  convolutions and attention that hold most of the memory; SwinV2's heads are padded to 48 as
  on CUDA; AdamW is the fused one the loop uses on CUDA.
* Not counted: the CUDA context (about 0.5 GiB), cuBLAS/cuDNN workspaces, and the caching
  allocator's rounding and fragmentation (``torch.cuda.memory_reserved`` is typically a few
  to 15% above the allocated peak this estimates).
* Eager: compiled blocks usually save fewer tensors for the backward pass.
* ``--world N`` shards with FSDP2 as the loop does on CUDA (parameters gathered in bf16), over
  a process group whose collectives do nothing: the shards, the gathered parameters and
  gradient buffers are allocated as on N devices (FSDP2 frees gathered parameters by resizing
  their storage: that is counted too).
* Values the step reads back get stand-ins: Sinkhorn-Knopp never meets its tolerance early
  (every round runs; each round replaces the last, so memory does not grow with rounds), and
  every sample of the global batch is in its own geo region (the most memory: the prototype
  scores and updates cover every region present on any device).

    PYTHONPATH=src python benchmarks/step_memory.py                       # huge, batches 3,4,6,8
    PYTHONPATH=src python benchmarks/step_memory.py --batches 3 --checkpointing off,fusion,all
    PYTHONPATH=src python benchmarks/step_memory.py --batches 3 --world 80  # the paper: FSDP2, 80 GPUs
    # real tensors at the paper's widths and shapes, every stack cut to 2 blocks (fits 24 GiB)
    PYTHONPATH=src python benchmarks/step_memory.py --max-depth 2 --batches 2,3 --checkpointing all --real
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_step  # noqa: E402
from live_memory import LiveBytes  # noqa: E402

from skysense import config as model_config  # noqa: E402
from skysense.devices import adamw, training_dtype  # noqa: E402
from skysense.distributed import (  # noqa: E402
    DistributedContext, apply_activation_checkpointing, apply_fsdp, checkpoint_blocks)
from skysense.models import TRANSFORMER_BLOCKS, swin_v2  # noqa: E402
from skysense.models.layers import TransformerBlock  # noqa: E402
from skysense.pretrain.loop import FSDP_UNITS  # noqa: E402
from skysense.pretrain.model import parameter_groups  # noqa: E402
from skysense.validation import checked_on_host  # noqa: E402

GIB = 2**30
# Activation checkpointing of the student: none; every transformer block keeping its matmul and
# attention outputs (``activation_checkpointing: selective``); the fusion transformer's blocks;
# every transformer block (--activation-checkpointing / ``activation_checkpointing: true``).
CHECKPOINTING = gpu_step.CHECKPOINTING
# The pretraining loop's activation_checkpointing for each setting but "off" and "fusion".
LOOP_SETTINGS = {"selective": "selective", "all": True, "selective-fusion": gpu_step.SELECTIVE_FUSION}


def clear_mask_caches() -> None:
    for builder in (swin_v2.shifted_window_mask, swin_v2.padded_key_mask):
        builder.cache_clear()


@contextmanager
def resizes_reported_to(live: LiveBytes):
    """``UntypedStorage.resize_`` reports to ``live``: it is no operator, so no dispatch mode sees it."""
    resize = torch.UntypedStorage.resize_

    def reporting(storage, size):
        out = resize(storage, size)
        live.resized(storage)
        return out

    torch.UntypedStorage.resize_ = reporting
    try:
        yield
    finally:
        torch.UntypedStorage.resize_ = resize


@contextmanager
def fake_process_group(world: int):
    """A process group of ``world`` ranks, this one rank 0, whose collectives do nothing
    (``torch.testing._internal.distributed.fake_pg``): FSDP2 shards and allocates as it would."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield DistributedContext(rank=0, world_size=world, device=torch.device("cpu"))
    finally:
        dist.destroy_process_group()


@contextmanager
def stacks_capped(preset: str, max_depth: int | None):
    """Every transformer stack of ``preset`` (each SwinV2 stage, both ViTs, the fusion) cut to
    at most ``max_depth`` blocks, widths, heads, windows and input shapes kept: a real step at
    the paper's widths that fits a small machine (``--max-depth``). None: unchanged."""
    if max_depth is None:
        yield
        return
    if max_depth < 1:
        raise ValueError(f"max_depth: expected at least 1 block, got {max_depth}")
    build = model_config.PRESETS[preset]

    def capped() -> model_config.SkySenseConfig:
        config = build()
        config.hr = dataclasses.replace(config.hr, depths=tuple(min(d, max_depth) for d in config.hr.depths))
        for name in ("s2", "s1", "fusion"):
            stack = getattr(config, name)
            setattr(config, name, dataclasses.replace(stack, depth=min(stack.depth, max_depth)))
        return config

    model_config.PRESETS[preset] = capped
    try:
        yield
    finally:
        model_config.PRESETS[preset] = build


@dataclass
class StepMemory:
    batch: int
    checkpointing: str
    world: int  # FSDP2 over this many devices (1: none)
    state_gib: float  # parameters, buffers, gradients and AdamW moments after a step
    peak_gib: float  # during a step, state included
    seconds: float


def estimate(batch: int, checkpointing: str = "off", shapes: gpu_step.Shapes = gpu_step.HUGE,
             world: int = 1, fake: bool = True, second_step_in: Any = None) -> StepMemory:
    """Peak memory of part (d)'s step at per-device ``batch`` (see the module docstring), on one
    device, or on each of ``world`` devices with the pretraining loop's FSDP2 sharding.

    ``fake=False`` runs the step for real on the CPU (small shapes only), counted the same way:
    the check that fake tensors are counted as real ones would be. ``second_step_in``: a context
    manager (a dispatch mode, say) the second step runs in (``benchmarks/step_operators.py``).
    """
    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"checkpointing: expected one of {CHECKPOINTING}, got {checkpointing!r}")
    if world < 1:
        raise ValueError(f"world: expected at least 1 device, got {world}")
    if not fake and world > 1:
        raise ValueError(f"fake=False runs on this machine's one device, not world={world}")
    with fake_process_group(world) if world > 1 else nullcontext() as context:
        return _estimate(batch, checkpointing, shapes, context, fake, second_step_in)


def _estimate(batch: int, checkpointing: str, shapes: gpu_step.Shapes,
              context: DistributedContext | None, fake: bool, second_step_in: Any = None) -> StepMemory:
    started = time.perf_counter()
    options = gpu_step.Options(device="cpu", dtype="bf16", shapes=shapes)
    torch.manual_seed(0)
    # Fake: built on meta (initialisation would read values, trunc_normal_; shapes suffice).
    with torch.device("meta" if fake else "cpu"):
        model = gpu_step.PretrainStep(gpu_step.pretrain_config(shapes, batch), options)
    model.pretraining.train()
    views = gpu_step.pretrain_views(shapes, batch, torch.device("cpu"), torch.Generator().manual_seed(0))
    views = tuple(checked_on_host(view) for view in views)  # as the loop: values checked on the host
    student = model.pretraining.student
    if checkpointing == "fusion":
        apply_activation_checkpointing(student.fusion, (TransformerBlock,))
    elif checkpointing != "off":  # the loop's activation_checkpointing: true, selective or per network
        checkpoint_blocks(student, TRANSFORMER_BLOCKS, LOOP_SETTINGS[checkpointing])
    if context is not None:  # after checkpointing, as the loop
        apply_fsdp(model.pretraining, context, FSDP_UNITS, training_dtype(torch.device("cuda")))  # as on CUDA
    padding = swin_v2.fused_head_multiple
    swin_v2.fused_head_multiple = lambda device: 8  # SwinV2-H's heads 44 -> 48, as on CUDA
    clear_mask_caches()  # masks cached by an earlier run would not be counted (or be real)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) if fake else nullcontext() as mode:
            if fake:
                model.to_empty(device="cpu")
                views = tuple({k: mode.from_tensor(v) for k, v in view.items()} for view in views)
            model.views = views
            model.optimizer = adamw(parameter_groups(model.pretraining, model.config.optim.weight_decay),
                                    model.config.optim.lr, torch.device("cuda"))  # fused, as on CUDA
            world = 1 if context is None else context.world_size
            # Fake: regions present, one per sample on all devices (the most).
            live = LiveBytes(nonzero_rows=batch * world if fake else None)
            for tensor in (*model.parameters(), *model.buffers(), *tree_leaves(model.views)):
                live.track(tensor)
            with live, resizes_reported_to(live):
                model()  # creates gradients and AdamW's moments
                state = live.live
                live.peak = live.live
                with second_step_in or nullcontext():
                    model()
    finally:
        swin_v2.fused_head_multiple = padding
        clear_mask_caches()  # fake masks must not reach a later real run
    return StepMemory(batch, checkpointing, world, state / GIB, live.peak / GIB, time.perf_counter() - started)


def trained_parameters(shapes: gpu_step.Shapes = gpu_step.HUGE) -> int:
    """Parameters AdamW updates in part (d) (the student and its heads), counted on meta."""
    with torch.device("meta"):
        model = gpu_step.PretrainStep(gpu_step.pretrain_config(shapes, 1), gpu_step.Options(device="cpu"))
    return sum(p.numel() for group in parameter_groups(model.pretraining, 0.0) for p in group["params"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="3,4,6,8", help="per-device batches (default 3,4,6,8)")
    parser.add_argument("--checkpointing", default="off,all",
                        help=f"comma-separated, of {', '.join(CHECKPOINTING)} (default off,all)")
    parser.add_argument("--world", default="1", help="comma-separated device counts to shard over with FSDP2 "
                        "(1: one device, no sharding; default 1)")
    parser.add_argument("--small", action="store_true", help="the tiny preset at gpu_step's --small shapes")
    parser.add_argument("--real", action="store_true", help="run the step for real on this CPU, counted the "
                        "same way (with --small: checks the fake count)")
    parser.add_argument("--max-depth", type=int, metavar="N",
                        help="cut every transformer stack to at most N blocks, widths and shapes kept (with "
                             "--real: the paper's widths on a small machine)")
    args = parser.parse_args(argv)
    shapes = gpu_step.SMALL if args.small else gpu_step.HUGE
    with stacks_capped(shapes.preset, args.max_depth):
        return _main(args, shapes)


def _main(args: argparse.Namespace, shapes: gpu_step.Shapes) -> int:
    trained = trained_parameters(shapes)
    print(f"pretraining step ({shapes.preset}, HR {shapes.step_hr} px, S2 {shapes.step_s2_frames} / "
          f"S1 {shapes.step_s1_frames} frames, two views), bf16 autocast, fused AdamW, per device, "
          f"torch {torch.__version__}")
    print(f"trained parameters {trained:,} (float32 gradients {trained * 4 / GIB:.2f} GiB, twice that in AdamW "
          f"moments)")
    print("real tensors on this CPU" if args.real else "fake tensors (an estimate)")
    if args.max_depth is not None:
        print(f"every transformer stack cut to at most {args.max_depth} blocks")
    digits = 4 if args.small else 2
    print(f"{'devices':>7} {'batch':>5} {'checkpointing':>13} {'state GiB':>10} {'peak GiB':>9} {'seconds':>8}")
    for world in (int(w) for w in args.world.split(",")):
        for mode in args.checkpointing.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                row = estimate(batch, mode, shapes, world, fake=not args.real)
                print(f"{row.world:7d} {row.batch:5d} {row.checkpointing:>13} {row.state_gib:10.{digits}f} "
                      f"{row.peak_gib:9.{digits}f} {row.seconds:8.0f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
