"""Your own places, end to end: a manifest of real S2 + S1 rasters with water masks, fine-tuned, scored, mapped.

Takes the Sen1Floods11 chip under ``$SKYSENSE_DATA/samples/sen1floods11`` (Spain, 512 x 512 px at
10 m: Sentinel-2 L1C 13 bands of 2019-09-18, Sentinel-1 VV/VH in dB of 2019-09-17, hand-labelled
water; -1 = no label) and does what a user with their own rasters does:

1. cuts it into four 256-px quadrants, written as GeoTIFFs with their georeference, and lists them
   in a ``manifest.jsonl`` (three ``train``, the south-east one ``val``) whose records name the S2
   file's band order (``s2_bands``), its level (L1C), the dates and the mask (``mask_ignore: -1``);
2. fine-tunes a ``tiny`` SkySense (random init, seed 0: no pretrained weights ship with the
   project) for segmentation of S2 + S1 through the fusion, ``skysense finetune --dataset manifest``;
3. scores the ``val`` quadrant (``skysense evaluate``);
4. maps the whole original chip with ``skysense predict`` (window by window, blended), and scores
   the map's ``val`` quadrant against the hand labels.

With ``--layout windows`` no file is cut: each record names the chip's own rasters with its
quadrant's ``window`` (what a user with one large scene does); the numbers must not change.

With ``--labels regions`` the labels are what a user drew in a GIS instead of a raster: the hand
labels vectorised once (``skysense polygons --nodata -1``) into one GeoJSON of water and dry-land
polygons in longitude / latitude that every record names as its ``mask``; the run checks that the
burnt masks equal the label raster pixel for pixel, trains on them, and also writes the predicted
map as polygons (``predict --polygons``) and scores those, burnt back, on the ``val`` quadrant.

Prints the numbers and writes them as JSON with ``--out``.

    SKYSENSE_DATA=../shared/data python benchmarks/own_data.py --steps 150 [--labels regions] [--layout windows]
"""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Callable
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window, transform as window_transform

CHIP = "samples/sen1floods11"
S2_FILE_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
CLASSES = ("not_water", "water")
S2_DATE, S1_DATE = "2019-09-18", "2019-09-17"
VAL = (256, 512, 256, 512)
"""Rows and columns of the held-out (``val``) quadrant."""


def _crop(source: Path, target: Path, window: Window) -> str:
    with rasterio.open(source) as src:
        profile = {**src.profile, "width": int(window.width), "height": int(window.height),
                   "transform": window_transform(window, src.transform)}
        data = src.read(window=window)
    target.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(target, "w", **profile) as dst:
        dst.write(data)
    return str(target)


LABELS = "Labels/Spain_7370579_LabelHand.tif"


def write_manifest(chip: Path, root: Path, labels: str = "raster", layout: str = "files") -> Path:
    """The four quadrants and their manifest under ``root`` (module docstring, step 1); with
    ``labels="regions"`` every record's mask is one GeoJSON of the hand labels' regions; with
    ``layout="windows"`` no file is cut: every record names the chip's own rasters and its
    quadrant's ``window``."""
    from skysense.inference.polygons import class_map_polygons

    regions = None
    if labels == "regions":
        root.mkdir(parents=True, exist_ok=True)
        class_map_polygons(chip / LABELS, root / "regions.geojson", CLASSES, nodata=-1, wgs84=True, progress=False)
        regions = "regions.geojson"
    records = []
    for k, (row, col) in enumerate(((0, 0), (0, 256), (256, 0), (256, 256))):
        window = Window(col, row, 256, 256)
        name = f"quadrant-{k}"
        if layout == "windows":
            records.append({
                "id": name, "split": "val" if (row, col) == (VAL[0], VAL[2]) else "train",
                "s2": [{"path": str(chip / "S2/Spain_7370579_S2Hand.tif"), "date": S2_DATE}],
                "s2_bands": list(S2_FILE_BANDS), "s2_level": "L1C", "s2_offset": 0,
                "s1": [{"path": str(chip / "S1/Spain_7370579_S1Hand.tif"), "date": S1_DATE}],
                "mask": regions or str(chip / LABELS), "window": [col, row, 256, 256]})
            continue
        records.append({
            "id": name, "split": "val" if (row, col) == (VAL[0], VAL[2]) else "train",
            "s2": [{"path": _crop(chip / "S2/Spain_7370579_S2Hand.tif", root / "s2" / f"{name}.tif", window),
                    "date": S2_DATE}],
            "s2_bands": list(S2_FILE_BANDS), "s2_level": "L1C", "s2_offset": 0,
            "s1": [{"path": _crop(chip / "S1/Spain_7370579_S1Hand.tif", root / "s1" / f"{name}.tif", window),
                    "date": S1_DATE}],
            "mask": regions or _crop(chip / LABELS, root / "masks" / f"{name}.tif", window),
        })
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    return manifest


