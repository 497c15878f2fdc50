"""``skysense convert-official``: the authors' released ``.pth`` files -> safetensors + config."""

from __future__ import annotations

import argparse

import torch

from skysense.commands import add_hr_bands_argument
from skysense.config import PRESETS, preset_config
from skysense.models import SkySense
from skysense.models.hr_bands import parse_bands
from skysense.official import PARTS, convert_state_dicts, load_official_file
from skysense.weights import save_pretrained

_FLAGS = {"hr": "--hr", "s2": "--s2", "s1": "--s1", "s2_head": "--s2-head", "s1_head": "--s1-head", "fusion": "--fusion"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert-official",
        help="convert the authors' released .pth state dicts (any subset) into safetensors + config.json",
    )
    for part in PARTS:
        parser.add_argument(_FLAGS[part], dest=part, metavar="FILE", help=f"official {part} state dict (.pth)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--preset", default="huge", choices=sorted(PRESETS),
                        help="architecture the files belong to (the release is 'huge')")
    parser.add_argument("--strict", action="store_true", help="fail if any key is missing or unexpected")
    add_hr_bands_argument(parser, "; saved so")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    files = {part: getattr(args, part) for part in PARTS if getattr(args, part)}
    if not files:
        raise ValueError(f"give at least one of {', '.join(_FLAGS.values())}")
    hr_bands = parse_bands(args.with_hr_bands) if args.with_hr_bands else None
    model = convert_official(files, args.preset, args.out, strict=args.strict, hr_bands=hr_bands)
    print(f"wrote {args.out} (preset {model.config.preset}, HR bands {','.join(model.config.inputs['hr'].bands)})")
    return 0


def convert_official(files: dict[str, str], preset: str, out: str, strict: bool = False,
                     hr_bands: tuple[str, ...] | None = None) -> SkySense:
    """Convert the given official files and save the model; parts not given stay randomly
    initialised. ``hr_bands`` (e.g. R, G, B, NIR): the HR encoder made to take them
    (:meth:`SkySense.with_hr_bands`) after loading the released R, G, B weights."""
    config = preset_config(preset)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in SkySense(config).state_dict().items()}
    parts = {part: load_official_file(path) for part, path in files.items()}
    state, report = convert_state_dicts(parts, expected)
    print(report.summary())
    if strict and (report.missing or report.unexpected):
        raise ValueError(f"--strict: {len(report.missing)} missing and {len(report.unexpected)} unexpected keys")
    model = SkySense(config)
    model.load_state_dict(state, strict=False)
    if hr_bands is not None:
        model.with_hr_bands(hr_bands)
    save_pretrained(model, out, metadata={"converted_from": ",".join(sorted(files))})
    return model
