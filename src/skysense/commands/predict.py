"""``skysense predict``: a fine-tuned segmentation or change model over a whole scene -> georeferenced class map.

    skysense predict --weights RUN [--hr HR.tif [--hr-post HR_AFTER.tif]] [--s2 S2 ...] [--s1 S1 ...] --out OUT.tif

Writes the class probabilities to ``OUT`` and the most probable class to ``OUT.classes.tif``
(:mod:`skysense.inference.predict`); the inputs are read as ``skysense embed`` reads them, and a
rerun after an interruption resumes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from skysense.commands.embed import (add_output_arguments, add_scene_arguments, build_scene, output_options,
                                     print_report)
from skysense.devices import resolve_device
from skysense.downstream.finetune import load_finetuned
from skysense.inference.predict import predict_scene
from skysense.inference.scene import HR_SCALE


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("predict", help="a fine-tuned segmentation or change model over a whole scene: "
                                                   "class map")
    add_scene_arguments(parser)
    parser.add_argument("--hr-post", type=Path, default=None,
                        help="change models: the HR GeoTIFF after (--hr is the one before); S2 / S1 change "
                             "models take two acquisitions per series")
    parser.add_argument("--weights", type=Path, required=True, help="a run folder written by skysense finetune")
    add_output_arguments(parser, "(default: 256, or one window when that is larger: 2048 HR pixels for the default "
                                 "window of 64 with HR input)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_finetuned(args.weights).to(resolve_device(args.device)).eval()
    if args.block is None:  # one output block holds at least one window
        args.block = max(256, args.window * (HR_SCALE if "hr" in model.spec.modalities else 1))
    with build_scene(args, model.encoder.config, hr_post=args.hr_post) as scene:
        report = predict_scene(model, scene, args.out, output_options(args))
    print_report(report, args.json, f"{report.channels} class probabilities x {report.height} x {report.width} "
                                    f"({report.crs})", f"classes: {report.extra['finish']['classes_path']}")
    return 0
