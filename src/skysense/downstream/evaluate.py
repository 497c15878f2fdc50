"""Evaluation of a fine-tuned task model on a dataset split, with the paper's metrics.

* classification: batches of whole samples; single-label: OA (top-1) and top-5 accuracy
  (fMoW-Sentinel reports both); multi-label: macro mAP.
* segmentation: one tile at a time through :func:`~skysense.downstream.sliding_window.sliding_window`,
  arg-max per pixel, one confusion matrix over the split: OA, mIoU, mF1, per-class IoU / F1;
  with ``excluded_classes`` also mF1 / mIoU over the other classes (``mf1_excluding``,
  ``miou_excluding``): :func:`evaluate_run` takes them from the dataset's protocol in
  :mod:`skysense.downstream.registry` (Potsdam, Vaihingen: clutter) unless told otherwise.
* change: the same for the change map: F1, precision, recall, IoU of the change class, OA; with
  a semantic head also BC, SC and SCS (:class:`~skysense.evaluation.metrics.SemanticChangeScore`).
* detection / oriented detection: one image at a time (a larger one window by window: fragments
  of objects a window edge cuts are dropped and the rest merged by NMS, or plain NMS with
  ``drop_fragments=False``; :meth:`~skysense.downstream.detection.DetectionModel.detect`), VOC
  average precision at IoU 0.5 per class and its mean (``map50``, and the 11-point ``map50_11point``:
  :mod:`skysense.evaluation.box_ap`; oriented boxes by the IoU of their quadrilaterals).

With ``predictions`` set, each tile's class map is written there as a GeoTIFF carrying the tile's
CRS and transform when it had them (:mod:`skysense.downstream.predictions`); change models also
write ``<id>_post.tif`` (the after date's classes) when they predict semantics; detection
models write ``<id>.json`` with each image's boxes, scores and classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from skysense.data.sample import collate
from skysense.devices import resolve_device, to_device
from skysense.downstream.data import EvaluationSamples, model_keys
from skysense.downstream.predictions import prediction_path, write_detections, write_prediction
from skysense.downstream.sliding_window import sliding_window
from skysense.downstream.tasks import DETECTION_TASKS, DownstreamModel
from skysense.evaluation.box_ap import BoxAveragePrecision
from skysense.evaluation.metrics import (
    ConfusionMatrix,
    SemanticChangeScore,
    change_scores,
    mean_average_precision,
    segmentation_scores,
    topk_accuracy,
)


def class_indices(classes: Sequence[int | str], class_names: Sequence[str], num_classes: int) -> tuple[int, ...]:
    """Class indices of ``classes``, each an index (int or digits) or a name in ``class_names``.

    Raises:
        ValueError: an unknown name or an index outside ``[0, num_classes)``; lists the classes.
    """
    known = ", ".join(f"{i} {n}" for i, n in enumerate(class_names)) or f"0..{num_classes - 1}"
    indices = []
    for value in classes:
        text = str(value).strip()
        if text.isdigit():
            index = int(text)
        elif text in class_names:
            index = list(class_names).index(text)
        else:
            raise ValueError(f"excluded classes: unknown class {text!r}; the model's classes: {known}")
        if not 0 <= index < num_classes:
            raise ValueError(f"excluded classes: index {index} outside 0..{num_classes - 1}; the model's classes: "
                             f"{known}")
        indices.append(index)
    return tuple(sorted(set(indices)))


def evaluate_model(
    model: DownstreamModel,
    dataset: Dataset,
    batch_size: int = 16,
    window: int | None = None,
    stride: int | None = None,
    predictions: str | Path | None = None,
    num_workers: int = 0,
    progress: bool = True,
    excluded_classes: Sequence[int | str] = (),
    drop_fragments: bool = True,
) -> dict[str, Any]:
    """Scores of ``model`` on ``dataset`` (raw samples; normalised here). See the module docstring.

    Args:
        window: sliding-window side for dense and detection tasks (reference-grid pixels); None:
            whole tiles.
        stride: step between windows (default: half the window).
        predictions: folder for GeoTIFF prediction maps (dense tasks), or None.
        excluded_classes: segmentation only: classes (indices or names) left out of the
            additional means ``mf1_excluding`` / ``miou_excluding``; empty: no such means.
        drop_fragments: detection over windows: drop detections of objects cut by a window edge
            that another window sees whole before NMS; False: plain NMS (DOTA_devkit's merge).
    """
    if len(dataset) == 0:
        raise ValueError("evaluate: the dataset split is empty")
    spec = model.spec
    if excluded_classes and spec.task != "segmentation":
        raise ValueError(f"evaluate: excluded classes apply to segmentation, not {spec.task}")
    excluded = class_indices(excluded_classes, spec.class_names, spec.num_classes)
    samples = EvaluationSamples(dataset, model.config, model_keys(spec.modalities, spec.geo_context),
                                spec.sentinel_size, spec.task)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if spec.task == "classification":
                return _classification(model, samples, batch_size, num_workers, progress, device)
            if spec.task in DETECTION_TASKS:
                return _detection(model, samples, window, stride, predictions, num_workers, progress, device,
                                  drop_fragments)
            return _dense(model, samples, window, stride, predictions, num_workers, progress, device, excluded)
    finally:
        model.train(was_training)


def _classification(model: DownstreamModel, samples: Dataset, batch_size: int, num_workers: int, progress: bool,
                    device: torch.device) -> dict[str, Any]:
    loader = DataLoader(samples, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    logits, labels = [], []
    for batch in tqdm(loader, desc="evaluate", unit="batch", disable=not progress, leave=False):
        batch = to_device(batch, device)
        logits.append(model(batch)["label"].float().cpu())
        labels.append(model.targets(batch)["label"].cpu())
    scores, targets = torch.cat(logits), torch.cat(labels)
    report: dict[str, Any] = {"samples": int(scores.shape[0])}
    if model.spec.multilabel:
        report["map"] = mean_average_precision(scores, targets)
        return report
    report["oa"] = topk_accuracy(scores, targets.long(), 1)
    if scores.shape[1] >= 5:
        report["top5"] = topk_accuracy(scores, targets.long(), 5)
    return report


def _detection(model: DownstreamModel, samples: Dataset, window: int | None, stride: int | None,
               predictions: str | Path | None, num_workers: int, progress: bool, device: torch.device,
               drop_fragments: bool) -> dict[str, Any]:
    spec = model.spec
    oriented = spec.task == "oriented_detection"
    metric = BoxAveragePrecision(spec.num_classes, class_names=spec.class_names or None, oriented=oriented)
    # One image per batch: detection images may differ in size (DOTA), and are not resized.
    loader = DataLoader(samples, batch_size=1, num_workers=num_workers, collate_fn=collate)
    written = 0
    for batch in tqdm(loader, desc="evaluate", unit="image", disable=not progress, leave=False):
        found = model.detect(to_device(batch, device), window, stride, drop_fragments=drop_fragments)[0]
        truth = model.targets(batch)
        if not isinstance(truth["boxes"], list) or not isinstance(truth["labels"], list):
            raise ValueError(f"evaluate: detection targets 'boxes' / 'labels' missing from sample "
                             f"{batch.get('id', ['?'])[0]!r} (keys {sorted(batch)})")
        difficult = truth["difficult"][0] if isinstance(truth["difficult"], list) else None
        metric.update(found["corners" if oriented else "boxes"], found["scores"], found["labels"], truth["boxes"][0],
                      truth["labels"][0], difficult)
        if predictions is not None:
            sample_id = batch.get("id", [f"sample_{written}"])[0]
            write_detections(prediction_path(predictions, sample_id, extension=".json"), found, spec.class_names,
                             batch.get("crs", [None])[0], batch.get("transform", [None])[0])
            written += 1
    report: dict[str, Any] = {"samples": len(samples), "drop_fragments": drop_fragments, **metric.compute()}
    if predictions is not None:
        report["predictions"] = str(predictions)
        report["predictions_written"] = written
    return report


def _dense(model: DownstreamModel, samples: Dataset, window: int | None, stride: int | None,
           predictions: str | Path | None, num_workers: int, progress: bool, device: torch.device,
           excluded: tuple[int, ...]) -> dict[str, Any]:
    spec = model.spec
    main = model.output_keys[0]
    matrix = ConfusionMatrix(spec.num_classes)
    semantic = SemanticChangeScore(spec.semantic_classes) if spec.semantic_classes else None
    loader = DataLoader(samples, batch_size=1, num_workers=num_workers, collate_fn=collate)
    written = 0
    for batch in tqdm(loader, desc="evaluate", unit="tile", disable=not progress, leave=False):
        batch = to_device(batch, device)
        if window is None:
            logits = model(batch)
        else:
            logits = sliding_window(model, batch, window, stride or max(1, window // 2))
        classes = {k: v.argmax(dim=1) for k, v in logits.items()}
        targets = model.targets(batch)
        matrix.update(classes[main].cpu(), targets[main].cpu())
        if semantic is not None:
            semantic.update(targets["change"].cpu(), classes["change"].cpu(), targets["mask_post"].cpu(),
                            classes["mask_post"].cpu())
        if predictions is not None:
            crs = batch.get("crs", [None])[0]
            transform = batch.get("transform", [None])[0]
            sample_id = batch.get("id", [f"sample_{written}"])[0]
            write_prediction(prediction_path(predictions, sample_id), classes[main][0], crs, transform)
            if semantic is not None:
                write_prediction(prediction_path(predictions, sample_id, "_post"), classes["mask_post"][0], crs,
                                 transform)
            written += 1
    report: dict[str, Any] = {"samples": len(samples)}
    if spec.task == "change":
        report.update(change_scores(matrix.matrix))
        report["pixels"] = int(matrix.matrix.sum())
        if semantic is not None:
            report.update(semantic.compute())
    else:
        report.update(segmentation_scores(matrix.matrix, spec.class_names or None, excluded_classes=excluded))
    report["confusion_matrix"] = matrix.matrix.tolist()
    if predictions is not None:
        report["predictions"] = str(predictions)
        report["predictions_written"] = written
    return report


def evaluate_run(
    run: str | Path,
    task: str | None = None,
    dataset: str | None = None,
    data_root: str | Path | None = None,
    split: str | None = None,
    limit: int | None = None,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 16,
    predictions: str | Path | None = None,
    num_workers: int = 0,
    progress: bool = True,
    excluded_classes: Sequence[int | str] | None = None,
    device: str | None = None,
    drop_fragments: bool = True,
) -> dict[str, Any]:
    """Evaluate a fine-tuned run folder; unset arguments come from its ``task.json``.

    Args:
        device: where the model runs ("cpu", "cuda", "cuda:N"); None: CUDA when there is a GPU.
        excluded_classes: segmentation: classes (indices or names) left out of the extra means
            ``mf1_excluding`` / ``miou_excluding``; None: the evaluated dataset's protocol
            (:mod:`skysense.downstream.registry`: clutter for Potsdam and Vaihingen); ``()``: none.
        drop_fragments: detection over windows (:func:`evaluate_model`).

    Raises:
        ValueError: ``task`` differs from the run's task.
    """
    from skysense.downstream.data import evenly_spaced
    from skysense.data.datasets import options_with_hr_bands
    from skysense.downstream.finetune import build_dataset, check_hr_bands, load_finetuned, read_task
    from skysense.downstream.registry import downstream_dataset

    info = read_task(run)
    model = load_finetuned(run).to(resolve_device(device))
    if task is not None and task != model.spec.task:
        raise ValueError(f"{run}: is a {model.spec.task} model, not {task}")
    name = dataset or info["dataset"]
    same_dataset = name == info["dataset"]
    root = data_root if data_root is not None else (info.get("data_root") if same_dataset else None)
    split = split or info.get("eval_split")
    options = options_with_hr_bands(name, info.get("dataset_options") if same_dataset else None,
                            model.encoder.config.inputs["hr"].bands)
    data = build_dataset(name, model.spec.task, split, root, options)
    check_hr_bands(data, model.spec, model.encoder)
    root_used = str(data.root)
    data = evenly_spaced(data, limit)
    if window is None:
        window = info.get("eval_window") or info.get("crop_size")
    if stride is None:
        stride = info.get("eval_stride")
    if excluded_classes is None:
        excluded_classes = downstream_dataset(name, model.spec.task).excluded_classes
    windowed = model.spec.task != "classification"
    report = evaluate_model(model, data, batch_size=batch_size, window=window if windowed else None,
                            stride=stride, predictions=predictions, num_workers=num_workers, progress=progress,
                            excluded_classes=excluded_classes, drop_fragments=drop_fragments)
    return {"task": model.spec.task, "dataset": name, "split": split, "data_root": root_used, "run": str(run),
            "encoder_source": info.get("encoder_source"), "finetune_step": info.get("step"),
            "preset": model.config.preset, "window": window if windowed else None,
            **report}
