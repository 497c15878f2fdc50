"""Objects in whole scenes from a fine-tuned detector: window by window, resumable, as GeoJSON.

:func:`detect_scene` runs a model made by ``skysense finetune --task detection`` (or
``oriented_detection``) over a :class:`~skysense.inference.scene.Scene`, read as
:func:`~skysense.inference.embed.embed_scene` reads it, and writes the objects it finds as a
GeoJSON ``FeatureCollection``:

* **Windows.** Squares of ``window`` fusion-grid pixels (``32 window`` HR pixels; by default the
  run's training crop) every ``window - overlap`` pixels over the HR grid (the HR image's own grid
  when the scene has no S2 / S1), starting on fusion-grid pixels, the last row and column moved
  back to end at the grid's edge rounded up to 32 pixels. The model sees each window as it saw its
  training crops; a window reaching past the image is filled with nodata (zeros after
  normalisation). With ``spec.geo_context`` each window gets the latitude / longitude of its centre.
* **Nodata.** A detection whose centre falls on an HR pixel without data (or outside the image) is
  dropped.
* **Merging** (what :meth:`~skysense.downstream.detection.DetectionModel.detect` does for one
  image, at the scale of a scene): a detection near a window edge inside the scene that lies at
  least ``FRAGMENT_COVERAGE`` inside an uncut detection of its class from another window is a
  fragment and is dropped (unless ``drop_fragments`` is False), then class-wise NMS at the head's
  threshold merges what overlapping windows found twice. Two detections can only interact when
  their windows overlap, so both steps run on the connected groups of detections that overlap
  (IoU above the NMS threshold, or a fragment inside a whole detection) across neighbouring
  windows: exact, and no N x N matrix over a whole scene. Unlike one image, a scene keeps every
  detection NMS keeps (no per-image cap).
* **Output.** One ``Polygon`` feature per detection (the box; an oriented box's four corners), in
  the scene's CRS (named by its EPSG code, GeoJSON 2008 style, which GDAL and QGIS read) or, with
  ``wgs84`` or a CRS without an EPSG code, in longitude / latitude (RFC 7946). Rings are closed and
  counter-clockwise. Properties: ``class``, ``label`` (index), ``score``, ``pixel_box`` (x0, y0,
  x1, y1 on the HR grid) and, oriented, ``pixel_rbox`` (cx, cy, w, h, angle in radians). The
  collection's ``skysense`` member records the task, classes, windows and counts. Detections
  scoring below ``min_score`` are left out of the file (the head keeps those of at least 0.05).
* **Resuming.** Each finished row of windows is saved to ``<out>.parts/`` and recorded in the
  ``<out>.progress.json`` sidecar with the run's signature (scene, weights, window, overlap, batch
  size); the same command after a kill computes only the rows left, then merges everything.
  ``min_score``, ``drop_fragments`` and ``wgs84`` act on the merge only. The GeoJSON is written
  atomically; the parts and the sidecar are removed after it.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import rasterio.warp
import torch
from affine import Affine
from rasterio.windows import Window
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from skysense.data.geojson import WGS84, closed_ring, output_coordinates
from skysense.downstream.boxes import cut_by_window, horizontal_boxes
from skysense.downstream.tasks import DETECTION_TASKS
from skysense.inference.embed import model_signature, window_centres
from skysense.inference.predict import completed_batch, model_inputs
from skysense.inference.reports import JsonReport
from skysense.inference.scene import HR_SCALE, Scene, normalized_batch
from skysense.inference.windows import aligned_starts
from skysense.inference.writers import ProgressLog, progress_path
from skysense.weights import atomic_write

if TYPE_CHECKING:  # the detectors need torchvision (the detection extra): imported where they run
    from skysense.downstream.detection import DetectionModel


@dataclass
class DetectOptions:
    """Settings of a scene's detection run.

    Attributes:
        window: side of the windows in fusion-grid pixels (``32 window`` HR pixels).
        overlap: fusion-grid pixels shared by neighbouring windows (objects smaller than it are
            seen whole by some window).
        batch_size: windows per forward pass.
        min_score: detections scoring less are left out of the GeoJSON.
        drop_fragments: drop parts of objects a window edge cuts when another window sees them whole.
        wgs84: write longitude / latitude (RFC 7946) instead of the scene's CRS.
        progress: show a progress bar.
        overwrite: replace a GeoJSON left by a finished run.
    """

    window: int = 32
    overlap: int = 8
    batch_size: int = 1
    min_score: float = 0.0
    drop_fragments: bool = True
    wgs84: bool = False
    progress: bool = True
    overwrite: bool = False


@dataclass
class DetectReport(JsonReport):
    """What a run did."""

    out: Path
    detections: int
    per_class: dict[str, int]
    windows: int
    windows_computed: int
    rows_skipped: int
    seconds: float
    coordinates: str
    extra: dict[str, Any] = field(default_factory=dict)



def parts_path(out: Path) -> Path:
    """``out.geojson`` -> ``out.geojson.parts``: the finished rows of windows of a partial run."""
    return out.with_name(out.name + ".parts")


class _RowDetector:
    """Runs the detector over one row of windows and returns their detections in scene pixels."""

    def __init__(self, model: DetectionModel, scene: Scene, options: DetectOptions, modalities: tuple[str, ...],
                 extent: tuple[int, int], cols: tuple[int, ...]) -> None:
        self.model, self.scene, self.options, self.modalities = model, scene, options, modalities
        self.extent, self.cols = extent, cols
        self.size = options.window * HR_SCALE
        self.device = next(model.parameters()).device
        self.computed = 0

    def run(self, row: int, y: int) -> dict[str, torch.Tensor]:
        pieces = []
        for k in range(0, len(self.cols), self.options.batch_size):
            cols = range(k, min(k + self.options.batch_size, len(self.cols)))
            windows = [Window(self.cols[c] // HR_SCALE, y // HR_SCALE, self.options.window, self.options.window)
                       for c in cols]
            reads = [(c, w, self.scene.read(w, self.modalities)) for c, w in zip(cols, windows)]
            reads = [r for r in reads if r[2].inputs["hr_valid"].any()]
            if not reads:
                continue
            pieces += self._detect(row, y, reads)
        return _concatenated(pieces, self.model)

    def _detect(self, row: int, y: int, reads: list) -> list[dict[str, torch.Tensor]]:
        from skysense.downstream.detection import EDGE_MARGIN

        model, config = self.model, self.model.encoder.config
        batch = normalized_batch([d for _, _, d in reads], config, self.modalities)
        if model.spec.geo_context:
            batch["lat"], batch["lon"] = window_centres(self.scene.grid, [w for _, w, _ in reads])
        batch = completed_batch(batch, self.modalities, self.options.window, config)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.inference_mode():
            found = model(batch)["detections"]
        self.computed += len(reads)
        height, width = self.extent
        pieces = []
        for (col, _, data), dets in zip(reads, found):
            dets = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu() for k, v in dets.items()}
            hulls = horizontal_boxes(dets[model.outline_key])
            x = self.cols[col]
            centre = ((hulls[:, :2] + hulls[:, 2:]) / 2).floor().long().clamp(0, self.size - 1)
            valid = torch.from_numpy(data.inputs["hr_valid"])[centre[:, 1], centre[:, 0]]
            w, h = min(self.size, width - x), min(self.size, height - y)
            cut = cut_by_window(hulls, (x, y, w, h), (height, width), EDGE_MARGIN)
            dets = {**model.moved(dets, x, y), "cut": cut,
                    "window": torch.full((len(cut),), row * len(self.cols) + col, dtype=torch.int64)}
            pieces.append({k: v[valid] for k, v in dets.items()})
        return pieces


def _concatenated(pieces: list[dict[str, torch.Tensor]], model: DetectionModel) -> dict[str, torch.Tensor]:
    if pieces:
        return {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}
    empty = {"boxes": torch.zeros(0, 5 if model.outline_key == "corners" else 4), "scores": torch.zeros(0),
             "labels": torch.zeros(0, dtype=torch.int64), "cut": torch.zeros(0, dtype=torch.bool),
             "window": torch.zeros(0, dtype=torch.int64)}
    if model.outline_key == "corners":
        empty["corners"] = torch.zeros(0, 8)
    return empty


def _groups(n: int, pairs: list[torch.Tensor]) -> list[np.ndarray]:
    """Connected groups (index arrays) of ``n`` items linked by the (P, 2) ``pairs``; singletons left out."""
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in torch.cat(pairs).tolist() if pairs else []:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(i) for i in range(n)], dtype=np.int64)
    order = np.argsort(roots, kind="stable")
    splits = np.flatnonzero(np.diff(roots[order])) + 1
    return [g for g in np.split(order, splits) if len(g) > 1]


def merge_scene_detections(model: DetectionModel, found: dict[str, torch.Tensor],
                           windows: dict[int, tuple[int, int, int, int]],
                           drop_fragments: bool = True) -> dict[str, torch.Tensor]:
    """Fragments dropped and class-wise NMS over the detections of a scene's windows (module docstring).

    Args:
        model: the detector (its outlines, coverage, IoU and NMS threshold).
        found: the detections in scene pixels with ``cut`` (near an inner window edge) and
            ``window`` (the index of the window that found each).
        windows: (x0, y0, x1, y1) of each window index, in scene pixels.
        drop_fragments: False: NMS alone.

    Returns:
        The kept detections (without ``cut`` / ``window``), highest score first.
    """
    from skysense.downstream.detection import FRAGMENT_COVERAGE

    n = len(found["scores"])
    outlines, labels, cut = found[model.outline_key].float(), found["labels"], found["cut"]
    order = torch.argsort(found["window"], stable=True)
    ids, counts = torch.unique_consecutive(found["window"][order], return_counts=True)
    members = dict(zip(ids.tolist(), torch.split(order, counts.tolist())))
    by_left = sorted(members, key=lambda w: windows[w][0])
    pairs = []
    for i, wa in enumerate(by_left):  # each pair of overlapping windows once (itself included), sweeping along x
        ax0, ay0, ax1, ay1 = windows[wa]
        for wb in by_left[i:]:
            bx0, by0, bx1, by1 = windows[wb]
            if bx0 >= ax1:
                break
            if ay0 >= by1 or by0 >= ay1:
                continue
            a, b = members[wa], members[wb]
            linked = model.iou(outlines[a], outlines[b]) > model.nms_threshold
            if drop_fragments:
                inside = model.coverage(outlines[a], outlines[b]) >= FRAGMENT_COVERAGE
                contains = model.coverage(outlines[b], outlines[a]).T >= FRAGMENT_COVERAGE
                linked |= inside & cut[a][:, None] & ~cut[b][None]
                linked |= contains & cut[b][None] & ~cut[a][:, None]
            linked &= labels[a][:, None] == labels[b][None]
            ia, ib = torch.nonzero(linked, as_tuple=True)
            pairs.append(torch.stack([a[ia], b[ib]], 1))
    keep = torch.ones(n, dtype=torch.bool)
    merged = []
    for group in _groups(n, pairs):
        index = torch.from_numpy(group)
        keep[index] = False
        part = {k: v[index] for k, v in found.items()}
        part_cut = part.pop("cut")
        part.pop("window")
        if drop_fragments:
            whole = ~model.fragments(part, part_cut)
            part = {k: v[whole] for k, v in part.items()}
        merged.append(model.merged(part, cap=False))
    alone = {k: v[keep] for k, v in found.items() if k not in ("cut", "window")}
    result = {k: torch.cat([alone[k], *(m[k] for m in merged)]) for k in alone}
    order = torch.argsort(result["scores"], descending=True, stable=True)
    return {k: v[order] for k, v in result.items()}


def detections_geojson(found: dict[str, torch.Tensor], classes: tuple[str, ...], transform: Affine,
                       crs: Any, wgs84: bool = False) -> tuple[dict[str, Any], str]:
    """A GeoJSON FeatureCollection of detections on an HR grid of ``transform`` / ``crs`` (module
    docstring), and what its coordinates are (``EPSG:...``, ``EPSG:4326`` or ``pixels``)."""
    oriented = "corners" in found
    outlines = found["corners"] if oriented else found["boxes"]
    quads = outlines.double().tolist() if oriented else [
        [x0, y0, x1, y0, x1, y1, x0, y1] for x0, y0, x1, y1 in found["boxes"].double().tolist()]
    coordinates, member = output_coordinates(crs, wgs84)
    to_wgs84 = coordinates == WGS84
    points = [[transform * (q[2 * k], q[2 * k + 1]) for k in range(4)] for q in quads]
    if to_wgs84 and points:
        xs, ys = rasterio.warp.transform(crs, WGS84, [x for p in points for x, _ in p], [y for p in points for _, y in p])
        flat = list(zip(xs, ys))
        points = [flat[4 * i:4 * i + 4] for i in range(len(points))]
    hulls = horizontal_boxes(outlines.float()).tolist()
    features = []
    for i, (label, score) in enumerate(zip(found["labels"].tolist(), found["scores"].tolist())):
        properties = {"class": classes[label] if label < len(classes) else str(label), "label": label,
                      "score": round(score, 5), "pixel_box": [round(v, 2) for v in hulls[i]]}
        if oriented:
            properties["pixel_rbox"] = [round(v, 4) for v in found["boxes"][i].tolist()]
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [closed_ring(points[i])]},
                         "properties": properties})
    collection: dict[str, Any] = {"type": "FeatureCollection", "features": features}
    if member is not None:
        collection["crs"] = member
    return collection, coordinates


def detect_scene(model: DetectionModel, scene: Scene, out: str | Path, options: DetectOptions | None = None,
                 model_id: str | None = None) -> DetectReport:
    """Detect the objects of ``scene`` into the GeoJSON ``out`` (module docstring); resumes a partial
    run of the same command.

    Args:
        model: a fine-tuned detection or oriented detection model
            (:func:`skysense.downstream.finetune.load_finetuned`), in eval mode, on the device to run on.
        scene: the opened inputs (read with the encoder's configuration).
        out: the GeoJSON's path.
        options: window, overlap, batch size, score floor, fragments, coordinates, progress, overwrite.
        model_id: identifies the weights in the resume signature (default: a hash of them).

    Raises:
        ValueError: not a detector, the scene lacks one of its inputs, bad window sizes, a finished
            output without ``overwrite``, or a partial run with other settings.
    """
    spec = model.spec
    modalities = model_inputs(spec, scene, DETECTION_TASKS, "detect")
    options = options or DetectOptions()
    if not 0 <= options.overlap < options.window:
        raise ValueError(f"overlap: expected 0 <= overlap < window ({options.window}), got {options.overlap}")
    patch = model.encoder.config.s2.patch_size
    if any(m != "hr" for m in modalities) and options.window % patch:
        raise ValueError(f"window: expected a multiple of the ViT patch ({patch} pixels) with S2 / S1 inputs, "
                         f"got {options.window}")
    if options.batch_size < 1:
        raise ValueError(f"batch size: expected at least 1, got {options.batch_size}")
    out = Path(out)
    start = time.perf_counter()
    extent = scene.hr_size
    size, step = options.window * HR_SCALE, (options.window - options.overlap) * HR_SCALE
    rows, cols = aligned_starts(extent[0], size, step, HR_SCALE), aligned_starts(extent[1], size, step, HR_SCALE)
    signature = {"scene": scene.signature(), "model": model_id or model_signature(model),
                 "options": {"window": options.window, "overlap": options.overlap, "batch_size": options.batch_size}}
    progress, parts = _open_progress(out, signature, options.overwrite)
    skipped = len(progress.done)
    detector = _RowDetector(model, scene, options, modalities, extent, cols)
    bar = tqdm(total=len(rows) * len(cols), initial=skipped * len(cols), unit="window", desc=out.name,
               disable=not options.progress, dynamic_ncols=True)
    with bar:
        for r, y in enumerate(rows):
            if r in progress.done:
                continue
            found = detector.run(r, y)
            atomic_write(parts / f"row_{r:05d}.safetensors", lambda p, f=found: save_file(
                {k: v.contiguous() for k, v in f.items()}, str(p)))
            progress.mark(r)
            bar.update(len(cols))
    found = _concatenated([load_file(str(parts / f"row_{r:05d}.safetensors")) for r in range(len(rows))], model)
    windows = {r * len(cols) + c: (x, y, x + size, y + size) for r, y in enumerate(rows) for c, x in enumerate(cols)}
    kept = merge_scene_detections(model, found, windows, options.drop_fragments)
    kept = {k: v[kept["scores"] >= options.min_score] for k, v in kept.items()}
    classes = tuple(spec.class_names) or tuple(str(i) for i in range(spec.num_classes))
    transform = scene.grid.transform @ Affine.scale(1 / HR_SCALE)
    collection, coordinates = detections_geojson(kept, classes, transform, scene.grid.crs, options.wgs84)
    counts = np.bincount(kept["labels"].numpy(), minlength=len(classes))[:len(classes)]
    per_class = {c: int(n) for c, n in zip(classes, counts) if n}
    collection["skysense"] = {"task": spec.task, "classes": list(classes), "coordinates": coordinates,
                              "window_pixels": size, "overlap_pixels": options.overlap * HR_SCALE,
                              "min_score": options.min_score, "drop_fragments": options.drop_fragments,
                              "detections": len(collection["features"]), "per_class": per_class}
    atomic_write(out, lambda p: p.write_text(json.dumps(collection) + "\n"))
    progress.path.unlink(missing_ok=True)
    shutil.rmtree(parts, ignore_errors=True)
    return DetectReport(out=out, detections=len(collection["features"]), per_class=per_class,
                        windows=len(rows) * len(cols), windows_computed=detector.computed, rows_skipped=skipped,
                        seconds=round(time.perf_counter() - start, 3), coordinates=coordinates,
                        extra={"before_merge": int(len(found["scores"])), "task": spec.task,
                               "classes": list(classes)})


def _open_progress(out: Path, signature: dict[str, Any], overwrite: bool) -> tuple[ProgressLog, Path]:
    """The progress of a partial run with this signature, or a fresh one (refusing to replace a
    finished output unless ``overwrite``)."""
    sidecar, parts = progress_path(out), parts_path(out)
    if sidecar.is_file():
        progress = ProgressLog.load(sidecar, signature)
        parts.mkdir(parents=True, exist_ok=True)
        progress.done = {r for r in progress.done if (parts / f"row_{r:05d}.safetensors").is_file()}
        return progress, parts
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists (from a finished run); pass --overwrite to replace it")
    shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir(parents=True)
    progress = ProgressLog(sidecar, signature)
    progress.save()
    return progress, parts
