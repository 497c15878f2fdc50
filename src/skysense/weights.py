"""Saving and loading SkySense weights: ``model.safetensors`` plus ``config.json``.

Loading never unpickles anything: safetensors holds only tensors, and the config is JSON.
Both files are written to temporary names in the target folder, then renamed, so a crash never
leaves a half-written checkpoint under the final names.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from skysense.config import SkySenseConfig
from skysense.models import SkySense
from skysense.models.layers import DropPath
from skysense.models.swin_v2 import WindowAttentionV2, log_spaced_relative_coords, relative_position_index

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_pretrained(model: SkySense, directory: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory``; returns the folder."""
    out = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": "pt", "skysense_format_version": str(FORMAT_VERSION), **(metadata or {})}
    atomic_write(out / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata=meta))
    config = {"skysense_format_version": FORMAT_VERSION, **model.config.to_dict()}
    atomic_write(out / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    return out


def load_config(directory: str | os.PathLike) -> SkySenseConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME}; expected a folder written by save_pretrained")
    data = json.loads(path.read_text())
    version = data.pop("skysense_format_version", None)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: skysense_format_version: expected {FORMAT_VERSION}, got {version}")
    return SkySenseConfig.from_dict(data)


def from_pretrained(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> SkySense:
    """Rebuild the model described by ``config.json`` and load ``model.safetensors`` strictly."""
    config = load_config(directory)
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing; expected beside {CONFIG_NAME}")
    state = load_file(str(weights), device=str(map_location))
    with torch.device("meta"):
        model = SkySense(config)
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{weights}: does not match its config: missing keys {result.missing_keys[:10]}, "
            f"unexpected keys {result.unexpected_keys[:10]}"
        )
    _rebuild_non_persistent_buffers(model, map_location)
    return model.eval()


def _rebuild_non_persistent_buffers(model: SkySense, device: str | torch.device) -> None:
    """Buffers not stored in the file (SwinV2 coordinate tables, drop-path rates) are recomputed
    on ``device``."""
    for module in model.modules():
        if isinstance(module, DropPath):
            module.reset_keep_prob(device)
        if isinstance(module, WindowAttentionV2):
            module.relative_coords_table = log_spaced_relative_coords(module.window).to(device)
            module.relative_position_index = relative_position_index(module.window).to(device)
