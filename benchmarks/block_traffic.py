"""Memory traffic of the transformer blocks of parts (a)-(c) in one training step, ours and timm's.

On the H100 (run 1, ``benchmarks/RESULTS.md``) our compiled SwinV2-H ran at 28.8% MFU, ViT-L/4
at 54.4% and the fusion at 52.5%, level with timm's, while their matmuls ran at about the
measured matmul peak. The rest of the kernel time goes to kernels bound by memory, whose cost
is the bytes they move. This compiles one block of each kind (for SwinV2-H: of each stage and
shift) with inductor on this CPU (forward and backward, bf16 autocast, SwinV2-H's heads padded
to 48 as on CUDA), adds up the bytes every kernel of the graphs reads and writes (inductor's
own count, ``graph.count_bytes``), and scales them to the part's step in ``gpu_step.py``
(SwinV2-H: batch 8 at 512 x 512; ViT-L/4: 256 frames of 257 tokens; fusion: 2048 sequences of
32 tokens; 24 blocks each). Each block is measured at two batches: the difference is the
traffic per token (activations), the rest is fixed (weights and their gradients), so the
scaling does not multiply the weights' traffic by the batch.

Kernels are split three ways: matmuls (inductor's extern kernels other than attention),
attention (SDPA; where inductor writes it on the CPU as batched matmuls around a softmax, as
for SwinV2's masked windows, it moves the attention matrices through memory, unlike CUDA's
fused kernels, so that share is larger here than on a GPU) and the generated element-wise and
reduction kernels (norms, GELU, residual adds, casts, copies). Inductor's CPU and Triton
backends fuse mostly alike, but not identically.

With ``--plan h100`` the count is of inductor's plan for the H100 instead of the CPU's:
inductor writes Triton kernels, as it does for CUDA, built for sm_90 (Triton's compiler is told
that target, as no GPU is here), and nothing runs (the kernels are not executable on the CPU;
the backward graph is compiled with the forward one). The fusion decisions are then the Triton
backend's, though the tensors still live on the CPU, so SDPA is the CPU's operator. With
``--attention short`` our blocks run attention through the short-sequence kernels
(:mod:`skysense.models.short_attention`), counted as opaque operators that read their inputs
and write their outputs once.

    PYTHONPATH=src python benchmarks/block_traffic.py                 # every part, about 12 minutes on 2 cores
    PYTHONPATH=src python benchmarks/block_traffic.py --parts vit,fusion
    PYTHONPATH=src python benchmarks/block_traffic.py --plan h100 --attention short --parts swin_v2
    PYTHONPATH=src python benchmarks/block_traffic.py --plan h100 --attention short --parts fusion --kernels
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # a cached graph reports no counts

import torch  # noqa: E402
import torch._inductor.metrics as metrics  # noqa: E402
from torch._inductor.scheduler import ExternKernelSchedulerNode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_step  # noqa: E402  (beside this file: the parts' shapes)

from skysense.config import preset_config  # noqa: E402
from skysense.models import swin_v2  # noqa: E402
from skysense.models.attention import set_attention_backends  # noqa: E402
from skysense.models.gelu_bias import set_mlp_kernel  # noqa: E402
from skysense.models.qkv_gradient import set_qkv_kernel  # noqa: E402
from skysense.models.residual_norm import set_norm_kernel  # noqa: E402
from skysense.models.layers import TransformerBlock  # noqa: E402

# Set by --plan h100 (see plan_for_h100): the forward call stops at the first kernel launch.
PLAN_ONLY = False
# Our operators are named in full ("skysense.short_attention_qkv"): the GELU's is element-wise.
ATTENTION_ORIGINS = {"skysense.short_attention", "skysense.short_attention_backward", "skysense.short_attention_qkv",
                     "skysense.short_attention_qkv_backward", "skysense.explicit_attention", "bmm", "amax", "_softmax", "_softmax_backward_data", "_scaled_dot_product_flash_attention_for_cpu",
                     "_scaled_dot_product_flash_attention_for_cpu_backward"}
KINDS = ("matmul", "attention", "element-wise")
# Our element-wise operators, opaque to inductor under the plan (so extern kernels, not matmuls).
ELEMENTWISE_ORIGINS = {"skysense.gelu_bias_backward", "skysense.qkv_gradient", "skysense.residual_norm_backward"}


def _origins(node) -> set[str]:
    names = set()
    for inner in node.get_nodes():
        for origin in getattr(inner.node, "origins", ()) or ():
            target = str(origin.target).replace("aten.", "")
            names.add(".".join(target.split(".")[:2]) if target.startswith("skysense.") else target.split(".")[0])
    return names


def _kind(node) -> str:
    origins = _origins(node)
    if origins & ATTENTION_ORIGINS:
        return "attention"
    if origins & ELEMENTWISE_ORIGINS:
        return "element-wise"
    return "matmul" if isinstance(node, ExternKernelSchedulerNode) else "element-wise"


def plan_for_h100() -> None:
    """Make inductor plan Triton kernels for an H100 without one: Triton's driver reports sm_90,
    inductor's CPU code is Triton, its kernels are generated but not built or run, and the
    backward graph is compiled with the forward one. The short-sequence kernels become opaque
    operators (their Triton code cannot be traced for a device that is not here). Call it
    before anything registers those operators."""
    global PLAN_ONLY
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    import triton
    from torch._inductor.runtime import triton_heuristics
    from triton.backends.compiler import GPUTarget

    from skysense.models import short_attention

    class H100Target:
        def get_current_target(self) -> GPUTarget:
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self) -> torch.device:
            return torch.device("cuda")

        def __getattr__(self, name: str):
            raise AttributeError(f"no GPU here: the H100 plan has no driver attribute {name!r}")

    if short_attention._short_attention is not None:
        raise RuntimeError("plan_for_h100: call it before the short-sequence operators are registered")
    triton.runtime.driver.set_active(H100Target())
    short_attention.interpreted = lambda: True
    inductor_config.cpu_backend = "triton"
    inductor_config.compile_threads = 1
    triton_heuristics.CachingAutotuner.precompile = lambda self, *args, **kwargs: None
    functorch_config.force_non_lazy_backward_lowering = True
    PLAN_ONLY = True


def _swin_block(implementation: str, config, dim: int, heads: int, side: int, shifted: bool) -> torch.nn.Module:
    """A SwinV2 block of ``config`` (a SwinV2Config) at width ``dim``, ours or timm's."""
    from timm.models.swin_transformer_v2 import SwinTransformerV2Block

    window = config.window_size
    if implementation == "skysense":
        return swin_v2.SwinV2Block(dim, heads, window, shifted, config.mlp_ratio, 0.0, config.norm_eps, False)
    return SwinTransformerV2Block(dim, (side, side), heads, window, shift_size=window // 2 if shifted else 0,
                                  mlp_ratio=config.mlp_ratio,
                                  norm_layer=functools.partial(torch.nn.LayerNorm, eps=config.norm_eps))


