"""CPU forward-pass timing of our ViT and SwinV2 encoders against timm's, at equal shapes.

For each requested size (the encoders of the ``tiny`` or ``base`` preset) both implementations
are built with the same architecture, run eagerly in fp32 under ``torch.inference_mode`` after a
warm-up, and timed alternately (ours, timm, ours, ...) so that drifts in machine load hit both;
the median of the repeats is reported. ViTs see (B, 10, 64, 64) Sentinel-2 frames, SwinV2s see
(B, 3, 256, 256) images.

    python benchmarks/encoders.py --sizes tiny,base --repeats 10 --json timings.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from skysense.config import preset_config
from skysense.models.swin_v2 import SwinTransformerV2
from skysense.models.vit import VisionTransformer
from skysense.timm_reference import timm_swin_like, timm_vit_like

# Batch sizes keep the whole default run (both sizes, 10 repeats) under ~3 minutes on 2 cores.
BATCH_SIZES = {"tiny": 8, "base": 2}
SWIN_IMAGE_SIZE = 256
WARMUP = 2


@dataclass
class Timing:
    encoder: str
    size: str
    batch: int
    ours_ms: float
    timm_ms: float

    @property
    def ratio(self) -> float:
        """timm time / our time: above 1 means ours is faster."""
        return self.timm_ms / self.ours_ms


def median_ms(
    ours: Callable[[], torch.Tensor], reference: Callable[[], torch.Tensor], repeats: int
) -> tuple[float, float]:
    """Median wall time in ms of each callable, after ``WARMUP`` untimed calls of each."""
    for _ in range(WARMUP):
        ours()
        reference()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, sink in ((ours, times[0]), (reference, times[1])):
            start = time.perf_counter()
            fn()
            sink.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[0]), statistics.median(times[1])


def bench_size(size: str, repeats: int) -> list[Timing]:
    config = preset_config(size)
    batch = BATCH_SIZES[size]
    torch.manual_seed(0)
    vit_ours, vit_timm = VisionTransformer(config.s2).eval(), timm_vit_like(config.s2).eval()
    frames = torch.randn(batch, config.s2.in_chans, 64, 64)
    swin_ours = SwinTransformerV2(config.hr).eval()
    swin_timm = timm_swin_like(config.hr, SWIN_IMAGE_SIZE).eval()
    images = torch.randn(batch, config.hr.in_chans, SWIN_IMAGE_SIZE, SWIN_IMAGE_SIZE)
    results = []
    with torch.inference_mode():
        ours_ms, timm_ms = median_ms(lambda: vit_ours(frames), lambda: vit_timm.forward_features(frames), repeats)
        results.append(Timing("ViT", size, batch, ours_ms, timm_ms))
        ours_ms, timm_ms = median_ms(lambda: swin_ours(images), lambda: swin_timm.forward_features(images), repeats)
        results.append(Timing("SwinV2", size, batch, ours_ms, timm_ms))
    return results


def format_table(rows: list[Timing]) -> str:
    lines = [f"{'encoder':<8} {'size':<5} {'batch':>5} {'ours ms':>9} {'timm ms':>9} {'timm/ours':>9}"]
    for r in rows:
        lines.append(
            f"{r.encoder:<8} {r.size:<5} {r.batch:>5} {r.ours_ms:>9.1f} {r.timm_ms:>9.1f} {r.ratio:>9.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Time our ViT and SwinV2 encoders against timm's on the CPU.")
    parser.add_argument("--sizes", default="tiny,base", help="comma-separated presets among: tiny, base")
    parser.add_argument("--repeats", type=int, default=10, help="timed forward passes per model")
    parser.add_argument("--json", metavar="PATH", help="also write the timings to this JSON file")
    args = parser.parse_args()
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = set(sizes) - set(BATCH_SIZES)
    if unknown:
        parser.error(f"unknown sizes {sorted(unknown)}; expected among {sorted(BATCH_SIZES)}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    torch.set_num_threads(2)
    rows = [timing for size in sizes for timing in bench_size(size, args.repeats)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 eager, median of {args.repeats}")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"ratio": r.ratio} for r in rows], f, indent=2)


if __name__ == "__main__":
    main()
