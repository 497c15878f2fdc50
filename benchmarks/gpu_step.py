"""Training-step speed and MFU on one device: our encoders against timm's, and a pretraining step.

In one run, on one device, forward + backward of

(a) SwinV2 (``skysense.models.swin_v2``) at the ``huge`` HR size on 512x512 RGB, batch 8;
(b) the S2 ViT at ``huge`` (ViT-L/4) on 64x64x10 frames, batch 256;
(c) the fusion transformer's 24 blocks x 1024 on 32-token sequences, batch 2048;

each for skysense and for timm's equivalent (``SwinTransformerV2``, ``VisionTransformer``,
``Block``), eager and under ``torch.compile``; and (d) one full ``huge`` pretraining step
(student and EMA teacher on two multi-modal views, every objective of
``skysense.pretrain.objective``, gradient clipping, AdamW, EMA) at the per-device batches of
``--step-batch``, eager and with its blocks compiled.

Numbers (PERFORMANCE.md's conventions): the step time is the median of the timed steps; FLOPs
are the model's, counted once per model with ``torch.utils.flop_counter.FlopCounterMode`` on one
eager step, leaving out activation checkpointing's recomputation (not model work; the step runs
checkpointed as the timed ones do, so counting needs no more memory) and without SwinV2's head
padding (44-wide heads run 48 wide on CUDA; the padded columns are not model
work); torch does count the score recomputation inside fused attention's backward (2.5x the
forward attention instead of 2x), under 1% of these steps. MFU is achieved FLOP/s over the
peak of an n x n matmul in the compute dtype measured in the same run. CUDA runs under bf16
autocast; the CPU runs fp32 unless ``--dtype bf16``. Parts (a)-(c) run with stochastic depth
off, as timm's counterparts are built; (d) keeps the preset's.

Compilation (``--compile-scope``): ``blocks`` (the default) compiles each transformer block's
forward on its own (:func:`skysense.compilation.compile_blocks`), for ours and for timm's
models alike; identical blocks share a graph, so compiling takes a fraction of the whole-model
time, and (d) compiles too (Sinkhorn-Knopp's convergence test stays eager between blocks).
``model`` compiles the whole model, as PERFORMANCE.md's timm numbers were taken; (d) then runs
eager only. ``--compile-mode max-autotune-no-cudagraphs`` also tunes the matmul kernels for the
shapes at hand (minutes more of compilation).

(d) runs at each batch of ``--step-batch`` in turn (default 3, the paper's 240 sequences over
80 GPUs, then 4, 6 and 8) until one does not fit; it is compiled at the largest that fitted.
On one 80 GB GPU, without FSDP's sharding of 35 GiB of weights, gradients and moments, batch 3
is estimated at 90.7 GiB without activation checkpointing, 70.5 GiB with every block keeping
only its matmul and attention outputs ("selective": it recomputes element-wise work only),
62.1 GiB with the fusion's blocks selective and the encoders' recomputed ("selective-fusion"),
54.6 GiB with the fusion transformer's blocks recomputed and 39.5 GiB with every block
(``benchmarks/step_memory.py``): expect the retries, in that order (CHECKPOINTING).

Attention kernels: ``--sdpa-priority`` gives SDPA's backends an order for every row (ours and
timm's); ``--our-sdpa PART=NAMES`` restricts only our attention layers of that part
(:func:`skysense.models.set_attention_backends`; in (d) the student's and teacher's matching
encoders). ``benchmarks/attention_backends.py`` times each backend on the calls of every part.
``--our-mlp-kernel PARTS`` runs our MLPs' GELU backward and first bias gradient in one Triton
kernel (:mod:`skysense.models.gelu_bias`) in those parts, ``--our-qkv-kernel PARTS`` our
attention layers' qkv gradient and its bias's (:mod:`skysense.models.qkv_gradient`),
``--our-norm-kernel PARTS`` the pre-norm blocks' residual junctions with their norms' and
projections' bias gradients (:mod:`skysense.models.residual_norm`);
``benchmarks/bias_kernels.py`` times each against inductor's kernels.

The report is rewritten (atomically) after every row, so a run stopped by a time limit keeps
what it measured; ``--budget`` stops starting new measurements after that many seconds.

    python benchmarks/gpu_step.py --json gpu_step.json                    # CUDA, huge shapes
    python benchmarks/gpu_step.py --device cpu --small --no-compile       # CPU, tiny models
    bash benchmarks/gpu_step_device.sh                                     # the device run

On a small CPU, use one thread (``OMP_NUM_THREADS=1``) when other jobs share it, and skip
compilation for a quick run: inductor takes minutes to compile even the tiny models there.
MFU on a shared CPU is indicative only (the matmul peak moves with the machine's load). At
``--small`` sizes our SwinV2 pads its last stages' maps up to one window (the authors'
semantics) where timm shrinks the window, so it does more FLOPs; compare items/s there.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.attention import sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from skysense.compilation import compile_blocks
from skysense.config import SkySenseConfig, preset_config
from skysense.devices import adamw, to_device
from skysense.distributed import apply_activation_checkpointing, clip_grad_norm, matmul_outputs_saved
from skysense.models import (SDPA_BACKENDS, set_attention_backends, set_mlp_kernel, set_norm_kernel, set_qkv_kernel,
                             short_attention)
from skysense.models.attention import check_attention_backends
from skysense.models.fusion import FusionTransformer
from skysense.models.layers import TransformerBlock
from skysense.models.swin_v2 import SwinTransformerV2, SwinV2Block, WindowAttentionV2
from skysense.models.vit import VisionTransformer
from skysense.pretrain.config import PretrainConfig
from skysense.pretrain.model import PretrainingModel, parameter_groups
from skysense.pretrain.teacher import ema_update
from skysense.timm_reference import timm_swin_like, timm_vit_like
from skysense.validation import checked_on_host

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compile_cache  # noqa: E402  (beside this file)
from live_memory import LiveSites  # noqa: E402


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Forward FLOPs of an attention operator whose first arguments are q, k and v."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                  **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _short_attention_backward_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # (q, k, v, key-padding mask, bias, window mask, out, grad, lse, scale, bias_grad): the
    # output's gradient has q's shape (self-attention, v as wide as q).
    return sdpa_backward_flop_count(query_shape, query_shape, key_shape, value_shape)


def _qkv_heads(qkv_shape, heads: int) -> tuple[int, int, int, int]:
    """The (N, H, L, D) shape of q, k and v in an (N, L, 3C) qkv projection's output."""
    n, length, width3 = qkv_shape
    return n, heads, length, width3 // (3 * heads)


def _qkv_attention_flops(qkv_shape, heads, *args, out_shape=None, **kwargs) -> int:
    shape = _qkv_heads(qkv_shape, heads)
    return sdpa_flop_count(shape, shape, shape)


def _qkv_attention_backward_flops(qkv_shape, heads, *args, out_shape=None, **kwargs) -> int:
    shape = _qkv_heads(qkv_shape, heads)
    return sdpa_backward_flop_count(shape, shape, shape, shape)


def attention_flop_formulas() -> dict:
    """FLOP formulas for FlopCounterMode's ``custom_mapping``: it knows the CUDA attention kernels
    only; the CPU's flash kernel (any mask, any head dim) and our short-sequence kernels
    (skysense.models.short_attention) would count as zero. Registers the latter's operators
    (where Triton is installed) if nothing has yet."""
    formulas = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
    }
    if short_attention.register_operators():  # not without Triton
        formulas[torch.ops.skysense.short_attention] = _attention_flops
        formulas[torch.ops.skysense.short_attention_backward] = _short_attention_backward_flops
        formulas[torch.ops.skysense.short_attention_qkv] = _qkv_attention_flops
        formulas[torch.ops.skysense.short_attention_qkv_backward] = _qkv_attention_backward_flops
    return formulas


@dataclass(frozen=True)
class Shapes:
    """Model sizes (a preset) and the input shapes of every part."""

    preset: str
    swin_image: int
    swin_batch: int
    vit_image: int
    vit_batch: int
    fusion_tokens: int
    fusion_batch: int
    # Pretraining step: per-device batches to try in turn, HR side (S2/S1 sides are HR / 32),
    # frames per series.
    step_batches: tuple[int, ...]
    step_hr: int
    step_s2_frames: int
    step_s1_frames: int
    matmul_n: int


