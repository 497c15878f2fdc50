"""Export of the SkySense encoders to ONNX and to a ``torch.export`` program, with dynamic shapes.

:func:`export_encoders` wraps the chosen encoders (HR SwinV2, S2 ViT, S1 ViT) side by side in one
module (:class:`EncoderBundle`: inputs ``hr`` (B, 3, H, W) (or the model's HR band count), ``s2`` (B, 10, h, w), ``s1`` (B, 2, h,
w), each with its own batch and spatial size; outputs ``hr_features`` (B, C, H/32, W/32),
``s2_features`` and ``s1_features`` (B, D, h/4, w/4)), exports it once with ``torch.export``
(saved as ``.pt2`` beside the ONNX file) and converts that program to ONNX.

Sizes the exported graphs accept (checked by the ``.pt2`` program, assumed by the ONNX graph):

* every batch size from 1;
* ``hr``: height and width multiples of 256 from 512 up. The SwinV2 pads each stage's map to a
  multiple of its window (8) and switches the shifted windows off where a map is no larger
  than one window; both are Python branches on the size, which a graph cannot keep. Sides that
  are multiples of 256 need no padding at any stage (H/4 ... H/32 are multiples of 8), and from
  512 the last stage is larger than one window, so one graph holds for all of them. Pad or
  resize other sizes to such a multiple before calling it (results then differ from the eager
  model run on the unpadded image), or run the eager model;
* ``s2``, ``s1``: height and width multiples of the patch (4), from 4 up.

What the export changes, inside :func:`export_friendly` only (the eager model is untouched):

* the cached shifted-window mask (``functools.lru_cache`` on the map size) is computed
  uncached, since a symbolic size cannot be a cache key;
* ``scaled_dot_product_attention`` is written out as ``softmax(q k^T * scale + mask) v``: the ONNX
  decomposition of PyTorch's fused CPU attention records a ``view`` that is invalid for the
  SwinV2's window layout (PyTorch 2.14 fails with "Cannot view a tensor ...");
* the ViT position embedding is always resized bicubically to the token grid: the eager code
  skips the resize for the stored 16 x 16 grid, a branch on the size; resizing a grid to its own
  size is the identity, so the values are the same;
* sizes are reasoned about "size-obliviously" (``backed_size_oblivious``), so that batch size 1
  is not special-cased against the example batch.

The fusion transformer is not exported: its forward skips the key-padding mask when every
frame is valid (``bool(mask.all())``) and encodes only the valid frames (boolean indexing), both
data-dependent Python branches that ``torch.export`` cannot trace.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import skysense.models.swin_v2 as swin_v2
from skysense.models import SkySense
from skysense.models.vit import VisionTransformer

ENCODERS = ("hr", "s2", "s1")
HR_MULTIPLE = 256
HR_MIN = 512
MAX_BATCH = 4096
MAX_SIDE = 16384


class EncoderBundle(nn.Module):
    """The chosen encoders side by side: ``forward(*inputs)`` returns one feature map per input."""

    def __init__(self, model: SkySense, encoders: Sequence[str] = ENCODERS) -> None:
        super().__init__()
        unknown = [e for e in encoders if e not in ENCODERS]
        if unknown or not encoders:
            raise ValueError(f"encoders: expected a non-empty subset of {ENCODERS}, got {list(encoders)}")
        self.names = tuple(encoders)
        self.encoders = nn.ModuleList(model.encoder(e) for e in self.names)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(encoder.forward_features(x) for encoder, x in zip(self.encoders, inputs))


def _attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                    enable_gqa: bool = False) -> torch.Tensor:
    """``scaled_dot_product_attention`` without dropout, causal masking or grouped heads."""
    if dropout_p or is_causal or enable_gqa:
        raise ValueError("export: attention with dropout, causal masking or grouped heads is not supported")
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return scores.softmax(-1) @ v


def _resized_position_embedding(self: VisionTransformer, grid_h: int, grid_w: int) -> torch.Tensor:
    """:meth:`VisionTransformer.position_embedding` without the shortcut for the stored grid."""
    g = self.config.pos_grid
    cls_slot, patch = self.pos_embed[:, :1], self.pos_embed[:, 1:]
    patch = patch.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
    patch = F.interpolate(patch, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    return torch.cat([cls_slot, patch.flatten(2).transpose(1, 2).to(self.pos_embed.dtype)], dim=1)


@contextlib.contextmanager
def export_friendly(model: SkySense) -> Iterator[None]:
    """Within this context the model traces with dynamic shapes (see the module docstring)."""
    import torch.fx.experimental._config as fx_config

    cached_mask = swin_v2.shifted_window_mask
    attention = F.scaled_dot_product_attention
    vits = [m for m in model.modules() if isinstance(m, VisionTransformer)]
    swin_v2.shifted_window_mask = cached_mask.__wrapped__
    F.scaled_dot_product_attention = _attention_math
    for vit in vits:
        vit.position_embedding = types.MethodType(_resized_position_embedding, vit)
    try:
        with fx_config.patch(backed_size_oblivious=True):
            yield
    finally:
        swin_v2.shifted_window_mask = cached_mask
        F.scaled_dot_product_attention = attention
        for vit in vits:
            del vit.position_embedding


def example_inputs(model: SkySense, encoders: Sequence[str], batch: int = 2) -> tuple[torch.Tensor, ...]:
    """Inputs traced at export: HR 512 x 768, S2 64 x 48, S1 48 x 64 (deliberately not square)."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    shapes = {"hr": (batch, cfg.hr.in_chans, 512, 768), "s2": (batch, cfg.s2.in_chans, 64, 48),
              "s1": (batch, cfg.s1.in_chans, 48, 64)}
    return tuple(torch.randn(shapes[e], generator=g) for e in encoders)


