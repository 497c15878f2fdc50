"""Does a four-band (R, G, B, NIR) encoder use its NIR band? Three bands against four on NIR-only classes.

Writes two Potsdam tiles in the release layout (``2_Ortho_RGB`` and ``4_Ortho_RGBIR``, labels in
``5_Labels_all_noBoundary``): each 8 x 8 block of a tile is one of the 6 ISPRS classes at random,
its NIR value is ``40 * class + 20``, and R, G, B are uniform noise. A ``tiny`` encoder from random
init (seed 0) with a UperNet head is fine-tuned on the training tile (2_10) for ``--steps`` steps,
once reading R, G, B (``2_Ortho_RGB``) and once made to take R, G, B, NIR
(:meth:`skysense.SkySense.with_hr_bands`, reading ``4_Ortho_RGBIR``), and both are scored on
the unseen tile (2_13). Both can fit the training tile (its noise is fixed); only NIR carries
over to the other tile. Prints the last training losses and the mIoU / mF1 of both, and writes
them as JSON with ``--out``.

    python benchmarks/nir_band.py --steps 150
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin

from skysense.data.datasets.isprs import ISPRS_COLOURS

TILES = ("2_10", "2_13")
"""Potsdam's first training tile and first validation tile (mmsegmentation's lists)."""


def _write(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=data.dtype, crs="EPSG:32633", transform=from_origin(368000.0, 5808000.0, 0.05, 0.05)) as dst:
        dst.write(data)


def potsdam_rgbir(root: Path, size: int = 64, seed: int = 0) -> None:
    """The two tiles (module docstring) under ``root``: RGB and RGBIR images, eroded-label colours."""
    rng = np.random.default_rng(seed)
    colours = np.array(list(ISPRS_COLOURS), np.uint8)
    for tile in TILES:
        classes = rng.integers(0, 6, (size // 8, size // 8)).repeat(8, 0).repeat(8, 1)
        rgb = rng.integers(0, 256, (3, size, size), dtype=np.uint8)
        nir = (classes * 40 + 20).astype(np.uint8)[None]
        _write(root / "4_Ortho_RGBIR" / f"top_potsdam_{tile}_RGBIR.tif", np.concatenate([rgb, nir]))
        _write(root / "2_Ortho_RGB" / f"top_potsdam_{tile}_RGB.tif", rgb)
        _write(root / "5_Labels_all_noBoundary" / f"top_potsdam_{tile}_label_noBoundary.tif",
               colours[classes].transpose(2, 0, 1).copy())


def train_and_score(root: Path, out: Path, hr_bands: tuple[str, ...] | None, steps: int, lr: float = 2e-3,
                    size: int = 64, progress: bool = False) -> dict[str, float]:
    """Fine-tune on tile 2_10 (``hr_bands``: None reads R, G, B) and score tile 2_13; returns the
    mean loss of the last 10 steps, ``miou`` and ``mf1``."""
    from skysense.downstream.evaluate import evaluate_run
    from skysense.downstream.finetune import FinetuneConfig, finetune

    config = FinetuneConfig(task="segmentation", dataset="potsdam", data_root=str(root), preset="tiny",
                            hr_bands=hr_bands, max_steps=steps, batch_size=1, crop_size=size, decoder_channels=16,
                            train_split="train", eval_split="val", flips=False, checkpoint_every=max(steps, 1))
    config.optim.lr, config.optim.warmup_steps, config.optim.layer_decay = lr, 2, 1.0
    rows = finetune(config, out, progress=progress)
    report = evaluate_run(out, progress=False)
    return {"train_loss": float(np.mean([r["loss"] for r in rows[-10:]])), "miou": report["miou"],
            "mf1": report["mf1"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--size", type=int, default=64, help="tile side in pixels (a multiple of 8)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "potsdam"
        potsdam_rgbir(root, args.size)
        for name, bands in (("R, G, B", None), ("R, G, B, NIR", ("R", "G", "B", "NIR"))):
            started = time.perf_counter()
            results[name] = train_and_score(root, Path(folder) / name.replace(", ", ""), bands, args.steps, args.lr,
                                            args.size, progress=True)
            results[name]["seconds"] = round(time.perf_counter() - started, 1)
    print(f"{'bands':<14}{'train loss':>12}{'val mIoU':>10}{'val mF1':>9}{'s':>7}")
    for name, r in results.items():
        print(f"{name:<14}{r['train_loss']:>12.4f}{r['miou']:>10.4f}{r['mf1']:>9.4f}{r['seconds']:>7.1f}")
    if args.out is not None:
        args.out.write_text(json.dumps({"steps": args.steps, "lr": args.lr, "size": args.size,
                                        "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
