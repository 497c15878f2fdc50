"""Sub-commands of the ``skysense`` CLI, one module each (see :mod:`skysense.cli`)."""

from __future__ import annotations

import argparse


def add_device_argument(parser: argparse.ArgumentParser, note: str = "") -> None:
    """``--device`` (read with :func:`skysense.devices.resolve_device`); ``note`` ends its help."""
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: CUDA when this machine has a GPU, else the CPU)" + note)
