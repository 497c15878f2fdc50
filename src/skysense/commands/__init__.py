"""Sub-commands of the ``skysense`` CLI, one module each (see :mod:`skysense.cli`)."""

from __future__ import annotations

import argparse


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
