"""Memory traffic of SwinV2-H's blocks in one training step, ours and timm's, as inductor counts it.

Part (a) of ``gpu_step.py`` ran our SwinV2-H at 28.8% MFU on the H100 and timm's at 30.1%, with
kernels busy 100.8 ms of a 132.4 ms step (``benchmarks/RESULTS.md``). Its matmuls alone need
about 40 ms at the measured matmul peak, so most kernel time is elsewhere: in kernels bound by
memory, whose cost is the bytes they move. This compiles one block of each stage and shift
with inductor on this CPU (forward and backward, bf16 autocast, heads padded to 48 as on CUDA),
adds up the bytes every kernel of the graphs reads and writes (inductor's own count,
``graph.count_bytes``), and scales them to part (a)'s step: batch 8 at 512 x 512, the blocks
of each stage. Each block is measured at batches 1 and 2: the difference is the traffic per
token (activations), the rest is fixed (weights and their gradients), so the scaling does not
multiply the weights' traffic by the batch.

Kernels are split three ways: matmuls (inductor's extern kernels other than attention),
attention (SDPA; on the CPU inductor writes it as two batched matmuls around a softmax, which
moves the attention matrices through memory, unlike CUDA's fused kernels: this share is
larger here than on a GPU) and the generated element-wise and reduction kernels. Inductor's
CPU and Triton backends fuse mostly alike, but not identically.

    PYTHONPATH=src python benchmarks/swin_traffic.py            # about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # a cached graph reports no counts

import torch  # noqa: E402
import torch._inductor.metrics as metrics  # noqa: E402
from torch._inductor.scheduler import ExternKernelSchedulerNode  # noqa: E402

from skysense.config import preset_config  # noqa: E402
from skysense.models import swin_v2  # noqa: E402

ATTENTION_ORIGINS = {"bmm", "amax", "_softmax", "_softmax_backward_data", "_scaled_dot_product_flash_attention_for_cpu",
                     "_scaled_dot_product_flash_attention_for_cpu_backward"}
KINDS = ("matmul", "attention", "element-wise")


def _origins(node) -> set[str]:
    names = set()
    for inner in node.get_nodes():
        for origin in getattr(inner.node, "origins", ()) or ():
            names.add(str(origin.target).replace("aten.", "").split(".")[0])
    return names


def _kind(node) -> str:
    origins = _origins(node)
    if origins & ATTENTION_ORIGINS:
        return "attention"
    return "matmul" if isinstance(node, ExternKernelSchedulerNode) else "element-wise"


def block_bytes(implementation: str, dim: int, heads: int, window: int, side: int, shifted: bool,
                batch: int) -> dict[str, float]:
    """Bytes moved by kind in one compiled forward and backward of a block on a (batch, side,
    side, dim) input."""
    from timm.models.swin_transformer_v2 import SwinTransformerV2Block

    torch.manual_seed(0)
    if implementation == "skysense":
        block = swin_v2.SwinV2Block(dim, heads, window, shifted, 4.0, 0.0, 1e-5, False)
    else:
        block = SwinTransformerV2Block(dim, (side, side), heads, window, shift_size=window // 2 if shifted else 0)
    x = torch.randn(batch, side, side, dim, requires_grad=True)
    torch._dynamo.reset()
    metrics.reset()
    compiled = torch.compile(block.train(), fullgraph=True, dynamic=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(x)
    out.float().square().mean().backward()
    totals = dict.fromkeys(KINDS, 0.0)
    for node, words in metrics.nodes_num_elem:  # inductor stores bytes // 4
        totals[_kind(node)] += 4 * words
    if not any(totals.values()):
        raise RuntimeError("inductor counted no bytes: were the graphs loaded from a cache?")
    return totals


def scaled_bytes(measure: Callable[[int], dict[str, float]], tokens: int, step_tokens: int) -> dict[str, float]:
    """Bytes by kind at ``step_tokens`` tokens, from ``measure(batch)`` at batches 1 and 2 of
    ``tokens`` tokens each: fixed part plus per-token part."""
    one, two = measure(1), measure(2)
    return {kind: one[kind] + (two[kind] - one[kind]) / tokens * (step_tokens - tokens) for kind in one}


def _quiet_metrics_log() -> None:
    """Make inductor count bytes (it does when its metrics log is on) without printing them."""
    from torch._inductor.compile_fx import inductor_metrics_log

    inductor_metrics_log.setLevel(logging.INFO)
    inductor_metrics_log.propagate = False
    inductor_metrics_log.handlers = [logging.NullHandler()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-side", type=int, default=64,
                        help="largest map compiled on this CPU (default 64; part (a)'s first stage is 128)")
    parser.add_argument("--batch", type=int, default=8, help="images per step scaled to (default 8, part (a)'s)")
    parser.add_argument("--image", type=int, default=512, help="image side scaled to (default 512)")
    args = parser.parse_args(argv)
    _quiet_metrics_log()
    swin_v2.fused_head_multiple = lambda device: 8  # SwinV2-H's 44-wide heads run 48 wide, as on CUDA
    config = preset_config("huge").hr
    step = {name: dict.fromkeys(KINDS, 0.0) for name in ("skysense", "timm")}
    print(f"SwinV2-H blocks, fwd + bwd, bf16 autocast, scaled to batch {args.batch} at {args.image} x {args.image}: "
          f"bytes per element of a block's input (the weights' fixed traffic included)")
    print(f"{'stage':>5} {'dim':>5} {'map':>5} {'shift':>5} {'impl':>9} " + " ".join(f"{k:>12}" for k in KINDS)
          + f" {'total':>7}")
    for stage, (depth, heads) in enumerate(zip(config.depths, config.num_heads)):
        dim = config.embed_dim * 2**stage
        side = args.image // config.patch_size // 2**stage
        measured = min(side, args.max_side)
        elements = args.batch * side * side * dim
        for shifted in (False, True):
            blocks = (depth + (0 if shifted else 1)) // 2  # blocks 0, 2, ... unshifted; 1, 3, ... shifted
            if shifted and side <= config.window_size:
                continue
            for name in step:
                def measure(batch: int) -> dict[str, float]:
                    return block_bytes(name, dim, heads, config.window_size, measured, shifted, batch)

                moved = scaled_bytes(measure, measured * measured, args.batch * side * side)
                counts = {kind: value / elements for kind, value in moved.items()}
                for kind, value in moved.items():
                    step[name][kind] += value * blocks
                print(f"{stage + 1:>5} {dim:>5} {side:>5} {shifted!s:>5} {name:>9} "
                      + " ".join(f"{counts[k]:>12.1f}" for k in KINDS) + f" {sum(counts.values()):>7.1f}")
    print("per step (GB): " + "; ".join(
        f"{name} " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in kinds.items()) + f", total {sum(kinds.values()) / 1e9:.1f}"
        for name, kinds in step.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