def _vit_block(implementation: str, config) -> torch.nn.Module:
    """A pre-norm block of ``config`` (a ViT or fusion config), ours or timm's."""
    from timm.models.vision_transformer import Block

    dim, heads, ratio, eps = config.embed_dim, config.num_heads, config.mlp_ratio, config.norm_eps
    if implementation == "skysense":
        return TransformerBlock(dim, heads, ratio, 0.0, eps)
    return Block(dim, heads, ratio, qkv_bias=True, norm_layer=functools.partial(torch.nn.LayerNorm, eps=eps))


def block_bytes(block: torch.nn.Module, x: torch.Tensor, attention: list[str] | None = None,
                mlp_kernel: bool = False, qkv_kernel: bool = False, norm_kernel: bool = False) -> dict[str, float]:
    """Bytes moved by kind in one compiled forward and backward of ``block`` on ``x``, its
    attention run by ``attention`` (names of skysense's backends; None: torch's choice), its
    MLP's GELU backward by :func:`skysense.models.gelu_bias.bias_gelu` if ``mlp_kernel``, its
    qkv gradient by :func:`skysense.models.qkv_gradient.split_qkv`'s kernel if ``qkv_kernel``,
    its residual junctions by :mod:`skysense.models.residual_norm`'s kernel if ``norm_kernel``."""
    set_attention_backends(block, attention)  # timm's blocks have none of these settings
    set_mlp_kernel(block, mlp_kernel)
    set_qkv_kernel(block, qkv_kernel)
    set_norm_kernel(block, norm_kernel)
    x = x.detach().requires_grad_()
    torch._dynamo.reset()
    metrics.reset()
    compiled = torch.compile(block.train(), fullgraph=True, dynamic=False)
    if PLAN_ONLY:
        try:  # both graphs are compiled before the first kernel would run
            with torch.autocast("cpu", dtype=torch.bfloat16):
                compiled(x)
        except IndexError as error:  # the first launch finds no built kernel: anything else is a real error
            if not any("triton_heuristics" in frame.filename for frame in traceback.extract_tb(error.__traceback__)):
                raise
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = compiled(x)
        out.float().square().mean().backward()
    totals = dict.fromkeys(KINDS, 0.0)
    for node, words in metrics.nodes_num_elem:  # inductor stores bytes // 4
        totals[_kind(node)] += 4 * words
    if not any(totals.values()):
        raise RuntimeError("inductor counted no bytes: were the graphs loaded from a cache?")
    return totals


