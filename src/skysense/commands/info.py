"""``skysense info``: parameter counts of a preset, counted on the meta device."""

from __future__ import annotations

import argparse
import json

from skysense.config import PRESETS, preset_config
from skysense.parameters import count_parameters


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help="parameter counts of a preset (nothing allocated)")
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    counts = count_parameters(preset_config(args.preset))
    if args.json:
        print(json.dumps({"preset": args.preset, "parameters": counts}, indent=2))
    else:
        for part, n in counts.items():
            print(f"{part:>12}: {n:>15,} ({n / 1e6:,.1f}M)")
    return 0
