"""``skysense predict``: a fine-tuned model over a whole scene -> georeferenced class map or labelled tiles.

    skysense predict --weights RUN [--hr HR.tif [--hr-post HR_AFTER.tif]] [--s2 S2 ...] [--s1 S1 ...] --out OUT.tif
    skysense polygons OUT.classes.tif --out REGIONS.geojson [--min-pixels N] [--wgs84]

Writes the class probabilities to ``OUT`` and the most probable class to ``OUT.classes.tif``
(:mod:`skysense.inference.predict`: segmentation and change maps, a classifier's tiles), with
``--polygons`` also its regions as the GeoJSON ``OUT.classes.geojson``
(:mod:`skysense.inference.polygons`), or a detector's boxes to the GeoJSON ``OUT``
(:mod:`skysense.inference.detect`); the inputs are read as ``skysense embed`` reads them, and a
rerun after an interruption resumes. ``skysense polygons`` vectorises a class map already written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from skysense.commands import add_min_pixels_argument, add_output_flags
from skysense.commands.embed import (add_output_arguments, add_scene_arguments, build_scene, output_options,
                                     print_report)
from skysense.devices import resolve_device
from skysense.downstream.finetune import load_finetuned, read_task
from skysense.downstream.tasks import DETECTION_TASKS, TaskSpec
from skysense.inference.detect import DetectOptions, detect_scene
from skysense.inference.polygons import PolygonReport, class_map_polygons
from skysense.inference.predict import classes_path, predict_scene
from skysense.inference.scene import HR_SCALE

if TYPE_CHECKING:
    from skysense.downstream.detection import DetectionModel


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("predict", help="a fine-tuned model over a whole scene: class map (segmentation, "
                                                   "change), labelled tiles (classification), GeoJSON boxes "
                                                   "(detection)")
    add_scene_arguments(parser)
    parser.add_argument("--hr-post", type=Path, default=None,
                        help="change models: the HR GeoTIFF after (--hr is the one before); S2 / S1 change "
                             "models take two acquisitions per series")
    parser.add_argument("--weights", type=Path, required=True, help="a run folder written by skysense finetune")
    add_output_arguments(parser, "(default: 256, or one window when that is larger: 2048 HR pixels for the default "
                                 "window of 64 with HR input)",
                         window_help="(default 64; a classifier's tile: its HR image size / 32, else its "
                                     "S2/S1 size, else 64)",
                         overlap_help="(default 16; 0 for a classifier, whose tiles do not overlap; a "
                                      "detector's window / 4)",
                         out_help="output .tif (cog) or folder (zarr); a detector's .geojson")
    parser.add_argument("--wgs84", action="store_true",
                        help="GeoJSON outputs (--polygons, a detector's boxes) in longitude / latitude (RFC 7946) "
                             "instead of the scene's CRS")
    maps = parser.add_argument_group("class maps (segmentation, change, a single-label classifier's tiles)")
    maps.add_argument("--polygons", action="store_true",
                      help="also write the class map's regions as polygons, OUT.classes.geojson (skysense polygons)")
    add_min_pixels_argument(maps)
    detection = parser.add_argument_group("detectors (the output is a GeoJSON of boxes; --window defaults to the "
                                          "run's training crop / 32)")
    detection.add_argument("--min-score", type=float, default=0.0,
                           help="leave out detections scoring less (the head keeps those of at least 0.05)")
    detection.add_argument("--keep-fragments", action="store_true",
                           help="merge windows by NMS alone (by default, parts of objects a window edge cuts are "
                                "dropped when another window sees the object whole)")
    parser.set_defaults(run=run)

    polygons = subparsers.add_parser("polygons", help="a class map (predict's OUT.classes.tif, or any classified "
                                                      "GeoTIFF) as GeoJSON polygons, one per region of a class")
    polygons.add_argument("class_map", type=Path, help="a one-band integer GeoTIFF of class values")
    polygons.add_argument("--out", type=Path, default=None, help="the GeoJSON (default: CLASS_MAP with .geojson)")
    polygons.add_argument("--classes", default=None,
                          help="class names by value, comma-separated, for a map without skysense's class tag")
    add_min_pixels_argument(polygons)
    polygons.add_argument("--nodata", type=int, default=None,
                          help="the value of pixels without a class (default: the map's nodata value)")
    polygons.add_argument("--wgs84", action="store_true",
                          help="longitude / latitude (RFC 7946) instead of the map's CRS")
    add_output_flags(polygons)
    polygons.set_defaults(run=run_polygons)


def print_polygons(report: PolygonReport, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    dropped = f"; {report.dropped} regions under --min-pixels with no labelled neighbour left out" if report.dropped else ""
    print(f"wrote {report.out}: {report.polygons} polygons ({report.coordinates}) in {report.seconds:.1f} s{dropped}")
    print(f"polygons per class: {report.per_class}")


def run_polygons(args: argparse.Namespace) -> int:
    out = args.out or args.class_map.with_suffix(".geojson")
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    report = class_map_polygons(args.class_map, out, classes, args.min_pixels, args.wgs84, args.overwrite,
                                progress=not args.no_progress, nodata=args.nodata)
    print_polygons(report, args.json)
    return 0


def default_window(spec: TaskSpec, patch: int) -> int:
    """The ``--window`` of a model: 64 fusion-grid pixels; a classifier's tile is the input it was
    trained on, its HR ``image_size`` / 32 or its S2 / S1 ``sentinel_size`` (rounded up to the ViT
    patch), when it has one."""
    if spec.task == "classification":
        if "hr" in spec.modalities and spec.image_size:
            return max(1, spec.image_size // HR_SCALE)
        if "hr" not in spec.modalities and spec.sentinel_size:
            return -(-spec.sentinel_size // patch) * patch
    return 64


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_finetuned(args.weights).to(resolve_device(args.device)).eval()
    spec = model.spec
    if args.hr_post is not None and spec.task != "change":
        raise ValueError(f"predict: --hr-post (the HR image after) is for change models; this is a {spec.task} model")
    if spec.task in DETECTION_TASKS:
        if args.polygons or args.min_pixels != 1:
            raise ValueError("predict: a detector writes its boxes as GeoJSON polygons already; --polygons and "
                             "--min-pixels are for class maps")
        return run_detection(args, model)
    if args.polygons and spec.multilabel:
        raise ValueError("predict: --polygons vectorises the class map, and a multi-label classifier writes none "
                         "(a tile may hold several classes)")
    if args.min_pixels != 1 and not args.polygons:
        raise ValueError("predict: --min-pixels applies to --polygons")
    if args.wgs84 and not args.polygons:
        raise ValueError("predict: --wgs84 applies to GeoJSON outputs: --polygons, or a detector's boxes")
    polygons_path = classes_path(Path(args.out)).with_suffix(".geojson")
    if args.polygons and polygons_path.exists() and not args.overwrite:
        raise ValueError(f"{polygons_path} exists; pass --overwrite to replace it")
    tiles = spec.task == "classification"
    if args.window is None:
        args.window = default_window(spec, model.encoder.config.s2.patch_size)
    if args.overlap is None:
        args.overlap = 0 if tiles else 16
    if args.block is None:  # one output block holds at least one window
        args.block = 256 if tiles else max(256, args.window * (HR_SCALE if "hr" in spec.modalities else 1))
    with build_scene(args, model.encoder.config, hr_post=args.hr_post) as scene:
        report = predict_scene(model, scene, args.out, output_options(args))
    what = (f"tiles of {args.window} x {args.window} fusion-grid pixels" if tiles else "class probabilities")
    finished = report.extra["finish"]
    classes = (f"classes: {finished['classes_path']}" if finished["classes_path"] else
               f"tiles per class (probability >= {finished['threshold']}): {finished['pixels_per_class']}")
    if args.polygons:
        vectors = class_map_polygons(finished["classes_path"], polygons_path, min_pixels=args.min_pixels,
                                     wgs84=args.wgs84, overwrite=True, progress=not args.no_progress)
        report.extra["polygons"] = vectors.to_dict()
    print_report(report, args.json, f"{report.channels} {what} x {report.height} x {report.width} ({report.crs})",
                 classes)
    if args.polygons and not args.json:
        print_polygons(vectors, False)
    return 0


def run_detection(args: argparse.Namespace, model: DetectionModel) -> int:
    """``predict`` with a detector: the objects of the scene as GeoJSON (:mod:`skysense.inference.detect`)."""
    unused = [flag for flag, value in (("--format", args.format), ("--block", args.block)) if value is not None]
    if unused:
        raise ValueError(f"predict: a detector writes a GeoJSON of boxes; {', '.join(unused)} do not apply")
    if args.window is None:
        crop = read_task(args.weights).get("crop_size")
        args.window = max(1, crop // HR_SCALE) if crop else 32
    if args.overlap is None:
        args.overlap = args.window // 4
    options = DetectOptions(window=args.window, overlap=args.overlap, batch_size=args.batch_size,
                            min_score=args.min_score, drop_fragments=not args.keep_fragments, wgs84=args.wgs84,
                            progress=not args.no_progress, overwrite=args.overwrite)
    with build_scene(args, model.encoder.config) as scene:
        report = detect_scene(model, scene, args.out, options)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    resumed = f", {report.rows_skipped} rows of windows already done" if report.rows_skipped else ""
    print(f"wrote {report.out}: {report.detections} detections ({report.coordinates}) from {report.windows} windows "
          f"of {args.window * HR_SCALE} px{resumed}, {report.windows_computed} computed in {report.seconds:.1f} s")
    print(f"per class: {report.per_class}")
    return 0
