"""``skysense demo``: pretrain ``tiny`` on real S2 + S1 patches, probe it, write a report.

A thin layer over :func:`skysense.demo.run_demo` (see there for the data, the steps and the
files written).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from skysense.demo import DEMO_PRETRAIN, run_demo


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="pretrain tiny on real S2+S1 patches, probe it against random init, write a report")
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"pretraining steps (default {DEMO_PRETRAIN['max_steps']})")
    parser.add_argument("--quick", action="store_true", help="4 pretraining steps: checks the pipeline only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue an interrupted demo in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    steps = 4 if args.quick else args.steps
    report = run_demo(Path(args.out), steps=steps, seed=args.seed, progress=not args.no_progress, resume=args.resume)
    print(f"wrote {args.out}/report.json, loss_curves.png, probe.png, embeddings.safetensors and pretrain/")
    return 0 if report["all_finite"] else 1
