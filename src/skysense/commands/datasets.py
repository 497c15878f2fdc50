"""``skysense datasets``: list the dataset loaders, and check a dataset on disk sample by sample."""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch

from skysense.commands import add_dataset_option_argument, parse_dataset_options
from skysense.data.datasets import DATASETS, dataset_root
from skysense.data.sample import CHANGE_CLASSES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("datasets", help="list dataset loaders; check a dataset on disk")
    sub = parser.add_subparsers(dest="datasets_command", required=True, metavar="ACTION")
    listing = sub.add_parser("list", help="the dataset loaders and their splits and bands")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(run=run_list)
    check = sub.add_parser("check", help="read every sample; report counts, bands, sizes, dates and errors")
    check.add_argument("name", choices=sorted(DATASETS))
    check.add_argument("--data-root", type=Path, default=None,
                       help="the dataset folder (default: $SKYSENSE_DATA/<usual sub-folder>)")
    check.add_argument("--limit", type=int, default=None, help="read at most this many samples")
    add_dataset_option_argument(check)
    check.add_argument("--json", action="store_true", help="print JSON")
    check.set_defaults(run=run_check)


def run_list(args: argparse.Namespace) -> int:
    rows = []
    for name, cls in sorted(DATASETS.items()):
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        rows.append({"name": name, "class": cls.__name__, "splits": list(cls.splits),
                     "bands": {m: list(b) for m, b in cls.bands.items()}, "summary": summary})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            bands = "; ".join(f"{m}: {','.join(b)}" for m, b in row["bands"].items())
            print(f"{row['name']:<16} {row['summary']}\n{'':<16} splits: {', '.join(row['splits'])}; {bands}")
    return 0


def check_dataset(name: str, root: Path, limit: int | None = None,
                  options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read every sample of a dataset (built with ``options``); a report of counts per split,
    shapes, dates, class counts of single labels (detection: of objects), pixel counts per class of
    masks (``mask``, ``change``; ``unlabelled`` for -1) and errors by file."""
    dataset = DATASETS[name](root, **(options or {}))
    classes = tuple(getattr(dataset, "classes", ()) or ())
    labels: dict[str, Counter] = defaultdict(Counter)
    pixels: dict[str, Counter] = defaultdict(Counter)
    sizes: dict[str, Counter] = defaultdict(Counter)
    dates: dict[str, set[int]] = defaultdict(set)
    read: Counter = Counter()
    errors: list[dict[str, str]] = []
    count = len(dataset) if limit is None else min(limit, len(dataset))
    for index in range(count):
        item = dataset.items[index]
        try:
            sample = dataset.load(index)
        except (ValueError, FileNotFoundError, OSError) as error:
            errors.append({"id": item.id, "path": str(item.path), "error": str(error)})
            continue
        read[item.split] += 1
        label = sample.get("label")
        if isinstance(label, torch.Tensor) and label.ndim == 0:
            index = int(label)
            labels[item.split][classes[index] if index < len(classes) else str(index)] += 1
        objects = sample.get("labels")  # detection: one label per object
        if isinstance(objects, torch.Tensor) and objects.ndim == 1 and "boxes" in sample:
            for index in objects.tolist():
                labels[item.split][classes[index] if index < len(classes) else str(index)] += 1
        for key in ("mask", "change"):
            mask = sample.get(key)
            if isinstance(mask, torch.Tensor) and mask.ndim == 2:
                names = classes if key == "mask" else CHANGE_CLASSES
                values, counts = torch.unique(mask, return_counts=True)
                for value, n in zip(values.tolist(), counts.tolist()):
                    name = "unlabelled" if value < 0 else names[value] if value < len(names) else str(value)
                    pixels[f"{item.split} {key}"][name] += n
        for key, value in sample.items():
            if isinstance(value, torch.Tensor) and value.ndim >= 1 and not key.endswith(("_dates", "_mask")):
                sizes[key][str(tuple(value.shape))] += 1
            if key.endswith("_dates") and isinstance(value, torch.Tensor):
                dates[key].update(int(v) for v in value.tolist())
    return {
        "dataset": name,
        "root": str(root),
        "items": dataset.split_counts(),
        "read": dict(sorted(read.items())),
        "checked": count,
        "bands": {m: list(b) for m, b in dataset.bands.items()},
        "sizes": {k: dict(v) for k, v in sorted(sizes.items())},
        "days_of_year": {k: sorted(v) for k, v in sorted(dates.items())},
        "labels": {split: dict(sorted(counts.items())) for split, counts in sorted(labels.items())},
        "pixels": {key: dict(sorted(counts.items())) for key, counts in sorted(pixels.items())},
        "errors": errors,
    }


def run_check(args: argparse.Namespace) -> int:
    root = dataset_root(args.name, args.data_root)
    report = check_dataset(args.name, root, args.limit, parse_dataset_options(args.dataset_option))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['dataset']} at {report['root']}")
        print(f"  items per split: {report['items']}; read: {report['read']} of {report['checked']} checked")
        for modality, bands in report["bands"].items():
            print(f"  {modality} bands: {', '.join(bands)}")
        for key, shapes in report["sizes"].items():
            print(f"  {key} shapes: " + ", ".join(f"{s} x{n}" for s, n in shapes.items()))
        for key, days in report["days_of_year"].items():
            print(f"  {key} days of year seen: {days}")
        for split, counts in report["labels"].items():
            print(f"  {split} labels: " + ", ".join(f"{c} x{n}" for c, n in counts.items()))
        for key, counts in report["pixels"].items():
            print(f"  {key} pixels: " + ", ".join(f"{c} {n}" for c, n in counts.items()))
        print(f"  errors: {len(report['errors'])}")
        for error in report["errors"]:
            print(f"    {error['path']}: {error['error']}")
    return 1 if report["errors"] else 0
