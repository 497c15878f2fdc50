"""``skysense finetune``: fine-tune SkySense with a task head on a labelled dataset, resumably.

``skysense finetune --task TASK --dataset NAME [--data-root DIR] [--weights DIR | --preset NAME]
[--out DIR] [--max-steps N] [--resume]``, optionally from a YAML config (``--config``, fields of
:class:`skysense.downstream.finetune.FinetuneConfig`); flags given on the command line override
the config. ``--evaluate`` scores the result on the evaluation split afterwards and writes
``eval.json`` into the run folder (the same report as ``skysense evaluate TASK --weights OUT``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from skysense.commands import (add_dataset_option_argument, add_device_argument, add_hr_bands_argument,
                               parse_dataset_options)
from skysense.config import PRESETS
from skysense.downstream.finetune import FinetuneConfig, finetune
from skysense.downstream.tasks import DETECTORS, TASKS
from skysense.models.hr_bands import parse_bands
from skysense.weights import atomic_write

EVAL_NAME = "eval.json"

# Command-line flag -> FinetuneConfig field (top level, or "optim.<name>").
OVERRIDES = {
    "task": "task", "dataset": "dataset", "data_root": "data_root", "weights": "weights", "preset": "preset",
    "max_steps": "max_steps", "batch_size": "batch_size", "lr": "optim.lr", "layer_decay": "optim.layer_decay",
    "warmup_steps": "optim.warmup_steps", "crop_size": "crop_size", "image_size": "image_size",
    "train_split": "train_split", "eval_split": "eval_split", "limit_train": "limit_train", "seed": "seed",
    "checkpoint_every": "checkpoint_every", "threads": "num_threads", "num_workers": "num_workers",
    "sentinel_size": "sentinel_size", "device": "device", "compile": "compile",
    "eval_window": "eval_window", "eval_stride": "eval_stride", "decoder_channels": "decoder_channels",
    "detector": "detector",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("finetune", help=f"fine-tune with a task head ({', '.join(TASKS)})")
    parser.add_argument("--config", type=Path, default=None, help="YAML config, e.g. configs/finetune/aid-tiny.yaml")
    parser.add_argument("--task", choices=TASKS, default=None, help="required unless the config sets it")
    parser.add_argument("--dataset", default=None, help="dataset name (skysense datasets list); required unless in the config")
    parser.add_argument("--data-root", default=None, help="dataset folder (default: $SKYSENSE_DATA/<usual sub-folder>)")
    add_dataset_option_argument(parser)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--weights", default=None, help="pretrained encoder: a folder written by save_pretrained")
    source.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="randomly initialised encoder of this preset (seeded by --seed; default tiny)")
    add_hr_bands_argument(parser, "; the dataset then reads them (Potsdam's RGBIR tiles, DynamicEarthNet's Planet NIR)")
    parser.add_argument("--out", type=Path, default=Path("runs/finetune"), help="output folder")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate of the head")
    parser.add_argument("--layer-decay", type=float, default=None, help="layer-wise LR decay factor (1: none)")
    parser.add_argument("--warmup-steps", type=int, default=None)
    parser.add_argument("--crop-size", type=int, default=None,
                        help="segmentation/change/detection training crop in pixels (default: the dataset's, e.g. 800 "
                             "for dior, else 128)")
    parser.add_argument("--image-size", type=int, default=None, help="classification HR side (multiple of 32)")
    parser.add_argument("--sentinel-size", type=int, default=None,
                        help="classification: resize each sample's S2/S1 frames to this side (bilinear) before "
                             "batching; default: the dataset's (96 for fmow_sentinel, else none); 0: no resize")
    parser.add_argument("--eval-window", type=int, default=None, help="sliding-window side for evaluation")
    parser.add_argument("--eval-stride", type=int, default=None, help="sliding-window stride for evaluation")
    parser.add_argument("--decoder-channels", type=int, default=None, help="UperNet width (detection: FPN width)")
    parser.add_argument("--detector", choices=sorted({d for ds in DETECTORS.values() for d in ds}), default=None,
                        help="oriented_detection: rotated_faster_rcnn (default) or oriented_rcnn; detection: faster_rcnn")
    parser.add_argument("--train-split", default=None)
    parser.add_argument("--eval-split", default=None)
    parser.add_argument("--limit-train", type=int, default=None, help="train on N samples spread over the split")
    parser.add_argument("--modalities", default=None, help="comma-separated encoder inputs, e.g. s2,s1")
    parser.add_argument("--geo-context", action="store_true", default=None, help="use lat/lon geo-context prototypes")
    parser.add_argument("--freeze-encoder", action="store_true", default=None, help="train the head only")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--checkpoint-every", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_device_argument(parser, "; CUDA trains in bf16 autocast")
    parser.add_argument("--compile", choices=("off", "blocks"), default=None,
                        help="blocks: compile each transformer block of the encoder (torch.compile)")
    parser.add_argument("--activation-checkpointing", nargs="?", const=True, default=None, choices=[True, "selective"],
                        metavar="selective",
                        help="recompute the encoder blocks' activations in the backward pass (less memory); "
                             "'selective': all but their matmul and attention outputs")
    parser.add_argument("--num-workers", type=int, default=None, help="DataLoader workers")
    parser.add_argument("--evaluate", action="store_true", help="score the evaluation split afterwards (eval.json)")
    parser.add_argument("--limit-eval", type=int, default=None, help="with --evaluate: N samples spread over the split")
    parser.add_argument("--predictions", type=Path, default=None, help="with --evaluate: write GeoTIFF predictions here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--json", action="store_true", help="with --evaluate: print the report as JSON")
    parser.set_defaults(run=run)


def build_config(args: argparse.Namespace) -> FinetuneConfig:
    """The config file (if any) with the command-line flags applied."""
    data = FinetuneConfig.from_yaml(args.config).to_dict() if args.config is not None else {}
    if args.config is None and (args.task is None or args.dataset is None):
        raise ValueError("finetune: give --task and --dataset (or a --config that sets them)")
    for flag, target in OVERRIDES.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if target.startswith("optim."):
            data.setdefault("optim", {})[target.split(".", 1)[1]] = value
        else:
            data[target] = value
    if args.weights is not None:
        data.pop("preset", None)
    elif args.preset is not None:
        data["weights"] = None
    if args.dataset_option:
        data["dataset_options"] = {**data.get("dataset_options", {}), **parse_dataset_options(args.dataset_option)}
    if args.with_hr_bands is not None:
        data["hr_bands"] = list(parse_bands(args.with_hr_bands))
    if args.modalities is not None:
        data["modalities"] = [m.strip() for m in args.modalities.split(",") if m.strip()]
    if args.geo_context:
        data["geo_context"] = True
    if args.freeze_encoder:
        data["freeze_encoder"] = True
    if args.activation_checkpointing:
        data["activation_checkpointing"] = args.activation_checkpointing
    return FinetuneConfig.from_dict(data)


def run(args: argparse.Namespace) -> int:
    config = build_config(args)
    started = time.perf_counter()
    finetune(config, args.out, resume=args.resume, progress=not args.no_progress)
    trained = time.perf_counter() - started
    if not args.evaluate:
        return 0
    from skysense.downstream.evaluate import evaluate_run

    report = evaluate_run(args.out, limit=args.limit_eval, predictions=args.predictions, progress=not args.no_progress,
                          device=config.device)
    report["seconds"] = {"finetune": round(trained, 1), "evaluate": round(time.perf_counter() - started - trained, 1)}
    atomic_write(args.out / EVAL_NAME, lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
    print_report(report, args.json)
    return 0


def print_report(report: dict, as_json: bool) -> None:
    """JSON, or one line with the headline scores."""
    if as_json:
        print(json.dumps(report, indent=2))
        return
    keys = [k for k in ("oa", "top5", "map", "map50", "map50_11point", "miou", "mf1", "miou_excluding",
                        "mf1_excluding", "f1", "precision", "recall", "iou", "scs", "bc", "sc")
            if isinstance(report.get(k), float)]
    scores = ", ".join(f"{k} {report[k]:.4f}" for k in keys)
    if report.get("excluded_classes"):
        scores += f" (excluding {', '.join(report['excluded_classes'])})"
    print(f"{report['task']} on {report['dataset']} {report['split']} ({report['samples']} samples): {scores}")
