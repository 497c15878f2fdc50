"""SwinV2-H's window attention layers, SDPA against the short-sequence Triton kernel, one run.

Part (a) of issue 7 (SwinV2-H, batch 8 at 512 x 512) spends about half its kernel time on
memory-bound work (``benchmarks/RESULTS.md``). Its windows hold 64 tokens of heads 44 wide:
the SDPA path pads q, k and v to 48 columns, materialises the position bias plus the shift mask
for every window and head in shifted blocks, slices the output back and transposes it for the
projection. ``attention_backends: [short]`` runs the layer through
:mod:`skysense.models.short_attention` instead, which adds the bias and the mask in the kernel,
takes the heads unpadded and writes the layout the projection reads.

This times one compiled ``WindowAttentionV2`` (qkv projection, cosine attention, output
projection) forward + backward, bf16 autocast, for each stage of SwinV2-H and each kind of
block (shifted or not), with both settings in the same process, and adds the times up as the
24 blocks of one training step run them. The ratio is SDPA's step time over the kernel's.

    python benchmarks/swin_attention.py --json swin_attention.json     # CUDA, SwinV2-H shapes
    python benchmarks/swin_attention.py --device cpu --small           # a CPU smoke run

On the CPU the kernel does not run (the "short" setting falls back to SDPA, and the report
says so in ``short_ran``); only a GPU can say what it gives.
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
from skysense.models import short_attention, swin_v2  # noqa: E402
from skysense.models.attention import set_attention_backends  # noqa: E402

SETTINGS: dict[str, list[str] | None] = {"sdpa": None, "short": ["short"]}


def layer_shapes(shapes: gpu_step.Shapes) -> list[dict[str, Any]]:
    """One row per stage and block kind: width, heads, map side, windows, blocks per step."""
    config = preset_config(shapes.preset).hr
    rows = []
    side = shapes.swin_image // config.patch_size
    for stage, (depth, heads) in enumerate(zip(config.depths, config.num_heads)):
        dim = config.embed_dim * 2**stage
        shift_possible = side > config.window_size
        for shifted in (False, True):
            blocks = (depth + (0 if shifted else 1)) // 2 if shift_possible else (depth if not shifted else 0)
            if blocks:
                rows.append({"stage": stage, "shifted": shifted, "dim": dim, "heads": heads, "side": side,
                             "window": config.window_size, "blocks": blocks})
        side //= 2
    return rows


def _inputs(row: dict[str, Any], batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's input windows (B, nW, w*w, C) of the padded map, and its shift mask or None."""
    window = row["window"]
    padded = row["side"] + -row["side"] % window
    x = torch.randn(batch, (padded // window) ** 2, window * window, row["dim"], device=device)
    mask = swin_v2.shifted_window_mask(padded, padded, window, window // 2, device) if row["shifted"] else None
    return x, mask


def time_layer(row: dict[str, Any], setting: str, batch: int, device: torch.device, warmup: int,
               repeats: int, compile_layer: bool) -> dict[str, Any]:
    """Median seconds of one forward + backward of the layer, and whether the kernel took it."""
    torch.manual_seed(0)
    layer = swin_v2.WindowAttentionV2(row["dim"], row["heads"], row["window"]).to(device)
    set_attention_backends(layer, SETTINGS[setting])
    x, mask = _inputs(row, batch, device)
    x.requires_grad_()
    b, nw, n, c = x.shape
    d = c // row["heads"]
    probe = torch.empty(b * nw, row["heads"], n, d, device=device, dtype=torch.bfloat16)
    bias = torch.empty(row["heads"], n, n, device=device, dtype=torch.bfloat16)
    ran = setting == "short" and short_attention.supports(probe, probe, probe, None, bias, mask)
    torch.compiler.reset()  # a fresh layer each time: no recompilation limit to run into
    run = torch.compile(layer) if compile_layer else layer
    gradient = torch.randn(x.shape, device=device, dtype=torch.bfloat16)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = run(x, mask)
        out.backward(gradient)
        x.grad = None
        for p in layer.parameters():
            p.grad = None

    times = gpu_step.time_steps(step, device, warmup, repeats)
    return {"seconds": statistics.median(times), "short_ran": ran}


def measure(shapes: gpu_step.Shapes, device: torch.device, warmup: int, repeats: int, compile_layer: bool,
            report: dict[str, Any], json_path: Path | None = None) -> dict[str, Any]:
    """Every layer shape under both settings into ``report["rows"]``, then the step totals; the
    report is rewritten to ``json_path`` after every row, so a run cut short keeps its rows."""
    rows = report.setdefault("rows", [])
    for row in layer_shapes(shapes):
        for setting in SETTINGS:
            timed = time_layer(row, setting, shapes.swin_batch, device, warmup, repeats, compile_layer)
            rows.append({**row, "setting": setting, "ms": 1e3 * timed["seconds"], "short_ran": timed["short_ran"]})
            print(f"stage {row['stage']} {'shifted' if row['shifted'] else 'plain  '} x{row['blocks']:<2} "
                  f"{setting:<5} {rows[-1]['ms']:8.3f} ms{'' if setting == 'sdpa' or timed['short_ran'] else ' (SDPA ran)'}",
                  flush=True)
            if json_path:
                gpu_step.write_json(report, json_path)
    totals = {s: sum(r["ms"] * r["blocks"] for r in rows if r["setting"] == s) for s in SETTINGS}
    report.update({"step_ms": totals, "ratio_sdpa_over_short": totals["sdpa"] / totals["short"],
                   "short_ran_everywhere": all(r["short_ran"] for r in rows if r["setting"] == "short")})
    if json_path:
        gpu_step.write_json(report, json_path)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    gpu_step.add_layer_arguments(parser)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shapes = gpu_step.SMALL if args.small else gpu_step.HUGE
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "preset": shapes.preset, "batch": shapes.swin_batch,
              "image": shapes.swin_image, "compiled": not args.no_compile, "dtype": "bf16 autocast"}
    measure(shapes, device, args.warmup, args.repeats, not args.no_compile, report, args.json)
    print(f"one step's window attention: SDPA {report['step_ms']['sdpa']:.2f} ms, short {report['step_ms']['short']:.2f} "
          f"ms, ratio {report['ratio_sdpa_over_short']:.3f}"
          f"{'' if report['short_ran_everywhere'] else ' (the kernel did not take every layer: SDPA ran there)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
