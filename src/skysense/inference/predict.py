"""Class and change maps of whole scenes from a fine-tuned model: streaming, resumable, georeferenced.

:func:`predict_scene` runs a model made by ``skysense finetune --task segmentation`` (or
``--task change``: two dates, as ``hr`` + ``hr_post`` and / or S2 / S1 series of two frames; or
``--task classification``: tiles) over a :class:`~skysense.inference.scene.Scene` window by
window, with the machinery of :func:`~skysense.inference.embed.embed_scene` (bounded memory,
cosine-blended overlaps, blocks written as they finish, a killed run resumed by the same command):

* the inputs are the model's modalities (``spec.modalities``), each of which the scene must give;
  with ``spec.geo_context`` each window gets the latitude / longitude of its centre;
* segmentation and change: the output grid is the model's target grid: the HR grid when HR is an
  input (the fusion grid refined 32 times; the HR image's own grid, pixel for pixel, when the
  scene has no S2 / S1), else the Sentinel grid (the fusion grid itself); a pixel is nodata where
  any input lacks data;
* classification: the scene is cut into side-by-side **tiles** of ``window`` x ``window``
  fusion-grid pixels (``overlap`` 0), one output pixel each (the fusion grid coarsened ``window``
  times), from the grid's top-left corner. Each tile is classified as the model was trained: HR
  resized to its ``image_size``, S2 / S1 frames to its ``sentinel_size`` when it has one. A tile is
  nodata unless every input holds data over all of it (a partial tile at the scene's right or
  bottom edge is nodata);
* ``out`` holds the class probabilities (softmax, one band per class, blended across
  overlapping windows; a multi-label classifier's sigmoid per class), NaN where nodata;
* ``<out stem>.classes.tif`` holds the most probable class per pixel (uint8 tiled GeoTIFF,
  255 = nodata), tagged with the class names; a semantic change model (``semantic_classes``)
  writes the probabilities of change, then of each class before, then after, and also
  ``<out stem>.before.classes.tif`` / ``.after.classes.tif`` (classes named by their index); a multi-label classifier has none (a tile may hold
  several classes), and the report counts the tiles at or above 0.5 per class instead.

Both keep the scene's CRS; the transform is the fusion grid's scaled by the tile (classification)
or divided by the refinement (maps on the HR grid).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import rasterio
import torch
from affine import Affine

from skysense.downstream.data import resize_series
from skysense.downstream.tasks import DownstreamModel, TaskSpec
from skysense.inference.embed import EmbedOptions, EmbedReport, model_signature, write_scene
from skysense.inference.scene import HR_SCALE, Scene
from skysense.weights import atomic_write

CLASS_NODATA = 255
"""Value of the class map where there is no prediction."""


def classes_path(out: Path) -> Path:
    """``out.tif`` -> ``out.classes.tif`` (``out.zarr`` -> ``out.classes.tif``)."""
    return out.with_name(out.stem + ".classes.tif")


def _check_two_dates(modalities: tuple[str, ...], scene: Scene) -> None:
    """A change model compares two dates: HR needs ``hr_post``, a series exactly two frames."""
    for m in modalities:
        if m == "hr" and scene.hr_post_path is None:
            raise ValueError("predict: the change model reads HR before and after; give the image after (--hr-post)")
        if m != "hr" and len(scene.frames[m]) != 2:
            raise ValueError(f"predict: the change model reads {m} at two dates (before, after); the scene has "
                             f"{len(scene.frames[m])} {m} frames")


def completed_batch(batch: dict[str, torch.Tensor], modalities: tuple[str, ...], window: int,
               config: Any, frames: int = 1) -> dict[str, torch.Tensor]:
    """The batch with every modality present: one that no window of the batch has data for gets
    zeros (the normalised mean; ``hr_post`` too for a change model's HR) and, for a series,
    ``frames`` frames marked missing. Those pixels are nodata in the output anyway (``require_all``)."""
    size = next(v.shape[0] for k, v in batch.items() if k in modalities)
    device = next(iter(batch.values())).device
    for m in modalities:
        if m in batch:
            continue
        if m == "hr":
            batch[m] = torch.zeros(size, config.hr.in_chans, window * HR_SCALE, window * HR_SCALE, device=device)
            if frames == 2:
                batch["hr_post"] = torch.zeros_like(batch[m])
        else:
            channels = getattr(config, m).in_chans
            batch[m] = torch.zeros(size, frames, channels, window, window, device=device)
            batch[f"{m}_mask"] = torch.zeros(size, frames, dtype=torch.bool, device=device)
            batch[f"{m}_dates"] = torch.ones(size, frames, dtype=torch.int64, device=device)
    return batch


def semantic_paths(out: Path) -> tuple[Path, Path]:
    """``out.tif`` -> ``out.before.classes.tif``, ``out.after.classes.tif``: a semantic change
    model's class maps of each date."""
    return out.with_name(out.stem + ".before.classes.tif"), out.with_name(out.stem + ".after.classes.tif")


def _class_map_writer(out: Path, classes: tuple[str, ...], crs: Any, transform: Any, block: int,
                      semantic: tuple[str, ...] = ()) -> Callable[[Callable, list, int, int], dict[str, Any]]:
    """``finish`` hook of :func:`write_scene`: writes the arg-max class map beside ``out``; with
    ``semantic`` class names (a semantic change model: bands of the change classes, then of the
    classes before, then after) also each date's class map."""

    def finish(read_block: Callable, blocks: list, height: int, width: int) -> dict[str, Any]:
        result = _write_class_map(classes_path(out), read_block, blocks, slice(0, len(classes)), classes, height,
                                  width)
        if semantic:
            k, dates = len(classes), {}
            for name, path, bands in zip(("before", "after"), semantic_paths(out),
                                         (slice(k, k + len(semantic)), slice(k + len(semantic), k + 2 * len(semantic)))):
                dates[name] = _write_class_map(path, read_block, blocks, bands, semantic, height, width)
            result["semantic"] = dates
        return result

    def _write_class_map(path: Path, read_block: Callable, blocks: list, bands: slice, classes: tuple[str, ...],
                         height: int, width: int) -> dict[str, Any]:
        counts = np.zeros(len(classes), dtype=np.int64)
        profile = dict(driver="GTiff", height=height, width=width, count=1, dtype="uint8", nodata=CLASS_NODATA,
                       crs=crs, transform=transform, tiled=True, blockxsize=block, blockysize=block,
                       compress="deflate")

        def write(tmp: Path) -> None:
            with rasterio.open(tmp, "w", **profile) as dst:
                for r0, r1, c0, c1 in blocks:
                    probabilities = read_block((r0, r1, c0, c1))[bands]
                    valid = np.isfinite(probabilities).all(axis=0)
                    labels = np.full(valid.shape, CLASS_NODATA, dtype=np.uint8)
                    labels[valid] = np.nan_to_num(probabilities).argmax(axis=0)[valid]
                    counts[:] += np.bincount(labels[valid], minlength=len(classes))[:len(classes)]
                    dst.write(labels[None], window=rasterio.windows.Window(c0, r0, c1 - c0, r1 - r0))
                dst.update_tags(skysense_classes=json.dumps(list(classes)))

        atomic_write(path, write)
        return {"classes_path": str(path), "pixels_per_class": dict(zip(classes, counts.tolist()))}

    return finish


def _tile_counter(classes: tuple[str, ...], threshold: float = 0.5) -> Callable[[Callable, list, int, int], dict[str, Any]]:
    """``finish`` hook of a multi-label classifier: no class map (a tile may hold several classes);
    counts the tiles whose probability of each class reaches ``threshold``."""

    def finish(read_block: Callable, blocks: list, height: int, width: int) -> dict[str, Any]:
        counts = np.zeros(len(classes), dtype=np.int64)
        for bounds in blocks:
            probabilities = read_block(bounds)
            valid = np.isfinite(probabilities).all(axis=0)
            counts += (probabilities[:, valid] >= threshold).sum(axis=1)
        return {"classes_path": None, "threshold": threshold, "pixels_per_class": dict(zip(classes, counts.tolist()))}

    return finish


PREDICTED_TASKS = ("segmentation", "change", "classification")
"""Tasks :func:`predict_scene` maps (detections: :func:`skysense.inference.detect.detect_scene`)."""


def model_inputs(spec: TaskSpec, scene: Scene, tasks: tuple[str, ...], what: str) -> tuple[str, ...]:
    """The modalities a fine-tuned model reads, in fusion order, after checking that it does one of
    ``tasks`` and that ``scene`` gives each of them (errors start with ``what``)."""
    if spec.task not in tasks:
        raise ValueError(f"{what}: expected a {', '.join(tasks)} model, got a {spec.task} model")
    missing = [m for m in spec.modalities if m not in scene.modalities]
    if missing:
        raise ValueError(f"{what}: the model reads {list(spec.modalities)}; the scene lacks {missing} "
                         f"(given: {list(scene.modalities)})")
    return tuple(m for m in ("hr", "s2", "s1") if m in spec.modalities)


def _resized_series(batch: dict[str, torch.Tensor], size: int | None) -> dict[str, torch.Tensor]:
    """S2 / S1 frames (B, T, C, h, w) resized to ``size`` as the classifier was trained on them
    (:func:`~skysense.downstream.data.resize_series`); the batch itself when ``size`` is None."""
    if size is None:
        return batch
    flat = {m: batch[m].flatten(0, 1) for m in ("s2", "s1") if m in batch}
    resized = resize_series(flat, size)
    return {**batch, **{m: resized[m].unflatten(0, batch[m].shape[:2]) for m in flat}}


def predict_scene(model: DownstreamModel, scene: Scene, out: str | Path, options: EmbedOptions | None = None,
                  model_id: str | None = None) -> EmbedReport:
    """Predict the classes of ``scene`` (module docstring); resumes a partial run of the same command.

    Args:
        model: a fine-tuned segmentation, change or classification model
            (:func:`skysense.downstream.finetune.load_finetuned`), in eval mode, on the device to run on.
        scene: the opened inputs (read with the encoder's configuration).
        out: the probabilities' path (``.tif`` or ``.zarr``); the class map goes beside it.
        options: window (a classifier's tile), overlap (fusion-grid pixels; 0 for a classifier),
            block (output pixels), batch size, dtype, format, preview (a PCA of the probabilities),
            progress, overwrite (``level`` is unused).
        model_id: identifies the weights in the resume signature (default: a hash of them).

    Raises:
        ValueError: the model is not a segmentation, change or classification model, the scene
            lacks one of its inputs (a change model: the HR image after, or a series' second
            date), or a classifier's tiles would overlap.
    """
    spec = model.spec
    modalities = model_inputs(spec, scene, PREDICTED_TASKS, "predict")
    if spec.task == "change":
        _check_two_dates(spec.modalities, scene)
    options = options or EmbedOptions()
    patch = model.encoder.config.s2.patch_size
    if any(m != "hr" for m in modalities) and options.window % patch:
        raise ValueError(f"window: expected a multiple of the ViT patch ({patch} pixels), got {options.window}")
    config = model.encoder.config
    classes = tuple(spec.class_names) or tuple(str(i) for i in range(spec.num_classes))
    tiles = spec.task == "classification"
    if tiles and options.overlap:
        raise ValueError(f"predict: a classifier labels side-by-side tiles of window x window fusion-grid pixels; "
                         f"overlap must be 0, got {options.overlap}")
    upscale = HR_SCALE if "hr" in modalities and not tiles else 1
    stride = options.window if tiles else 1
    output = {"segmentation": "mask", "change": "change", "classification": "label"}[spec.task]
    frames = 2 if spec.task == "change" else 1
    semantic = tuple(str(i) for i in range(spec.semantic_classes)) if spec.task == "change" else ()

    def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = completed_batch(batch, modalities, options.window, config, frames=frames)
        if tiles:
            logits = model(_resized_series(batch, spec.sentinel_size))[output].float()[:, :, None, None]
        elif semantic:  # change, then each date's classes
            found = model(batch)
            return torch.cat([torch.softmax(found[k].float(), dim=1) for k in ("change", "mask", "mask_post")], dim=1)
        else:
            logits = model(batch)[output].float()
        return torch.sigmoid(logits) if spec.multilabel else torch.softmax(logits, dim=1)

    grid = scene.grid
    transform = grid.transform @ Affine.scale(stride / upscale)
    extent = scene.hr_size if upscale > 1 else None
    tags = {"skysense_task": spec.task, "skysense_classes": json.dumps(list(classes)),
            "skysense_modalities": ",".join(modalities), "skysense_preset": config.preset}
    if tiles:
        tags["skysense_tile"] = str(options.window)
    if semantic:
        tags["skysense_semantic_classes"] = json.dumps(list(semantic))
    finish = (_tile_counter(classes) if spec.multilabel else
              _class_map_writer(Path(out), classes, grid.crs, transform, options.block, semantic))
    report = write_scene(scene, out, options, forward, modalities, len(classes) + 2 * len(semantic), config, tags,
                         model_id or model_signature(model), stride=stride, upscale=upscale,
                         device=next(model.parameters()).device, locate=spec.geo_context, require_all=True,
                         finish=finish, extent=extent)
    report.extra["classes"] = list(classes)
    report.extra["task"] = spec.task
    return report
