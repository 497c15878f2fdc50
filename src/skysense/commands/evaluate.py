"""``skysense evaluate``: evaluate SkySense on a labelled dataset.

``skysense evaluate linear-probe --dataset aid (--weights DIR | --preset tiny --random-init)``
extracts pooled features of the train and test splits (:mod:`skysense.evaluation.features`),
fits a linear classifier on the train features and prints the test score
(:mod:`skysense.evaluation.linear_probe`): overall accuracy for single-label datasets, macro mAP
for multi-label ones (BigEarthNet).

``skysense evaluate {classification,segmentation,change} --weights RUN`` scores a model
fine-tuned by ``skysense finetune`` (:func:`skysense.downstream.evaluate.evaluate_run`): OA /
top-5 / mAP, OA / mIoU / mF1, or change F1 / precision / recall / IoU (and SCS for semantic
change), on the run's evaluation split unless ``--dataset`` / ``--split`` say otherwise;
``--predictions DIR`` writes the dense predictions as GeoTIFFs. Segmentation also reports mF1 /
mIoU without the classes the benchmark's protocol excludes (``mf1_excluding``,
``miou_excluding``: clutter for ISPRS Potsdam and Vaihingen, as the paper's Potsdam mF1);
``--exclude-classes 5`` or ``--exclude-classes clutter,car`` chooses them, ``none`` turns them off.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from skysense.commands import add_device_argument
from skysense.config import PRESETS
from skysense.data.datasets import DATASETS, dataset_root
from skysense.devices import resolve_device
from skysense.downstream.tasks import TASKS
from skysense.evaluation.features import extract_features, per_class_subset
from skysense.evaluation.linear_probe import linear_probe

PROBE_DATASETS: dict[str, tuple[str, str]] = {
    "aid": ("train", "test"),
    "bigearthnet_v1": ("train", "test"),
    "bigearthnet_v2": ("train", "test"),
}
"""Datasets the linear probe knows: name -> (train split, test split)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("evaluate", help="linear probe of frozen features; scores of fine-tuned models")
    sub = parser.add_subparsers(dest="evaluate_command", required=True, metavar="PROTOCOL")
    probe = sub.add_parser("linear-probe", help="linear classifier on frozen pooled features; test accuracy / mAP")
    probe.add_argument("--dataset", required=True, choices=sorted(PROBE_DATASETS))
    probe.add_argument("--data-root", type=Path, default=None,
                       help="the dataset folder (default: $SKYSENSE_DATA/<usual sub-folder>, e.g. $SKYSENSE_DATA/aid)")
    source = probe.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", type=Path, default=None, help="a folder written by save_pretrained")
    source.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="build this preset (with --random-init: the random-init baseline)")
    probe.add_argument("--random-init", action="store_true",
                       help="with --preset: randomly initialised weights (torch.manual_seed(--seed))")
    probe.add_argument("--seed", type=int, default=0, help="seed of the random init and the held-out split")
    probe.add_argument("--batch-size", type=int, default=64)
    probe.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default 0)")
    probe.add_argument("--image-size", type=int, default=None,
                       help="HR square side, a multiple of 32 (default: each side rounded up to a multiple of 32)")
    probe.add_argument("--limit-per-class", type=int, default=None,
                       help="use only the first N images of each class in each split (single-label datasets)")
    probe.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_device_argument(probe)
    probe.add_argument("--no-progress", action="store_true", help="no progress bars")
    probe.add_argument("--json", action="store_true", help="print JSON")
    probe.set_defaults(run=run_linear_probe)
    change = sub.add_parser("change-probe", help="frozen S2 features: per-pixel linear change classifier; change F1")
    change.add_argument("--dataset", default="oscd", choices=["oscd"])
    change.add_argument("--data-root", type=Path, default=None, help="default: $SKYSENSE_DATA/oscd")
    change_source = change.add_mutually_exclusive_group(required=True)
    change_source.add_argument("--weights", type=Path, default=None, help="a folder written by save_pretrained")
    change_source.add_argument("--preset", choices=sorted(PRESETS), default=None)
    change.add_argument("--random-init", action="store_true", help="with --preset: random weights (seed --seed)")
    change.add_argument("--seed", type=int, default=0, help="seed of the random init and the pixel sample")
    change.add_argument("--tile", type=int, default=64, help="window side the S2 encoder embeds (default 64)")
    change.add_argument("--train-pixels", type=int, default=100_000)
    change.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_device_argument(change)
    change.add_argument("--no-progress", action="store_true", help="no progress bars")
    change.add_argument("--json", action="store_true", help="print JSON")
    change.set_defaults(run=run_change_probe)
    for task in TASKS:
        _register_task(sub, task)


