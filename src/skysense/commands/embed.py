"""``skysense embed``: embed a whole scene into a georeferenced raster (COG or Zarr).

    skysense embed [--hr HR.tif] [--s2 S2 ...] [--s1 S1 ...] (--weights DIR | --preset NAME)
                   --out OUT [--format cog|zarr] [--level fused|hr|s2|s1] [--dtype float16|float32]

Inputs, dates, the common grid and the resume rules are those of :mod:`skysense.inference.scene`
and :mod:`skysense.inference.embed`; running the same command again after an interruption skips
the finished blocks and gives the same output.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import torch

from skysense.commands import add_device_argument, add_hr_bands_argument
from skysense.config import PRESETS, SkySenseConfig
from skysense.data.dates import parse_date
from skysense.devices import resolve_device
from skysense.inference.embed import LEVELS, EmbedOptions, EmbedReport, embed_scene
from skysense.inference.scene import Scene, resolve_frames, s2_frame_offsets
from skysense.inference.writers import DTYPES, FORMATS
from skysense.models import SkySense
from skysense.models.hr_bands import parse_bands


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("embed", help="embed a whole scene (HR, S2, S1 rasters) into a COG or Zarr")
    add_scene_arguments(parser)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--weights", type=Path, help="a folder written by save_pretrained")
    model.add_argument("--preset", choices=sorted(PRESETS), help="a randomly initialised preset (torch.manual_seed(--seed))")
    parser.add_argument("--seed", type=int, default=0)
    add_hr_bands_argument(parser)
    parser.add_argument("--level", choices=LEVELS, default="fused")
    add_output_arguments(parser)
    parser.set_defaults(run=run)


def add_output_arguments(parser: argparse.ArgumentParser, block_help: str = "(default 256)",
                         window_help: str = "(default 64)", overlap_help: str = "(default 16)",
                         out_help: str = "output .tif (cog) or folder (zarr)") -> None:
    """Where and how a scene-wide run writes (:class:`EmbedOptions` and the device), for
    ``embed`` and ``predict`` (whose ``--window``, ``--overlap`` and ``--block`` defaults, None,
    are chosen by the command)."""
    parser.add_argument("--out", type=Path, required=True, help=out_help)
    parser.add_argument("--format", choices=FORMATS, default=None, help="default: zarr for a .zarr path, else cog")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--window", type=int, default=None, help=f"window side in fusion-grid pixels {window_help}")
    parser.add_argument("--overlap", type=int, default=None,
                        help=f"overlap of windows in fusion-grid pixels {overlap_help}")
    parser.add_argument("--block", type=int, default=None, help=f"output block side in output pixels {block_help}")
    parser.add_argument("--batch-size", type=int, default=4)
    add_device_argument(parser)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-preview", action="store_true", help="do not write <out>.preview.png")
    parser.add_argument("--overwrite", action="store_true", help="replace an output left by a finished run")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the run's report as JSON")


def add_scene_arguments(parser: argparse.ArgumentParser) -> None:
    """The scene's inputs (``--hr``, ``--s2``, ``--s1`` and how to read them), as :func:`build_scene` takes them."""
    inputs = parser.add_argument_group("inputs (at least one)")
    inputs.add_argument("--hr", type=Path, help="HR GeoTIFF, the model's bands (R, G, B) as its first bands")
    inputs.add_argument("--hr-bands", help="band order of the HR file when it is not the model's, e.g. NIR,R,G,B")
    inputs.add_argument("--s2", type=Path, nargs="+", action="extend", default=[], metavar="PATH",
                        help="Sentinel-2 acquisitions: band folders, stacked GeoTIFFs, or a folder of them "
                             "(one per date); repeat for a time series")
    inputs.add_argument("--s1", type=Path, nargs="+", action="extend", default=[], metavar="PATH",
                        help="Sentinel-1 acquisitions (VV, VH), as --s2")
    inputs.add_argument("--s2-dates", help="comma-separated dates, one per S2 acquisition (YYYY-MM-DD)")
    inputs.add_argument("--s1-dates", help="comma-separated dates, one per S1 acquisition (YYYY-MM-DD)")
    inputs.add_argument("--s2-bands", help="band order of stacked S2 files without band descriptions, e.g. B1,B2,...")
    inputs.add_argument("--s1-bands", help="band order of stacked S1 files, e.g. VH,VV")
    inputs.add_argument("--s2-offset", type=float, default=None,
                        help="DN offset of the S2 products (0 before processing baseline 04.00, -1000 from it)")
    inputs.add_argument("--s2-baseline", default=None, help="processing baseline of the S2 products, e.g. 04.00")
    inputs.add_argument("--s2-level", choices=("L2A", "L1C"), default="L2A")
    inputs.add_argument("--s1-units", choices=("db", "linear"), default="db")
    inputs.add_argument("--hr-bit-depth", type=int, default=None, help="bits of HR data stored in 16-bit files")