HUGE = Shapes(preset="huge", swin_image=512, swin_batch=8, vit_image=64, vit_batch=256, fusion_tokens=32,
              fusion_batch=2048, step_batches=(3, 4, 6, 8), step_hr=512, step_s2_frames=20, step_s1_frames=10,
              matmul_n=8192)
SMALL = Shapes(preset="tiny", swin_image=64, swin_batch=4, vit_image=16, vit_batch=16, fusion_tokens=8,
               fusion_batch=64, step_batches=(2,), step_hr=128, step_s2_frames=2, step_s1_frames=2, matmul_n=1024)
COMPILE_SCOPES = ("blocks", "model")
# Activation checkpointing of a workload (Workload.checkpoint), in the order (d) tries them when
# the paper's batch does not fit: estimated at batch 3 on one device 90.7, 70.5, 62.1, 54.6 and
# 39.5 GiB (benchmarks/step_memory.py). Each recomputes more than the one before: element-wise work
# only; that and the student encoders' forward (about 5% of the step's 158.3 TFLOP at batch 3);
# the student fusion's forward instead (20%); every forward (25%) (RESULTS.md, session 20).
CHECKPOINTING = ("off", "selective", "selective-fusion", "fusion", "all")
# The settings that name (d)'s fusion transformer apart from its other blocks.
FUSION_SCOPES = ("selective-fusion", "fusion")
# "selective-fusion" as the pretraining config's activation_checkpointing (a setting per network).
SELECTIVE_FUSION = {"hr": True, "s2": True, "s1": True, "fusion": "selective"}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
# Issue 7's targets on an H100 (bf16): the MFU each of our parts must reach.
MFU_TARGETS = {"swin_v2": 0.50, "vit": 0.55, "fusion": 0.55, "pretrain_step": 0.45}
# What PyTorch could reserve on the H100 80GB HBM3 of 2026-11-28: it ran out of memory with
# 78.36 GiB reserved of its 79.18 GiB (the rest held by the CUDA context and libraries;
# device_runs/2026-11-28-h100/call1/gpu_step-d.json). --memory-cap-gib with this on a larger card
# (an H200's 139 GiB) keeps (d)'s checkpointing ladder and batch to what fits that H100.
H100_ALLOCATOR_GIB = 78.3


@dataclass
class Options:
    """One benchmark run (the command line's flags)."""

    device: str = "cuda"
    dtype: str = "bf16"
    shapes: Shapes = HUGE
    compile: bool = True
    compile_scope: str = "blocks"
    # torch.compile's mode (None: its default; "max-autotune-no-cudagraphs" tunes the GEMMs,
    # "reduce-overhead" replays CUDA graphs, "max-autotune" does both).
    compile_mode: str | None = None
    activation_checkpointing: bool = False
    # (d): the CHECKPOINTING setting its ladder starts from (--activation-checkpointing: "all").
    step_checkpointing: str = "off"
    warmup: int = 3
    repeats: int = 10
    parts: tuple[str, ...] = ("swin_v2", "vit", "fusion", "pretrain_step")
    # Seconds after which no new measurement starts (None: no limit).
    budget_s: float | None = None
    # Rewritten after every row.
    json_path: Path | None = None
    # The operators that took most time in two profiled steps of every compiled row.
    profile: bool = False
    # torch.compile's caches: loaded from this file before the first compilation when it exists,
    # rewritten after every compiled row (benchmarks/compile_cache.py). None: not kept.
    compile_cache: Path | None = None
    # SDPA's backends in priority order, the others switched off (SDPA_BACKENDS names); None:
    # torch's own choice. Applies to every row, ours and timm's (benchmarks/attention_backends.py).
    sdpa_priority: tuple[str, ...] | None = None
    # For our models only: the SDPA backends each of OUR_SDPA_SCOPES may use (names of
    # skysense.models.SDPA_BACKENDS), set with set_attention_backends before compiling.
    our_sdpa: dict[str, tuple[str, ...]] | None = None
    # For our models only: the parts (names of Options.parts) whose MLPs run their GELU backward
    # and first bias gradient in one kernel (skysense.models.gelu_bias.set_mlp_kernel).
    our_mlp_kernel: tuple[str, ...] = ()
    # For our models only: the parts whose attention layers assemble the qkv gradient from SDPA's
    # and sum the qkv bias's gradient in one kernel (skysense.models.qkv_gradient.set_qkv_kernel).
    our_qkv_kernel: tuple[str, ...] = ()
    # For our models only: the parts whose pre-norm blocks differentiate their residual junctions
    # (norms, residual adds, projection biases) in one kernel each (skysense.models.residual_norm).
    our_norm_kernel: tuple[str, ...] = ()
    # Part (d)'s Sinkhorn-Knopp: None as the pretraining config's default (rounds until the
    # tolerance, each test a host sync); N: exactly N rounds, no test (sinkhorn_stop_early: false).
    sinkhorn_rounds: int | None = None
    # Cap on what the CUDA caching allocator may reserve (GiB; None: the whole card): a larger
    # card answers an 80 GB card's memory question (H100_ALLOCATOR_GIB).
    memory_cap_gib: float | None = None


# --our-sdpa's scopes: our model of that part in (a)-(c), and these networks of (d)'s student and
# teacher (SkySense.set_attention_backends).
OUR_SDPA_SCOPES = {"swin_v2": ("hr",), "vit": ("s2", "s1"), "fusion": ("fusion",)}


def set_our_attention(part: str, model: nn.Module, options: Options) -> None:
    """Restrict the attention backends of our ``model`` of ``part`` as ``options.our_sdpa`` asks,
    and set its MLPs to the GELU kernel, its attention layers to the qkv kernel and its pre-norm
    blocks to the junction kernels if ``options.our_mlp_kernel``, ``options.our_qkv_kernel`` and
    ``options.our_norm_kernel`` name the part."""
    if part in options.our_mlp_kernel:
        set_mlp_kernel(model, True)
    if part in options.our_qkv_kernel:
        set_qkv_kernel(model, True)
    if part in options.our_norm_kernel:
        set_norm_kernel(model, True)
    for scope, backends in (options.our_sdpa or {}).items():
        if part == "pretrain_step":
            for network in (model.pretraining.student, model.pretraining.teacher):
                network.set_attention_backends({name: backends for name in OUR_SDPA_SCOPES[scope]})
        elif part == scope:
            set_attention_backends(model, backends)


def sdpa_priority(options: Options):
    """The context that makes SDPA try ``options.sdpa_priority`` in that order, or nothing."""
    if options.sdpa_priority is None:
        return nullcontext()
    unknown = [name for name in options.sdpa_priority if name not in SDPA_BACKENDS]
    if unknown or not options.sdpa_priority:
        raise ValueError(f"sdpa_priority: expected names among {list(SDPA_BACKENDS)}, got {list(options.sdpa_priority)}")
    return sdpa_kernel([SDPA_BACKENDS[name] for name in options.sdpa_priority], set_priority=True)


@dataclass
class Workload:
    """One model and its inputs; ``step(model)`` runs forward + backward (and more for (d))."""

    part: str
    implementation: str
    unit: str
    batch: int
    input_shape: str
    model: nn.Module
    step: Callable[[nn.Module], None]
    # Blocks recomputed under --activation-checkpointing and compiled under --compile-scope blocks.
    blocks: tuple[type[nn.Module], ...]
    # Which of its blocks recompute their activations in the backward pass (CHECKPOINTING).
    checkpointed: str = "off"
    # Whether its eager row also counts one step's host syncs and operators ((d), once).
    count_launches: bool = False

    def checkpoint(self, scope: str = "all") -> None:
        """Set the activation checkpointing of the blocks (of the student, for (d)); it can be
        changed between steps. ``scope`` (CHECKPOINTING): "off"; "selective": every block keeps its
        matmul and attention outputs and recomputes the rest
        (:func:`skysense.distributed.matmul_outputs_saved`); "selective-fusion" (for (d)): the
        fusion transformer's blocks selective, every other block recomputes its whole forward (the
        pretraining config's ``{hr: true, s2: true, s1: true, fusion: selective}``); "fusion" (for
        (d)): the fusion transformer's blocks recompute their whole forward, the others none (they
        hold two thirds of the step's activations, benchmarks/step_memory.py); "all": every block
        recomputes its whole forward."""
        if scope not in CHECKPOINTING:
            raise ValueError(f"checkpoint scope {scope!r}: expected one of {list(CHECKPOINTING)}")
        target, fusion = self.model, None
        if isinstance(self.model, PretrainStep):
            target, fusion = self.model.pretraining.student, self.model.pretraining.student.fusion
        elif scope in FUSION_SCOPES:
            raise ValueError(f"checkpoint scope {scope!r}: only (d) has a fusion transformer; use 'all'")
        switch = getattr(target, "_benchmark_checkpointing", None)
        if switch is None:
            switch = target._benchmark_checkpointing = SwitchedCheckpointing(target, self.blocks, fusion)
        switch.set(scope)
        self.checkpointed = scope