def _register_task(sub: argparse._SubParsersAction, task: str) -> None:
    parser = sub.add_parser(task, help=f"score a model fine-tuned for {task} (skysense finetune)")
    parser.add_argument("--weights", type=Path, required=True, help="a run folder written by skysense finetune")
    parser.add_argument("--dataset", default=None, help="default: the dataset the run was fine-tuned on")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="default: the run's, else $SKYSENSE_DATA/<usual sub-folder>")
    parser.add_argument("--split", default=None, help="default: the run's evaluation split")
    parser.add_argument("--limit", type=int, default=None, help="evaluate N samples spread evenly over the split")
    if task != "classification":
        parser.add_argument("--window", type=int, default=None,
                            help="sliding-window side in pixels (default: the run's eval window or crop size)")
        parser.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: window / 2)")
    if task in ("segmentation", "change"):
        parser.add_argument("--predictions", type=Path, default=None,
                            help="write each tile's predicted class map here as a GeoTIFF (input CRS/transform kept)")
    if task in ("detection", "oriented_detection"):
        parser.add_argument("--predictions", type=Path, default=None,
                            help="write each image's detections here as <id>.json (pixel boxes, scores, classes)")
        parser.add_argument("--keep-fragments", action="store_true",
                            help="merge windows by NMS alone (DOTA_devkit's merge); by default, detections of objects "
                                 "a window edge cuts are dropped when another window sees the object whole")
    if task == "segmentation":
        parser.add_argument("--exclude-classes", type=_class_list, default=None, metavar="CLASSES",
                            help="comma-separated class indices or names left out of the extra means mf1_excluding "
                                 "/ miou_excluding (mf1 and miou stay over all classes); 'none' for no extra means "
                                 "(default: the dataset's protocol, e.g. clutter for potsdam and vaihingen)")
    parser.add_argument("--batch-size", type=int, default=16, help="classification batch size")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_device_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(run=run_task, task=task)


def _class_list(text: str) -> tuple[str, ...]:
    """``--exclude-classes``: ``"5"``, ``"clutter,car"``; ``"none"`` is the empty list."""
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    if not values:
        raise argparse.ArgumentTypeError("expected class indices or names separated by commas, or 'none'")
    return () if values == ("none",) else values


def run_task(args: argparse.Namespace) -> int:
    from skysense.commands.finetune import print_report
    from skysense.downstream.evaluate import evaluate_run

    start = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    report = evaluate_run(args.weights, task=args.task, dataset=args.dataset, data_root=args.data_root,
                          split=args.split, limit=args.limit, window=getattr(args, "window", None),
                          stride=getattr(args, "stride", None), batch_size=args.batch_size,
                          predictions=getattr(args, "predictions", None), num_workers=args.num_workers,
                          progress=not args.no_progress, excluded_classes=getattr(args, "exclude_classes", None),
                          device=args.device, drop_fragments=not getattr(args, "keep_fragments", False))
    report["seconds"] = round(time.perf_counter() - start, 2)
    report["threads"] = torch.get_num_threads()
    print_report(report, args.json)
    return 0


def load_model(weights: Path | None, preset: str | None, random_init: bool, seed: int) -> torch.nn.Module:
    """The model to evaluate: saved weights, or a preset randomly initialised with ``seed``."""
    from skysense.models import SkySense

    if weights is not None:
        if random_init:
            raise ValueError("evaluate: --random-init goes with --preset, not --weights")
        return SkySense.from_pretrained(str(weights)).eval()
    if not random_init:
        raise ValueError(f"evaluate: --preset {preset} builds an untrained model: add --random-init "
                         "(the random-init baseline) or give --weights DIR")
    torch.manual_seed(seed)
    return SkySense.from_preset(preset).eval()


