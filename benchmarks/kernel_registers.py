"""Registers and spills of the short-sequence kernels as built for the H100, without a GPU.

Triton's compiler builds :mod:`skysense.models.short_attention`'s forward and backward kernels
for sm_90 (bf16, the switches of each call below), and the ``ptxas`` Triton ships assembles
them with ``-v``, which reports the registers a thread uses and the bytes it spills to local
memory when 255 are not enough. A spilled value goes out to memory and back in the kernel's
inner loop, so fewer spills is the aim; how much time that saves only a GPU can say.

The calls: the fusion's (32 tokens, 64-wide heads, a key-padding mask) and SwinV2-H's windows
(64 tokens, 44-wide heads in 64 columns, the position bias and the cosine normalisation with
their gradients, the shift mask in shifted blocks) at part (a)'s batch (``gpu_step.py``), whose
backward programs each add up the bias gradient of ``GROUP`` windows (``_bias_group``).

    PYTHONPATH=src python benchmarks/kernel_registers.py          # about a minute on 2 cores
    PYTHONPATH=src python benchmarks/kernel_registers.py --warps 4,8
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_step  # noqa: E402  (beside this file: the parts' shapes)

from skysense.config import preset_config  # noqa: E402
from skysense.models import gelu_bias, qkv_gradient, residual_norm, short_attention  # noqa: E402

POINTER_TYPES = {"mask_ptr": "*i8", "lse_ptr": "*fp32", "window_ptr": "*fp32", "dbias_ptr": "*fp32",
                 "cos_ptr": "*fp32", "dcos_ptr": "*fp32", "dqkvb_ptr": "*fp32"}
# The bias-gradient kernels' float32 pointers: the MLP's bias, and the partial sums of both.
BIAS_KERNEL_POINTERS = {"bias_ptr": "*fp32", "partial_ptr": "*fp32"}
# The residual junctions' kernel (skysense.models.residual_norm) under bf16 autocast: the residual
# stream, its gradients, the norm's weight and the sums float32; the branch, its scale and the
# norm's output gradient bf16.
NORM_KERNEL_POINTERS = {"x_ptr": "*fp32", "dres_ptr": "*fp32", "dx_ptr": "*fp32", "weight_ptr": "*fp32",
                        "partial_ptr": "*fp32"}
# Its three junctions of a pre-norm block (layer_norm_residual, branch_layer_norm, branch_add),
# with stochastic depth, at the ViTs' and the fusion's width 1024.
NORM_JUNCTIONS = {
    "LN1 junction": {"NORM": True, "ADDED": False, "BRANCH": False, "SCALE": False, "RESIDUAL": True, "SUMS": 2},
    "LN2 junction": {"NORM": True, "ADDED": True, "BRANCH": True, "SCALE": True, "RESIDUAL": True, "SUMS": 3},
    "output add": {"NORM": False, "ADDED": False, "BRANCH": True, "SCALE": True, "RESIDUAL": True, "SUMS": 1},
}
# Arguments that are float32 scalars (the rest, i32).
FLOAT_ARGUMENTS = {"scale", "eps"}


def calls(shapes: gpu_step.Shapes = gpu_step.HUGE) -> dict[str, dict[str, object]]:
    """The kernels' switches for the fusion's call and for SwinV2-H's stages (shifted blocks)."""
    config = preset_config(shapes.preset)
    found = {"fusion": {"HAS_MASK": True, "HAS_BIAS": False, "HAS_WINDOW_MASK": False, "COSINE": False,
                        "BIAS_GRAD": False, "SCALE_GRAD": False, "QKV_BIAS_GRAD": True, "ONE_LAYOUT": True, "GROUP": 1,
                        "BLOCK": short_attention._tile(shapes.fusion_tokens),
                        "WIDTH": short_attention._tile(config.fusion.embed_dim // config.fusion.num_heads)}}
    hr = config.hr
    for stage, heads in enumerate(hr.num_heads):
        side = shapes.swin_image // hr.patch_size // 2**stage
        if side <= hr.window_size:
            continue  # a stage of one window has no shifted block
        windows = shapes.swin_batch * (side // hr.window_size) ** 2
        found[f"swin stage {stage + 1}"] = {
            "HAS_MASK": False, "HAS_BIAS": True, "HAS_WINDOW_MASK": True, "COSINE": True, "BIAS_GRAD": True,
            "SCALE_GRAD": True, "QKV_BIAS_GRAD": False, "ONE_LAYOUT": True,
            "GROUP": short_attention._bias_group(windows, heads),
            "BLOCK": short_attention._tile(hr.window_size**2),
            "WIDTH": short_attention._tile(hr.embed_dim * 2**stage // heads)}
    return found


def build(kernel, switches: dict[str, object], warps: int, pointers: dict[str, str] | None = None) -> dict[str, int]:
    """``kernel`` built for sm_90 in bf16 with ``warps`` warps (pointers bf16 but those of
    :data:`POINTER_TYPES` and ``pointers``): ptxas's registers and spills, and Triton's shared memory."""
    types = {**POINTER_TYPES, **(pointers or {})}
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in kernel.arg_names:
        if name in switches or name.isupper():
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = types.get(name, "*bf16")
        else:
            signature[name] = "fp32" if name in FLOAT_ARGUMENTS else "i32"
    constants = {name: value for name, value in {**switches, "PRECISION": "tf32"}.items() if name in kernel.arg_names}
    missing = [name for name in kernel.arg_names if name.isupper() and name not in constants]
    if missing:
        raise ValueError(f"{kernel.__name__}: no value for the switches {missing}")
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        Path(source).write_text(compiled.asm["ptx"])
        report = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", source, "-o", os.path.join(folder, "kernel.cubin")],
                                capture_output=True, text=True, check=True)
    text = report.stdout + report.stderr
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if registers is None or spills is None:
        raise RuntimeError(f"ptxas -v printed no register or spill count for {kernel.__name__}: {text[-2000:]}")
    return {"registers": int(registers.group(1)), "spill_stores": int(spills.group(1)),
            "spill_loads": int(spills.group(2)), "shared": compiled.metadata.shared}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warps", default="", help="comma-separated warps to build with (default: the library's "
                        "choice, 4 for the forward kernel and short_attention.backward_warps for the backward)")
    args = parser.parse_args(argv)
    if short_attention.triton is None:
        raise SystemExit("kernel_registers: Triton is not installed")
    print(f"{'call':<14} {'kernel':<17} {'GROUP':>5} {'warps':>5} {'registers':>9} {'spill stores':>12} "
          f"{'spill loads':>11} {'shared':>7}")
    for name, switches in calls().items():
        for kernel in (short_attention._forward_kernel, short_attention._backward_kernel):
            default = 4 if kernel is short_attention._forward_kernel else short_attention.backward_warps(switches["BLOCK"])
            for warps in [int(w) for w in args.warps.split(",") if w] or [default]:
                built = build(kernel, switches, warps)
                print(f"{name:<14} {kernel.__name__:<17} {switches['GROUP']:>5} {warps:>5} {built['registers']:>9} "
                      f"{built['spill_stores']:>12} {built['spill_loads']:>11} {built['shared']:>7}")
    # The bias-gradient kernels (skysense.models.gelu_bias, qkv_gradient), with the tiles they launch.
    for name, kernel, switches in (
            ("MLP", gelu_bias._backward_kernel, {"ROWS": gelu_bias.ROWS_PER_PROGRAM, "BLOCK_ROWS": gelu_bias.BLOCK_ROWS,
                                                  "BLOCK_COLS": gelu_bias.BLOCK_COLS}),
            ("qkv", qkv_gradient._assemble_kernel, {"BIAS_GRAD": True, "ROWS": qkv_gradient.ROWS_PER_PROGRAM,
                                                     "BLOCK_ROWS": qkv_gradient.BLOCK_ROWS,
                                                     "BLOCK_COLS": qkv_gradient.BLOCK_COLS})):
        for warps in [int(w) for w in args.warps.split(",") if w] or [4]:
            built = build(kernel, switches, warps, BIAS_KERNEL_POINTERS)
            print(f"{name:<14} {kernel.__name__:<17} {'-':>5} {warps:>5} {built['registers']:>9} "
                  f"{built['spill_stores']:>12} {built['spill_loads']:>11} {built['shared']:>7}")
    width = short_attention.triton.next_power_of_2(preset_config("huge").fusion.embed_dim)
    tile = {"ROWS": residual_norm.ROWS_PER_PROGRAM, "BLOCK_COLS": width,
            "BLOCK_ROWS": max(1, residual_norm.TILE_ELEMENTS // width)}
    for name, switches in NORM_JUNCTIONS.items():
        for warps in [int(w) for w in args.warps.split(",") if w] or [residual_norm.NUM_WARPS]:
            built = build(residual_norm._backward_kernel, {**tile, **switches}, warps, NORM_KERNEL_POINTERS)
            print(f"{name:<14} {'_backward_kernel':<17} {'-':>5} {warps:>5} {built['registers']:>9} "
                  f"{built['spill_stores']:>12} {built['spill_loads']:>11} {built['shared']:>7}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