class SwitchedCheckpointing:
    """Activation checkpointing of every block of a model, switched between steps: which blocks
    recompute (composable ``checkpoint``'s per-block ``enable_hook``) and whether fully or
    selectively, for the blocks of ``fusion`` (a submodule) and for the others apart. Each group's
    :class:`CheckpointContexts` is its blocks' ``context_fn``."""

    def __init__(self, model: nn.Module, blocks: tuple[type[nn.Module], ...], fusion: nn.Module | None = None) -> None:
        from torch.distributed._composable.checkpoint_activation import checkpoint

        self.fusion, self.others = CheckpointContexts(), CheckpointContexts()
        if fusion is not None:
            apply_activation_checkpointing(fusion, blocks, context_fn=self.fusion)
        apply_activation_checkpointing(model, blocks, context_fn=self.others)
        self.inside = set(fusion.modules()) if fusion is not None else set()
        self.states = {m: checkpoint.state(m) for m in model.modules() if isinstance(m, blocks)}

    def set(self, scope: str) -> None:
        for block, state in self.states.items():
            state.enable_hook = scope in ("selective", "selective-fusion", "all") or (
                scope == "fusion" and block in self.inside)
        self.fusion.selective = scope in ("selective", "selective-fusion")
        self.others.selective = scope == "selective"


class CheckpointContexts:
    """``context_fn`` of a group of checkpointed blocks: the forward's and the recomputation's
    context managers, selective or not. Recomputation runs under :meth:`Recomputation.running`,
    which the FLOP count leaves out, and when selective, ``compile_blocks`` traces the selective
    policy inside each compiled block (``traced_in_compile``; not changed after compiling)."""

    def __init__(self) -> None:
        self.selective = False
        self.selective_contexts = matmul_outputs_saved()

    def __call__(self) -> tuple[Any, Any]:
        forward, recompute = self.selective_contexts() if self.selective else (nullcontext(), nullcontext())
        return forward, _marked(recompute)

    @property
    def traced_in_compile(self) -> Any:
        return self.selective_contexts if self.selective else None


@contextmanager
def _marked(recompute):
    """``recompute`` (a checkpoint's recomputation context) under :meth:`Recomputation.running`."""
    with recompute, Recomputation.running():
        yield


