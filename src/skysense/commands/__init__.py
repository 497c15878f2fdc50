"""Sub-commands of the ``skysense`` CLI, one module each (see :mod:`skysense.cli`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml


def add_device_argument(parser: argparse.ArgumentParser, note: str = "") -> None:
    """``--device`` (read with :func:`skysense.devices.resolve_device`); ``note`` ends its help."""
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: CUDA when this machine has a GPU, else the CPU)" + note)


def add_hr_bands_argument(parser: argparse.ArgumentParser, note: str = "") -> None:
    """``--with-hr-bands R,G,B,NIR``: the encoder made to take these HR bands (read with
    :func:`skysense.models.hr_bands.parse_bands`, applied with ``SkySense.with_hr_bands``)."""
    parser.add_argument("--with-hr-bands", default=None, metavar="BANDS",
                        help="make the HR encoder take these bands, e.g. R,G,B,NIR: a new band starts from a "
                             "copy of a filter (NIR: red's, as the authors do) and red's normalisation" + note)


def add_embeddings_argument(parser: argparse.ArgumentParser) -> None:
    """The positional ``embeddings``: a raster written by ``skysense embed``."""
    parser.add_argument("embeddings", type=Path, help="an embedding raster written by skysense embed (.tif or .zarr)")


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    """``--overwrite``, ``--json`` and ``--no-progress`` of a command that writes one output."""
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_min_pixels_argument(parser: argparse._ActionsContainer) -> None:
    """``--min-pixels``: the sieve of a class map vectorised into polygons."""
    parser.add_argument("--min-pixels", type=int, default=1,
                        help="merge regions of fewer pixels into their largest neighbour before vectorising "
                             "(default 1: keep every region)")


def add_dataset_option_argument(parser: argparse.ArgumentParser) -> None:
    """``--option KEY=VALUE`` (repeatable): a keyword argument of the dataset class, the value
    read as YAML (``--option classes=[cropland,forest]``, ``--option multilabel=true``)."""
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", dest="dataset_option",
                        help="a dataset option, the value in YAML, e.g. classes=[cropland,forest] (repeatable)")


def parse_dataset_options(items: list[str]) -> dict[str, Any]:
    """``["classes=[a,b]", "multilabel=true"]`` -> ``{"classes": ["a", "b"], "multilabel": True}``."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option {item!r}: expected KEY=VALUE, e.g. classes=[cropland,forest]")
        try:
            options[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ValueError(f"--option {item!r}: the value is not YAML ({error})") from None
    return options
