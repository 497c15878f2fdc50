"""Typed configuration of a pretraining run, read from YAML with command-line overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from skysense.config import build_dataclass
from skysense.pretrain.objective import HeadConfig, PretrainObjectiveConfig
from skysense.pretrain.views import ViewAugment


@dataclass
class DataConfig:
    """Where the pretraining images come from and how views are cut."""

    dataset: str = "aid"
    # Folder of the dataset; None: $SKYSENSE_DATA/<dataset>.
    root: str | None = None
    split: str = "train"
    # Side of each HR view in pixels after the random resized crop.
    view_size: int = 128
    # Range of the crop's side as a fraction of the image side.
    crop_scale: tuple[float, float] = (0.4, 1.0)
    num_workers: int = 2
    # Optional photometric augmentations of each view (skysense.pretrain.views.ViewAugment); 0: off.
    color_jitter_prob: float = 0.0
    color_jitter: float = 0.4
    grayscale_prob: float = 0.0
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.001, 0.02)

    def augment(self) -> ViewAugment:
        return ViewAugment(self.color_jitter_prob, self.color_jitter, self.grayscale_prob, self.blur_prob,
                           tuple(self.blur_sigma))


@dataclass
class OptimConfig:
    lr: float = 5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.04
    warmup_steps: int = 10
    grad_clip: float = 3.0
    teacher_momentum: float = 0.996
    final_teacher_momentum: float = 1.0


@dataclass
class PretrainConfig:
    """One pretraining run. ``batch_size`` is global: each of N processes takes 1/N of it."""

    preset: str = "tiny"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    objective: PretrainObjectiveConfig = field(default_factory=PretrainObjectiveConfig)
    batch_size: int = 32
    max_steps: int = 100
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 50
    compile: bool = False
    # torch CPU threads of each process (None: torch's default, one per core). On a small shared
    # CPU one thread avoids the OpenMP spin-wait stalls that made a 2-thread step 10-20x slower
    # when another job held a core.
    num_threads: int | None = None
    activation_checkpointing: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PretrainConfig":
        return build_dataclass(cls, data, "config", _NESTED)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "PretrainConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: pretraining config not found")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: {error}") from error


_NESTED = {
    "data": DataConfig,
    "optim": OptimConfig,
    "objective": PretrainObjectiveConfig,
    "head": HeadConfig,
}
