"""Which task each benchmark dataset is fine-tuned and evaluated on, with its classes and splits.

One entry per (dataset, task) pair the loaders in :mod:`skysense.data.datasets` support. The
``metric`` is the score the SkySense paper reports for that benchmark (``oa``, ``map``,
``miou``, ``mf1``, ``f1`` of the change class, ``scs``, ``map50`` for both detection tasks).
Class names are taken from the dataset object when it lists them (AID and RESISC-45 read them from their folders).

``excluded_classes`` names the classes the benchmark's protocol leaves out of its class means:
ISPRS Potsdam's mF1 in the SkySense paper is over five classes, *clutter* excluded, and Vaihingen
is reported the same way in the works it compares with. The evaluation then reports both the
means over every class (``mf1``, ``miou``) and over the others (``mf1_excluding``,
``miou_excluding``; :func:`skysense.evaluation.metrics.segmentation_scores`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from skysense.data.datasets import DATASETS
from skysense.data.datasets.bigearthnet import LABELS_19
from skysense.data.datasets.detection import DIOR_CLASSES, DOTA_CLASSES, FAIR1M_CLASSES
from skysense.data.datasets.dynamic_earthnet import CLASSES as DYNAMIC_EARTHNET_CLASSES
from skysense.data.datasets.eurosat import CLASSES as EUROSAT_CLASSES
from skysense.data.datasets.fmow import CATEGORIES as FMOW_CATEGORIES
from skysense.data.sample import CHANGE_CLASSES

DEFAULT_CROP_SIZE = 128
"""Training crop side of segmentation, change and detection runs whose dataset names none."""


def _classes(name: str) -> tuple[str, ...]:
    """The class names a registered segmentation dataset lists."""
    return tuple(getattr(DATASETS[name], "classes", ()))


@dataclass(frozen=True)
class DownstreamDataset:
    """Task settings of one benchmark dataset."""

    task: str
    num_classes: int
    metric: str
    class_names: tuple[str, ...] = ()
    multilabel: bool = False
    semantic_classes: int = 0
    train_split: str = "train"
    eval_split: str = "test"
    # Keyword arguments of the dataset class.
    options: Mapping[str, Any] = field(default_factory=dict)
    # Classes left out of the protocol's class means (module docstring).
    excluded_classes: tuple[str, ...] = ()
    # Classification: S2/S1 side each sample is resized to before batching; None: as read.
    sentinel_size: int | None = None
    # Training crop side when the run sets none (None: DEFAULT_CROP_SIZE). Detection trains on
    # whole images or DOTA_devkit-style patches: DIOR's 800 px, 1024 px patches of DOTA / FAIR1M.
    crop_size: int | None = None


REGISTRY: dict[tuple[str, str], DownstreamDataset] = {
    ("aid", "classification"): DownstreamDataset("classification", 30, "oa"),
    ("resisc45", "classification"): DownstreamDataset("classification", 45, "oa"),
    # EuroSAT publishes no acquisition dates; presets that date-encode S2 need one, so a mid-year
    # placeholder day is given (our choice, not a property of the data).
    ("eurosat_ms", "classification"): DownstreamDataset("classification", 10, "oa", EUROSAT_CLASSES,
                                                        train_split="all", eval_split="all",
                                                        options={"day_of_year": 182}),
    # fMoW-Sentinel images differ in size (each location's footprint): resized to 96 px, SatMAE's
    # input size for this dataset (its README's --input_size 96); SatMAE crops and resizes
    # bicubically (random resized crops in training, resize and centre crop in evaluation), here
    # a plain bilinear resize of the whole image.
    ("fmow_sentinel", "classification"): DownstreamDataset("classification", len(FMOW_CATEGORIES), "oa",
                                                           tuple(FMOW_CATEGORIES), eval_split="val",
                                                           sentinel_size=96),
    ("bigearthnet_v1", "classification"): DownstreamDataset("classification", 19, "map", LABELS_19, multilabel=True,
                                                            options={"modalities": ("s2",)}),
    ("bigearthnet_v2", "classification"): DownstreamDataset("classification", 19, "map", LABELS_19, multilabel=True),
    ("bigearthnet_mm", "classification"): DownstreamDataset("classification", 19, "map", LABELS_19, multilabel=True),
    ("loveda", "segmentation"): DownstreamDataset("segmentation", 7, "miou", _classes("loveda"), eval_split="val"),
    ("potsdam", "segmentation"): DownstreamDataset("segmentation", 6, "mf1", _classes("potsdam"), eval_split="val",
                                                   excluded_classes=("clutter",)),
    ("vaihingen", "segmentation"): DownstreamDataset("segmentation", 6, "mf1", _classes("vaihingen"), eval_split="val",
                                                     excluded_classes=("clutter",)),
    ("isaid", "segmentation"): DownstreamDataset("segmentation", 16, "miou", _classes("isaid"), eval_split="val"),
    ("dynamic_earthnet", "segmentation"): DownstreamDataset("segmentation", 7, "miou", DYNAMIC_EARTHNET_CLASSES,
                                                            eval_split="val"),
    ("sen1floods11", "segmentation"): DownstreamDataset("segmentation", 2, "miou", ("not_water", "water")),
    ("levir_cd", "change"): DownstreamDataset("change", 2, "f1", CHANGE_CLASSES),
    ("dsifn", "change"): DownstreamDataset("change", 2, "f1", CHANGE_CLASSES),
    ("oscd", "change"): DownstreamDataset("change", 2, "f1", CHANGE_CLASSES),
    # Horizontal detection: DIOR as the paper evaluates it (Faster R-CNN + FPN, mAP at IoU 0.5);
    # DOTA with the horizontal hulls of its oriented boxes, its official horizontal-box task
    # (trained on 1024-px crops, evaluated in 1024-px windows; classes follow the dataset's version).
    ("dior", "detection"): DownstreamDataset("detection", len(DIOR_CLASSES), "map50", DIOR_CLASSES, crop_size=800),
    ("dota", "detection"): DownstreamDataset("detection", len(DOTA_CLASSES["1.0"]), "map50", DOTA_CLASSES["1.0"],
                                             eval_split="val", crop_size=1024),
    # Oriented detection (Rotated Faster R-CNN): DIOR-R and FAIR1M v1.0 as in the paper, DOTA's
    # oriented task; mAP at IoU 0.5 of the quadrilaterals. FAIR1M's test labels are not public.
    ("dior_r", "oriented_detection"): DownstreamDataset("oriented_detection", len(DIOR_CLASSES), "map50", DIOR_CLASSES,
                                                        crop_size=800),
    ("fair1m", "oriented_detection"): DownstreamDataset("oriented_detection", len(FAIR1M_CLASSES), "map50",
                                                        FAIR1M_CLASSES, eval_split="validation", crop_size=1024),
    ("dota", "oriented_detection"): DownstreamDataset("oriented_detection", len(DOTA_CLASSES["1.0"]), "map50",
                                                      DOTA_CLASSES["1.0"], eval_split="val", crop_size=1024),
    # Your own places (ManifestDataset with the option classes: [...]; multilabel: true for
    # multi-hot labels): the classes and the number of them come from the dataset; change maps
    # need no classes.
    ("manifest", "classification"): DownstreamDataset("classification", 0, "oa", eval_split="val"),
    ("manifest", "segmentation"): DownstreamDataset("segmentation", 0, "miou", eval_split="val"),
    ("manifest", "change"): DownstreamDataset("change", 2, "f1", CHANGE_CLASSES, eval_split="val"),
    # objects: GeoJSON polygons on the HR images; crops of 512 px unless --crop-size says otherwise
    ("manifest", "detection"): DownstreamDataset("detection", 0, "map50", eval_split="val", crop_size=512),
    ("manifest", "oriented_detection"): DownstreamDataset("oriented_detection", 0, "map50", eval_split="val",
                                                          crop_size=512),
    ("dynamic_earthnet", "change"): DownstreamDataset("change", 2, "scs", CHANGE_CLASSES,
                                                      semantic_classes=len(DYNAMIC_EARTHNET_CLASSES),
                                                      eval_split="val", options={"task": "change"}),
}


def downstream_dataset(name: str, task: str) -> DownstreamDataset:
    """The settings of ``name`` for ``task``; the error lists the tasks the dataset supports."""
    found = REGISTRY.get((name, task))
    if found is None:
        supported = sorted(t for n, t in REGISTRY if n == name)
        if supported:
            raise ValueError(f"dataset {name!r} is not a {task} dataset; it supports: {', '.join(supported)}")
        names = sorted({n for n, t in REGISTRY if t == task})
        raise ValueError(f"dataset {name!r} has no downstream task; {task} datasets: {', '.join(names)}")
    return found
