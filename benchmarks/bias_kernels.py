"""Our MLPs, attention layers and blocks with and without the kernels that sum their bias gradients, one run.

Compiled by inductor, a block's backward pass reads two of its gradients back only to sum a
bias's gradient over the tokens: the GELU input's (fc1's bias; 8 bytes per element of the
block's input) and the qkv projection output's (6 bytes; after three copy kernels have
assembled it from SDPA's dq, dk and dv). :mod:`skysense.models.gelu_bias` and
:mod:`skysense.models.qkv_gradient` sum them in the kernels that write those gradients
(``set_mlp_kernel``, ``set_qkv_kernel``): in inductor's H100 plan about 12.8 + 9.7 GB less per
step of part (b) (``benchmarks/block_traffic.py --plan h100 --mlp-kernel --qkv-kernel``).
:mod:`skysense.models.residual_norm` differentiates a pre-norm block's residual junctions (the
norms, the residual adds, the projections' bias gradients) in one kernel each
(``set_norm_kernel``): 21.5 GB less per step of part (b) (``--norm-kernel``).

This times, compiled, forward + backward under bf16 autocast, with and without the kernel in the
same process (after checking both give the same output and gradients within bf16 rounding):
- ``mlp`` rows: one ``Mlp`` (fc1, exact GELU, fc2) at the width and token count of ViT-L/4
  (part (b); the fusion's, part (c), differ by 0.4% in tokens) and of each SwinV2-H stage (part (a));
- ``qkv`` rows: one ``Attention`` (qkv projection, SDPA, output projection) of ViT-L/4 and one of
  the fusion (SDPA: where the short kernel runs the fusion's attention it sums that bias itself);
- a ``norm`` row: one whole ``TransformerBlock`` of ViT-L/4 (the junctions span the block; the
  fusion's blocks are as wide, with 0.4% fewer tokens), whose kernels save a few percent of its
  time at most, hence :data:`BLOCK_MARGIN`.
It adds the times up as the blocks of each part's step run them; ``--choice-from`` turns the
report into ``gpu_step.py``'s ``--our-mlp-kernel``, ``--our-qkv-kernel`` and ``--our-norm-kernel``
arguments for the parts where a kernel won by :data:`MARGIN` (a whole block: :data:`BLOCK_MARGIN`) or more (``pretrain_step`` when it won over all of its
rows together).

    python benchmarks/bias_kernels.py --json bias_kernels.json           # CUDA, huge shapes
    TRITON_INTERPRET=1 python benchmarks/bias_kernels.py --device cpu --small   # a CPU smoke run
    python benchmarks/bias_kernels.py --choice-from bias_kernels.json

On the CPU the kernels run only under Triton's interpreter, whose times say nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_step  # noqa: E402  (beside this file: shapes, timing, atomic writes)

from skysense.config import preset_config  # noqa: E402
from skysense.models import gelu_bias, qkv_gradient, residual_norm  # noqa: E402
from skysense.models.layers import Attention, Mlp, TransformerBlock  # noqa: E402

# A kernel is chosen for a part whose step total it beats by this factor or more; the junction
# kernels, timed on whole blocks (matrix products included), by BLOCK_MARGIN.
MARGIN = 1.05
BLOCK_MARGIN = 1.02
# Largest difference allowed between the two settings' outputs and gradients, relative to the
# largest value of each (bf16 rounds to 3.9e-3; the MLP kernel adds the bias after the product's rounding).
TOLERANCE = 2e-2
# Per kind of kernel: gpu_step.py's argument, and for each part the rows its step total adds up
# (the fusion's MLPs are ViT-L/4's width; part (d) has every encoder and the fusion).
KINDS = {"mlp": "--our-mlp-kernel", "qkv": "--our-qkv-kernel", "norm": "--our-norm-kernel"}
PART_ROWS = {"mlp": {"swin_v2": ("swin_v2",), "vit": ("vit",), "fusion": ("vit",), "pretrain_step": ("swin_v2", "vit")},
             "qkv": {"vit": ("vit",), "fusion": ("fusion",), "pretrain_step": ("vit", "fusion")},
             "norm": {"vit": ("vit",), "fusion": ("vit",), "pretrain_step": ("vit",)}}


def row_shapes(shapes: gpu_step.Shapes) -> list[dict[str, Any]]:
    """One row per layer shape: kernel kind, part, width, hidden width or heads, sequences and
    tokens per call, and layers per step."""
    config = preset_config(shapes.preset)
    vit, fusion = config.s2, config.fusion
    vit_tokens = (shapes.vit_image // vit.patch_size) ** 2 + 1
    # (b)'s and (c)'s rows first: a run cut short by its time limit still decides steps 1 and 2 of
    # benchmarks/device_call.sh; SwinV2-H's, whose part (a) that call does not run, last.
    rows = [{"kind": "mlp", "part": "vit", "label": "ViT MLP", "dim": vit.embed_dim,
             "hidden": int(vit.embed_dim * vit.mlp_ratio), "sequences": shapes.vit_batch, "tokens": vit_tokens,
             "blocks": vit.depth},
            {"kind": "qkv", "part": "vit", "label": "ViT attention", "dim": vit.embed_dim, "heads": vit.num_heads,
             "sequences": shapes.vit_batch, "tokens": vit_tokens, "blocks": vit.depth},
            {"kind": "qkv", "part": "fusion", "label": "fusion attention", "dim": fusion.embed_dim,
             "heads": fusion.num_heads, "sequences": shapes.fusion_batch, "tokens": shapes.fusion_tokens,
             "blocks": fusion.depth},
            {"kind": "norm", "part": "vit", "label": "ViT block", "dim": vit.embed_dim, "heads": vit.num_heads,
             "hidden": int(vit.embed_dim * vit.mlp_ratio), "sequences": shapes.vit_batch, "tokens": vit_tokens,
             "blocks": vit.depth}]
    hr = config.hr
    side = shapes.swin_image // hr.patch_size
    for stage, depth in enumerate(hr.depths):
        dim = hr.embed_dim * 2**stage
        rows.append({"kind": "mlp", "part": "swin_v2", "label": f"SwinV2 {stage + 1} MLP", "dim": dim,
                     "hidden": int(dim * hr.mlp_ratio), "sequences": shapes.swin_batch, "tokens": side * side,
                     "blocks": depth})
        side = -(-side // 2)
    return rows


def run_row(row: dict[str, Any], kernel: bool, device: torch.device, warmup: int, repeats: int,
            compile_layer: bool) -> dict[str, Any]:
    """Median seconds of one forward + backward of the row's layer, with or without its kernel,
    whether the kernel ran, and the output and gradients of the last step (for the check)."""
    torch.manual_seed(0)
    if row["kind"] == "mlp":
        layer = Mlp(row["dim"], row["hidden"]).to(device).train()
        gelu_bias.set_mlp_kernel(layer, kernel)
        shape = (row["sequences"] * row["tokens"], row["dim"])
        probe = torch.empty(shape[0], row["hidden"], device=device, dtype=torch.bfloat16)
        ran = kernel and gelu_bias.supports(probe, layer.fc1.bias)
    elif row["kind"] == "qkv":
        layer = Attention(row["dim"], row["heads"]).to(device).train()
        qkv_gradient.set_qkv_kernel(layer, kernel)
        shape = (row["sequences"], row["tokens"], row["dim"])
        probe = torch.empty(*shape[:2], 3 * row["dim"], device=device, dtype=torch.bfloat16)
        ran = kernel and qkv_gradient.supports(probe, row["heads"])
    else:
        layer = TransformerBlock(row["dim"], row["heads"], row["hidden"] / row["dim"]).to(device).train()
        residual_norm.set_norm_kernel(layer, kernel)
        shape = (row["sequences"], row["tokens"], row["dim"])
        ran = kernel and residual_norm.supports(torch.empty(shape, device=device))
    x = torch.randn(shape, device=device, requires_grad=True)
    gradient = torch.randn(shape, device=device, dtype=torch.bfloat16)
    torch.compiler.reset()
    run = torch.compile(layer) if compile_layer else layer
    last: dict[str, torch.Tensor] = {}

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = run(x)
        out.backward(gradient)
        last.update(out=out.detach(), x=x.grad, **{name: p.grad for name, p in layer.named_parameters()})
        x.grad = None
        for p in layer.parameters():
            p.grad = None

    times = gpu_step.time_steps(step, device, warmup, repeats)
    return {"seconds": statistics.median(times), "kernel_ran": ran, "values": last}


def largest_difference(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per tensor, the largest difference relative to the reference's largest value."""
    return {name: ((ours[name].float() - value.float()).abs().max() / value.float().abs().max().clamp_min(1e-30)).item()
            for name, value in reference.items()}


