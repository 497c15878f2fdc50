"""Training-step speed and MFU on one device: our encoders against timm's, and a pretraining step.

In one run, on one device, forward + backward of

(a) SwinV2 (``skysense.models.swin_v2``) at the ``huge`` HR size on 512x512 RGB, batch 8;
(b) the S2 ViT at ``huge`` (ViT-L/4) on 64x64x10 frames, batch 256;
(c) the fusion transformer's 24 blocks x 1024 on 32-token sequences, batch 2048;

each for skysense and for timm's equivalent (``SwinTransformerV2``, ``VisionTransformer``,
``Block``), eager and under ``torch.compile``; and (d) one full ``huge`` pretraining step
(student and EMA teacher on two multi-modal views, every objective of
``skysense.pretrain.objective``, gradient clipping, AdamW, EMA) at a given per-device batch,
eager (Sinkhorn-Knopp's convergence test breaks a compiled graph at every iteration).

Numbers (PERFORMANCE.md's conventions): the step time is the median of the timed steps; FLOPs
are counted once per model with ``torch.utils.flop_counter.FlopCounterMode`` on one eager step
without activation checkpointing (its recomputation is not model work; torch does count the
score recomputation inside fused attention's backward, 2.5x the forward attention instead of
2x, under 1% of these steps); MFU is achieved FLOP/s over the peak of an n x n matmul in the
compute dtype measured in the same run. CUDA runs under bf16 autocast; the CPU runs fp32 unless
``--dtype bf16``. Parts (a)-(c) run with stochastic depth off, as timm's counterparts are built;
(d) keeps the preset's.

    python benchmarks/gpu_step.py --json gpu_step.json                    # CUDA, huge shapes
    python benchmarks/gpu_step.py --device cpu --small --no-compile       # CPU, tiny models

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
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from skysense.config import preset_config
from skysense.distributed import apply_activation_checkpointing, clip_grad_norm
from skysense.models.fusion import FusionTransformer
from skysense.models.layers import TransformerBlock
from skysense.models.swin_v2 import SwinTransformerV2, SwinV2Block
from skysense.models.vit import VisionTransformer
from skysense.pretrain.config import PretrainConfig
from skysense.pretrain.loop import PretrainingModel, parameter_groups
from skysense.pretrain.teacher import ema_update
from skysense.timm_reference import timm_swin_like, timm_vit_like


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                  **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# FlopCounterMode knows the CUDA attention kernels only; the CPU's flash kernel (any mask, any
# head dim) would count as zero.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


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
    # Pretraining step: per-device batch, HR side (S2/S1 sides are HR / 32), frames per series.
    step_batch: int
    step_hr: int
    step_s2_frames: int
    step_s1_frames: int
    matmul_n: int


HUGE = Shapes(preset="huge", swin_image=512, swin_batch=8, vit_image=64, vit_batch=256, fusion_tokens=32,
              fusion_batch=2048, step_batch=2, step_hr=512, step_s2_frames=20, step_s1_frames=10, matmul_n=8192)
SMALL = Shapes(preset="tiny", swin_image=64, swin_batch=4, vit_image=16, vit_batch=16, fusion_tokens=8,
               fusion_batch=64, step_batch=2, step_hr=128, step_s2_frames=2, step_s1_frames=2, matmul_n=1024)


@dataclass
class Options:
    """One benchmark run (the command line's flags)."""

    device: str = "cuda"
    dtype: str = "bf16"
    shapes: Shapes = HUGE
    compile: bool = True
    activation_checkpointing: bool = False
    warmup: int = 3
    repeats: int = 10
    parts: tuple[str, ...] = ("swin_v2", "vit", "fusion", "pretrain_step")


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
    # Blocks recomputed in the backward pass under --activation-checkpointing.
    blocks: tuple[type[nn.Module], ...]
    compilable: bool = True


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
    in training mode, and an input batch for them."""
    config = preset_config(shapes.preset)
    torch.manual_seed(0)
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
        timm_blocks = [Block(fusion.embed_dim, fusion.num_heads, fusion.mlp_ratio, qkv_bias=True, norm_layer=norm)
                       for _ in range(fusion.depth)]
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
    blocks = {"skysense": (SwinV2Block, TransformerBlock), "timm": (SwinTransformerV2Block, Block)}
    unit = {"swin_v2": "image", "vit": "frame", "fusion": "sequence"}[part]
    return [Workload(part, name, unit, x.shape[0], str(tuple(x.shape)), model, encoder_step(x, options),
                     blocks[name]) for name, model in models.items()]


def pretrain_config(shapes: Shapes) -> PretrainConfig:
    """The pretraining run of part (d): the preset with default objective, smaller for tiny."""
    config = PretrainConfig(preset=shapes.preset, batch_size=shapes.step_batch)
    if shapes.preset == "tiny":
        config.objective.head.hidden_dim, config.objective.head.bottleneck_dim, config.objective.head.out_dim = 64, 32, 128
        config.objective.sinkhorn_iterations = 20
    return config


def pretrain_views(shapes: Shapes, device: torch.device, generator: torch.Generator) -> tuple[dict, dict]:
    """Two multi-modal views: HR, S2 and S1 series (HR / 32 pixels), dates, lat/lon."""
    b, side, small = shapes.step_batch, shapes.step_hr, max(1, shapes.step_hr // 32)
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

    def __init__(self, config: PretrainConfig, views: tuple[dict, dict], options: Options) -> None:
        super().__init__()
        self.config, self.views, self.options = config, views, options
        self.pretraining = PretrainingModel(config)
        self.optimizer: torch.optim.Optimizer | None = None

    def forward(self) -> None:
        module = self.pretraining
        if self.optimizer is None:  # after .to(device)
            self.optimizer = torch.optim.AdamW(parameter_groups(module, self.config.optim.weight_decay),
                                               lr=self.config.optim.lr)
        with autocast(self.options):
            total, terms = module(self.views)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        clip_grad_norm([p for g in self.optimizer.param_groups for p in g["params"]], self.config.optim.grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            if "geo" in terms:
                module.objective.update_prototypes(module.student.geo_context)
            module.objective.update_teacher_heads(self.config.optim.teacher_momentum)
            ema_update(module.teacher, module.student, self.config.optim.teacher_momentum)


def pretrain_workload(options: Options) -> Workload:
    s, device = options.shapes, torch.device(options.device)
    torch.manual_seed(0)
    views = pretrain_views(s, device, torch.Generator().manual_seed(0))
    model = PretrainStep(pretrain_config(s), views, options).to(device)
    model.pretraining.train()
    shape = (f"2 views x (hr {tuple(views[0]['hr'].shape)}, s2 {tuple(views[0]['s2'].shape)}, "
             f"s1 {tuple(views[0]['s1'].shape)})")
    return Workload("pretrain_step", "skysense", "sample", s.step_batch, shape, model,
                    lambda m: m(), (TransformerBlock, SwinV2Block), compilable=False)


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


def count_flops(workload: Workload) -> int:
    """FLOPs of one step (matmuls, convolutions, attention), forward and backward."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        workload.step(workload.model)
    return counter.get_total_flops()


def measure(workload: Workload, mode: str, flops: int, peak: float, options: Options) -> dict[str, Any]:
    """Time ``workload`` eagerly or compiled; one result row."""
    device = torch.device(options.device)
    row: dict[str, Any] = {
        "part": workload.part, "implementation": workload.implementation, "mode": mode, "unit": workload.unit,
        "batch": workload.batch, "input_shape": workload.input_shape,
        "parameters": sum(p.numel() for p in workload.model.parameters() if p.requires_grad),
        "flops_per_step": flops, "compile_s": None, "step_ms": None, "items_per_s": None, "tflops_per_s": None,
        "mfu": None, "peak_memory_gib": None, "error": None,
    }
    try:
        model = workload.model
        if mode == "compiled":
            model = torch.compile(model)
            start = time.perf_counter()
            workload.step(model)  # compiles
            synchronize(device)
            row["compile_s"] = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = time_steps(lambda: workload.step(model), device, options.warmup, options.repeats)
        seconds = statistics.median(times)
        row.update(step_ms=seconds * 1e3, items_per_s=workload.batch / seconds, tflops_per_s=flops / seconds / 1e12,
                   mfu=flops / seconds / peak)
        if device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    except (torch.OutOfMemoryError, RuntimeError, AssertionError) as error:
        # One part that does not fit or does not compile must not cost the others their numbers.
        row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        print(f"{workload.part}/{workload.implementation}/{mode}: {row['error']}", file=sys.stderr)
    return row


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


def run_benchmark(options: Options) -> dict[str, Any]:
    """Every requested part, ours and timm's, eager and compiled; the report as a JSON-able dict."""
    import timm

    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available; use --device cpu")
    peak = matmul_peak(options)
    rows = []
    for part in options.parts:
        workloads = [pretrain_workload(options)] if part == "pretrain_step" else encoder_workloads(part, options)
        for workload in workloads:
            flops = count_flops(workload)
            if options.activation_checkpointing:
                target = workload.model.pretraining.student if part == "pretrain_step" else workload.model
                apply_activation_checkpointing(target, workload.blocks)
            modes = ["eager"] + (["compiled"] if options.compile and workload.compilable else [])
            for mode in modes:
                rows.append(measure(workload, mode, flops, peak, options))
                if mode == "compiled":
                    torch._dynamo.reset()
        del workloads, workload
        release(device)
    return {
        "device": str(device), "device_name": device_name(device), "torch": torch.__version__,
        "timm": timm.__version__, "threads": torch.get_num_threads(), "dtype": options.dtype,
        "autocast": options.dtype == "bf16", "activation_checkpointing": options.activation_checkpointing,
        "warmup": options.warmup, "repeats": options.repeats, "shapes": dataclasses.asdict(options.shapes),
        "peak": {"matmul_n": options.shapes.matmul_n, "dtype": options.dtype, "tflops_per_s": peak / 1e12},
        "results": rows,
    }


def format_table(report: dict[str, Any]) -> str:
    peak = report["peak"]
    lines = [
        f"{report['device_name']} ({report['device']}), torch {report['torch']}, timm {report['timm']}, "
        f"{report['dtype']}{' autocast' if report['autocast'] else ''}, activation checkpointing "
        f"{'on' if report['activation_checkpointing'] else 'off'}; matmul peak "
        f"{peak['tflops_per_s']:.2f} TFLOP/s (n={peak['matmul_n']}, {peak['dtype']})",
        f"{'part':<14} {'impl':<9} {'mode':<9} {'batch':>5} {'step ms':>9} {'items/s':>9} {'TFLOP/s':>8} "
        f"{'MFU':>6} {'GiB':>6}",
    ]
    for r in report["results"]:
        if r["error"]:
            lines.append(f"{r['part']:<14} {r['implementation']:<9} {r['mode']:<9} {r['batch']:>5} {r['error']}")
            continue
        memory = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        lines.append(
            f"{r['part']:<14} {r['implementation']:<9} {r['mode']:<9} {r['batch']:>5} {r['step_ms']:>9.1f} "
            f"{r['items_per_s']:>9.1f} {r['tflops_per_s']:>8.3f} {100 * r['mfu']:>5.1f}% {memory:>6}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Training-step speed and MFU of our models against timm's.")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp32"),
                        help="compute dtype: bf16 autocast (default on CUDA) or fp32 (default on the CPU)")
    parser.add_argument("--small", action="store_true", help="tiny models and shapes (a CPU smoke run)")
    parser.add_argument("--step-batch", type=int, help="per-device batch of the pretraining step (default 2)")
    parser.add_argument("--parts", default="swin_v2,vit,fusion,pretrain_step",
                        help="comma-separated among swin_v2, vit, fusion, pretrain_step")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute every transformer block's activations in the backward pass")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps (the median is reported)")
    parser.add_argument("--json", metavar="PATH", help="also write the report to this JSON file")
    args = parser.parse_args(argv)
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    unknown = set(parts) - set(Options.parts)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; expected among {list(Options.parts)}")
    if args.warmup < 0 or args.repeats < 1:
        parser.error("--warmup must be >= 0 and --repeats >= 1")
    shapes = SMALL if args.small else HUGE
    if args.step_batch is not None:
        shapes = dataclasses.replace(shapes, step_batch=args.step_batch)
    dtype = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    options = Options(device=args.device, dtype=dtype, shapes=shapes, compile=not args.no_compile,
                      activation_checkpointing=args.activation_checkpointing, warmup=args.warmup,
                      repeats=args.repeats, parts=parts)
    report = run_benchmark(options)
    print(format_table(report))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(path)
    return report


if __name__ == "__main__":
    main()