def _burnt_masks_equal_the_raster(chip: Path, root: Path) -> dict:
    """How many pixels of the masks burnt from ``regions.geojson`` equal the hand-label raster's."""
    from skysense.data.datasets import ManifestDataset

    dataset = ManifestDataset(root, classes=CLASSES, modalities=("s2",))
    with rasterio.open(chip / LABELS) as src:
        truth = src.read(1).astype(np.int64)
    equal = total = 0
    for index, item in enumerate(dataset.items):
        row, col = divmod(index, 2)  # quadrants in reading order
        expected = truth[256 * row:256 * row + 256, 256 * col:256 * col + 256]
        mask = dataset.load(index)["mask"].numpy()
        equal += int((mask == expected).sum())
        total += expected.size
    return {"pixels_equal": equal, "pixels": total}


def _scored_ious(predicted: np.ndarray, truth: np.ndarray, nodata: int) -> tuple[list[float], int]:
    """IoU per class of ``predicted`` against ``truth`` over pixels labelled in both."""
    p, t = predicted.astype(np.int64), truth.astype(np.int64)
    scored = (t >= 0) & (p != nodata)
    ious = [float(((p == k) & (t == k) & scored).sum() / max(1, (((p == k) | (t == k)) & scored).sum()))
            for k in range(len(CLASSES))]
    return ious, int(scored.sum())


