"""Water from a few clicks: ``skysense similar`` on a real chip, embeddings against the raw bands.

Takes the Sen1Floods11 chip under ``$SKYSENSE_DATA/samples/sen1floods11`` (Spain, 512 x 512 px at
10 m: Sentinel-2 L1C of 2019-09-18, Sentinel-1 VV/VH of 2019-09-17, hand-labelled water) and
does what a user with an embedding raster and a few clicks does:

1. embeds the chip with ``skysense embed`` (S2 + S1, fused level, 128 channels on the 10 m grid)
   with ``tiny`` from random init (seed 0: no pretrained weights ship with the project), or with
   ``--weights`` (such as the ``tiny`` that ``skysense demo`` pretrains in ``demo_out/pretrain``);
2. for each of ``--trials`` seeds, picks ``--shots`` labelled pixels of each class (water, not
   water) at random in the three training quadrants, writes them as a GeoJSON of points in
   longitude / latitude with their class, and runs ``skysense similar`` (one band per class): the
   most similar band is the predicted class;
3. scores that map on the held-out south-east quadrant (the own_data benchmark's ``val``) by IoU
   per class against the hand labels.

The reference, measured in the same run with the same points and the same code: the raw inputs
themselves as the "embedding" (13 S2 bands in reflectance and VV/VH in dB, each standardised over
the chip), so the ratio says what the encoder adds over the pixels' own values.

    SKYSENSE_DATA=../shared/data python benchmarks/few_shot_similarity.py --shots 5 --trials 5
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import rasterio.warp

CHIP = "samples/sen1floods11"
S2 = "S2/Spain_7370579_S2Hand.tif"
S1 = "S1/Spain_7370579_S1Hand.tif"
LABELS = "Labels/Spain_7370579_LabelHand.tif"
S2_FILE_BANDS = "B1,B2,B3,B4,B5,B6,B7,B8,B8A,B9,B10,B11,B12"
CLASSES = ("not_water", "water")
VAL = (256, 512, 256, 512)
"""Rows and columns of the held-out quadrant."""


def raw_bands(chip: Path, out: Path) -> Path:
    """The chip's S2 and S1 bands, each standardised over the chip, as a float32 GeoTIFF."""
    with rasterio.open(chip / S2) as src:
        s2, profile = src.read().astype(np.float32), src.profile
    with rasterio.open(chip / S1) as src:
        s1 = src.read().astype(np.float32)
    data = np.concatenate([s2, s1])
    finite = np.isfinite(data)
    mean = np.array([band[ok].mean() for band, ok in zip(data, finite)], dtype=np.float32)[:, None, None]
    std = np.array([band[ok].std() for band, ok in zip(data, finite)], dtype=np.float32)[:, None, None]
    data = (data - mean) / np.maximum(std, 1e-6)
    profile.update(count=data.shape[0], dtype="float32", nodata=float("nan"))
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(data)
    return out


def clicks(truth: np.ndarray, transform, crs, shots: int, seed: int, out: Path) -> Path:
    """``shots`` labelled pixels per class outside the held-out quadrant, as lon/lat points."""
    rng = np.random.default_rng(seed)
    r0, r1, c0, c1 = VAL
    rows, cols = np.mgrid[0:truth.shape[0], 0:truth.shape[1]]
    outside = ~((rows >= r0) & (rows < r1) & (cols >= c0) & (cols < c1))
    features = []
    for k, name in enumerate(CLASSES):
        candidates = np.flatnonzero(outside & (truth == k))
        for index in rng.choice(candidates, size=shots, replace=False):
            row, col = divmod(int(index), truth.shape[1])
            x, y = transform * (col + 0.5, row + 0.5)
            (lon,), (lat,) = rasterio.warp.transform(crs, "EPSG:4326", [x], [y])
            features.append({"type": "Feature", "properties": {"class": name},
                             "geometry": {"type": "Point", "coordinates": [lon, lat]}})
    out.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return out


def scored(similarity: Path, truth: np.ndarray) -> dict[str, float]:
    """IoU per class and their mean of the most similar band on the held-out quadrant."""
    with rasterio.open(similarity) as src:
        names, scores = list(src.descriptions), src.read()
    predicted = np.asarray([CLASSES.index(names[b]) for b in range(len(names))])[
        np.nan_to_num(scores, nan=-2).argmax(axis=0)]
    r0, r1, c0, c1 = VAL
    p, t = predicted[r0:r1, c0:c1], truth[r0:r1, c0:c1].astype(np.int64)
    labelled = t >= 0
    ious = {name: float(((p == k) & (t == k) & labelled).sum() / max(1, (((p == k) | (t == k)) & labelled).sum()))
            for k, name in enumerate(CLASSES)}
    return {**ious, "miou": float(np.mean(list(ious.values())))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shots", type=int, default=5, help="labelled pixels per class")
    parser.add_argument("--trials", type=int, default=5, help="random draws of the pixels (seeds 0..)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="embed with these weights (e.g. skysense demo's demo_out/pretrain) instead of a "
                             "random-init tiny")
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON")
    args = parser.parse_args()
    data = os.environ.get("SKYSENSE_DATA")
    if not data:
        raise SystemExit("set SKYSENSE_DATA to the shared data folder")
    chip = Path(data) / CHIP
    from skysense.cli import main as skysense
    from skysense.inference.similarity import similarity_map

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        started = time.perf_counter()
        model = ["--weights", str(args.weights)] if args.weights else ["--preset", "tiny"]
        assert skysense(["embed", "--s2", str(chip / S2), "--s2-bands", S2_FILE_BANDS, "--s2-level", "L1C",
                         "--s2-offset", "0", "--s2-dates", "2019-09-18", "--s1", str(chip / S1), "--s1-dates",
                         "2019-09-17", *model, "--out", str(work / "embedding.tif"), "--no-progress",
                         "--no-preview"]) == 0
        embed_seconds = time.perf_counter() - started
        raw = raw_bands(chip, work / "raw.tif")
        with rasterio.open(chip / LABELS) as src:
            truth, transform, crs = src.read(1), src.transform, src.crs
        results: dict[str, list[dict[str, float]]] = {"embedding": [], "raw_bands": []}
        seconds = []
        for seed in range(args.trials):
            points = clicks(truth, transform, crs, args.shots, seed, work / f"clicks_{seed}.geojson")
            for name, raster in (("embedding", work / "embedding.tif"), ("raw_bands", raw)):
                started = time.perf_counter()
                similarity_map(raster, points, work / f"{name}_{seed}.tif", progress=False)
                seconds.append(time.perf_counter() - started)
                results[name].append(scored(work / f"{name}_{seed}.tif", truth))

    def summary(rows: list[dict[str, float]]) -> dict[str, float]:
        values = np.array([r["miou"] for r in rows])
        return {"miou_mean": round(float(values.mean()), 4), "miou_std": round(float(values.std()), 4),
                "water_iou_mean": round(float(np.mean([r["water"] for r in rows])), 4),
                "miou_per_trial": [round(float(v), 4) for v in values]}

    result = {"weights": str(args.weights) if args.weights else "tiny, random init", "shots_per_class": args.shots,
              "trials": args.trials, "embed_seconds": round(embed_seconds, 1),
              "similar_seconds_mean": round(float(np.mean(seconds)), 2),
              "embedding": summary(results["embedding"]), "raw_bands": summary(results["raw_bands"])}
    result["ratio_embedding_over_raw"] = round(result["embedding"]["miou_mean"] / result["raw_bands"]["miou_mean"], 3)
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
