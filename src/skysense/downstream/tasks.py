"""Task models: a SkySense encoder (any subset of its modalities) plus a task head.

Five tasks, each a :class:`DownstreamModel`; the first three return from ``forward(batch)`` a
dict of logits keyed by the target each one predicts:

* ``classification`` (:class:`ClassificationModel`): ``{"label": (B, K)}``. The pooled feature
  of the linear probe (:func:`skysense.evaluation.features.pool_features`: with S2/S1 the pooled
  fused map, i.e. every modality and every valid frame; HR alone adds pooled HR levels) goes
  through :class:`~skysense.downstream.heads.LinearClassifier`. Single-label (AID, RESISC-45, EuroSAT,
  fMoW-Sentinel: T frames through the fusion) or multi-label (BigEarthNet-S2, and
  BigEarthNet-MM with S2 + S1 through the fusion).
* ``segmentation`` (:class:`SegmentationModel`): ``{"mask": (B, K, H, W)}`` on the target grid
  (HR pixels when HR is an input, else S2/S1 pixels), from a
  :class:`~skysense.downstream.heads.UperNetHead` over :func:`feature_pyramid`.
* ``change`` (:class:`ChangeModel`): siamese. The encoder sees the *before* and the *after*
  inputs (one batch of 2B); the decoder sees the absolute differences of their pyramids, level
  by level, and predicts ``{"change": (B, 2, H, W)}``. With ``semantic_classes`` (semantic
  change, DynamicEarthNet) a second, shared UperNet predicts the classes of each date:
  ``"mask"`` (before) and ``"mask_post"`` (after).
* ``detection`` (:class:`~skysense.downstream.detection.DetectionModel`): horizontal boxes from a
  Faster R-CNN with FPN over :func:`feature_pyramid` (needs ``hr``); losses in training mode,
  ``{"detections": [...]}`` in evaluation mode. Built on demand (it needs torchvision).
* ``oriented_detection`` (:class:`~skysense.downstream.oriented_detection.OrientedDetectionModel`):
  the same with a Rotated Faster R-CNN box head: oriented boxes (DIOR-R, FAIR1M, DOTA).

Feature pyramid (:func:`feature_pyramid`), four levels, finest first:

* HR among the inputs: the HR encoder's pyramid (strides 4, 8, 16, 32). When S2/S1 are inputs too,
  or the geo-context is on, the fused (or geo-context) map, which lies on the stride-32 grid, is
  concatenated to the last level: that is where the time series and the location enter.
* S2/S1 only: the fused (or geo-context) map lies on the Sentinel pixel grid; the pyramid is that
  map average-pooled by 1, 2, 4 and 8 (our choice; the paper does not publish its decoder input
  for the Sentinel-only tasks).

Geo-context (``geo_context=True``): the model gets ``lat``/``lon`` and uses
``forward_features``'s ``geo`` output (fused features concatenated with their attention over the
region's prototypes, 2D channels) wherever the fused map would be used. Datasets without a
location (AID, LEVIR-CD, ...) cannot use it: the error says so.

Bitemporal inputs (:func:`bitemporal_inputs`): HR before/after are ``hr`` / ``hr_post``;
S2/S1 series must hold exactly two frames (before, after), as OSCD and DynamicEarthNet's change
samples do; each becomes a one-frame series.

Losses (:meth:`DownstreamModel.loss`): cross-entropy (ignore index -1, optional class weights)
for single-label and dense targets, binary cross-entropy for multi-label.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from skysense.config import MODALITIES, SkySenseConfig
from skysense.data.sample import IGNORE_INDEX
from skysense.downstream.heads import LinearClassifier, UperNetHead
from skysense.evaluation.features import feature_dim, pool_features, resize_hr
from skysense.models import SkySense

TASKS = ("classification", "segmentation", "change", "detection", "oriented_detection")
DETECTION_TASKS = ("detection", "oriented_detection")
DETECTORS = {"detection": ("faster_rcnn",), "oriented_detection": ("rotated_faster_rcnn", "oriented_rcnn")}
"""The detectors each detection task offers, its default first."""
SENTINEL = ("s2", "s1")
PYRAMID_POOLS = (1, 2, 4, 8)
"""Pooling factors of the Sentinel-only pyramid levels."""


@dataclass
class TaskSpec:
    """What a task model predicts and from which inputs; saved as ``task.json`` beside the weights."""

    task: str
    num_classes: int
    modalities: tuple[str, ...] = ("hr",)
    multilabel: bool = False
    geo_context: bool = False
    decoder_channels: int = 128
    # Change only: > 0 also predicts each date's classes (semantic change).
    semantic_classes: int = 0
    class_names: tuple[str, ...] = ()
    # Classification: HR square side (multiple of 32); None rounds each side up to a multiple of 32.
    image_size: int | None = None
    class_weights: tuple[float, ...] | None = None
    # Classification: S2/S1 square side each sample's frames are resized to (bilinear) before
    # batching (skysense.downstream.data.resize_series); None keeps them as read.
    sentinel_size: int | None = None
    # Detection: which detector (DETECTORS); None: the task's default.
    detector: str | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task: expected one of {TASKS}, got {self.task!r}")
        self.modalities = tuple(self.modalities)
        unknown = set(self.modalities) - set(MODALITIES)
        if unknown or not self.modalities:
            raise ValueError(f"task modalities: expected a non-empty subset of {MODALITIES}, got {self.modalities}")
        self.modalities = tuple(m for m in MODALITIES if m in self.modalities)
        if self.num_classes < 1 or (self.task == "change" and self.num_classes != 2):
            raise ValueError(f"num_classes: expected >= 1 (2 for change), got {self.num_classes} for {self.task}")
        if self.task in DETECTION_TASKS and "hr" not in self.modalities:
            raise ValueError(f"{self.task}: boxes lie in HR pixels, so 'hr' must be among the modalities, got "
                             f"{self.modalities}")
        if self.multilabel and self.task != "classification":
            raise ValueError("multilabel: only for classification")
        if self.semantic_classes and self.task != "change":
            raise ValueError("semantic_classes: only for change")
        if self.sentinel_size is not None and (self.task != "classification" or self.sentinel_size < 1):
            raise ValueError(f"sentinel_size: a positive side for classification only, got {self.sentinel_size} "
                             f"for {self.task}")
        if self.detector is not None and self.detector not in DETECTORS.get(self.task, ()):
            offered = DETECTORS.get(self.task)
            raise ValueError(f"detector: {self.task} offers {offered}, got {self.detector!r}" if offered else
                             f"detector: only for {' and '.join(DETECTORS)}, not {self.task}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names: {len(self.class_names)} names for {self.num_classes} classes")
        if self.class_weights is not None and len(self.class_weights) != self.num_classes:
            raise ValueError(f"class_weights: {len(self.class_weights)} weights for {self.num_classes} classes")
        self.class_names = tuple(self.class_names)
        if self.class_weights is not None:
            self.class_weights = tuple(float(w) for w in self.class_weights)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TaskSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"task spec: unknown keys {sorted(unknown)}; expected a subset of {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def context_dim(config: SkySenseConfig, spec: TaskSpec) -> int:
    """Channels of the fused map (``D``), or of the geo-context map (``2D``)."""
    return config.fusion.embed_dim * (2 if spec.geo_context else 1)


def uses_context(spec: TaskSpec) -> bool:
    """Whether the fused / geo-context map enters the HR pyramid (S2/S1 inputs, or geo-context)."""
    return spec.geo_context or any(m in spec.modalities for m in SENTINEL)


def pyramid_channels(config: SkySenseConfig, spec: TaskSpec) -> tuple[int, ...]:
    """Channels of the four :func:`feature_pyramid` levels."""
    ctx = context_dim(config, spec)
    if "hr" in spec.modalities:
        dims = list(config.hr.out_dims)
        if uses_context(spec):
            dims[-1] += ctx
        return tuple(dims)
    return (ctx,) * len(PYRAMID_POOLS)


def feature_pyramid(out: Mapping[str, Any], spec: TaskSpec) -> list[torch.Tensor]:
    """Four maps, finest first, from ``SkySense.forward_features`` output (module docstring)."""
    context = out["geo"] if spec.geo_context else out["fused"]
    if "hr" in spec.modalities:
        levels = list(out["hr_pyramid"])
        if uses_context(spec):
            levels[-1] = torch.cat([levels[-1], context], dim=1)
        return levels
    return [context if k == 1 else F.avg_pool2d(context, k, ceil_mode=True) for k in PYRAMID_POOLS]


def target_size(inputs: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """Pixel grid of dense predictions: HR when present, else the S2 (or S1) frames."""
    for key in ("hr", "s2", "s1"):
        if key in inputs:
            return tuple(inputs[key].shape[-2:])
    raise ValueError("no hr, s2 or s1 input")


class DownstreamModel(nn.Module):
    """An encoder and a task head. Subclasses implement :meth:`head_forward`."""

    output_keys: tuple[str, ...] = ()

    def __init__(self, encoder: SkySense, spec: TaskSpec) -> None:
        super().__init__()
        self.encoder = encoder
        self.spec = spec
        weights = torch.tensor(spec.class_weights, dtype=torch.float32) if spec.class_weights else None
        self.register_buffer("class_weights", weights, persistent=False)

    @property
    def config(self) -> SkySenseConfig:
        return self.encoder.config

    def encoder_inputs(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The batch entries the encoder takes: the spec's modalities (with dates and masks), lat/lon."""
        inputs: dict[str, torch.Tensor] = {}
        for m in self.spec.modalities:
            if not isinstance(batch.get(m), torch.Tensor):
                raise ValueError(f"{self.spec.task} model: input {m!r} missing from the batch (the task uses "
                                 f"{list(self.spec.modalities)}; batch keys {sorted(batch)})")
            inputs[m] = batch[m]
            for suffix in ("_dates", "_mask", "_post"):
                if isinstance(batch.get(m + suffix), torch.Tensor):
                    inputs[m + suffix] = batch[m + suffix]
        if self.spec.geo_context:
            if not all(isinstance(batch.get(k), torch.Tensor) for k in ("lat", "lon")):
                raise ValueError(f"geo_context: the samples carry no 'lat'/'lon' (batch keys {sorted(batch)}); "
                                 "turn geo-context off for this dataset")
            inputs["lat"], inputs["lon"] = batch["lat"], batch["lon"]
        return inputs

    def encode(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        return self.encoder.forward_features(**{k: v for k, v in inputs.items() if not k.endswith("_post")})

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return self.head_forward(self.encoder_inputs(batch))

    def head_forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def targets(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The target of each output key (see the module docstring)."""
        found = {}
        for key in self.output_keys:
            source = self.target_key(key, batch)
            if not isinstance(batch.get(source), torch.Tensor):
                raise ValueError(f"{self.spec.task} model: target {source!r} missing from the batch "
                                 f"(keys {sorted(batch)})")
            found[key] = batch[source]
        return found

    def target_key(self, output_key: str, batch: Mapping[str, Any]) -> str:
        return output_key

    def loss(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and one term per output key."""
        terms = {}
        for key, target in self.targets(batch).items():
            logits = outputs[key]
            if self.spec.multilabel:
                terms[key] = F.binary_cross_entropy_with_logits(logits.float(), target.float())
                continue
            weight = self.class_weights if key == self.output_keys[0] else None
            terms[key] = labelled_cross_entropy(logits, target.long(), weight)
        total = torch.stack(list(terms.values())).sum()
        return total, terms


def labelled_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy averaged over the labelled targets (weighted as ``F.cross_entropy``'s mean);
    0, with zero gradients, when nothing is labelled (``IGNORE_INDEX`` everywhere).

    Without reading a value: ``F.cross_entropy``'s mean is NaN for a batch with nothing
    labelled, and asking first whether anything is would wait for the GPU every step.
    """
    labelled = target != IGNORE_INDEX
    summed = F.cross_entropy(logits.float(), target, weight=weight, ignore_index=IGNORE_INDEX, reduction="sum")
    if weight is None:
        count = labelled.sum().to(summed.dtype)
    else:  # the sum of the labelled targets' class weights, as the mean reduction divides by
        count = (weight[target.clamp_min(0)] * labelled).sum().to(summed.dtype)
    return summed / torch.where(count > 0, count, torch.ones_like(count))


class ClassificationModel(DownstreamModel):
    output_keys = ("label",)

    def __init__(self, encoder: SkySense, spec: TaskSpec) -> None:
        super().__init__(encoder, spec)
        dim = feature_dim(encoder.config, spec.modalities)
        if spec.geo_context:
            dim += encoder.config.fusion.embed_dim
        self.head = LinearClassifier(dim, spec.num_classes)

    def head_forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "hr" in inputs:
            inputs = {**inputs, "hr": resize_hr(inputs["hr"], self.spec.image_size)}
        out = self.encode(inputs)
        if self.spec.geo_context:
            out = {**out, "fused": out["geo"]}
        return {"label": self.head(pool_features(out))}


class SegmentationModel(DownstreamModel):
    output_keys = ("mask",)

    def __init__(self, encoder: SkySense, spec: TaskSpec) -> None:
        super().__init__(encoder, spec)
        self.head = UperNetHead(pyramid_channels(encoder.config, spec), spec.num_classes, spec.decoder_channels)

    def head_forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.head(feature_pyramid(self.encode(inputs), self.spec))
        return {"mask": F.interpolate(logits, size=target_size(inputs), mode="bilinear", align_corners=False)}


def bitemporal_inputs(inputs: Mapping[str, torch.Tensor], modalities: Sequence[str]) -> tuple[dict, dict]:
    """Split encoder inputs into (before, after) (module docstring)."""
    before: dict[str, torch.Tensor] = {}
    after: dict[str, torch.Tensor] = {}
    for key in ("lat", "lon"):
        if key in inputs:
            before[key] = after[key] = inputs[key]
    for m in modalities:
        if m == "hr":
            if "hr_post" not in inputs:
                raise ValueError("change: HR input needs 'hr' (before) and 'hr_post' (after); 'hr_post' is missing")
            before["hr"], after["hr"] = inputs["hr"], inputs["hr_post"]
            continue
        x = inputs[m]
        if x.shape[1] != 2:
            raise ValueError(f"change: {m}: expected 2 frames (before, after) on axis 1, got shape {tuple(x.shape)}")
        for suffix in ("", "_dates", "_mask"):
            if m + suffix in inputs:
                value = inputs[m + suffix]
                before[m + suffix], after[m + suffix] = value[:, :1], value[:, 1:]
    return before, after


class ChangeModel(DownstreamModel):
    def __init__(self, encoder: SkySense, spec: TaskSpec) -> None:
        super().__init__(encoder, spec)
        channels = pyramid_channels(encoder.config, spec)
        self.head = UperNetHead(channels, 2, spec.decoder_channels)
        self.semantic_head = (UperNetHead(channels, spec.semantic_classes, spec.decoder_channels)
                              if spec.semantic_classes else None)
        self.output_keys = ("change", "mask", "mask_post") if spec.semantic_classes else ("change",)

    def target_key(self, output_key: str, batch: Mapping[str, Any]) -> str:
        # LEVIR-CD / DSIFN / OSCD keep the change map in "mask"; DynamicEarthNet's change samples
        # have "change", with "mask" / "mask_post" holding each date's classes.
        if output_key == "change" and "change" not in batch:
            return "mask"
        return output_key

    def head_forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        before, after = bitemporal_inputs(inputs, self.spec.modalities)
        both = {k: torch.cat([before[k], after[k]]) for k in before}
        levels = feature_pyramid(self.encode(both), self.spec)
        b = next(iter(before.values())).shape[0]
        first, second = [x[:b] for x in levels], [x[b:] for x in levels]
        size = target_size(before)

        def up(x: torch.Tensor) -> torch.Tensor:
            return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

        result = {"change": up(self.head([(s - f).abs() for f, s in zip(first, second)]))}
        if self.semantic_head is not None:
            semantic = up(self.semantic_head([torch.cat([f, s]) for f, s in zip(first, second)]))
            result["mask"], result["mask_post"] = semantic[:b], semantic[b:]
        return result


MODELS: dict[str, type[DownstreamModel]] = {
    "classification": ClassificationModel,
    "segmentation": SegmentationModel,
    "change": ChangeModel,
}


def build_task_model(encoder: SkySense, spec: TaskSpec) -> DownstreamModel:
    """The task model of ``spec.task`` around ``encoder``."""
    if spec.task == "detection":
        from skysense.downstream.detection import DetectionModel  # torchvision, only when asked for

        return DetectionModel(encoder, spec)
    if spec.task == "oriented_detection" and spec.detector == "oriented_rcnn":
        from skysense.downstream.oriented_rcnn import OrientedRCNNModel

        return OrientedRCNNModel(encoder, spec)
    if spec.task == "oriented_detection":
        from skysense.downstream.oriented_detection import OrientedDetectionModel

        return OrientedDetectionModel(encoder, spec)
    return MODELS[spec.task](encoder, spec)

