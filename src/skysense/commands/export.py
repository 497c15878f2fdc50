"""``skysense export``: the encoders as ONNX (dynamic batch and size) plus a ``torch.export`` program.

    skysense export --format onnx (--preset NAME | --weights DIR) --out FILE.onnx [--encoders hr,s2,s1]

Writes ``FILE.onnx`` and ``FILE.pt2``, then (unless ``--no-check``) runs the ONNX file under
onnxruntime at sizes other than the export's and prints the largest difference from PyTorch.
Input size rules and what the export cannot do (the fusion): :mod:`skysense.inference.export`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from skysense.config import PRESETS
from skysense.inference.export import ENCODERS, check_inputs, compare_onnx, export_encoders, size_rules
from skysense.models import SkySense


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="export the encoders to ONNX and a torch.export program")
    parser.add_argument("--format", choices=("onnx",), default="onnx")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", type=Path, help="a folder written by save_pretrained")
    source.add_argument("--preset", choices=sorted(PRESETS), help="a randomly initialised preset (torch.manual_seed(--seed))")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="the .onnx file (the .pt2 program goes beside it)")
    parser.add_argument("--encoders", default=",".join(ENCODERS), help="comma-separated subset of hr,s2,s1")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    parser.add_argument("--json", action="store_true", help="print a JSON report")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.weights is not None:
        model = SkySense.from_pretrained(str(args.weights))
    else:
        torch.manual_seed(args.seed)
        model = SkySense.from_preset(args.preset).eval()
    encoders = [e.strip() for e in args.encoders.split(",") if e.strip()]
    start = time.perf_counter()
    result = export_encoders(model, args.out, encoders)
    report = {
        "onnx": str(result.onnx), "program": str(result.program), "encoders": list(result.encoders),
        "inputs": size_rules(model, result.encoders), "seconds": round(time.perf_counter() - start, 1),
    }
    if not args.no_check:
        inputs = check_inputs(model, result.encoders)
        report["check"] = {
            "sizes": {k: list(v.shape) for k, v in inputs.items()},
            "max_abs_error": compare_onnx(model, result.onnx, inputs),
        }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"wrote {result.onnx} and {result.program} ({', '.join(result.encoders)}) in {report['seconds']} s")
        for name, rule in report["inputs"].items():
            print(f"  {name}: {rule}")
        if "check" in report:
            for name, error in report["check"]["max_abs_error"].items():
                print(f"  onnxruntime vs PyTorch, {name} at {report['check']['sizes'][name.split('_')[0]]}: "
                      f"max abs error {error:.2e}")
    return 0
