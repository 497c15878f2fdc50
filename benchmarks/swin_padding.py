"""Time of a tiny SwinV2 forward+backward with padded tokens attended to (official semantics)
and masked out (``SwinV2Config.mask_padding``, the ``tiny`` preset's setting), in one run.

At the pretraining view sizes the last stages' maps are smaller than the 8 x 8 window (64 px:
4 x 4 and 2 x 2; 32 px: 2 x 2 and 1 x 1). Unmasked, each is padded to a whole window of zeros;
masked, a map that fits in one window is attended without padding. Prints ms per image and the
ratio unmasked / masked for each size.

    python benchmarks/swin_padding.py [--batch 64] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from skysense.config import preset_config
from skysense.models.swin_v2 import SwinTransformerV2


def step_seconds(encoder: SwinTransformerV2, images: torch.Tensor, repeats: int) -> float:
    """Median seconds of one forward + backward over ``images``."""
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        levels = encoder.forward_pyramid(images)
        sum(level.mean() for level in levels).backward()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 160])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = preset_config("tiny").hr
    print(f"tiny SwinV2 (embed {base.embed_dim}, depths {base.depths}, window {base.window_size}), batch "
          f"{args.batch}, forward+backward, {torch.get_num_threads()} threads, median of {args.repeats}")
    print("size | unmasked ms/img | masked ms/img | ratio")
    for size in args.sizes:
        images = torch.randn(args.batch, 3, size, size)
        seconds = {}
        for mask in (False, True):
            torch.manual_seed(0)
            encoder = SwinTransformerV2(dataclasses.replace(base, mask_padding=mask))
            seconds[mask] = step_seconds(encoder, images, args.repeats)
        per = {m: 1000 * s / args.batch for m, s in seconds.items()}
        print(f"{size:4d} | {per[False]:15.2f} | {per[True]:13.2f} | {seconds[False] / seconds[True]:.2f}")


if __name__ == "__main__":
    main()
