"""Objects outlined in a GIS, end to end: a manifest with GeoJSON outlines, a detector fine-tuned, a scene searched.

What a user with their own imagery and a QGIS layer of outlined objects does, on the real NAIP quad
under ``$SKYSENSE_DATA/samples/naip_series`` (Minnesota, 2018-07-16, R, G, B, NIR resampled to 5 m,
724 x 934 px, EPSG:26914). The quad has no object labels, so **the objects are synthetic**: bright
rotated rectangles ("roof") and dark squares ("pond") painted onto the real image at random places
(seed 0), their outlines written as GeoJSON polygons in longitude / latitude, as QGIS exports a
layer by default. The numbers say whether the pipeline carries the outlines correctly from map
coordinates to pixels and back, not how well SkySense finds real roofs.

1. Paints the objects, writes the painted quad as a GeoTIFF with its georeference, cuts it into
   four quadrants (three ``train``, the south-east one ``val``) with one GeoJSON each, and lists
   them in a ``manifest.jsonl`` (``"objects": "objects/quadrant-k.geojson"``).
2. Fine-tunes a ``tiny`` SkySense (random init, seed 0: no pretrained weights ship with the
   project) with Faster R-CNN + FPN on 256-px crops (``skysense finetune --dataset manifest
   --task detection``).
3. Scores the ``val`` quadrant (``skysense evaluate``: VOC mAP at IoU 0.5).
4. Searches the whole painted quad with ``skysense predict`` (windows of the 256-px training crop
   every 192 px, merged), reads the GeoJSON it writes back into pixels of the quad with the
   manifest's reader, and scores the detections whose centre lies in the ``val`` quadrant against
   the objects painted there.

Prints the numbers and writes them as JSON with ``--out``.

    SKYSENSE_DATA=../shared/data python benchmarks/own_objects.py --steps 150
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import rasterio
import rasterio.warp
from rasterio.windows import Window, transform as window_transform

QUAD = "samples/naip_series/m_4709963_se_14_1_20180716.tif"
CLASSES = ("roof", "pond")
OBJECTS = 50
"""Objects painted on the quad (about half of each class)."""


def paint(image: np.ndarray, rng: np.random.Generator, count: int) -> list[tuple[int, np.ndarray]]:
    """Paint ``count`` objects onto ``image`` (C, H, W) uint8 in place, apart from each other:
    (class, (4, 2) corners in pixels) of each."""
    _, height, width = image.shape
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    objects: list[tuple[int, np.ndarray]] = []
    centres: list[np.ndarray] = []
    while len(objects) < count:
        label = int(rng.integers(0, 2))
        centre = rng.uniform(40, [width - 40, height - 40])
        if any(np.hypot(*(centre - c)) < 60 for c in centres):
            continue
        # sizes from the smallest anchor (32 px) up: Faster R-CNN's RPN matches little else
        if label == 0:  # a roof: a bright rectangle at any angle
            w, h, angle = rng.uniform(28, 48), rng.uniform(18, 30), rng.uniform(0, math.pi)
        else:  # a pond: a dark square along the grid
            w = h = rng.uniform(22, 36)
            angle = 0.0
        u = np.array([math.cos(angle), math.sin(angle)])
        v = np.array([-u[1], u[0]])
        corners = centre + np.array([-w * u - h * v, w * u - h * v, w * u + h * v, -w * u + h * v]) / 2
        inside = (np.abs((xs - centre[0]) * u[0] + (ys - centre[1]) * u[1]) <= w / 2) & \
                 (np.abs((xs - centre[0]) * v[0] + (ys - centre[1]) * v[1]) <= h / 2)
        colour = (235, 228, 220, 200) if label == 0 else (20, 35, 45, 10)
        for band in range(image.shape[0]):
            image[band][inside] = colour[band % len(colour)]
        objects.append((label, corners))
        centres.append(centre)
    return objects


def _geojson(path: Path, objects: list[tuple[int, np.ndarray]], crs: object, transform: object) -> str:
    """The outlines as a GeoJSON FeatureCollection in longitude / latitude (no crs member)."""
    features = []
    for label, corners in objects:
        xs, ys = zip(*(transform * (float(x), float(y)) for x, y in corners))
        lon, lat = rasterio.warp.transform(crs, "EPSG:4326", list(xs), list(ys))
        ring = [[a, b] for a, b in zip(lon, lat)]
        features.append({"type": "Feature", "properties": {"class": CLASSES[label]},
                         "geometry": {"type": "Polygon", "coordinates": [ring + ring[:1]]}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return str(path)


def write_manifest(quad: Path, root: Path, seed: int = 0) -> tuple[Path, list[tuple[int, np.ndarray]], tuple]:
    """The painted quad, its quadrants and their manifest under ``root`` (module docstring, step 1):
    the painted quad's path, its objects and the ``val`` quadrant (row0, row1, col0, col1)."""
    with rasterio.open(quad) as src:
        image, profile = src.read(), src.profile
    profile["photometric"] = "minisblack"  # four plain bands, not RGB + alpha
    objects = paint(image, np.random.default_rng(seed), OBJECTS)
    painted = root / "painted.tif"
    root.mkdir(parents=True, exist_ok=True)
    with rasterio.open(painted, "w", **profile) as dst:
        dst.write(image)
    height, width = image.shape[1:]
    rows, cols = (0, height // 2, height), (0, width // 2, width)
    records, val = [], (rows[1], rows[2], cols[1], cols[2])
    for k, (i, j) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        window = Window(cols[j], rows[i], cols[j + 1] - cols[j], rows[i + 1] - rows[i])
        transform = window_transform(window, profile["transform"])
        name = f"quadrant-{k}"
        hr = root / "hr" / f"{name}.tif"
        hr.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(hr, "w", **{**profile, "width": int(window.width), "height": int(window.height),
                                        "transform": transform}) as dst:
            dst.write(image[:, rows[i]:rows[i + 1], cols[j]:cols[j + 1]])
        offset = np.array([cols[j], rows[i]])
        mine = [(label, corners - offset) for label, corners in objects
                if (corners.mean(0) >= offset).all() and (corners.mean(0) < [cols[j + 1], rows[i + 1]]).all()]
        records.append({"id": name, "split": "val" if (i, j) == (1, 1) else "train", "hr": f"hr/{name}.tif",
                        "objects": _geojson(root / "objects" / f"{name}.geojson", mine, profile["crs"], transform)})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return painted, objects, val


def run(quad: Path, work: Path, steps: int, lr: float, batch_size: int, crop: int, progress: bool = True) -> dict:
    import torch

    from skysense.data.geojson_objects import read_objects
    from skysense.downstream.boxes import horizontal_boxes
    from skysense.downstream.evaluate import evaluate_run
    from skysense.downstream.finetune import FinetuneConfig, finetune, load_finetuned
    from skysense.evaluation.box_ap import BoxAveragePrecision
    from skysense.inference import DetectOptions, Scene, detect_scene

    painted, objects, (r0, r1, c0, c1) = write_manifest(quad, work / "data")
    config = FinetuneConfig(
        task="detection", dataset="manifest", data_root=str(work / "data"), preset="tiny", max_steps=steps,
        batch_size=batch_size, crop_size=crop, decoder_channels=64, checkpoint_every=max(steps, 1), seed=0,
        dataset_options={"classes": list(CLASSES)}, cache_samples=True)
    config.optim.lr, config.optim.warmup_steps = lr, 20
    started = time.perf_counter()
    rows = finetune(config, work / "run", progress=progress)
    trained = time.perf_counter() - started
    report = evaluate_run(work / "run", progress=False)

    model = load_finetuned(work / "run").eval()
    started = time.perf_counter()
    with Scene(model.encoder.config, hr=painted) as scene:
        found = detect_scene(model, scene, work / "found.geojson",
                             DetectOptions(window=crop // 32, overlap=crop // 128, progress=False))
    searched = time.perf_counter() - started
    with rasterio.open(painted) as src:
        back = read_objects(found.out, CLASSES, src.crs, src.transform, src.shape)
    scores = torch.tensor([f["properties"]["score"] for f in json.loads(found.out.read_text())["features"]])
    hulls = horizontal_boxes(back["boxes"])
    centre = (hulls[:, :2] + hulls[:, 2:]) / 2
    in_val = (centre[:, 0] >= c0) & (centre[:, 0] < c1) & (centre[:, 1] >= r0) & (centre[:, 1] < r1)
    truth = [(label, corners) for label, corners in objects
             if c0 <= corners.mean(0)[0] < c1 and r0 <= corners.mean(0)[1] < r1]
    truth_boxes = horizontal_boxes(torch.tensor(np.array([c.reshape(-1) for _, c in truth]), dtype=torch.float32))
    metric = BoxAveragePrecision(len(CLASSES), class_names=CLASSES)
    metric.update(hulls[in_val], scores[in_val], back["labels"][in_val], truth_boxes,
                  torch.tensor([label for label, _ in truth]))
    scene_val = metric.compute()
    return {
        "steps": steps, "lr": lr, "batch_size": batch_size, "crop": crop,
        "objects_painted": len(objects), "objects_val": len(truth),
        "train_loss_last10": float(np.mean([r["loss"] for r in rows[-10:]])), "train_seconds": round(trained, 1),
        "evaluate_val": {"map50": report["map50"], "ap50_per_class": report["ap50_per_class"]},
        "predict_val": {"map50": scene_val["map50"], "ap50_per_class": scene_val["ap50_per_class"],
                        "detections_in_val": int(in_val.sum())},
        "predict": {"detections": found.detections, "before_merge": found.extra["before_merge"],
                    "windows": found.windows, "seconds": round(searched, 1), "coordinates": found.coordinates},
    }


if __name__ == "__main__":
    from own_data import benchmark_main

    benchmark_main(__doc__, QUAD, run, steps=150, lr=5e-4, batch_size=4, crop=256)
