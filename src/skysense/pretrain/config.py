"""Typed configuration of a pretraining run, read from YAML with command-line overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from skysense.config import SkySenseConfig, build_dataclass, config_from_yaml
from skysense.distributed import check_checkpointing_setting
from skysense.models.skysense import SkySense
from skysense.pretrain.objective import HeadConfig, PretrainObjectiveConfig
from skysense.pretrain.views import ViewAugment, ViewConfig


@dataclass
class DataConfig:
    """Where the pretraining samples come from and how views are cut (skysense.pretrain.views)."""

    # A dataset of skysense.data.datasets.DATASETS (aid, manifest, oscd, ...), read from `root`.
    dataset: str = "aid"
    # Folder of the dataset; None: $SKYSENSE_DATA/<dataset>.
    root: str | None = None
    split: str = "train"
    # Extra keyword arguments of the dataset class (e.g. manifest: {modalities: [hr, s2]}).
    dataset_options: dict[str, Any] = field(default_factory=dict)
    # Folder of shards written by `skysense shard`: read instead of `dataset` when set.
    shards: str | None = None
    # Keep each normalised sample in memory once read (per worker): small datasets of large scenes.
    cache: bool = False
    # Side of each HR view in pixels after the random resized crop.
    view_size: int = 128
    # Side of each S2/S1 view in pixels; None: view_size / 32 (the model's HR-to-Sentinel ratio).
    sentinel_view_size: int | None = None
    # Range of the crop's side as a fraction of the image (or crop_size window) side.
    crop_scale: tuple[float, float] = (0.4, 1.0)
    # Random window of each sample, in pixels of its finest modality, the views are cut from
    # (scenes larger than a view, e.g. OSCD cities); None: the whole sample.
    crop_size: int | None = None
    # Random transposes (with the flips: all 8 orientations, i.e. 90-degree rotations).
    rotate: bool = False
    # Per-modality brightness and contrast jitter strength.
    jitter: float = 0.4
    # Valid frames drawn per view from each series (the paper: 20 S2, 10 S1); None: all.
    s2_frames: int | None = None
    s1_frames: int | None = None
    # Largest random change of each frame's day of year, in days.
    date_jitter: int = 0
    # Probability of dropping each modality from a view, per global batch (never all).
    modality_dropout: float = 0.0
    num_workers: int = 2
    # Optional photometric augmentations of each HR view (skysense.pretrain.views.ViewAugment); 0: off.
    color_jitter_prob: float = 0.0
    color_jitter: float = 0.4
    grayscale_prob: float = 0.0
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.001, 0.02)
    # Multi-crop (DINO): small local views per sample besides the two views; the student sees them,
    # the teacher does not, and only the image-level loss uses them. 0: off.
    local_views: int = 0
    local_view_size: int = 32
    # Side of each local S2/S1 view; None: the two views' S2/S1 side scaled like the HR side.
    local_sentinel_view_size: int | None = None
    # Range of a local crop's side as a fraction of the image (or crop_size window) side.
    local_crop_scale: tuple[float, float] = (0.1, 0.4)

    def augment(self) -> ViewAugment:
        return ViewAugment(self.color_jitter_prob, self.color_jitter, self.grayscale_prob, self.blur_prob,
                           tuple(self.blur_sigma))

    def view_config(self, model_config: SkySenseConfig) -> ViewConfig:
        """The :class:`ViewConfig` of these settings for a model (its HR-to-Sentinel ratio)."""
        sentinel = self.sentinel_view_size or max(1, self.view_size // model_config.hr_stride)
        return ViewConfig(
            hr_size=self.view_size, sentinel_size=sentinel, crop_scale=tuple(self.crop_scale),
            crop_size=self.crop_size, rotate=self.rotate, jitter=self.jitter, s2_frames=self.s2_frames,
            s1_frames=self.s1_frames, date_jitter=self.date_jitter, modality_dropout=self.modality_dropout,
            augment=self.augment(), local_views=self.local_views, local_hr_size=self.local_view_size,
            local_sentinel_size=self.local_sentinel_view_size or max(1, round(sentinel * self.local_view_size
                                                                           / self.view_size)),
            local_crop_scale=tuple(self.local_crop_scale),
        )


@dataclass
class OptimConfig:
    lr: float = 5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.04
    warmup_steps: int = 10
    grad_clip: float = 3.0
    teacher_momentum: float = 0.996
    final_teacher_momentum: float = 1.0


STRATEGIES: tuple[str, ...] = ("ddp", "fsdp")
COMPILE_SCOPES: tuple[str, ...] = ("off", "blocks", "model")


@dataclass
class DistributedConfig:
    """How the processes of ``torchrun --nproc-per-node N`` share a run (see skysense.distributed).

    ``strategy``: ``"ddp"``: every process holds the whole model (DistributedDataParallel);
    resumable state in ``training_state.pt``. ``"fsdp"``: parameters, gradients and optimizer
    state sharded per transformer block (FSDP2), for models that do not fit one device;
    resumable state in sharded ``checkpoint-<step>/`` folders (torch.distributed.checkpoint),
    which a run with another number of processes can resume. In one process neither shards.
    """

    strategy: str = "ddp"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"distributed.strategy: expected one of {list(STRATEGIES)}, got {self.strategy!r}")


@dataclass
class PretrainConfig:
    """One pretraining run. ``batch_size`` is global: each of N processes takes 1/N of it."""

    preset: str = "tiny"
    # HR bands of the model, e.g. [R, G, B, NIR] (SkySense.with_hr_bands: NIR's filter starts as
    # red's, NIR normalised as red); the dataset reads them (its hr_bands option: the manifest's
    # rasters). None: R, G, B.
    hr_bands: tuple[str, ...] | None = None
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    objective: PretrainObjectiveConfig = field(default_factory=PretrainObjectiveConfig)
    batch_size: int = 32
    max_steps: int = 100
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 50
    # torch.compile: "off"; "blocks", each transformer block compiled on its own (regional, see
    # skysense.compilation: fast to compile, composes with activation checkpointing and FSDP2);
    # "model", the whole step module (true and false are read as "model" and "off").
    compile: str = "off"
    # torch CPU threads of each process (None: torch's default, one per core). On a small shared
    # CPU one thread avoids the OpenMP spin-wait stalls that made a 2-thread step 10-20x slower
    # when another job held a core.
    num_threads: int | None = None
    # Recompute the student's transformer blocks in the backward pass: false; true (each block's
    # whole forward); "selective" (matmul and attention outputs kept, the rest recomputed:
    # skysense.distributed.matmul_outputs_saved; traced inside each block under compile: blocks);
    # or one of those per network, e.g. {hr: true, s2: true, s1: true, fusion: selective} (networks
    # hr, s2, s1, fusion, geo; those not named are not checkpointed). That one keeps the fusion's
    # matmul outputs, where most of the step's FLOPs are, and recomputes the encoders: huge's step
    # at the paper's batch of 3 on one device is estimated at 62.1 GiB against selective's 70.5
    # (benchmarks/step_memory.py --batches 3 --checkpointing selective-fusion).
    activation_checkpointing: bool | str | dict[str, bool | str] = False
    # Encode the views of a step that share their shapes (the two global views) in one pass of
    # the student and one of the teacher, stacked along the batch (skysense.pretrain.view_batching):
    # the same features with half the launches and FSDP gathers. False: one pass per view.
    batch_views: bool = True
    # SDPA backends that each network's attention may use, e.g. {fusion: [efficient]} (networks
    # hr, s2, s1, fusion, geo; backends cudnn, flash, efficient, math, or explicit alone); the
    # student's and the teacher's alike. Empty: torch's choice everywhere.
    # benchmarks/attention_backends.py times them.
    attention_backends: dict[str, list[str]] = field(default_factory=dict)
    # Every MLP's GELU backward pass and first bias gradient in one Triton kernel (CUDA;
    # skysense.models.gelu_bias): the same values, 8 bytes per element of a block's input less
    # to move. qkv_kernel: every attention layer that runs SDPA assembles its qkv gradient and
    # sums the qkv bias's in one kernel (skysense.models.qkv_gradient): 6 bytes less.
    # norm_kernel: every pre-norm block differentiates each residual junction (norm, residual
    # add, the projections' bias gradients) in one kernel (skysense.models.residual_norm): about 13
    # bytes less. benchmarks/bias_kernels.py times each against inductor's kernels.
    mlp_kernel: bool = False
    qkv_kernel: bool = False
    norm_kernel: bool = False
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        if isinstance(self.compile, bool):
            self.compile = "model" if self.compile else "off"
        if self.compile not in COMPILE_SCOPES:
            raise ValueError(f"compile: expected one of {list(COMPILE_SCOPES)} (or true/false), got {self.compile!r}")
        check_checkpointing_setting(self.activation_checkpointing)
        SkySense.check_attention_backends(self.attention_backends)
        if self.hr_bands is not None:
            self.hr_bands = tuple(self.hr_bands)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PretrainConfig":
        return build_dataclass(cls, data, "config", _NESTED)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "PretrainConfig":
        return config_from_yaml(cls, path, "pretraining config")


_NESTED = {
    "data": DataConfig,
    "optim": OptimConfig,
    "objective": PretrainObjectiveConfig,
    "head": HeadConfig,
    "distributed": DistributedConfig,
}