def kernel_rows() -> list[tuple[float, str, str, str]]:
    """The kernels of the last :func:`block_bytes` call: bytes moved, kind, inductor's name for
    it, and the dtype and shape of each buffer it writes (a weight's shape marks traffic that is
    fixed per step: its cast to bf16, its gradient's to float32)."""
    rows = []
    for node, words in metrics.nodes_num_elem:
        outputs = []
        for inner in node.get_nodes():
            try:
                dtype, size = inner.node.get_dtype(), tuple(int(v) for v in inner.node.get_size())
            except (AttributeError, NotImplementedError, TypeError):  # a node without one layout (a multi-output op)
                continue
            outputs.append(f"{str(dtype).replace('torch.', '')}{list(size)}")
        rows.append((4.0 * words, _kind(node), node.get_name(), " ".join(outputs)))
    return rows


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


# A block of a part: label, blocks of it per step, its width, tokens per measured batch, tokens
# per step, and how to measure it at batch 1 and 2 ((implementation, batch) -> bytes by kind).
Row = tuple[str, int, int, int, int, Callable[[str, int], dict[str, float]]]


def part_blocks(part: str, max_side: int, shapes: "gpu_step.Shapes" = gpu_step.HUGE,
                attention: list[str] | None = None, mlp_kernel: bool = False,
                qkv_kernel: bool = False, norm_kernel: bool = False) -> Iterator[Row]:
    """The blocks of part (a) ``swin_v2``, (b) ``vit`` or (c) ``fusion`` at ``shapes`` (gpu_step.py's),
    ours with ``attention``, ``mlp_kernel``, ``qkv_kernel`` and ``norm_kernel`` (see :func:`block_bytes`)."""
    config = preset_config(shapes.preset)
    if part == "swin_v2":
        hr = config.hr
        for stage, (depth, heads) in enumerate(zip(hr.depths, hr.num_heads)):
            dim = hr.embed_dim * 2**stage
            side = shapes.swin_image // hr.patch_size // 2**stage
            measured = min(side, max_side)
            for shifted in (False, True):
                if shifted and side <= hr.window_size:
                    continue
                blocks = (depth + (0 if shifted else 1)) // 2  # blocks 0, 2, ... unshifted; 1, 3, ... shifted

                def measure(name: str, batch: int, dim=dim, heads=heads, measured=measured, shifted=shifted):
                    torch.manual_seed(0)
                    block = _swin_block(name, hr, dim, heads, measured, shifted)
                    return block_bytes(block, torch.randn(batch, measured, measured, dim), attention, mlp_kernel,
                                       qkv_kernel, norm_kernel)

                label = f"stage {stage + 1} {dim}x{side}x{side}{' shifted' if shifted else ''}"
                yield label, blocks, dim, measured * measured, shapes.swin_batch * side * side, measure
        return
    if part not in ("vit", "fusion"):
        raise ValueError(f"unknown part {part!r}; expected swin_v2, vit or fusion")
    if part == "vit":  # a class token and (image / patch)^2 patches per frame
        block_config, sequences, measured = config.s2, shapes.vit_batch, 16
        tokens = (shapes.vit_image // config.s2.patch_size) ** 2 + 1
    else:
        block_config, tokens, sequences, measured = config.fusion, shapes.fusion_tokens, shapes.fusion_batch, 64

    def measure(name: str, batch: int):
        torch.manual_seed(0)
        return block_bytes(_vit_block(name, block_config), torch.randn(batch * measured, tokens, block_config.embed_dim),
                           attention, mlp_kernel, qkv_kernel, norm_kernel)

    yield (f"{block_config.embed_dim} wide, {tokens} tokens", block_config.depth, block_config.embed_dim,
           measured * tokens, sequences * tokens, measure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="swin_v2,vit,fusion", help="comma-separated: swin_v2, vit, fusion")
    parser.add_argument("--max-side", type=int, default=64,
                        help="largest SwinV2 map compiled on this CPU (default 64; part (a)'s first stage is 128)")
    parser.add_argument("--plan", choices=("cpu", "h100"), default="cpu",
                        help="count inductor's plan for this CPU (compiled and run) or for an H100 (Triton "
                             "kernels generated for sm_90, nothing run; see the module's docstring)")
    parser.add_argument("--kernels", action="store_true",
                        help="also list the kernels of each of our blocks as compiled at batch 2: bytes per "
                             "element of its input, kind, and the buffers each writes")
    parser.add_argument("--attention", choices=("sdpa", "short"), default="sdpa",
                        help="our blocks' attention: SDPA, or the short-sequence kernels (needs --plan h100)")
    parser.add_argument("--mlp-kernel", action="store_true",
                        help="our MLPs' GELU backward and first bias gradient in one kernel (needs --plan h100)")
    parser.add_argument("--qkv-kernel", action="store_true",
                        help="our attention layers' qkv gradient and its bias's in one kernel where SDPA runs "
                             "(needs --plan h100)")
    parser.add_argument("--norm-kernel", action="store_true",
                        help="our pre-norm blocks' residual junctions (norms, residual adds, the projections' "
                             "bias gradients) in one backward kernel each (needs --plan h100)")
    args = parser.parse_args(argv)
    if args.attention == "short" and args.plan != "h100":
        parser.error("--attention short: the short-sequence kernels run on CUDA only; count them with --plan h100")
    for flag, on in (("--mlp-kernel", args.mlp_kernel), ("--qkv-kernel", args.qkv_kernel),
                     ("--norm-kernel", args.norm_kernel)):
        if on and args.plan != "h100":
            parser.error(f"{flag}: the kernel runs on CUDA only; count it with --plan h100")
    if args.plan == "h100":
        plan_for_h100()
    attention = ["short"] if args.attention == "short" else None
    _quiet_metrics_log()
    swin_v2.fused_head_multiple = lambda device: 8  # SwinV2-H's 44-wide heads run 48 wide, as on CUDA
    print(f"fwd + bwd, bf16 autocast, scaled to gpu_step.py's huge shapes: bytes per element of a block's input "
          f"(the weights' fixed traffic included); inductor's plan for {'an H100' if args.plan == 'h100' else 'this CPU'}, "
          f"our attention {args.attention}")
    print(f"{'part':<8} {'block':<28} {'impl':>9} " + " ".join(f"{k:>12}" for k in KINDS) + f" {'total':>7}")
    for part in args.parts.split(","):
        step = {name: dict.fromkeys(KINDS, 0.0) for name in ("skysense", "timm")}
        for label, blocks, dim, tokens, step_tokens, measure in part_blocks(part.strip(), args.max_side,
                                                                                  attention=attention,
                                                                                  mlp_kernel=args.mlp_kernel,
                                                                                  qkv_kernel=args.qkv_kernel,
                                                                                  norm_kernel=args.norm_kernel):
            for name in step:
                moved = scaled_bytes(functools.partial(measure, name), tokens, step_tokens)
                elements = step_tokens * dim
                for kind, value in moved.items():
                    step[name][kind] += value * blocks
                print(f"{part:<8} {label:<28} {name:>9} " + " ".join(f"{moved[k] / elements:>12.1f}" for k in KINDS)
                      + f" {sum(moved.values()) / elements:>7.1f}")
                if args.kernels and name == "skysense":  # scaled_bytes' last call: batch 2
                    for moved_bytes, kind, kernel, outputs in kernel_rows():
                        if moved_bytes >= tokens * dim:  # half a byte per element or more
                            print(f"{'':<8} {moved_bytes / (2 * tokens * dim):>7.1f} {kind:<12} {kernel:<24} {outputs}")
        for name, kinds in step.items():
            print(f"{part:<8} per step (GB) {name:>23} " + " ".join(f"{v / 1e9:>12.1f}" for v in kinds.values())
                  + f" {sum(kinds.values()) / 1e9:>7.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
