"""``skysense pretrain``: SkySense pretraining from a YAML config, resumable, torchrun-ready."""

from __future__ import annotations

import argparse

from skysense.pretrain.config import PretrainConfig
from skysense.pretrain.loop import pretrain


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("pretrain", help="pretrain SkySense (one process, or many with torchrun)")
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/pretrain/aid-tiny.yaml")
    parser.add_argument("--out", default="runs/pretrain", help="output folder (weights, state, metrics)")
    parser.add_argument("--data-root", help="dataset folder (default: data.root, else $SKYSENSE_DATA/<dataset>)")
    parser.add_argument("--max-steps", type=int, help="override max_steps")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = PretrainConfig.from_yaml(args.config)
    pretrain(config, args.out, data_root=args.data_root, resume=args.resume, max_steps=args.max_steps,
             progress=not args.no_progress)
    return 0
