"""Compiled SwinV2 training step on the CPU: the position-bias MLP's ReLU out of place (the
reference) against :class:`skysense.models.swin_v2.CompiledInPlaceReLU` (in place when compiled).

Out of place, inductor's CPU code stores a boolean mask of the ReLU in the forward pass with a
slow kernel; in place it does not. Both variants are built from the same seed, compiled block by
block (``compile_blocks``), and timed in this one process over forward + backward of the four
pyramid levels. The values must agree: outputs exactly, gradients within float rounding.

    PYTHONPATH=src python benchmarks/position_bias_relu.py            # tiny, batch 4 at 64 px, about 2 minutes
    PYTHONPATH=src python benchmarks/position_bias_relu.py --steps 50 --image 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # each variant compiles its own graphs

import torch  # noqa: E402
from torch import nn  # noqa: E402

from skysense.compilation import compile_blocks  # noqa: E402
from skysense.config import preset_config  # noqa: E402
from skysense.models.swin_v2 import CompiledInPlaceReLU, SwinTransformerV2, SwinV2Block  # noqa: E402


def run(variant: str, preset: str, batch: int, image: int, steps: int
        ) -> tuple[list[float], list[torch.Tensor], list[torch.Tensor]]:
    """Step times (s), the pyramid's outputs and the gradients of one compiled variant."""
    torch.manual_seed(0)
    model = SwinTransformerV2(preset_config(preset).hr).train()
    for module in model.modules():
        if isinstance(module, CompiledInPlaceReLU) and variant == "out of place":
            module.forward = nn.ReLU().forward  # type: ignore[method-assign]
    x = torch.randn(batch, 3, image, image, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    compile_blocks(model, (SwinV2Block,))

    def step() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        out = model.forward_pyramid(x)
        sum(o.square().mean() for o in out).backward()
        return out

    for _ in range(3):  # compiles
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = step()
        times.append(time.perf_counter() - start)
    return times, [o.detach() for o in out], [p.grad for p in model.parameters() if p.grad is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--image", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {v: run(v, args.preset, args.batch, args.image, args.steps) for v in ("out of place", "ours")}
    print(f"compiled SwinV2 ({args.preset}, batch {args.batch}, {args.image} px, {args.threads} threads), "
          f"forward + backward, {args.steps} steps; torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}")
    for variant, (times, _, _) in results.items():
        print(f"  ReLU {variant:<12} median {1e3 * statistics.median(times):6.1f} ms, fastest {1e3 * min(times):6.1f} ms")
    (reference, old_out, old_grads), (ours, new_out, new_grads) = results["out of place"], results["ours"]
    print(f"  ratio (out of place / ours, medians): {statistics.median(reference) / statistics.median(ours):.2f}")
    same_outputs = all(torch.equal(a, b) for a, b in zip(old_out, new_out))
    gradient_error = max((a - b).abs().max().item() for a, b in zip(old_grads, new_grads))
    print(f"  outputs identical: {same_outputs}; largest gradient difference: {gradient_error:.1e}")
    return 0 if same_outputs and gradient_error < 1e-6 else 1


if __name__ == "__main__":
    raise SystemExit(main())
