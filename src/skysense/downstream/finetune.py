"""Fine-tuning a SkySense encoder with a task head: one readable, resumable loop.

Per step: a batch of augmented samples (:class:`~skysense.downstream.data.TrainingSamples`), the
task model's loss, AdamW with layer-wise LR decay (:mod:`skysense.downstream.lr_decay`), linear
warm-up then cosine decay (the pretraining loop's :func:`~skysense.pretrain.loop.learning_rate`),
gradient clipping. Data order and augmentation are seeded by ``(seed, step)`` through the
pretraining loop's :class:`~skysense.pretrain.data.StepBatchSampler`, so a resumed run repeats an
uninterrupted one exactly. Metrics go through the pretraining loop's
:class:`~skysense.pretrain.loop.MetricsLog`; every file is written atomically.

Output folder:
    ``model.safetensors`` + ``config.json``   the fine-tuned encoder (``SkySense.from_pretrained``)
    ``head.safetensors`` + ``task.json``      the task head and what it predicts (:func:`load_finetuned`)
    ``training_state.pt``                     everything needed to resume (weights-only pickle)
    ``metrics.csv``, ``tensorboard/``         one row per step
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from skysense.compilation import compile_blocks
from skysense.config import PRESETS, build_dataclass, config_from_yaml
from skysense.data.datasets import DATASETS, dataset_root, reads_hr_bands, options_with_hr_bands
from skysense.data.sample import collate
from skysense.downstream.data import TrainingSamples, evenly_spaced, model_keys
from skysense.downstream.lr_decay import parameter_groups
from skysense.downstream.registry import DEFAULT_CROP_SIZE, downstream_dataset
from skysense.devices import adamw, resolve_device, to_device, training_autocast
from skysense.distributed import check_checkpointing_setting, checkpoint_blocks
from skysense.downstream.tasks import TASKS, DownstreamModel, TaskSpec, build_task_model
from skysense.models import TRANSFORMER_BLOCKS, SkySense, set_mlp_kernel, set_norm_kernel, set_qkv_kernel
from skysense.pretrain.data import StepBatchSampler
from skysense.pretrain.loop import METRICS_NAME, STATE_NAME, MetricsLog, NonFiniteLossError, learning_rate
from skysense.validation import checked_on_host
from skysense.weights import atomic_write, save_pretrained

HEAD_NAME = "head.safetensors"
TASK_NAME = "task.json"
TASK_FORMAT_VERSION = 1

__all__ = ["FinetuneConfig", "FinetuneOptim", "finetune", "load_finetuned", "build_dataset", "task_spec",
           "HEAD_NAME", "TASK_NAME", "METRICS_NAME", "STATE_NAME"]


@dataclass
class FinetuneOptim:
    """Optimiser and schedule (names shared with the pretraining config's ``optim``)."""

    lr: float = 1e-4
    min_lr: float = 1e-6
    warmup_steps: int = 10
    weight_decay: float = 0.05
    # Per-layer LR factor inside each encoder stack (1.0: no decay).
    layer_decay: float = 0.75
    # Max gradient norm (None: no clipping).
    grad_clip: float | None = 3.0


FINETUNE_COMPILE = ("off", "blocks")


@dataclass
class FinetuneConfig:
    """One fine-tuning run. Unset task details come from :mod:`skysense.downstream.registry`."""

    task: str = "classification"
    dataset: str = "aid"
    # Dataset folder; None: $SKYSENSE_DATA/<usual sub-folder>.
    data_root: str | None = None
    # Extra keyword arguments of the dataset class (merged over the registry's).
    dataset_options: dict[str, Any] = field(default_factory=dict)
    train_split: str | None = None
    eval_split: str | None = None
    # Encoder: a folder written by save_pretrained (pretrained), else the preset randomly initialised.
    weights: str | None = None
    preset: str = "tiny"
    # HR bands the encoder is made to take before training (SkySense.with_hr_bands: NIR starts
    # from red's filter), e.g. [R, G, B, NIR]; the dataset reads the encoder's HR bands (its
    # ``hr_bands`` option: Potsdam's RGBIR tiles, DynamicEarthNet's Planet NIR). None: as loaded.
    hr_bands: tuple[str, ...] | None = None
    # Encoder inputs (default: every modality the samples carry).
    modalities: tuple[str, ...] | None = None
    geo_context: bool = False
    freeze_encoder: bool = False
    decoder_channels: int = 128
    # Detection: the detector (skysense.downstream.tasks.DETECTORS); None: the task's default.
    detector: str | None = None
    # Classification: HR square side (multiple of 32); None: each side rounded up to 32.
    image_size: int | None = None
    # Classification: S2/S1 frames of each sample resized (bilinear) to this side before batching;
    # None: the registry's (96 for fMoW-Sentinel, whose images differ in size; else no resize); 0: none.
    sentinel_size: int | None = None
    # Segmentation / change / detection: training crop, and evaluation window / stride
    # (reference-grid pixels). None: the dataset's in the registry (DIOR 800, DOTA and FAIR1M
    # 1024), else 128; resolved when the config is made.
    crop_size: int | None = None
    eval_window: int | None = None
    eval_stride: int | None = None
    class_weights: tuple[float, ...] | None = None
    flips: bool = True
    # Keep each normalised training sample in memory once read (few, large scenes).
    cache_samples: bool = False
    batch_size: int = 8
    max_steps: int = 100
    seed: int = 0
    checkpoint_every: int = 50
    num_workers: int = 0
    num_threads: int | None = None
    # Use only this many training samples, spread evenly over the split (None: all).
    limit_train: int | None = None
    # Where to train: "cpu", "cuda", "cuda:N"; None: CUDA when there is a GPU (bf16 autocast
    # there), else the CPU.
    device: str | None = None
    # "blocks": each transformer block of the encoder compiled on its own (skysense.compilation).
    compile: str = "off"
    # Recompute the encoder blocks' activations in the backward pass (less memory, more time):
    # true, each block's whole forward; "selective", all but its matmul and attention outputs;
    # or one of those per network, e.g. {hr: true, fusion: selective} (networks hr, s2, s1,
    # fusion, geo; those not named are not checkpointed).
    activation_checkpointing: bool | str | dict[str, bool | str] = False
    # SDPA backends that each encoder network's attention may use, e.g. {fusion: [efficient]}
    # (networks hr, s2, s1, fusion, geo; backends cudnn, flash, efficient, math, or explicit
    # alone). Empty: torch's choice.
    attention_backends: dict[str, list[str]] = field(default_factory=dict)
    # The encoder's bias-gradient kernels on CUDA, as in pretraining (PretrainConfig): every MLP's
    # GELU backward with fc1's bias gradient (skysense.models.gelu_bias), every SDPA attention
    # layer's qkv gradient with its bias's (qkv_gradient), every pre-norm block's residual
    # junctions with their norms' and projections' bias gradients (residual_norm). The same
    # values; on the CPU the layers compute them without the kernels.
    mlp_kernel: bool = False
    qkv_kernel: bool = False
    norm_kernel: bool = False
    optim: FinetuneOptim = field(default_factory=FinetuneOptim)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task: expected one of {TASKS}, got {self.task!r}")
        check_checkpointing_setting(self.activation_checkpointing)
        SkySense.check_attention_backends(self.attention_backends)
        if self.crop_size is None:
            entry = downstream_dataset(self.dataset, self.task)
            self.crop_size = entry.crop_size or DEFAULT_CROP_SIZE
        if self.weights is None and self.preset not in PRESETS:
            raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {self.preset!r}")
        for name in ("batch_size", "max_steps", "checkpoint_every", "crop_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.sentinel_size is not None and self.sentinel_size < 0:
            raise ValueError(f"sentinel_size: expected >= 0 (0: no resize) or None, got {self.sentinel_size}")
        if self.modalities is not None:
            self.modalities = tuple(self.modalities)
        if self.hr_bands is not None:
            self.hr_bands = tuple(self.hr_bands)
        if self.compile not in FINETUNE_COMPILE:
            raise ValueError(f"compile: expected one of {list(FINETUNE_COMPILE)}, got {self.compile!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FinetuneConfig":
        options = data.get("dataset_options")
        config = build_dataclass(cls, {k: v for k, v in data.items() if k != "dataset_options"}, "config",
                                 {"optim": FinetuneOptim})
        if options is not None:
            if not isinstance(options, dict):
                raise ValueError(f"dataset_options: expected a mapping, got {type(options).__name__}")
            config.dataset_options = dict(options)
        return config

    @classmethod
    def from_yaml(cls, path: str | Path) -> "FinetuneConfig":
        return config_from_yaml(cls, path, "fine-tuning config")

    def splits(self) -> tuple[str, str]:
        """(train split, evaluation split), the registry's unless set."""
        entry = downstream_dataset(self.dataset, self.task)
        return self.train_split or entry.train_split, self.eval_split or entry.eval_split


def build_dataset(name: str, task: str, split: str | None, data_root: str | os.PathLike | None = None,
                  options: dict[str, Any] | None = None) -> Dataset:
    """The dataset ``name`` for ``task`` (registry options, then ``options``) restricted to ``split``."""
    entry = downstream_dataset(name, task)
    kwargs = {**entry.options, **(options or {})}
    for key, value in kwargs.items():
        if isinstance(value, list):
            kwargs[key] = tuple(value)
    accepted = inspect.signature(DATASETS[name]).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        readers = "; the datasets that read other HR bands: " + ", ".join(n for n in sorted(DATASETS)
                                                                          if reads_hr_bands(n))
        raise ValueError(f"{name}: dataset options {unknown} not taken; it takes "
                         f"{[k for k in accepted if k not in ('root', 'split')]}"
                         f"{readers if 'hr_bands' in unknown else ''}")
    dataset = DATASETS[name](dataset_root(name, data_root), split=split, **kwargs)
    if len(dataset) == 0:
        raise ValueError(f"{name}: split {split!r} under {dataset.root} is empty (splits found: "
                         f"{dataset.split_counts() if split else 'none'})")
    return dataset


def task_spec(config: FinetuneConfig, dataset: Dataset) -> TaskSpec:
    """The :class:`TaskSpec` of a run: the dataset's own class list when it has one, else the
    registry's; the inputs the samples carry (or ``config.modalities``)."""
    entry = downstream_dataset(config.dataset, config.task)
    # A dataset that lists its classes (AID, RESISC-45: one folder per class) decides their number.
    names = tuple(getattr(dataset, "classes", ()) or entry.class_names) if config.task != "change" else entry.class_names
    num_classes = len(names) if names else entry.num_classes
    if num_classes < 1:
        raise ValueError(f"{config.dataset}: no class list; give the dataset option classes (dataset_options: "
                         f"{{classes: [name, ...]}} in the config)")
    first = dataset[0]
    target = {"classification": "label", "segmentation": "mask", "detection": "boxes",
              "oriented_detection": "boxes"}.get(config.task)
    if config.task == "change" and not {"change", "mask"} & set(first):
        target = "change"
    if target is not None and target not in first:
        raise ValueError(f"{config.dataset}: {config.task} needs a {target!r} in every training sample; the first "
                         f"({first.get('id')}) has none")
    carried = tuple(m for m in ("hr", "s2", "s1") if isinstance(first.get(m), torch.Tensor))
    modalities = config.modalities or carried
    missing = set(modalities) - set(carried)
    if missing:
        raise ValueError(f"modalities: {config.dataset} samples carry {list(carried)}, not {sorted(missing)}")
    sentinel_size = entry.sentinel_size if config.sentinel_size is None else config.sentinel_size
    return TaskSpec(task=config.task, num_classes=num_classes, modalities=modalities,
                    multilabel=getattr(dataset, "multilabel", entry.multilabel), geo_context=config.geo_context,
                    decoder_channels=config.decoder_channels, semantic_classes=entry.semantic_classes,
                    class_names=names, image_size=config.image_size, class_weights=config.class_weights,
                    sentinel_size=sentinel_size or None, detector=config.detector)


def load_encoder(weights: str | os.PathLike | None, preset: str, seed: int,
                 hr_bands: tuple[str, ...] | None = None) -> SkySense:
    """Pretrained weights, or the preset randomly initialised with ``torch.manual_seed(seed)``;
    made to take ``hr_bands`` (:meth:`SkySense.with_hr_bands`) when they are given and differ."""
    if weights is not None:
        encoder = SkySense.from_pretrained(str(weights))
    else:
        torch.manual_seed(seed)
        encoder = SkySense.from_preset(preset)
    if hr_bands is not None and tuple(hr_bands) != encoder.config.inputs["hr"].bands:
        encoder.with_hr_bands(hr_bands)
    return encoder


def check_hr_bands(dataset: Dataset, spec: TaskSpec, encoder: SkySense) -> None:
    """Raise when the task feeds HR images whose bands the encoder does not take."""
    bands = getattr(dataset, "bands", {}).get("hr")
    wanted = encoder.config.inputs["hr"].bands
    if "hr" in spec.modalities and bands is not None and tuple(bands) != wanted:
        raise ValueError(f"hr bands: {spec.task} on {getattr(dataset, 'name', type(dataset).__name__)} reads "
                         f"{list(bands)}; the encoder takes {list(wanted)} (set hr_bands, --with-hr-bands, to "
                         f"the same list, or the dataset option hr_bands where the dataset has those bands)")


def save_finetuned(model: DownstreamModel, out: Path, extra: dict[str, Any], step: int) -> None:
    """Encoder (``save_pretrained``), head weights and ``task.json``, each written atomically."""
    save_pretrained(model.encoder, out, metadata={"finetune_step": str(step)})
    head = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    atomic_write(out / HEAD_NAME, lambda p: save_file(head, str(p), metadata={"format": "pt"}))
    task = {"task_format_version": TASK_FORMAT_VERSION, "spec": model.spec.to_dict(), "step": step, **extra}
    atomic_write(out / TASK_NAME, lambda p: p.write_text(json.dumps(task, indent=2) + "\n"))


def read_task(directory: str | os.PathLike) -> dict[str, Any]:
    """``task.json`` of a fine-tuned run folder."""
    path = Path(directory) / TASK_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {TASK_NAME}; expected a folder written by skysense finetune")
    data = json.loads(path.read_text())
    if data.get("task_format_version") != TASK_FORMAT_VERSION:
        raise ValueError(f"{path}: task_format_version: expected {TASK_FORMAT_VERSION}, "
                         f"got {data.get('task_format_version')}")
    return data


def load_finetuned(directory: str | os.PathLike) -> DownstreamModel:
    """Rebuild a fine-tuned task model from its run folder (safetensors + JSON only)."""
    directory = Path(directory)
    spec = TaskSpec.from_dict(read_task(directory)["spec"])
    model = build_task_model(SkySense.from_pretrained(str(directory)), spec)
    path = directory / HEAD_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; expected beside {TASK_NAME}")
    head = load_file(str(path))
    expected = {k for k in model.state_dict() if not k.startswith("encoder.")}
    if set(head) != expected:
        raise ValueError(f"{path}: does not match {TASK_NAME}: missing {sorted(expected - set(head))[:5]}, "
                         f"unexpected {sorted(set(head) - expected)[:5]}")
    model.load_state_dict(head, strict=False)
    return model.eval()


RESUME_KEYS = ("task", "dataset", "preset", "weights", "batch_size", "seed", "modalities", "crop_size", "limit_train",
               "sentinel_size")


def _save_state(out: Path, step: int, model: DownstreamModel, optimizer: torch.optim.Optimizer,
                config: FinetuneConfig, extra: dict[str, Any]) -> None:
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "config": config.to_dict()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    save_finetuned(model, out, extra, step)
    atomic_write(out / STATE_NAME, lambda p: p.write_bytes(buffer.getvalue()))


def _load_state(out: Path, model: DownstreamModel, optimizer: torch.optim.Optimizer, config: FinetuneConfig) -> int:
    path = out / STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: nothing to resume from")
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = state["config"]
    for key in RESUME_KEYS:
        now = config.to_dict()[key]
        before = saved.get(key)
        if (tuple(before) if isinstance(before, list) else before) != now:
            raise ValueError(f"{path}: cannot resume: {key} was {before!r}, now {now!r}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def finetune(config: FinetuneConfig, out: str | os.PathLike, resume: bool = False, progress: bool = True) -> list[dict[str, float]]:
    """Run (or resume) fine-tuning; returns the metrics rows of the steps run by this call."""
    out = Path(out)
    if (out / STATE_NAME).exists() and not resume:
        raise ValueError(f"{out / STATE_NAME} exists: pass --resume to continue it, or choose another --out")
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    device = resolve_device(config.device, "device")
    train_split, eval_split = config.splits()
    encoder = load_encoder(config.weights, config.preset, config.seed, config.hr_bands)
    options = options_with_hr_bands(config.dataset, config.dataset_options, encoder.config.inputs["hr"].bands)
    dataset = build_dataset(config.dataset, config.task, train_split, config.data_root, options)
    spec = task_spec(config, dataset)
    check_hr_bands(dataset, spec, encoder)
    torch.manual_seed(config.seed)  # the head's initialisation
    model = build_task_model(encoder, spec).to(device)
    model.encoder.check_values = False  # on the host batch instead (checked_on_host): no syncs
    if config.freeze_encoder:
        model.encoder.requires_grad_(False)
    checkpoint_blocks(model.encoder, TRANSFORMER_BLOCKS, config.activation_checkpointing)
    model.encoder.set_attention_backends(config.attention_backends)  # before compiling
    set_mlp_kernel(model.encoder, config.mlp_kernel)
    set_qkv_kernel(model.encoder, config.qkv_kernel)
    set_norm_kernel(model.encoder, config.norm_kernel)
    optimizer = adamw(parameter_groups(model, encoder.config, config.optim.weight_decay, config.optim.layer_decay),
                      config.optim.lr, device)
    start = _load_state(out, model, optimizer, config) if resume else 0
    if config.compile == "blocks":  # after checkpointing: its hooks stay around the compiled forward
        compile_blocks(model.encoder, TRANSFORMER_BLOCKS)

    samples = TrainingSamples(evenly_spaced(dataset, config.limit_train), encoder.config, spec.task,
                              model_keys(spec.modalities, spec.geo_context), config.crop_size, config.flips,
                              config.cache_samples, spec.sentinel_size)
    sampler = StepBatchSampler(len(samples), config.batch_size, config.seed, start, config.max_steps)
    loader = DataLoader(samples, batch_sampler=sampler, collate_fn=collate, num_workers=config.num_workers,
                        persistent_workers=config.num_workers > 0)
    extra = {"dataset": config.dataset, "data_root": config.data_root, "dataset_options": options,
             "train_split": train_split, "eval_split": eval_split, "crop_size": config.crop_size,
             "eval_window": config.eval_window,
             "eval_stride": config.eval_stride, "encoder_source": config.weights or f"{config.preset} (random init, "
             f"seed {config.seed})"}
    log = MetricsLog(out, start)
    bar = tqdm(total=config.max_steps, initial=start, desc=f"finetune {config.dataset}", disable=not progress)
    rows: list[dict[str, float]] = []
    model.train()
    if config.freeze_encoder:
        model.encoder.eval()
    started = time.perf_counter()
    for step, batch in zip(range(start, config.max_steps), loader):
        lr = learning_rate(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        torch.manual_seed(config.seed * 1_000_003 + step * 7919)  # dropout, stochastic depth
        batch = to_device(checked_on_host(batch), device)
        optimizer.zero_grad(set_to_none=True)  # before the forward pass: memory peaks there
        with training_autocast(device):
            total, terms = model.loss(model(batch), batch)
        total.backward()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if config.optim.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        optimizer.step()
        # Every logged value in one read-back to the host (on a GPU, the step's one wait).
        names = ["loss", *(f"loss/{k}" for k in terms), "grad_norm"]
        logged = torch.stack([v.detach().float() for v in (total, *terms.values(), grad_norm)]).tolist()
        values = dict(zip(names, logged))
        if not math.isfinite(values["loss"]):
            raise NonFiniteLossError(f"step {step}: loss is {values['loss']}; stopped without saving, the last "
                                     f"checkpoint in {out} is intact")
        values.update(lr=lr, grad_norm=values.pop("grad_norm"))
        rows.append({"step": step, **values})
        log.add(step, values)
        bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}")
        bar.update(1)
        done = step + 1
        if done % config.checkpoint_every == 0 or done == config.max_steps:
            log.flush()
            _save_state(out, done, model, optimizer, config, extra)
    bar.close()
    if rows:
        elapsed = time.perf_counter() - started
        # stderr: stdout stays free for the --json report of the command.
        print(f"finetune: steps {start}..{config.max_steps - 1} in {elapsed:.1f}s; weights and state in {out}",
              file=sys.stderr)
    return rows