class _Features(nn.Module):
    """Calls ``forward_features`` of a timm model (its ``forward`` would pool and classify)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


class _Blocks(nn.Module):
    """A stack of transformer blocks applied to (N, L, D) sequences."""

    def __init__(self, blocks: nn.ModuleList | list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def compute_dtype(options: Options) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[options.dtype]


def autocast(options: Options):
    """bf16 autocast, or nothing for fp32."""
    if options.dtype == "fp32":
        return nullcontext()
    return torch.autocast(torch.device(options.device).type, dtype=torch.bfloat16)


def encoder_step(inputs: torch.Tensor, options: Options) -> Callable[[nn.Module], None]:
    """Forward + backward of a feature extractor on ``inputs``, with a mean-square loss."""

    def step(model: nn.Module) -> None:
        model.zero_grad(set_to_none=True)
        with autocast(options):
            out = model(inputs)
        out.float().square().mean().backward()

    return step


def encoder_models(part: str, shapes: Shapes, device: torch.device) -> tuple[dict[str, nn.Module], torch.Tensor]:
    """Ours (``"skysense"``) and timm's model of part (a) ``swin_v2``, (b) ``vit`` or (c) ``fusion``,
    in training mode, and an input batch for them, built on ``device``."""
    config = preset_config(shapes.preset)
    torch.manual_seed(0)
    with device:  # initialised where they run: a CPU would take minutes over SwinV2-H
        if part == "swin_v2":
            hr = dataclasses.replace(config.hr, drop_path_rate=0.0)
            x = torch.randn(shapes.swin_batch, hr.in_chans, shapes.swin_image, shapes.swin_image)
            models = {"skysense": SwinTransformerV2(hr), "timm": _Features(timm_swin_like(hr, shapes.swin_image))}
        elif part == "vit":
            vit = dataclasses.replace(config.s2, drop_path_rate=0.0)
            x = torch.randn(shapes.vit_batch, vit.in_chans, shapes.vit_image, shapes.vit_image)
            models = {"skysense": VisionTransformer(vit), "timm": _Features(timm_vit_like(vit))}
        elif part == "fusion":
            from timm.models.vision_transformer import Block

            fusion = dataclasses.replace(config.fusion, drop_path_rate=0.0)
            x = torch.randn(shapes.fusion_batch, shapes.fusion_tokens, fusion.embed_dim)
            norm = functools.partial(nn.LayerNorm, eps=fusion.norm_eps)
            timm_blocks = [Block(fusion.embed_dim, fusion.num_heads, fusion.mlp_ratio, qkv_bias=True,
                                 norm_layer=norm) for _ in range(fusion.depth)]
            models = {"skysense": _Blocks(FusionTransformer(fusion, config.fusion_input_dim).blocks),
                      "timm": _Blocks(timm_blocks)}
        else:
            raise ValueError(f"unknown part {part!r}; expected swin_v2, vit or fusion")
    return {name: model.to(device).train() for name, model in models.items()}, x.to(device)


def encoder_workloads(part: str, options: Options) -> list[Workload]:
    """Part (a), (b) or (c) for skysense and for timm."""
    from timm.models.swin_transformer_v2 import SwinTransformerV2Block
    from timm.models.vision_transformer import Block

    models, x = encoder_models(part, options.shapes, torch.device(options.device))
    set_our_attention(part, models["skysense"], options)
    blocks = {"skysense": (SwinV2Block, TransformerBlock), "timm": (SwinTransformerV2Block, Block)}
    unit = {"swin_v2": "image", "vit": "frame", "fusion": "sequence"}[part]
    return [Workload(part, name, unit, x.shape[0], str(tuple(x.shape)), model, encoder_step(x, options),
                     blocks[name]) for name, model in models.items()]


def pretrain_config(shapes: Shapes, batch: int) -> PretrainConfig:
    """The pretraining run of part (d): the preset with default objective, smaller for tiny."""
    config = PretrainConfig(preset=shapes.preset, batch_size=batch)
    if shapes.preset == "tiny":
        config.objective.head.hidden_dim, config.objective.head.bottleneck_dim, config.objective.head.out_dim = 64, 32, 128
        config.objective.sinkhorn_iterations = 20
    return config


def pretrain_views(shapes: Shapes, batch: int, device: torch.device,
                   generator: torch.Generator) -> tuple[dict, dict]:
    """Two multi-modal views: HR, S2 and S1 series (HR / 32 pixels), dates, lat/lon."""
    b, side, small = batch, shapes.step_hr, max(1, shapes.step_hr // 32)
    lat = torch.rand(b, generator=generator) * 140 - 70
    lon = torch.rand(b, generator=generator) * 360 - 180

    def view() -> dict[str, torch.Tensor]:
        series = {}
        for name, frames, bands in (("s2", shapes.step_s2_frames, 10), ("s1", shapes.step_s1_frames, 2)):
            series[name] = torch.randn(b, frames, bands, small, small, generator=generator)
            series[f"{name}_dates"] = torch.randint(1, 366, (b, frames), generator=generator)
            series[f"{name}_mask"] = torch.ones(b, frames, dtype=torch.bool)
        hr = torch.randn(b, 3, side, side, generator=generator)
        return {k: v.to(device) for k, v in {"hr": hr, **series, "lat": lat, "lon": lon}.items()}

    return view(), view()


class PretrainStep(nn.Module):
    """The pretraining loop's step: forward, backward, clipping, AdamW, prototype and EMA updates."""

    def __init__(self, config: PretrainConfig, options: Options) -> None:
        super().__init__()
        self.config, self.options = config, options
        self.views: tuple[dict, dict] | None = None
        self.pretraining = PretrainingModel(config)
        # As the pretraining loop: values are checked on the host (pretrain_workload).
        self.pretraining.student.check_values = self.pretraining.teacher.check_values = False
        self.optimizer: torch.optim.Optimizer | None = None

    def forward(self) -> None:
        module = self.pretraining
        if self.optimizer is None:  # after .to(device)
            self.optimizer = adamw(parameter_groups(module, self.config.optim.weight_decay), self.config.optim.lr,
                                   next(module.parameters()).device)
        self.optimizer.zero_grad(set_to_none=True)  # as the loop: before the forward, where memory peaks
        with autocast(self.options):
            total, terms = module(self.views)
        total.backward()
        clip_grad_norm([p for g in self.optimizer.param_groups for p in g["params"]], self.config.optim.grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            if "geo" in terms:
                module.objective.update_prototypes(module.student.geo_context)
            module.objective.update_teacher_heads(self.config.optim.teacher_momentum)
            ema_update(module.teacher, module.student, self.config.optim.teacher_momentum)


def narrow_huge_config(name: str = "huge") -> SkySenseConfig:
    """``huge``'s structure (depths, heads, extra norms, drop-path schedules, window) with
    CPU-sized widths: what compiling (d) traces and launches at the paper's shapes, on a CPU.
    Any ``name`` gives it: it stands in for ``preset_config`` (:func:`narrow_huge_model`)."""
    config = preset_config("huge")
    config.hr.embed_dim, config.s2.embed_dim, config.s1.embed_dim, config.fusion.embed_dim = 32, 64, 64, 64
    config.geo_context.lat_bands = config.geo_context.lon_bins = 8
    return config


def narrow_huge_model(options: Options) -> PretrainStep:
    """Part (d)'s model built from :func:`narrow_huge_config`, at ``options.shapes`` (huge's, say)."""
    from skysense.pretrain import model as pretraining_module

    built_from = pretraining_module.preset_config
    pretraining_module.preset_config = narrow_huge_config
    try:
        return pretrain_model(options)
    finally:
        pretraining_module.preset_config = built_from


def pretrain_model(options: Options) -> PretrainStep:
    """Part (d)'s model, built on the device, without inputs (see :func:`pretrain_workload`)."""
    device = torch.device(options.device)
    torch.manual_seed(0)
    config = pretrain_config(options.shapes, options.shapes.step_batches[0])
    if options.sinkhorn_rounds is not None:
        config.objective.sinkhorn_iterations, config.objective.sinkhorn_stop_early = options.sinkhorn_rounds, False
    with device:
        model = PretrainStep(config, options)
    model.pretraining.train()
    set_our_attention("pretrain_step", model, options)
    return model


def pretrain_workload(model: PretrainStep, batch: int, options: Options, checkpointed: str = "off") -> Workload:
    """Part (d) at per-device ``batch``: ``model`` takes two fresh views of that batch.
    ``checkpointed``: the activation checkpointing set on ``model`` before (CHECKPOINTING)."""
    s = options.shapes
    views = pretrain_views(s, batch, torch.device("cpu"), torch.Generator().manual_seed(0))
    # As the pretraining loop: values checked on the host, the model's value checks off.
    device = torch.device(options.device)
    model.views = views = tuple(to_device(checked_on_host(view), device) for view in views)
    shape = (f"2 views x (hr {tuple(views[0]['hr'].shape)}, s2 {tuple(views[0]['s2'].shape)}, "
             f"s1 {tuple(views[0]['s1'].shape)})")
    return Workload("pretrain_step", "skysense", "sample", batch, shape, model, lambda m: m(),
                    (TransformerBlock, SwinV2Block), checkpointed=checkpointed)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(options: Options) -> float:
    """FLOP/s of the best of a few ``n x n @ n x n`` matmuls in the compute dtype."""
    device, n = torch.device(options.device), options.shapes.matmul_n
    a = torch.randn(n, n, device=device, dtype=compute_dtype(options))
    b = torch.randn(n, n, device=device, dtype=compute_dtype(options))
    times = time_steps(lambda: a @ b, device, warmup=3, repeats=10)
    return 2 * n**3 / min(times)


def copy_bandwidth(options: Options) -> float:
    """Bytes per second read and written by the best of a few copies of ``4 n^2`` values in the
    compute dtype (512 MiB each way at the huge shapes in bf16): what the kernels bound by
    memory can reach, next to the matmul peak (``benchmarks/block_traffic.py`` counts their
    bytes)."""
    device, n = torch.device(options.device), options.shapes.matmul_n
    source = torch.randn(4 * n * n, device=device, dtype=compute_dtype(options))
    target = torch.empty_like(source)
    times = time_steps(lambda: target.copy_(source), device, warmup=3, repeats=10)
    return 2 * source.numel() * source.element_size() / min(times)


def time_steps(step: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Wall seconds of each of ``repeats`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


@contextmanager
def unpadded_heads(model: nn.Module):
    """SwinV2 attention at its own head width (no padding for the fused kernels) inside."""
    attentions = [m for m in model.modules() if isinstance(m, WindowAttentionV2)]
    for attention in attentions:
        attention.pad_heads = False
    try:
        yield
    finally:
        for attention in attentions:
            attention.pad_heads = True


class Recomputation:
    """Whether the backward pass is recomputing a checkpointed block's forward (how deep):
    blocks checkpointed by :meth:`Workload.checkpoint` run their recomputation under
    :meth:`running` (:class:`SwitchedCheckpointing`), so FLOP counting can leave it out while
    the step keeps its memory."""

    depth = 0

    @classmethod
    @contextmanager
    def running(cls):
        cls.depth += 1
        try:
            yield
        finally:
            cls.depth -= 1


class ModelFlopCounter(FlopCounterMode):
    """``FlopCounterMode`` that leaves out the recomputation of blocks checkpointed by
    :meth:`Workload.checkpoint` (their operators run, uncounted)."""

    def _count_flops(self, func_packet, out, args, kwargs):
        if Recomputation.depth:
            return out
        return super()._count_flops(func_packet, out, args, kwargs)


def count_flops(workload: Workload) -> int:
    """The model's FLOPs in one step (matmuls, convolutions, attention), forward and backward,
    without activation checkpointing's recomputation or SwinV2's head padding.

    The counted step runs as the timed ones do, checkpointed blocks included (only their
    recomputation goes uncounted), so it needs no more memory than they do: at the paper's
    batch a step without checkpointing does not fit one 80 GB GPU."""
    with unpadded_heads(workload.model), ModelFlopCounter(display=False, custom_mapping=attention_flop_formulas()) as counter:
        workload.step(workload.model)
    return counter.get_total_flops()


def count_launches(workload: Workload) -> dict[str, int]:
    """One untimed step of part (d) counted by ``host_syncs.count_step``: the host-device
    synchronisations (mostly Sinkhorn-Knopp's convergence tests, about a tenth of its rounds)
    and the operators that compute (about one kernel launch each), the optimizer left out."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:  # this file loaded by path (the tests)
        sys.path.insert(0, here)
    from host_syncs import count_step  # here, not at the top: host_syncs imports this module

    workload.step(workload.model)  # the optimizer's state exists before the counted step
    counter = count_step(workload.model)
    return {"host_syncs": counter.total, "operators": counter.operators}


def meta_flops(shapes: Shapes, parts: tuple[str, ...] = ("swin_v2", "vit", "fusion")) -> dict[tuple[str, str], int]:
    """FLOPs of one training step of parts (a)-(c), ours and timm's, counted on the meta device
    (no memory, no compute: the huge shapes count on any machine in seconds). On meta, attention
    takes SDPA's math path, so its backward counts 2x its forward instead of the fused kernels'
    2.5x."""
    options = Options(device="meta", dtype="fp32", shapes=shapes)
    flops = {}
    for part in parts:
        models, x = encoder_models(part, shapes, torch.device("meta"))
        for name, model in models.items():
            workload = Workload(part, name, "", x.shape[0], "", model, encoder_step(x, options), ())
            flops[part, name] = count_flops(workload)
    return flops


# Kinds of kernel (CUDA) or operator (CPU) by name, the first match wins: attention before
# matmul, since CUTLASS's attention kernels are named after CUTLASS too.
KERNEL_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("fmha", "flash", "attention", "sdpa", "cudnn")),
    ("matmul", ("gemm", "nvjet", "xmma", "cublas", "cutlass", "aten::mm", "aten::addmm", "aten::bmm",
                "aten::baddbmm", "aten::linear", "aten::matmul", "aten::_weight_norm")),
    ("compiled (triton / inductor)", ("triton", "cpp_fused", "graph_")),
    ("copy", ("copy", "memcpy", "memset", "cat", "fill")),
)


def kernel_kind(name: str) -> str:
    """The :data:`KERNEL_KINDS` class of a kernel or operator name, else ``"other"``."""
    lowered = name.lower()
    for kind, patterns in KERNEL_KINDS:
        if any(pattern in lowered for pattern in patterns):
            return kind
    return "other"


def top_operators(step: Callable[[], Any], device: torch.device, steps: int = 2,
                  top: int = 15) -> tuple[list[dict[str, Any]], float, dict[str, float]]:
    """The operators (CUDA kernels on a GPU) with the most self time over ``steps`` steps, the
    self time of all of them per step in ms (on a GPU, how long its kernels ran, so the rest of
    a step's wall time is time the GPU waited for the host), and that time per step split by
    :func:`kernel_kind` (matmul, attention, compiled element-wise, copies, other)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    events = [e for e in prof.key_averages() if (e.device_type.name == "CUDA") == (device.type == "cuda")]
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    if device.type == "cuda" and events and not hasattr(events[0], attribute):
        attribute = "self_cuda_time_total"  # torch < 2.4
    total = sum(getattr(e, attribute) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, attribute), reverse=True)
    rows = [{"name": e.key[:120], "ms_per_step": getattr(e, attribute) / 1e3 / steps,
             "share": getattr(e, attribute) / total, "calls_per_step": e.count / steps} for e in events[:top]]
    kinds: dict[str, float] = {}
    for e in events:
        kind = kernel_kind(e.key)
        kinds[kind] = kinds.get(kind, 0.0) + getattr(e, attribute) / 1e3 / steps
    return rows, total / 1e3 / steps, dict(sorted(kinds.items(), key=lambda item: -item[1]))


def empty_row(workload: Workload, mode: str, flops: int | None) -> dict[str, Any]:
    return {
        "part": workload.part, "implementation": workload.implementation, "mode": mode, "unit": workload.unit,
        "batch": workload.batch, "input_shape": workload.input_shape,
        "activation_checkpointing": workload.checkpointed,
        "parameters": sum(p.numel() for p in workload.model.parameters() if p.requires_grad),
        "flops_per_step": flops, "compile_s": None, "compiled_graphs": None, "step_ms": None, "items_per_s": None, "tflops_per_s": None,
        "mfu": None, "peak_memory_gib": None, "peak_reserved_gib": None, "alloc_retries": None, "host_syncs": None, "operators": None, "error": None,
    }


def measure(workload: Workload, mode: str, flops: int | None, peak: float, options: Options) -> dict[str, Any]:
    """Time ``workload`` eagerly or compiled; one result row. ``flops``: of one step, counted
    first when None. Compiling changes the model in place (--compile-scope blocks), so a
    workload's compiled row comes after its eager one."""
    device = torch.device(options.device)
    row = empty_row(workload, mode, flops)
    try:
        if flops is None:
            row["flops_per_step"] = flops = count_flops(workload)
        if workload.count_launches and mode == "eager":
            row.update(count_launches(workload))  # two untimed steps, in (d) only
        model = workload.model
        if mode == "compiled":
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            start = time.perf_counter()
            if options.compile_scope == "model":
                model = torch.compile(model, mode=options.compile_mode)
            else:
                compile_blocks(model, workload.blocks, mode=options.compile_mode)
            workload.step(model)  # compiles
            synchronize(device)
            row["compile_s"] = time.perf_counter() - start
            # Distinct graphs compiled for it (each shape, block kind and grad mode is one).
            row["compiled_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            retries = torch.cuda.memory_stats(device).get("num_alloc_retries", 0)
        times = time_steps(lambda: workload.step(model), device, options.warmup, options.repeats)
        if device.type == "cuda":
            # Allocations that found no free cached block and freed the cache to retry: each
            # frees memory with cudaFree, which waits for the whole GPU (a sync the step's code
            # does not show), so a step near the memory limit can be slow without running out.
            row["alloc_retries"] = torch.cuda.memory_stats(device).get("num_alloc_retries", 0) - retries
        seconds = statistics.median(times)
        row.update(step_ms=seconds * 1e3, items_per_s=workload.batch / seconds, tflops_per_s=flops / seconds / 1e12,
                   mfu=flops / seconds / peak)
        if device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        if options.profile and mode == "compiled":
            try:
                row["top_operators"], row["kernel_ms_per_step"], row["kernel_ms_by_kind"] = top_operators(
                    lambda: workload.step(model), device)
            except Exception as error:  # a profiler that cannot start must not cost the row its timing
                row["top_operators"] = error_text(error)
    except (torch.OutOfMemoryError, RuntimeError, AssertionError) as error:
        # One part that does not fit or does not compile must not cost the others their numbers.
        # (torch's compile errors derive from RuntimeError.)
        row["error"] = error_text(error)
        print(f"{workload.part}/{workload.implementation}/{mode}: {row['error']}", file=sys.stderr)
    return row


def cap_device_memory(device: torch.device, gib: float) -> dict[str, float]:
    """Let the CUDA caching allocator of ``device`` reserve at most ``gib`` GiB (out of memory
    beyond, as on a card that size); what was set, for the report."""
    if device.type != "cuda":
        raise ValueError(f"memory_cap_gib {gib:g}: caps a CUDA device's allocator; the device is {device}")
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    if not 0 < gib <= total:
        raise ValueError(f"memory_cap_gib: expected more than 0 and at most {device}'s {total:.2f} GiB, got {gib:g}")
    torch.cuda.set_per_process_memory_fraction(gib / total, device)
    return {"gib": gib, "device_total_gib": total, "fraction": gib / total}


def over_memory_cap(row: dict[str, Any], cap: dict[str, float] | None) -> bool:
    """Whether ``row`` reserved more than the run's memory cap (the allocator should not let it)."""
    return bool(cap and row.get("peak_reserved_gib") is not None and row["peak_reserved_gib"] > cap["gib"])


def error_text(error: BaseException) -> str:
    """The error's type and the first line of its message."""
    message = str(error).strip()
    return f"{type(error).__name__}: {message.splitlines()[0] if message else ''}"


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def add_layer_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the benchmarks that time single layers compiled against each other
    (``swin_attention.py``, ``bias_kernels.py``): device, shapes, timing, compilation, report."""
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="the tiny preset's shapes (a CPU smoke run)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true", help="eager layers")
    parser.add_argument("--json", type=Path, help="write the report here (atomically)")


def write_json(report: dict[str, Any], path: Path) -> None:
    """Write ``report`` to ``path`` atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


class Run:
    """The report of one run as it grows: rows, the time budget, the JSON rewritten per row."""

    def __init__(self, options: Options, peak: float) -> None:
        import timm

        device = torch.device(options.device)
        self.options, self.peak, self.started = options, peak, time.perf_counter()
        self.report: dict[str, Any] = {
            "device": str(device), "device_name": device_name(device), "torch": torch.__version__,
            "cuda": torch.version.cuda if device.type == "cuda" else None,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "timm": timm.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "dtype": options.dtype, "autocast": options.dtype == "bf16",
            "compile_scope": options.compile_scope if options.compile else None,
            "compile_mode": options.compile_mode if options.compile else None,
            "activation_checkpointing": options.activation_checkpointing,
            "step_checkpointing": options.step_checkpointing,
            "sdpa_priority": list(options.sdpa_priority) if options.sdpa_priority else None,
            "our_sdpa": {k: list(v) for k, v in options.our_sdpa.items()} if options.our_sdpa else None,
            "our_mlp_kernel": list(options.our_mlp_kernel),
            "our_qkv_kernel": list(options.our_qkv_kernel),
            "our_norm_kernel": list(options.our_norm_kernel),
            "sinkhorn_rounds": options.sinkhorn_rounds,
            "memory_cap": None,
            "warmup": options.warmup,
            "repeats": options.repeats, "budget_s": options.budget_s,
            "shapes": dataclasses.asdict(options.shapes),
            "peak": {"matmul_n": options.shapes.matmul_n, "dtype": options.dtype, "tflops_per_s": peak / 1e12},
            "results": [], "complete": False, "elapsed_s": 0.0,
        }

    def out_of_time(self) -> bool:
        budget = self.options.budget_s
        return budget is not None and time.perf_counter() - self.started > budget

    def add(self, row: dict[str, Any]) -> dict[str, Any]:
        self.report["results"].append(row)
        self.save()
        return row

    def skip(self, workload: Workload, mode: str, flops: int | None) -> dict[str, Any]:
        row = empty_row(workload, mode, flops)
        row["error"] = f"skipped: the time budget ({self.options.budget_s:g} s) was spent"
        return self.add(row)

    def measure(self, workload: Workload, mode: str, flops: int | None = None) -> dict[str, Any]:
        """One row of ``workload`` in ``mode`` (counting its FLOPs first when not given)."""
        if self.out_of_time():
            return self.skip(workload, mode, flops)
        row = measure(workload, mode, flops, self.peak, self.options)
        if mode == "compiled" and self.options.compile_cache is not None:
            self.report["compile_cache"].update(compile_cache.save(self.options.compile_cache))
        return self.add(row)

    def save(self, complete: bool = False) -> None:
        self.report.update(complete=complete, elapsed_s=time.perf_counter() - self.started)
        if self.options.json_path is not None:
            write_json(self.report, self.options.json_path)


def run_encoder_part(run: Run, part: str) -> None:
    for workload in encoder_workloads(part, run.options):
        if run.options.activation_checkpointing:
            workload.checkpoint()
        eager = run.measure(workload, "eager")
        if run.options.compile:
            run.measure(workload, "compiled", eager["flops_per_step"])
            torch._dynamo.reset()


def run_pretrain_step(run: Run) -> None:
    """(d) eager at each batch until one does not fit, then compiled at the largest that did
    (with the next checkpointing settings in turn while the compiled step runs out of memory).

    When the first batch (the paper's) does not fit without activation checkpointing, it is
    tried again with each next setting of CHECKPOINTING: every block keeping its matmul
    outputs (selective), the fusion's blocks so and the encoders' recomputed (selective-fusion),
    the fusion transformer's blocks recomputed, every block recomputed;
    the following batches keep what fitted. When it does not fit even so, one more step of it runs
    under :class:`live_memory.LiveSites` to record what was alive when memory ran out
    (``memory_at_failure`` in its row), and smaller batches are tried down to 1, so that the
    step's speed is measured all the same.
    """
    options, device = run.options, torch.device(run.options.device)
    model = pretrain_model(options)  # one that does not fit is a part error (run_benchmark)
    checkpointed = "off"
    start = "all" if options.activation_checkpointing else options.step_checkpointing
    if start not in CHECKPOINTING:
        raise ValueError(f"step_checkpointing: expected one of {list(CHECKPOINTING)}, got {start!r}")
    if start != "off":
        pretrain_workload(model, options.shapes.step_batches[0], options).checkpoint(start)
        checkpointed = start
    fitted: dict[str, Any] | None = None
    counted = False

    def eager_row(batch: int) -> dict[str, Any]:
        nonlocal counted
        workload = pretrain_workload(model, batch, options, checkpointed)
        workload.count_launches = not counted
        before = allocated_gib(workload)
        row = run.measure(workload, "eager")
        if before is not None:  # what the model, its state and leftovers held before the row
            row["allocated_before_gib"] = before
            run.save()
        counted = counted or row.get("host_syncs") is not None
        return row

    def rebuilt(batch: int) -> None:
        """A model built anew, with the current checkpointing: a step that ran out of memory can
        leave its model half-updated (H100, 2026-11-28: AdamW's state half made, and every later
        setting ran out of memory or failed with KeyError: 'exp_avg_sq')."""
        nonlocal model
        model.optimizer = model.views = None
        model = None  # the old one is freed before the new one is made
        release(device)
        model = pretrain_model(options)
        if checkpointed != "off":
            pretrain_workload(model, batch, options).checkpoint(checkpointed)

    def next_setting(batch: int) -> None:
        """The next setting of CHECKPOINTING, on a model built anew."""
        nonlocal checkpointed
        checkpointed = CHECKPOINTING[CHECKPOINTING.index(checkpointed) + 1]
        rebuilt(batch)

    first = options.shapes.step_batches[0]
    for batch in options.shapes.step_batches:
        row = eager_row(batch)
        while fitted is None and checkpointed != "all" and out_of_memory(row):
            next_setting(batch)
            row = eager_row(batch)
        if row["error"]:
            if not out_of_memory(row):
                release(device)
            else:
                rebuilt(batch)  # also for the compiled row at a smaller batch that fitted
                if fitted is None:
                    row["memory_at_failure"] = memory_at_failure(pretrain_workload(model, batch, options, checkpointed))
                    run.save()
                    rebuilt(batch)
            break
        fitted = row
    if fitted is None and out_of_memory(row):
        for batch in range(first - 1, 0, -1):  # below the paper's batch: a speed all the same
            if run.out_of_time():
                break
            row = eager_row(batch)
            if not row["error"]:
                fitted = row
                break
            rebuilt(batch)
    # Sinkhorn-Knopp's convergence test breaks a whole-model graph at every iteration: (d) is
    # compiled block-wise only.
    if fitted is not None and options.compile and options.compile_scope == "blocks":
        batch = fitted["batch"]
        row = run.measure(pretrain_workload(model, batch, options, checkpointed), "compiled", fitted["flops_per_step"])
        # The compiled step need not fit where the eager one did (inductor's buffers and its
        # partitioner's choices of what to keep differ): then the next setting, compiled anew.
        while out_of_memory(row) and checkpointed != "all":
            torch._dynamo.reset()
            next_setting(batch)
            row = run.measure(pretrain_workload(model, batch, options, checkpointed), "compiled",
                              fitted["flops_per_step"])
        torch._dynamo.reset()


def out_of_memory(row: dict[str, Any]) -> bool:
    return (row["error"] or "").startswith("OutOfMemoryError")


def memory_at_failure(workload: Workload, top: int = 12) -> dict[str, Any]:
    """One step of ``workload`` under :class:`live_memory.LiveSites`: when it runs out of
    memory, the bytes alive at that moment by origin (model state; the operator and our line
    that made each storage of 1 MiB or more; the autograd node in the backward pass)."""
    model = workload.model
    sites = LiveSites()
    optimizer_state = [] if model.optimizer is None else [
        t for state in model.optimizer.state.values() for t in state.values()]
    sites.track_state([*model.parameters(), *model.buffers(), *optimizer_state,
                       *(p.grad for p in model.parameters() if p.grad is not None),
                       *(t for view in model.views for t in view.values())])

    def record(failure: str | None) -> dict[str, Any]:
        # allocator_gib well above live_gib: memory held where no operator's output shows it
        # (a kernel's own workspace, a library's buffers).
        return {"error": failure, "live_gib": sites.live / 2**30, "peak_gib": sites.peak / 2**30,
                "allocator_gib": allocated_gib(workload), "by_origin": sites.by_origin(top)}

    try:
        with sites:
            workload.step(model)
    except torch.OutOfMemoryError as error:
        return record(error_text(error))  # while the failed step's tensors are still referenced
    return record(None)


def allocated_gib(workload: Workload) -> float | None:
    """What the CUDA caching allocator holds for tensors now (None on the CPU)."""
    device = next(workload.model.parameters()).device
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None


def run_benchmark(options: Options) -> dict[str, Any]:
    """Every requested part, ours and timm's, eager and compiled; the report as a JSON-able dict."""
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available; use --device cpu")
    if options.compile_scope not in COMPILE_SCOPES:
        raise ValueError(f"compile_scope: expected one of {list(COMPILE_SCOPES)}, got {options.compile_scope!r}")
    if options.compile_mode is not None and options.compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode: expected one of {list(COMPILE_MODES)}, got {options.compile_mode!r}")
    priority = sdpa_priority(options)  # checked before the first measurement
    cap = cap_device_memory(device, options.memory_cap_gib) if options.memory_cap_gib is not None else None
    run = Run(options, matmul_peak(options))
    run.report["memory_cap"] = cap
    run.report["peak"]["copy_gb_per_s"] = copy_bandwidth(options) / 1e9
    if options.compile and options.compile_cache is not None:
        run.report["compile_cache"] = {"path": str(options.compile_cache), **compile_cache.load(options.compile_cache)}
    for part in options.parts:
        try:
            with priority:  # around counting, compiling and timing alike: compiled graphs keep the choice
                if part == "pretrain_step":
                    run_pretrain_step(run)
                else:
                    run_encoder_part(run, part)
        except Exception as error:  # e.g. a timm too old to build the counterpart: the other parts still run
            traceback.print_exc()
            run.report.setdefault("part_errors", {})[part] = error_text(error)
            run.save()
        release(device)
    run.report["summary"] = summary(run.report)
    run.save(complete=True)
    return run.report


def summary(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per part: our best MFU (any mode), timm's best, their ratio and issue 7's H100 target."""
    rows = []
    for part in dict.fromkeys(r["part"] for r in report["results"]):
        best = {}
        for impl in ("skysense", "timm"):
            measured = [r for r in report["results"] if r["part"] == part and r["implementation"] == impl
                        and r["mfu"] is not None and not over_memory_cap(r, report.get("memory_cap"))]
            best[impl] = max(measured, key=lambda r: r["mfu"], default=None)
        ours, timm = best["skysense"], best["timm"]
        # (d) meets its target only at the paper's per-device batch or above (it must fit).
        paper_batch = report["shapes"]["step_batches"][0] if part == "pretrain_step" else None
        at_paper_batch = None if paper_batch is None or ours is None else ours["batch"] >= paper_batch
        rows.append({
            "part": part, "target_mfu": MFU_TARGETS.get(part),
            "skysense_mfu": ours and ours["mfu"], "skysense_mode": ours and ours["mode"],
            "skysense_batch": ours and ours["batch"], "timm_mfu": timm and timm["mfu"],
            "ratio_to_timm": ours["mfu"] / timm["mfu"] if ours and timm else None,
            # The targets are for an H100 in bf16; elsewhere they are not judged.
            "met": (bool(ours and ours["mfu"] >= MFU_TARGETS[part] and at_paper_batch is not False)
                    if part in MFU_TARGETS and report["device"].startswith("cuda") else None),
            "paper_batch": paper_batch, "at_paper_batch": at_paper_batch,
        })
    return rows


def format_table(report: dict[str, Any]) -> str:
    peak = report["peak"]
    scope = f"compile {report['compile_scope']}" if report.get("compile_scope") else "no compile"
    if report.get("compile_mode"):
        scope += f" ({report['compile_mode']})"
    rounds = report.get("sinkhorn_rounds")
    cap = report.get("memory_cap")
    settings = f"; (d) Sinkhorn-Knopp {rounds} rounds without convergence tests" if rounds else ""
    if cap:
        settings += f"; memory capped at {cap['gib']:g} of {cap['device_total_gib']:.2f} GiB"
    # Each row's mode, with its activation checkpointing beside it where it has any.
    modes = [r["mode"] if (r.get("activation_checkpointing") or "off") == "off"
             else f"{r['mode']}, {r['activation_checkpointing']}" for r in report["results"]]
    width = max([20, *map(len, modes)])
    lines = [
        f"{report['device_name']} ({report['device']}), torch {report['torch']}, timm {report['timm']}, "
        f"{report['dtype']}{' autocast' if report['autocast'] else ''}, {scope}, activation checkpointing "
        f"{'on' if report['activation_checkpointing'] else 'off'}"
        f"{'; SDPA ' + ' > '.join(report['sdpa_priority']) if report.get('sdpa_priority') else ''}"
        f"{''.join(f'; our {k} SDPA ' + '/'.join(v) for k, v in (report.get('our_sdpa') or {}).items())}"
        f"{'; our GELU kernel in ' + ', '.join(report['our_mlp_kernel']) if report.get('our_mlp_kernel') else ''}"
        f"{'; our qkv kernel in ' + ', '.join(report['our_qkv_kernel']) if report.get('our_qkv_kernel') else ''}"
        f"{'; our junction kernels in ' + ', '.join(report['our_norm_kernel']) if report.get('our_norm_kernel') else ''}"
        f"{settings}; matmul peak "
        f"{peak['tflops_per_s']:.2f} TFLOP/s (n={peak['matmul_n']}, {peak['dtype']})"
        f"{'; copy ' + format(peak['copy_gb_per_s'], ',.0f') + ' GB/s' if peak.get('copy_gb_per_s') else ''}",
        f"{'part':<14} {'impl':<9} {'mode':<{width}} {'batch':>5} {'step ms':>9} {'items/s':>9} {'TFLOP/s':>8} "
        f"{'MFU':>6} {'GiB':>6} {'compile s':>9} {'graphs':>6}",
    ]
    cache = report.get("compile_cache")
    if cache:
        lines.insert(1, f"compile cache {cache['path']}: loaded {cache['loaded_bytes']:,} bytes "
                        f"({cache.get('loaded_entries', 0)} entries), saved {cache.get('saved_bytes', 0):,} bytes "
                        f"({cache.get('saved_entries', 0)} entries)")
    for r, mode in zip(report["results"], modes):
        if r["error"]:
            lines.append(f"{r['part']:<14} {r['implementation']:<9} {mode:<{width}} {r['batch']:>5} {r['error']}")
            continue
        memory = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        compiled = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "-"
        graphs = r["compiled_graphs"] if r.get("compiled_graphs") is not None else "-"
        lines.append(
            f"{r['part']:<14} {r['implementation']:<9} {mode:<{width}} {r['batch']:>5} {r['step_ms']:>9.1f} "
            f"{r['items_per_s']:>9.1f} {r['tflops_per_s']:>8.3f} {100 * r['mfu']:>5.1f}% {memory:>6} {compiled:>9} {graphs:>6}"
        )
    for r in report["results"]:
        if over_memory_cap(r, cap):
            lines.append(f"{r['part']:<14} {r['implementation']} {r['mode']} batch {r['batch']}: reserved "
                         f"{r['peak_reserved_gib']:.2f} GiB, over the {cap['gib']:g} GiB cap; not counted in the summary")
    for r in report["results"]:
        failure = r.get("memory_at_failure")
        if failure:
            origins = "; ".join(f"{o['origin']} {o['gib']:.2f}" for o in failure["by_origin"][:8])
            allocator = f" ({failure['allocator_gib']:.1f} GiB in the allocator)" if failure.get("allocator_gib") else ""
            lines.append(f"{r['part']:<14} batch {r['batch']}: {failure['live_gib']:.1f} GiB alive{allocator} when memory "
                         f"ran out{'' if failure['error'] else ' (not this time: at the end)'}; by origin (GiB): {origins}")
    for r in report["results"]:
        kernels = r.get("kernel_ms_per_step")
        if kernels is not None and r.get("step_ms"):
            what = "kernels" if report["device"].startswith("cuda") else "operators' own time"
            lines.append(f"{r['part']:<14} {r['implementation']} {r['mode']}: {what} {kernels:.1f} ms of its "
                         f"{r['step_ms']:.1f} ms step ({100 * (1 - kernels / r['step_ms']):.0f}% without)"
                         + "".join(f"; {kind} {ms:.1f}" for kind, ms in (r.get("kernel_ms_by_kind") or {}).items()))
        if r.get("alloc_retries"):
            lines.append(f"{r['part']:<14} {r['implementation']} {r['mode']}: {r['alloc_retries']} allocator retries "
                         f"(cache flushes, each a device sync) while timed")
    for r in report["results"]:
        if r.get("host_syncs") is not None:
            lines.append(f"{r['part']:<14} batch {r['batch']}: {r['host_syncs']} host syncs and {r['operators']:,d} "
                         f"operators (views excluded) in one eager step")
    for part, error in report.get("part_errors", {}).items():
        lines.append(f"{part:<14} failed: {error}")
    lines.append(f"{'part':<14} {'ours MFU':>9} {'timm MFU':>9} {'ratio':>6} {'target':>7}  (best mode of each; targets for an H100)")
    for row in summary(report):
        def pct(value: float | None) -> str:
            return f"{100 * value:.1f}%" if value is not None else "-"
        ratio = f"{row['ratio_to_timm']:.2f}x" if row["ratio_to_timm"] is not None else "-"
        verdict = {True: "met", False: "not met", None: ""}[row["met"]]
        if row["at_paper_batch"] is False:
            verdict += f" (the paper's batch {row['paper_batch']} did not fit)"
        if row["met"] is not None and "H100" not in report["device_name"]:
            # An H200's HBM3e moves 1.4x an H100's bytes per second (data sheets), same matmul peak: its
            # memory-bound kernels are faster, so its MFU says more than an H100's would.
            verdict += f" (on an {report['device_name']}, not an H100)"
        lines.append(f"{row['part']:<14} {pct(row['skysense_mfu']):>9} {pct(row['timm_mfu']):>9} {ratio:>6} "
                     f"{pct(row['target_mfu']):>7}  {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Training-step speed and MFU of our models against timm's.")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp32"),
                        help="compute dtype: bf16 autocast (default on CUDA) or fp32 (default on the CPU)")
    parser.add_argument("--small", action="store_true", help="tiny models and shapes (a CPU smoke run)")
    parser.add_argument("--step-batch", metavar="B[,B...]",
                        help="per-device batches of the pretraining step, tried in turn until one does not fit "
                             "(default 3,4,6,8; --small: 2)")
    parser.add_argument("--parts", default="swin_v2,vit,fusion,pretrain_step",
                        help="comma-separated among swin_v2, vit, fusion, pretrain_step")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--compile-scope", choices=COMPILE_SCOPES, default="blocks",
                        help="compile each transformer block (default) or the whole model")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES,
                        help="torch.compile's mode (default: its default); reduce-overhead and max-autotune "
                             "replay CUDA graphs (with --compile-scope model: one for the forward, one for the "
                             "backward)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute every transformer block's activations in the backward pass")
    parser.add_argument("--step-checkpointing", choices=CHECKPOINTING, default="off",
                        help="(d): the activation checkpointing its ladder starts from (default off; at the paper's "
                             "batch on an 80 GB card off needs an estimated 90.7 GiB, selective 70.5)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps (the median is reported)")
    parser.add_argument("--budget", type=float, metavar="SECONDS",
                        help="start no new measurement after this many seconds (the rest is reported as skipped)")
    parser.add_argument("--profile", action="store_true",
                        help="record the operators that take most time in every compiled row")
    parser.add_argument("--json", metavar="PATH", help="also write the report to this JSON file (after every row)")
    parser.add_argument("--compile-cache", metavar="FILE",
                        help="load torch.compile's caches from FILE when it exists, rewrite it after every "
                             "compiled row (a later run on a fresh machine compiles only what changed)")
    parser.add_argument("--sdpa-priority", metavar="NAME[,NAME...]",
                        help=f"SDPA backends to try, in this order, the others off (among {', '.join(SDPA_BACKENDS)}); "
                             "default: torch's own choice")
    parser.add_argument("--our-sdpa", metavar="PART=NAME[,NAME...]", action="append",
                        help=f"only for our models: the SDPA backends the attention of PART ({', '.join(OUR_SDPA_SCOPES)}; "
                             "in (d) the student's and teacher's matching encoders) may use; repeatable")
    parser.add_argument("--our-mlp-kernel", metavar="PART[,PART...]", default="",
                        help="only for our models: the parts whose MLPs run the GELU backward and the first "
                             "bias gradient in one kernel (skysense.models.gelu_bias; CUDA)")
    parser.add_argument("--our-qkv-kernel", metavar="PART[,PART...]", default="",
                        help="only for our models: the parts whose attention layers assemble the qkv gradient and "
                             "sum its bias's in one kernel where SDPA runs (skysense.models.qkv_gradient; CUDA)")
    parser.add_argument("--our-norm-kernel", metavar="PART[,PART...]", default="",
                        help="only for our models: the parts whose pre-norm blocks differentiate each residual "
                             "junction (norm, residual add, projection bias) in one kernel "
                             "(skysense.models.residual_norm; CUDA)")
    parser.add_argument("--sinkhorn-rounds", type=int, metavar="N",
                        help="(d): exactly N Sinkhorn-Knopp rounds per call, without the convergence tests that "
                             "read the GPU back (default: the pretraining config's, rounds until the tolerance)")
    parser.add_argument("--memory-cap-gib", type=float, metavar="GIB",
                        help="CUDA: let the allocator reserve at most GIB GiB, as on a smaller card "
                             f"(an H100 80GB's: {H100_ALLOCATOR_GIB})")
    parser.add_argument("--meta-flops", action="store_true",
                        help="only count the FLOPs of (a)-(c), ours and timm's, on the meta device, and print them")
    args = parser.parse_args(argv)
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    unknown = set(parts) - set(Options.parts)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; expected among {list(Options.parts)}")
    if args.warmup < 0 or args.repeats < 1:
        parser.error("--warmup must be >= 0 and --repeats >= 1")
    shapes = SMALL if args.small else HUGE
    if args.meta_flops:
        encoders = tuple(p for p in parts if p != "pretrain_step")
        counted = meta_flops(shapes, encoders)
        for (part, name), flops in counted.items():
            print(f"{part:<8} {name:<9} {flops:>20,d} FLOPs per step")
        return {f"{part}/{name}": flops for (part, name), flops in counted.items()}
    if args.step_batch is not None:
        try:
            batches = tuple(int(b) for b in args.step_batch.split(","))
        except ValueError:
            parser.error(f"--step-batch: expected comma-separated integers, got {args.step_batch!r}")
        if not batches or min(batches) < 1:
            parser.error(f"--step-batch: batches must be >= 1, got {args.step_batch!r}")
        shapes = dataclasses.replace(shapes, step_batches=batches)
    if args.sinkhorn_rounds is not None and args.sinkhorn_rounds < 1:
        parser.error(f"--sinkhorn-rounds: expected at least 1 round, got {args.sinkhorn_rounds}")
    our_sdpa = {}
    for item in args.our_sdpa or []:
        scope, _, names = item.partition("=")
        if scope not in OUR_SDPA_SCOPES:
            parser.error(f"--our-sdpa {item!r}: expected PART=NAME[,NAME...] with PART among {list(OUR_SDPA_SCOPES)}")
        try:
            our_sdpa[scope] = check_attention_backends([n.strip() for n in names.split(",") if n.strip()],
                                                       f"--our-sdpa {scope}")
        except ValueError as error:
            parser.error(str(error))
    kernel_parts = {}
    for flag, value in (("--our-mlp-kernel", args.our_mlp_kernel), ("--our-qkv-kernel", args.our_qkv_kernel),
                        ("--our-norm-kernel", args.our_norm_kernel)):
        kernel_parts[flag] = tuple(p.strip() for p in value.split(",") if p.strip())
        if set(kernel_parts[flag]) - set(Options.parts):
            parser.error(f"{flag} {value!r}: expected parts among {list(Options.parts)}")
    dtype = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    options = Options(device=args.device, dtype=dtype, shapes=shapes, compile=not args.no_compile,
                      compile_scope=args.compile_scope, compile_mode=args.compile_mode,
                      activation_checkpointing=args.activation_checkpointing, step_checkpointing=args.step_checkpointing,
                      warmup=args.warmup, repeats=args.repeats, parts=parts, budget_s=args.budget,
                      json_path=Path(args.json) if args.json else None, profile=args.profile,
                      compile_cache=Path(args.compile_cache) if args.compile_cache else None,
                      sdpa_priority=tuple(n.strip() for n in args.sdpa_priority.split(",")) if args.sdpa_priority else None,
                      our_sdpa=our_sdpa or None, our_mlp_kernel=kernel_parts["--our-mlp-kernel"],
                      our_qkv_kernel=kernel_parts["--our-qkv-kernel"],
                      our_norm_kernel=kernel_parts["--our-norm-kernel"], sinkhorn_rounds=args.sinkhorn_rounds,
                      memory_cap_gib=args.memory_cap_gib)
    report = run_benchmark(options)
    print(format_table(report))
    return report


if __name__ == "__main__":
    main()
