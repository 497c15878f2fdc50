"""Our MLPs with and without the GELU backward kernel (:mod:`skysense.models.gelu_bias`), one run.

Compiled by inductor, an MLP's backward pass writes the gradient of the GELU's input in one
kernel and reads it back in another to sum the first bias's gradient: 8 bytes per element of
the block's input, about 12.9 GB per step of part (b) and of part (c) in inductor's H100 plan
(``benchmarks/block_traffic.py --plan h100 --mlp-kernel``). With ``set_mlp_kernel`` one Triton
kernel writes both gradients.

This times one compiled ``Mlp`` (fc1, exact GELU, fc2) forward + backward under bf16 autocast at
the widths and token counts of ViT-L/4 (part (b); the fusion's, part (c), differ by 0.4% in
tokens) and of each SwinV2-H stage (part (a)), with and without the kernel in the same process,
after checking that both give the same output and gradients within bf16 rounding. It adds the
times up as the blocks of each part's step run them; ``--our-mlp-kernel-from`` turns the report
into ``gpu_step.py``'s ``--our-mlp-kernel`` argument for the parts where the kernel won by
:data:`MARGIN` or more (``pretrain_step`` when it won over every row together).

    python benchmarks/gelu_backward.py --json gelu_backward.json         # CUDA, huge shapes
    TRITON_INTERPRET=1 python benchmarks/gelu_backward.py --device cpu --small   # a CPU smoke run
    python benchmarks/gelu_backward.py --our-mlp-kernel-from gelu_backward.json

On the CPU the kernel runs only under Triton's interpreter, whose times say nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_step  # noqa: E402  (beside this file: shapes, timing, atomic writes)

from skysense.config import preset_config  # noqa: E402
from skysense.models import gelu_bias  # noqa: E402
from skysense.models.layers import Mlp  # noqa: E402

# The kernel is chosen for a part whose step total it beats by this factor or more.
MARGIN = 1.05
# Largest difference allowed between the two settings' outputs and gradients, relative to the
# largest value of each (bf16 rounds to 3.9e-3; the kernel adds the bias after the product's rounding).
TOLERANCE = 2e-2


def mlp_shapes(shapes: gpu_step.Shapes) -> list[dict[str, Any]]:
    """One row per MLP shape: its part, width, hidden width, tokens per call, and calls per step."""
    config = preset_config(shapes.preset)
    vit = config.s2
    rows = [{"part": "vit", "label": "ViT", "dim": vit.embed_dim, "hidden": int(vit.embed_dim * vit.mlp_ratio),
             "tokens": shapes.vit_batch * ((shapes.vit_image // vit.patch_size) ** 2 + 1), "blocks": vit.depth}]
    hr = config.hr
    side = shapes.swin_image // hr.patch_size
    for stage, depth in enumerate(hr.depths):
        dim = hr.embed_dim * 2**stage
        rows.append({"part": "swin_v2", "label": f"SwinV2 stage {stage + 1}", "dim": dim,
                     "hidden": int(dim * hr.mlp_ratio), "tokens": shapes.swin_batch * side * side, "blocks": depth})
        side = -(-side // 2)
    return rows


def run_mlp(row: dict[str, Any], kernel: bool, device: torch.device, warmup: int, repeats: int,
            compile_mlp: bool) -> dict[str, Any]:
    """Median seconds of one forward + backward of the row's MLP, with or without the kernel,
    whether the kernel ran, and the output and gradients of the last step (for the check)."""
    torch.manual_seed(0)
    mlp = Mlp(row["dim"], row["hidden"]).to(device).train()
    gelu_bias.set_mlp_kernel(mlp, kernel)
    x = torch.randn(row["tokens"], row["dim"], device=device, requires_grad=True)
    gradient = torch.randn(row["tokens"], row["dim"], device=device, dtype=torch.bfloat16)
    probe = torch.empty(row["tokens"], row["hidden"], device=device, dtype=torch.bfloat16)
    ran = kernel and gelu_bias.supports(probe, mlp.fc1.bias)
    torch.compiler.reset()
    run = torch.compile(mlp) if compile_mlp else mlp
    last: dict[str, torch.Tensor] = {}

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = run(x)
        out.backward(gradient)
        last.update(out=out.detach(), x=x.grad, **{name: p.grad for name, p in mlp.named_parameters()})
        x.grad = None
        for p in mlp.parameters():
            p.grad = None

    times = gpu_step.time_steps(step, device, warmup, repeats)
    return {"seconds": statistics.median(times), "kernel_ran": ran, "values": last}


def largest_difference(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per tensor, the largest difference relative to the reference's largest value."""
    return {name: ((ours[name].float() - value.float()).abs().max() / value.float().abs().max().clamp_min(1e-30)).item()
            for name, value in reference.items()}