def run(chip: Path, work: Path, steps: int, lr: float, batch_size: int, crop: int, window: int = 64,
        overlap: int = 16, progress: bool = True, labels: str = "raster", layout: str = "files") -> dict:
    from skysense.config import S1_BANDS
    from skysense.data.geojson_regions import read_regions
    from skysense.inference.polygons import class_map_polygons
    from skysense.downstream.evaluate import evaluate_run
    from skysense.downstream.finetune import FinetuneConfig, finetune, load_finetuned
    from skysense.inference import EmbedOptions, Scene, resolve_frames
    from skysense.inference.predict import CLASS_NODATA, classes_path, predict_scene

    (work / "data").mkdir(parents=True, exist_ok=True)
    write_manifest(chip, work / "data", labels, layout)
    burnt = _burnt_masks_equal_the_raster(chip, work / "data") if labels == "regions" else None
    config = FinetuneConfig(
        task="segmentation", dataset="manifest", data_root=str(work / "data"), preset="tiny", max_steps=steps,
        batch_size=batch_size, crop_size=crop, decoder_channels=32, checkpoint_every=max(steps, 1), seed=0,
        dataset_options={"classes": list(CLASSES), "mask_ignore": -1, "modalities": ["s2", "s1"]},
        cache_samples=True)
    config.optim.lr, config.optim.warmup_steps = lr, 10
    started = time.perf_counter()
    rows = finetune(config, work / "run", progress=progress)
    trained = time.perf_counter() - started
    report = evaluate_run(work / "run", progress=False)

    model = load_finetuned(work / "run").eval()
    s2 = resolve_frames("s2", [chip / "S2/Spain_7370579_S2Hand.tif"], model.encoder.config.inputs["s2"].bands,
                        list(S2_FILE_BANDS), [dt.date.fromisoformat(S2_DATE)])
    s1 = resolve_frames("s1", [chip / "S1/Spain_7370579_S1Hand.tif"], S1_BANDS, None,
                        [dt.date.fromisoformat(S1_DATE)])
    started = time.perf_counter()
    with Scene(model.encoder.config, s2=s2, s1=s1, s2_offsets=[0.0], s2_level="L1C") as scene:
        mapped = predict_scene(model, scene, work / "water.tif",
                               EmbedOptions(window=window, overlap=overlap, block=256, progress=False, preview=False))
    predicted = time.perf_counter() - started
    with rasterio.open(classes_path(mapped.out)) as src:
        class_map, crs, transform = src.read(1), src.crs, src.transform
    with rasterio.open(chip / LABELS) as src:
        truth = src.read(1)
    r0, r1, c0, c1 = VAL
    ious, scored = _scored_ious(class_map[r0:r1, c0:c1], truth[r0:r1, c0:c1], CLASS_NODATA)
    extra = {}
    if labels == "regions":
        vectors = class_map_polygons(classes_path(mapped.out), work / "water.classes.geojson", wgs84=True,
                                     progress=False)
        back = read_regions(vectors.out, CLASSES, crs, transform, class_map.shape).numpy()
        polygon_ious, _ = _scored_ious(np.where(back < 0, CLASS_NODATA, back)[r0:r1, c0:c1], truth[r0:r1, c0:c1],
                                       CLASS_NODATA)
        extra = {"labels": "regions", "regions_burnt": burnt,
                 "predict_polygons": {"polygons": vectors.polygons, "per_class": vectors.per_class,
                                      "seconds": vectors.seconds,
                                      "val_miou_burnt_back": float(np.mean(polygon_ious)),
                                      "pixels_equal_class_map": int((back == class_map).sum()),
                                      "pixels": int(class_map.size)}}
    return {
        **extra,
        "layout": layout,
        "steps": steps, "lr": lr, "batch_size": batch_size, "crop": crop, "window": window, "overlap": overlap,
        "train_loss_last10": float(np.mean([r["loss"] for r in rows[-10:]])), "train_seconds": round(trained, 1),
        "evaluate_val": {"miou": report["miou"], "iou_per_class": report["iou_per_class"], "oa": report.get("oa")},
        "predict_val": {"miou": float(np.mean(ious)), "iou_per_class": dict(zip(CLASSES, ious)),
                        "pixels_scored": scored},
        "water_fraction_val": float((truth[r0:r1, c0:c1][truth[r0:r1, c0:c1] >= 0] == 1).mean()),
        "predict_seconds": round(predicted, 1), "predict_windows": mapped.windows_computed,
    }


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labels", choices=("raster", "regions"), default="raster",
                        help="the hand labels as a raster per quadrant, or one GeoJSON of regions")
    parser.add_argument("--layout", choices=("files", "windows"), default="files",
                        help="cut the quadrants into files, or name the chip's rasters with a window each")


def benchmark_main(doc: str, source: str, run_fn, steps: int, lr: float, batch_size: int, crop: int,
                   arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                   keywords: tuple[str, ...] = ()) -> None:
    """The command line of an own-data benchmark: ``--steps``, ``--lr``, ``--batch-size``, ``--crop``
    (these defaults), ``--out`` and what ``arguments`` adds (passed to ``run_fn`` by the names in
    ``keywords``); runs ``run_fn(SKYSENSE_DATA / source, a temporary folder, ...)`` and prints its
    result as JSON (also written to ``--out``)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    if arguments is not None:
        arguments(parser)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--crop", type=int, default=crop)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    data = os.environ.get("SKYSENSE_DATA")
    if not data:
        raise SystemExit("set SKYSENSE_DATA to the shared data folder")
    with tempfile.TemporaryDirectory() as folder:
        result = run_fn(Path(data) / source, Path(folder), args.steps, args.lr, args.batch_size, args.crop,
                        **{k: getattr(args, k) for k in keywords})
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    benchmark_main(__doc__, CHIP, run, steps=150, lr=1e-3, batch_size=4, crop=64,
                   arguments=_arguments, keywords=("labels", "layout"))