def _dates(text: str | None, flag: str) -> list[dt.date] | None:
    if text is None:
        return None
    dates = []
    for item in text.split(","):
        found = parse_date(item.strip())
        if found is None:
            raise ValueError(f"{flag}: {item.strip()!r} is not a date (expected YYYY-MM-DD)")
        dates.append(found)
    return dates


def _bands(text: str | None) -> list[str] | None:
    return None if text is None else [b.strip() for b in text.split(",") if b.strip()]


def build_scene(args: argparse.Namespace, cfg: SkySenseConfig, hr_post: Path | None = None) -> Scene:
    """The :class:`Scene` of the command-line arguments, read for a model of configuration ``cfg``
    (``hr_post``: the HR image after a change)."""
    s2 = resolve_frames("s2", args.s2, cfg.inputs["s2"].bands, _bands(args.s2_bands),
                        _dates(args.s2_dates, "--s2-dates")) if args.s2 else []
    s1 = resolve_frames("s1", args.s1, cfg.inputs["s1"].bands, _bands(args.s1_bands),
                        _dates(args.s1_dates, "--s1-dates")) if args.s1 else []
    offsets = s2_frame_offsets(s2, args.s2_baseline, args.s2_offset) if s2 else None
    return Scene(cfg, hr=args.hr, s2=s2, s1=s1, hr_bit_depth=args.hr_bit_depth, s2_offsets=offsets,
                 s2_level=args.s2_level, s1_units=args.s1_units, hr_file_bands=_bands(args.hr_bands), hr_post=hr_post)


def load_model(args: argparse.Namespace) -> SkySense:
    if args.weights is not None:
        model = SkySense.from_pretrained(str(args.weights))
    else:
        torch.manual_seed(args.seed)
        model = SkySense.from_preset(args.preset).eval()
    if args.with_hr_bands:
        model.with_hr_bands(parse_bands(args.with_hr_bands))
    return model


def output_options(args: argparse.Namespace, level: str = "fused") -> EmbedOptions:
    """The :class:`EmbedOptions` of :func:`add_output_arguments`' flags."""
    fmt = args.format or ("zarr" if args.out.suffix == ".zarr" else "cog")
    window = 64 if args.window is None else args.window
    overlap = 16 if args.overlap is None else args.overlap
    return EmbedOptions(level=level, window=window, overlap=overlap, block=args.block or 256,
                        batch_size=args.batch_size, dtype=args.dtype, format=fmt, preview=not args.no_preview,
                        progress=not args.no_progress, overwrite=args.overwrite)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args).to(resolve_device(args.device)).eval()
    options = output_options(args, level=args.level)
    with build_scene(args, model.config) as scene:
        report = embed_scene(model, scene, args.out, options)
    print_report(report, args.json, f"{report.channels} x {report.height} x {report.width} {args.dtype} "
                                     f"({report.extra['level']}, stride {report.stride}, {report.crs})")
    return 0


def print_report(report: EmbedReport, as_json: bool, written: str, *lines: str) -> None:
    """The run's report as JSON, or a line saying what was ``written`` and how, then ``lines``."""
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    resumed = f", {report.blocks_skipped} already done" if report.blocks_skipped else ""
    print(f"wrote {report.out}: {written}; {report.blocks} blocks{resumed}, {report.windows_computed} windows in "
          f"{report.seconds:.1f} s")
    for line in lines:
        print(line)
    if report.preview is not None:
        print(f"preview: {report.preview}")