def probe_inputs(args: argparse.Namespace) -> tuple[Path, torch.nn.Module]:
    """Shared set-up of the probe commands: torch threads, the dataset folder and the model (on
    ``--device``)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = load_model(args.weights, args.preset, args.random_init, args.seed)
    return dataset_root(args.dataset, args.data_root), model.to(resolve_device(args.device))



def run_linear_probe(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    root, model = probe_inputs(args)
    train_split, test_split = PROBE_DATASETS[args.dataset]
    cls = DATASETS[args.dataset]
    splits: dict[str, Any] = {}
    num_classes = None
    for split in (train_split, test_split):
        dataset = cls(root, split=split)
        if hasattr(dataset, "classes"):
            num_classes = len(dataset.classes)
        if args.limit_per_class is not None:
            dataset = per_class_subset(dataset, args.limit_per_class)
        if len(dataset) == 0:
            raise ValueError(f"evaluate: {args.dataset} split {split!r} under {root} is empty")
        splits[split] = dataset
    t_features = time.perf_counter()
    extracted = {
        split: extract_features(model, dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                                image_size=args.image_size, progress=not args.no_progress, desc=split)
        for split, dataset in splits.items()
    }
    t_probe = time.perf_counter()
    (x_train, y_train), (x_test, y_test) = extracted[train_split], extracted[test_split]
    result = linear_probe(x_train, y_train, x_test, y_test, seed=args.seed,
                          num_classes=None if y_train.ndim == 2 else num_classes)
    end = time.perf_counter()
    report = {
        result.metric: result.score,
        "metric": result.metric,
        "dataset": args.dataset,
        "data_root": str(root),
        "model": str(args.weights) if args.weights is not None else f"{args.preset} (random init, seed {args.seed})",
        "preset": model.config.preset,
        "train_count": result.num_train,
        "test_count": result.num_test,
        "validation_count": result.num_validation,
        "num_classes": result.num_classes,
        "feature_dim": result.feature_dim,
        "weight_decay": result.weight_decay,
        f"train_{result.metric}": result.train_score,
        "validation": {f"{k:g}": v for k, v in result.validation.items()},
        "limit_per_class": args.limit_per_class,
        "image_size": args.image_size,
        "threads": torch.get_num_threads(),
        "seconds": {
            "total": round(end - start, 2),
            "features": round(t_probe - t_features, 2),
            "probe": round(end - t_probe, 2),
        },
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.dataset} linear probe, {report['model']}: test {result.metric} {result.score:.4f} "
              f"(train {result.num_train}, test {result.num_test}, {result.num_classes} classes, "
              f"feature dim {result.feature_dim}, weight decay {result.weight_decay:g}, "
              f"{report['seconds']['total']:.1f} s)")
    return 0


def run_change_probe(args: argparse.Namespace) -> int:
    """``skysense evaluate change-probe``: :func:`skysense.evaluation.change_probe.change_probe`."""
    from skysense.evaluation.change_probe import change_probe

    start = time.perf_counter()
    root, model = probe_inputs(args)
    cls = DATASETS[args.dataset]
    result = change_probe(model, cls(root, split="train"), cls(root, split="test"), tile=args.tile,
                          train_pixels=args.train_pixels, seed=args.seed, progress=not args.no_progress)
    report = {"dataset": args.dataset, "data_root": str(root),
              "model": str(args.weights) if args.weights else f"{args.preset} (random init, seed {args.seed})",
              "tile": args.tile, **result.to_dict(), "total_seconds": round(time.perf_counter() - start, 2)}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"change F1 {result.f1:.4f} (precision {result.precision:.4f}, recall {result.recall:.4f}) "
              f"on {result.test_pixels} test pixels; per scene {result.per_scene_f1}")
    return 0