def measure(shapes: gpu_step.Shapes, device: torch.device, warmup: int, repeats: int, compile_layer: bool,
            report: dict[str, Any], json_path: Path | None = None) -> dict[str, Any]:
    """Every row with and without its kernel into ``report["rows"]``, then each part's step totals;
    rewritten to ``json_path`` after every row, so a run cut short keeps its rows."""
    rows = report.setdefault("rows", [])
    for shape in row_shapes(shapes):
        plain = run_row(shape, False, device, warmup, repeats, compile_layer)
        try:
            ours = run_row(shape, True, device, warmup, repeats, compile_layer)
            differences = largest_difference(ours["values"], plain["values"])
            error = None if max(differences.values()) <= TOLERANCE else f"values differ: {differences}"
        except Exception as failure:  # noqa: BLE001  (reported, and the kernel is not chosen)
            ours, differences, error = {"seconds": float("nan"), "kernel_ran": False}, {}, repr(failure)
        rows.append({**shape, "plain_ms": 1e3 * plain["seconds"], "kernel_ms": 1e3 * ours["seconds"],
                     "kernel_ran": ours["kernel_ran"], "differences": differences, "error": error})
        print(f"{shape['label']:<18} {shape['sequences']:>5} x {shape['tokens']:<5} x {shape['dim']:<5} "
              f"x{shape['blocks']:<2} plain {rows[-1]['plain_ms']:8.3f} ms, kernel {rows[-1]['kernel_ms']:8.3f} ms"
              f"{'' if ours['kernel_ran'] else ' (the kernel did not run)'}{'; ' + error if error else ''}", flush=True)
        report["parts"] = part_totals(rows)
        if json_path:
            gpu_step.write_json(report, json_path)
    return report


