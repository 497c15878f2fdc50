"""Streaming embedding of a whole scene into a georeferenced raster, resumable, in bounded memory.

:func:`embed_scene` plans windows and blocks (:mod:`skysense.inference.windows`), reads each batch
of windows from the :class:`~skysense.inference.scene.Scene`, runs the model, blends overlapping
windows into the current output block and writes each finished block
(:mod:`skysense.inference.writers`); at the end it writes a PCA preview
(:mod:`skysense.inference.preview`) and the final output.

Levels (``level``) and their output grid, relative to the fusion grid of the scene (the
Sentinel-2 / Sentinel-1 pixel grid, or the HR grid coarsened 32 times):

* ``fused``: the fusion transformer's output, one ``fusion.embed_dim`` vector per fusion-grid
  pixel (stride 1), from every modality given;
* ``hr``: the HR encoder's last level (stride 1 on the fusion grid, 32 HR pixels);
* ``s2`` / ``s1``: the ViT features of each frame averaged over the valid frames, one per patch
  (stride ``patch_size`` = 4).

The output keeps the CRS of the fusion grid; its transform is the fusion grid's scaled by the
stride. A pixel is nodata (NaN) where no frame of any modality used holds data.

Memory: the model, one batch of windows, the block being finished and the one to its right
(partial sums carried over), and GDAL's block cache (``GDAL_CACHEMAX``, 64 MB here). None of it
grows with the scene.

Cost: windows straddling two block rows are computed again for the lower row (their results
are not kept across rows, which would cost memory proportional to the scene width): with the
defaults, 80 windows computed for 72 planned on the 408 x 390 px Paris OSCD scene, 336 for 272
on its 2 x 2 mosaic (``benchmarks/embed_memory.py``).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.warp
import torch
from affine import Affine
from rasterio.windows import Window
from tqdm.auto import tqdm

from skysense.config import SkySenseConfig
from skysense.data.rasters import RasterReadError
from skysense.inference.preview import pca_preview
from skysense.inference.reports import JsonReport
from skysense.inference.scene import HR_SCALE, Grid, Scene, WindowData, normalized_batch
from skysense.inference.windows import OWNER_ORDER, Group, WindowPlan
from skysense.inference.writers import DTYPES, FORMATS, BlockWriter, OutputSpec, close_progress, open_writer
from skysense.models import SkySense

LEVELS = ("fused", "hr", "s2", "s1")
GDAL_CACHE_MB = 64


@dataclass
class EmbedOptions:
    """Settings of a run (all sizes in pixels of the fusion grid except ``block``).

    Attributes:
        level: ``fused``, ``hr``, ``s2`` or ``s1`` (see the module docstring).
        window: side of the windows the model sees (fusion-grid pixels; 64 = the paper's S2 input).
        overlap: pixels shared by neighbouring windows, blended by cosine ramps.
        block: side of the output blocks (output pixels; a multiple of 16 for ``cog``).
        batch_size: windows per forward pass.
        dtype: ``float32`` or ``float16`` output.
        format: ``cog`` or ``zarr``.
        preview: write ``<out stem>.preview.png``.
        progress: show a progress bar.
        overwrite: replace an output left by a finished run.
    """

    level: str = "fused"
    window: int = 64
    overlap: int = 16
    block: int = 256
    batch_size: int = 4
    dtype: str = "float32"
    format: str = "cog"
    preview: bool = True
    progress: bool = True
    overwrite: bool = False


@dataclass
class EmbedReport(JsonReport):
    """What a run did."""

    out: Path
    preview: Path | None
    height: int
    width: int
    channels: int
    stride: int
    blocks: int
    blocks_skipped: int
    windows_computed: int
    seconds: float
    crs: str | None
    transform: tuple[float, ...]
    extra: dict[str, Any] = field(default_factory=dict)



def level_modalities(level: str, scene_modalities: Iterable[str]) -> tuple[str, ...]:
    """The modalities a level reads. Raises ValueError when the level's modality is not given."""
    present = tuple(scene_modalities)
    if level not in LEVELS:
        raise ValueError(f"level: expected one of {LEVELS}, got {level!r}")
    if level == "fused":
        return present
    if level not in present:
        raise ValueError(f"level {level!r} needs --{level} input; given: {', '.join(present) or 'none'}")
    return (level,)


def level_stride(model: SkySense, level: str) -> int:
    """Output pixels per fusion-grid pixel of a level."""
    return {"fused": 1, "hr": 1, "s2": model.config.s2.patch_size, "s1": model.config.s1.patch_size}[level]


def level_channels(model: SkySense, level: str) -> int:
    cfg = model.config
    return {"fused": cfg.fusion.embed_dim, "hr": cfg.hr.out_dims[-1], "s2": cfg.s2.embed_dim,
            "s1": cfg.s1.embed_dim}[level]


def preview_path(out: Path) -> Path:
    """``out.tif`` -> ``out.preview.png``, ``out.zarr`` -> ``out.preview.png``."""
    return out.with_name(out.stem + ".preview.png")


def model_signature(model: SkySense) -> str:
    """SHA-256 of the model's configuration and every parameter and buffer (identifies the weights)."""
    digest = hashlib.sha256(model.config.to_json().encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def window_centres(grid: Grid, windows: list[Window]) -> tuple[torch.Tensor, torch.Tensor]:
    """Latitude and longitude (degrees, float32) of the centre of each window of ``grid`` (geo-context).

    Raises:
        ValueError: the grid has no CRS.
    """
    if grid.crs is None:
        raise ValueError("geo-context: the scene has no CRS, so windows have no latitude / longitude")
    xs, ys = zip(*(grid.transform * (w.col_off + w.width / 2, w.row_off + w.height / 2) for w in windows))
    lon, lat = rasterio.warp.transform(grid.crs, "EPSG:4326", list(xs), list(ys))
    return torch.tensor(lat, dtype=torch.float32), torch.tensor(lon, dtype=torch.float32)


class _BlockSum:
    """Weighted sum, weight and validity of one output block."""

    def __init__(self, index: int, bounds: tuple[int, int, int, int], channels: int) -> None:
        self.index = index
        self.bounds = bounds
        r0, r1, c0, c1 = bounds
        self.total = np.zeros((channels, r1 - r0, c1 - c0), dtype=np.float32)
        self.weight = np.zeros((r1 - r0, c1 - c0), dtype=np.float32)
        self.valid = np.zeros((r1 - r0, c1 - c0), dtype=bool)

    def add(self, window: tuple[int, int, int, int], features: np.ndarray, weights: np.ndarray,
            valid: np.ndarray) -> None:
        y0, y1, x0, x1 = window
        r0, r1, c0, c1 = self.bounds
        ty0, ty1, tx0, tx1 = max(y0, r0), min(y1, r1), max(x0, c0), min(x1, c1)
        if ty1 <= ty0 or tx1 <= tx0:
            return
        src = (slice(ty0 - y0, ty1 - y0), slice(tx0 - x0, tx1 - x0))
        dst = (slice(ty0 - r0, ty1 - r0), slice(tx0 - c0, tx1 - c0))
        w = weights[src]
        self.total[(slice(None),) + dst] += features[(slice(None),) + src] * w
        self.weight[dst] += w
        self.valid[dst] |= valid[src]

    def result(self) -> np.ndarray:
        """(C, h, w) float32: the weighted mean, NaN where nodata."""
        ok = self.valid & (self.weight > 0)
        out = np.full_like(self.total, np.nan)
        np.divide(self.total, self.weight, out=out, where=ok[None])
        return out


class WindowRunner:
    """Reads groups of windows from a scene and runs ``forward`` on them (embedding or prediction).

    ``stride`` is how many fusion-grid pixels one output pixel spans (coarser output), ``upscale``
    how many output pixels one fusion-grid pixel spans (finer output: 32 for maps on the HR
    grid); one of them is 1. ``forward`` takes a normalised batch and returns (B, C, h, w) on the
    output grid of the windows.
    """

    def __init__(self, scene: Scene, plan: WindowPlan, modalities: tuple[str, ...], config: SkySenseConfig,
                 forward: Callable[[dict[str, torch.Tensor]], torch.Tensor], device: torch.device,
                 stride: int = 1, upscale: int = 1, locate: bool = False, require_all: bool = False) -> None:
        if stride > 1 and upscale > 1:
            raise ValueError(f"stride ({stride}) and upscale ({upscale}): one of them must be 1")
        if upscale > 1 and not (require_all and upscale == HR_SCALE and "hr" in modalities):
            raise ValueError(f"upscale: outputs finer than the fusion grid are predictions on the HR grid "
                             f"(require_all, upscale {HR_SCALE}, HR read); got upscale {upscale}")
        self.locate = locate
        self.require_all = require_all
        self.scene = scene
        self.plan = plan
        self.modalities = modalities
        self.config = config
        self.forward = forward
        self.device = device
        self.stride = stride
        self.upscale = upscale
        self.computed = 0

    def _fusion_window(self, row: int, col: int) -> Window:
        y0, _, x0, _ = self.plan.window_bounds(row, col)
        size = self.plan.window * self.stride // self.upscale
        return Window(x0 * self.stride // self.upscale, y0 * self.stride // self.upscale, size, size)

    def _valid(self, data: WindowData) -> np.ndarray:
        """Validity on the output grid of a window: where any modality holds data; with
        ``require_all`` where every one does (a prediction needs all its inputs), and an output
        pixel coarser than the fusion grid (a classified tile) only when they do over all of it."""
        size = self.plan.window
        if not self.require_all:
            if self.stride > 1:
                return data.valid.reshape(size, self.stride, size, self.stride).any(axis=(1, 3))
            return data.valid
        valid = None
        for m in self.modalities:
            v = data.inputs[f"{m}_valid"]
            if m != "hr":  # (T, h, w) per frame on the fusion grid
                v = v.any(axis=0).repeat(self.upscale, 0).repeat(self.upscale, 1)
            elif self.upscale == 1:  # HR grid -> fusion grid: a fusion pixel needs all its HR pixels
                n = v.shape[0] // HR_SCALE
                v = v.reshape(n, HR_SCALE, n, HR_SCALE).all(axis=(1, 3))
            valid = v if valid is None else valid & v
        if self.stride > 1:
            valid = valid.reshape(size, self.stride, size, self.stride).all(axis=(1, 3))
        return valid

    def run(self, group: Group) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Output (C, w, w) and validity (w, w) on the output grid of each window with data.

        Raises:
            RasterReadError: a read failed (names the window and the file).
        """
        reads = []
        for col in group.cols:
            window = self._fusion_window(group.row, col)
            try:
                data = self.scene.read(window, self.modalities)
            except RasterReadError as error:
                y0, y1, x0, x1 = self.plan.window_bounds(group.row, col)
                raise RasterReadError(
                    f"window ({group.row}, {col}) = output rows {y0}..{y1}, cols {x0}..{x1} "
                    f"(fusion-grid rows {int(window.row_off)}..{int(window.row_off + window.height)}, "
                    f"cols {int(window.col_off)}..{int(window.col_off + window.width)}): {error}"
                ) from None
            if data.valid.any():
                reads.append((col, data))
        if not reads:
            return {}
        batch = normalized_batch([d for _, d in reads], self.config, self.modalities)
        if self.locate:
            batch["lat"], batch["lon"] = window_centres(self.scene.grid,
                                                          [self._fusion_window(group.row, c) for c, _ in reads])
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.inference_mode():
            features = self.forward(batch)
        features = features.float().cpu().numpy()
        size = self.plan.window
        out = {}
        for i, (col, data) in enumerate(reads):
            out[col] = (features[i, :, :size, :size], self._valid(data))
        self.computed += len(reads)
        return out


def level_forward(model: SkySense, level: str) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """The features of ``level`` (module docstring) from a normalised batch."""

    def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if level == "fused":
            return model.forward_features(**batch)["fused"]
        if level == "hr":
            return model.hr_encoder.forward_features(batch["hr"])
        valid = batch[f"{level}_mask"]
        frames = model.encode_frames(level, batch[level], valid)
        weights = valid.to(frames.dtype)[:, :, None, None, None]
        return (frames * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    return forward


def _check_sizes(options: EmbedOptions, stride: int, modalities: tuple[str, ...], model: SkySense) -> None:
    if options.window % stride or options.overlap % stride:
        raise ValueError(
            f"window ({options.window}) and overlap ({options.overlap}): expected multiples of the output "
            f"stride of level {options.level!r} ({stride} fusion-grid pixels)"
        )
    patch = model.config.s2.patch_size
    if any(m in ("s2", "s1") for m in modalities) and options.window % patch:
        raise ValueError(f"window: expected a multiple of the ViT patch ({patch} pixels), got {options.window}")
    if options.format == "cog" and options.block % 16:
        raise ValueError(f"block: a GeoTIFF tile side must be a multiple of 16, got {options.block}")
    if options.dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {DTYPES}, got {options.dtype!r}")
    if options.format not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {options.format!r}")


def embed_scene(model: SkySense, scene: Scene, out: str | Path, options: EmbedOptions | None = None,
                model_id: str | None = None) -> EmbedReport:
    """Embed ``scene`` into ``out`` (see the module docstring); resumes a partial run of the same
    command.

    Args:
        model: the model, in eval mode, on the device to run on.
        scene: the opened inputs.
        out: output path (``.tif`` for ``cog``, a folder such as ``.zarr`` for ``zarr``).
        options: the run's settings.
        model_id: identifies the weights in the resume signature (default: a hash of them).

    Raises:
        ValueError: inconsistent settings, an existing output, a partial run of other settings.
        RasterReadError: a window cannot be read (names the window and file); the blocks finished
            so far stay on disk and a rerun resumes after them.
    """
    options = options or EmbedOptions()
    stride = level_stride(model, options.level)
    modalities = level_modalities(options.level, scene.modalities)
    _check_sizes(options, stride, modalities, model)
    report = write_scene(scene, out, options, level_forward(model, options.level), modalities,
                         level_channels(model, options.level), model.config,
                         {"skysense_level": options.level, "skysense_stride": str(stride),
                          "skysense_modalities": ",".join(modalities), "skysense_preset": model.config.preset},
                         model_id or model_signature(model), stride=stride, device=next(model.parameters()).device)
    report.extra["level"] = options.level
    return report


def write_scene(scene: Scene, out: str | Path, options: EmbedOptions,
                forward: Callable[[dict[str, torch.Tensor]], torch.Tensor], modalities: tuple[str, ...],
                channels: int, config: SkySenseConfig, tags: dict[str, str], model_id: str, stride: int = 1,
                upscale: int = 1, device: torch.device | None = None, locate: bool = False, require_all: bool = False,
                finish: Callable[[Callable, list, int, int], Any] | None = None,
                extent: tuple[int, int] | None = None) -> EmbedReport:
    """Run ``forward`` over ``scene`` window by window and write its ``channels`` blended outputs
    to ``out`` block by block, resumably (the machinery of :func:`embed_scene`, which
    :func:`skysense.inference.predict.predict_scene` shares). ``stride`` / ``upscale``: see
    :class:`WindowRunner`; ``options.window`` and ``options.overlap`` are fusion-grid pixels,
    ``options.block`` output pixels; ``locate`` adds each window's ``lat`` / ``lon`` to the batch,
    ``require_all`` counts a pixel valid only where every modality holds data;
    ``finish(read_block, blocks, height, width)`` runs on the written output before it is
    finalised (its result goes in ``extra["finish"]``); ``extent`` (height, width) cuts the output
    grid (a map on the HR grid of a scene without S2 / S1 ends where the HR image does, not at the
    fusion grid's next multiple of 32 pixels)."""
    out = Path(out)
    start = time.perf_counter()
    grid = scene.grid
    height, width = -(-grid.height * upscale // stride), -(-grid.width * upscale // stride)
    if extent is not None:
        height, width = min(height, extent[0]), min(width, extent[1])
    plan = WindowPlan.create(height, width, options.window * upscale // stride, options.overlap * upscale // stride,
                             options.block, options.batch_size, align=upscale)
    transform = grid.transform @ Affine.scale(stride / upscale)
    spec = OutputSpec(grid.crs, transform, width, height, channels, options.dtype, options.block, tags)
    signature = {
        "scene": scene.signature(),
        "model": model_id,
        "options": {k: v for k, v in asdict(options).items() if k not in ("progress", "overwrite")},
    }
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
        writer, progress = open_writer(options.format, out, spec, signature, overwrite=options.overwrite)
        skipped = len(progress.done)
        runner = WindowRunner(scene, plan, modalities, config, forward, device or torch.device("cpu"), stride, upscale,
                              locate, require_all)
        bar = tqdm(total=plan.num_blocks, initial=skipped, unit="block", desc=f"{out.name}",
                   disable=not options.progress, dynamic_ncols=True)
        with bar:
            carry: _BlockSum | None = None
            for index in range(plan.num_blocks):
                if index in progress.done:
                    carry = None
                    continue
                carry = _finish_block(plan, runner, index, carry, progress.done, channels, writer)
                progress.mark(index)
                bar.set_postfix(windows=runner.computed, refresh=False)
                bar.update(1)
        blocks = [plan.block_bounds(i) for i in range(plan.num_blocks)]
        preview = None
        if options.preview:
            preview = preview_path(out)
            pca_preview(writer.read_block, blocks, height, width, preview)
        finished = None if finish is None else finish(writer.read_block, blocks, height, width)
        writer.finish()
        close_progress(writer, progress)
    return EmbedReport(
        out=out, preview=preview, height=height, width=width, channels=channels, stride=stride,
        blocks=plan.num_blocks, blocks_skipped=skipped, windows_computed=runner.computed,
        seconds=round(time.perf_counter() - start, 3), crs=None if grid.crs is None else grid.crs.to_string(),
        transform=tuple(transform)[:6],
        extra={"windows_in_plan": plan.num_windows, "modalities": list(modalities), "upscale": upscale,
               **({} if finished is None else {"finish": finished})},
    )


def _finish_block(plan: WindowPlan, embedder: WindowRunner, index: int, carry: _BlockSum | None,
                  done: set[int], channels: int, writer: BlockWriter) -> _BlockSum | None:
    """Blend every window reaching block ``index``, write it; returns the partial sums of the next
    block to the right (the windows owned here and above that reach it), or None."""
    bi, bj = plan.block_position(index)
    if carry is not None and carry.index == index:
        current, owners = carry, OWNER_ORDER[2:]
    else:
        current, owners = _BlockSum(index, plan.block_bounds(index), channels), OWNER_ORDER
    right = index + 1 if bj + 1 < plan.block_cols and index + 1 not in done else None
    following = None if right is None else _BlockSum(right, plan.block_bounds(right), channels)
    for di, dj in owners:
        feeds_right = following is not None and (di, dj) in OWNER_ORDER[2:]
        for group in plan.groups(bi + di, bj + dj):
            if not any(plan.overlaps(group.row, c, index) for c in group.cols):
                continue
            results = embedder.run(group)
            for col in group.cols:
                if col not in results:
                    continue
                features, valid = results[col]
                bounds = plan.window_bounds(group.row, col)
                weights = plan.weights(group.row, col)
                current.add(bounds, features, weights, valid)
                if feeds_right:
                    following.add(bounds, features, weights, valid)
    writer.write_block(current.bounds, current.result())
    return following