def dynamic_shapes(model: SkySense, encoders: Sequence[str]) -> tuple[dict[int, object], ...]:
    """Batch and spatial dims of every input, with the size rules of the module docstring."""
    from torch.export import Dim

    cfg = model.config
    shapes = []
    for e in encoders:
        batch = Dim(f"{e}_batch", min=1, max=MAX_BATCH)
        if e == "hr":
            h = HR_MULTIPLE * Dim("hr_h", min=HR_MIN // HR_MULTIPLE, max=MAX_SIDE // HR_MULTIPLE)
            w = HR_MULTIPLE * Dim("hr_w", min=HR_MIN // HR_MULTIPLE, max=MAX_SIDE // HR_MULTIPLE)
        else:
            patch = getattr(cfg, e).patch_size
            h = patch * Dim(f"{e}_h", min=1, max=MAX_SIDE // patch)
            w = patch * Dim(f"{e}_w", min=1, max=MAX_SIDE // patch)
        shapes.append({0: batch, 2: h, 3: w})
    return tuple(shapes)


@dataclass
class ExportResult:
    """Files written by :func:`export_encoders` and what they take."""

    onnx: Path
    program: Path
    encoders: tuple[str, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


def size_rules(model: SkySense, encoders: Sequence[str]) -> dict[str, str]:
    """Human-readable input size rules of an export, also stored in the ONNX metadata."""
    rules = {}
    for e in encoders:
        if e == "hr":
            rules[e] = (f"(B, {model.config.hr.in_chans}, H, W): H, W multiples of {HR_MULTIPLE}, "
                        f"at least {HR_MIN}")
        else:
            cfg = getattr(model.config, e)
            rules[e] = f"(B, {cfg.in_chans}, h, w): h, w multiples of {cfg.patch_size}"
    return rules


def export_encoders(model: SkySense, out: str | Path, encoders: Sequence[str] = ENCODERS,
                    verbose: bool = False) -> ExportResult:
    """Export the encoders to ``out`` (ONNX) and ``out`` with suffix ``.pt2`` (``torch.export``).

    Both files are written atomically (see the comment in the body). The ONNX model's metadata holds the model configuration
    (bands, normalisation) as ``skysense_config`` and the size rules as ``skysense_input_sizes``.
    """
    out = Path(out)
    model = model.eval()
    bundle = EncoderBundle(model, encoders).eval()
    inputs = example_inputs(model, bundle.names)
    input_names = tuple(bundle.names)
    output_names = tuple(f"{e}_features" for e in bundle.names)
    with export_friendly(model), torch.no_grad():
        program = torch.export.export(bundle, inputs, dynamic_shapes={"inputs": dynamic_shapes(model, bundle.names)})
        onnx_program = torch.onnx.export(program, inputs, dynamo=True, input_names=list(input_names),
                                         output_names=list(output_names), verbose=verbose)
    onnx_program.model.metadata_props["skysense_config"] = model.config.to_json()
    onnx_program.model.metadata_props["skysense_input_sizes"] = json.dumps(size_rules(model, bundle.names))
    pt2 = out.with_suffix(".pt2")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written under their final names in a scratch folder beside ``out``, then renamed into place
    # (the ONNX file last): a crash never leaves a half-written file under a final name, and an
    # external weights file (models over 2 GB) keeps the name the ONNX file refers to.
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as scratch:
        onnx_program.save(str(Path(scratch) / out.name))
        torch.export.save(program, str(Path(scratch) / pt2.name))
        for path in sorted(Path(scratch).iterdir(), key=lambda p: p.name == out.name):
            os.replace(path, out.parent / path.name)
    return ExportResult(out, pt2, bundle.names, input_names, output_names)


def compare_onnx(model: SkySense, onnx_path: str | Path, inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max absolute difference between onnxruntime (CPU) and the eager PyTorch encoders, per output."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in inputs]
    if missing:
        raise ValueError(f"{onnx_path}: inputs {missing} not given; the model takes {names}")
    outputs = session.run(None, {n: inputs[n].numpy() for n in names})
    errors = {}
    with torch.no_grad():
        for name, value in zip(names, outputs):
            reference = model.encoder(name).forward_features(inputs[name]).numpy()
            if value.shape != reference.shape:
                raise ValueError(f"{onnx_path}: {name}_features shape {value.shape}, PyTorch gives {reference.shape}")
            errors[f"{name}_features"] = float(np.abs(value - reference).max())
    return errors


def check_inputs(model: SkySense, encoders: Sequence[str], batch: int = 1) -> dict[str, torch.Tensor]:
    """Inputs at sizes other than the export's: HR 768 x 512, S2 40 x 56, S1 20 x 16."""
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    shapes = {"hr": (batch, cfg.hr.in_chans, 768, 512), "s2": (batch, cfg.s2.in_chans, 40, 56),
              "s1": (batch, cfg.s1.in_chans, 20, 16)}
    return {e: torch.randn(shapes[e], generator=g) for e in encoders}