def part_totals(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per kernel kind and part (:data:`PART_ROWS`), the layers' step time with and without the
    kernel, their ratio, and whether every row's kernel ran and checked out."""
    totals: dict[str, dict[str, dict[str, Any]]] = {}
    for kind in KINDS:
        for part, members in PART_ROWS[kind].items():
            chosen = [r for r in rows if r["kind"] == kind and r["part"] in members]
            if not chosen:
                continue
            plain = sum(r["plain_ms"] * r["blocks"] for r in chosen)
            kernel = sum(r["kernel_ms"] * r["blocks"] for r in chosen)
            sound = all(r["kernel_ran"] and r["error"] is None for r in chosen)
            totals.setdefault(kind, {})[part] = {"plain_ms": plain, "kernel_ms": kernel,
                                                 "ratio": plain / kernel if sound else None, "sound": sound}
    return totals


def chosen_parts(report: dict[str, Any], kind: str) -> list[str]:
    """The parts whose layers the ``kind`` kernel made faster by :data:`MARGIN` or more, with values
    that checked out."""
    margin = BLOCK_MARGIN if kind == "norm" else MARGIN
    return [part for part, total in report.get("parts", {}).get(kind, {}).items()
            if total["sound"] and total["ratio"] >= margin]


def choice_arguments(report: dict[str, Any]) -> list[str]:
    """``gpu_step.py``'s arguments for the kernels the report chose (none if none)."""
    arguments = []
    for kind, flag in KINDS.items():
        parts = chosen_parts(report, kind)
        if parts:
            arguments += [flag, ",".join(parts)]
    return arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    gpu_step.add_layer_arguments(parser)
    parser.add_argument("--choice-from", type=Path, metavar="JSON",
                        help="only print gpu_step.py's --our-mlp-kernel / --our-qkv-kernel / --our-norm-kernel "
                             "arguments for the parts this report chose (nothing if none)")
    args = parser.parse_args(argv)
    if args.choice_from:
        print(" ".join(choice_arguments(json.loads(args.choice_from.read_text()))))
        return 0
    device = torch.device(args.device)
    shapes = gpu_step.SMALL if args.small else gpu_step.HUGE
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "preset": shapes.preset, "compiled": not args.no_compile,
              "dtype": "bf16 autocast", "margin": MARGIN, "block_margin": BLOCK_MARGIN, "tolerance": TOLERANCE}
    measure(shapes, device, args.warmup, args.repeats, not args.no_compile, report, args.json)
    for kind, parts in report["parts"].items():
        for part, total in parts.items():
            ratio = f"{total['ratio']:.3f}" if total["ratio"] else "- (the kernel did not run or its values differ)"
            print(f"{kind} {part:<14} per step: plain {total['plain_ms']:.2f} ms, kernel {total['kernel_ms']:.2f} ms, "
                  f"ratio {ratio}")
    print(f"chosen: {' '.join(choice_arguments(report)) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