def measure(shapes: gpu_step.Shapes, device: torch.device, warmup: int, repeats: int, compile_mlp: bool,
            report: dict[str, Any], json_path: Path | None = None) -> dict[str, Any]:
    """Every MLP shape with and without the kernel into ``report["rows"]``, then each part's step
    totals; rewritten to ``json_path`` after every row, so a run cut short keeps its rows."""
    rows = report.setdefault("rows", [])
    for shape in mlp_shapes(shapes):
        plain = run_mlp(shape, False, device, warmup, repeats, compile_mlp)
        try:
            ours = run_mlp(shape, True, device, warmup, repeats, compile_mlp)
            differences = largest_difference(ours["values"], plain["values"])
            error = None if max(differences.values()) <= TOLERANCE else f"values differ: {differences}"
        except Exception as failure:  # noqa: BLE001  (reported, and the kernel is not chosen)
            ours, differences, error = {"seconds": float("nan"), "kernel_ran": False}, {}, repr(failure)
        rows.append({**shape, "plain_ms": 1e3 * plain["seconds"], "kernel_ms": 1e3 * ours["seconds"],
                     "kernel_ran": ours["kernel_ran"], "differences": differences, "error": error})
        print(f"{shape['label']:<15} {shape['tokens']:>7} x {shape['dim']:<5} x{shape['blocks']:<2} plain "
              f"{rows[-1]['plain_ms']:8.3f} ms, kernel {rows[-1]['kernel_ms']:8.3f} ms"
              f"{'' if ours['kernel_ran'] else ' (the kernel did not run)'}{'; ' + error if error else ''}", flush=True)
        if json_path:
            gpu_step.write_json(report, json_path)
    report["parts"] = part_totals(rows)
    if json_path:
        gpu_step.write_json(report, json_path)
    return report


def part_totals(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per part (the fusion as ViT's row; ``pretrain_step`` as every row), the MLPs' step time with
    and without the kernel, their ratio, and whether every row's kernel ran and checked out."""
    groups = {"swin_v2": ["swin_v2"], "vit": ["vit"], "fusion": ["vit"], "pretrain_step": ["swin_v2", "vit"]}
    totals = {}
    for part, members in groups.items():
        chosen = [r for r in rows if r["part"] in members]
        if not chosen:
            continue
        plain = sum(r["plain_ms"] * r["blocks"] for r in chosen)
        kernel = sum(r["kernel_ms"] * r["blocks"] for r in chosen)
        sound = all(r["kernel_ran"] and r["error"] is None for r in chosen)
        totals[part] = {"plain_ms": plain, "kernel_ms": kernel, "ratio": plain / kernel if sound else None,
                        "sound": sound}
    return totals


def chosen_parts(report: dict[str, Any]) -> list[str]:
    """The parts whose MLPs the kernel made faster by :data:`MARGIN` or more, with values that checked out."""
    return [part for part, total in report.get("parts", {}).items() if total["sound"] and total["ratio"] >= MARGIN]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="the tiny preset's shapes (a CPU smoke run)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true", help="eager MLPs")
    parser.add_argument("--json", type=Path, help="write the report here (atomically)")
    parser.add_argument("--our-mlp-kernel-from", type=Path, metavar="JSON",
                        help="only print gpu_step.py's --our-mlp-kernel argument for the parts this report chose "
                             "(nothing if none)")
    args = parser.parse_args(argv)
    if args.our_mlp_kernel_from:
        import json

        parts = chosen_parts(json.loads(args.our_mlp_kernel_from.read_text()))
        if parts:
            print(f"--our-mlp-kernel {','.join(parts)}")
        return 0
    device = torch.device(args.device)
    shapes = gpu_step.SMALL if args.small else gpu_step.HUGE
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "preset": shapes.preset, "compiled": not args.no_compile,
              "dtype": "bf16 autocast", "margin": MARGIN, "tolerance": TOLERANCE}
    measure(shapes, device, args.warmup, args.repeats, not args.no_compile, report, args.json)
    for part, total in report["parts"].items():
        ratio = f"{total['ratio']:.3f}" if total["ratio"] else "- (the kernel did not run or its values differ)"
        print(f"{part:<14} MLPs per step: plain {total['plain_ms']:.2f} ms, kernel {total['kernel_ms']:.2f} ms, "
              f"ratio {ratio}")
    print(f"chosen: {', '.join(chosen_parts(report)) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
