"""``skysense shard``: write a dataset as WebDataset-style tar shards (see :mod:`skysense.data.shards`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from skysense.commands import add_dataset_option_argument, parse_dataset_options
from skysense.data.datasets import DATASETS, dataset_root, reads_hr_bands
from skysense.data.shards import write_shards
from skysense.models.hr_bands import parse_bands


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("shard", help="write a dataset as tar shards for pretraining (data.shards)")
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    parser.add_argument("--data-root", type=Path, default=None,
                        help="the dataset folder (default: $SKYSENSE_DATA/<usual sub-folder>)")
    parser.add_argument("--out", type=Path, required=True, help="folder of the shards and their index.json")
    parser.add_argument("--split", default=None, help="only this split (default: every sample)")
    parser.add_argument("--samples-per-shard", type=int, default=256,
                        help="samples per tar file (default 256); at least ranks x workers shards are needed")
    parser.add_argument("--modalities", nargs="+", choices=("hr", "s2", "s1"), default=None,
                        help="manifest only: the modalities to read")
    parser.add_argument("--hr-bands", default=None, metavar="BANDS",
                        help="the HR bands to write, e.g. R,G,B,NIR for a model with hr_bands (datasets that read "
                             "other HR bands: " + ", ".join(n for n in sorted(DATASETS) if reads_hr_bands(n)) + ")")
    add_dataset_option_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    options = parse_dataset_options(args.dataset_option)
    if args.modalities is not None:
        if args.dataset != "manifest":
            raise ValueError(f"--modalities: only the manifest dataset takes it, not {args.dataset}")
        options["modalities"] = tuple(args.modalities)
    if args.hr_bands is not None:
        if not reads_hr_bands(args.dataset):
            raise ValueError(f"--hr-bands: {args.dataset} reads R, G, B only")
        options["hr_bands"] = parse_bands(args.hr_bands)
    dataset = DATASETS[args.dataset](dataset_root(args.dataset, args.data_root), split=args.split, **options)
    index = write_shards(dataset, args.out, args.samples_per_shard, dataset=args.dataset, split=args.split,
                         progress=not args.no_progress)
    size = sum((index.directory / s.name).stat().st_size for s in index.shards)
    print(json.dumps({"dataset": args.dataset, "split": args.split, "samples": index.samples,
                      "shards": len(index.shards), "bytes": size, "out": str(index.directory)}))
    return 0
