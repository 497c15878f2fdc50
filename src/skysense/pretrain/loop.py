"""The pretraining loop: one readable function for one process or many (torchrun).

Per step: student and EMA teacher encode two aligned views; the composed objective gives the
loss; AdamW with warm-up + cosine LR and gradient clipping updates the student and its heads;
then the teacher, its heads and the geo-context prototypes follow by EMA.

Everything that decides a step (data order, view augmentation, stochastic depth) is seeded by
``(seed, step)``, so a resumed run repeats an uninterrupted one exactly, and N processes sharing
a global batch match one process (the objectives that look across the batch, the DINO centres,
Sinkhorn balance, prototype EMA and cross-modal negatives, all-reduce or gather over the
processes). N processes replicate the model (``distributed.strategy: ddp``) or shard it per
transformer block with FSDP2 (``fsdp``); see :mod:`skysense.distributed`.

Output folder:
    ``model.safetensors`` + ``config.json``   the student at the latest checkpoint (``--weights DIR``)
    ``training_state.pt`` (ddp) or
    ``checkpoint-<step>/`` (fsdp)             everything needed to resume (skysense.pretrain.checkpoint)
    ``metrics.csv``                           one row per step
    ``tensorboard/``                          the same metrics, when tensorboard is installed
"""

from __future__ import annotations

import csv
import math
import os
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from skysense.compilation import compile_blocks
from skysense.devices import adamw, to_device, training_autocast, training_dtype
from skysense.distributed import (
    DistributedContext,
    apply_fsdp,
    average_gradients,
    checkpoint_blocks,
    clip_grad_norm,
    close_distributed,
    init_distributed,
    mean_across_processes,
    wrap_data_parallel,
)
from skysense.models import (TRANSFORMER_BLOCKS, PixelShuffleProjection, set_mlp_kernel, set_norm_kernel,
                             set_qkv_kernel)
from skysense.pretrain.checkpoint import (
    STATE_NAME,
    has_checkpoint,
    is_sharded,
    load_checkpoint,
    save_checkpoint,
)
from skysense.pretrain.config import PretrainConfig
from skysense.pretrain.data import build_view_loader
from skysense.pretrain.model import PretrainingModel, parameter_groups
from skysense.pretrain.teacher import cosine_momentum, ema_update
from skysense.validation import checked_on_host
from skysense.weights import atomic_write

METRICS_NAME = "metrics.csv"
# FSDP2 units: each block of every encoder and of the fusion (student and teacher alike, so that
# their shards line up for the EMA), and the two large S2/S1 projections (46M parameters each at
# huge). The rest (embeddings, patch merging, heads) is the root group.
FSDP_UNITS: tuple[type[nn.Module], ...] = (*TRANSFORMER_BLOCKS, PixelShuffleProjection)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the message names the step and the offending terms."""


def learning_rate(step: int, config: PretrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr`` at ``max_steps``."""
    o = config.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, config.max_steps - o.warmup_steps)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


class MetricsLog:
    """CSV (rewritten atomically on resume, keeping rows up to the checkpoint) and TensorBoard."""

    def __init__(self, out: Path, resume_step: int) -> None:
        self.path = out / METRICS_NAME
        self.rows: list[dict[str, str]] = []
        if resume_step and self.path.is_file():
            with self.path.open() as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) < resume_step]
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step)
        except ImportError:
            pass

    def add(self, step: int, values: dict[str, float]) -> None:
        self.rows.append({"step": str(step), **{k: repr(float(v)) for k, v in values.items()}})
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        fields = ["step"] + sorted({k for r in self.rows for k in r} - {"step"})

        def write(path: Path) -> None:
            with path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(self.rows)

        atomic_write(self.path, write)
        if self.writer is not None:
            self.writer.flush()


def pretrain(
    config: PretrainConfig,
    out: str | os.PathLike,
    data_root: str | None = None,
    resume: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Run (or resume) pretraining; returns the metrics rows of the steps run by this call."""
    out = Path(out)
    if max_steps is not None:
        config.max_steps = max_steps
    context = init_distributed()
    try:
        return _pretrain(config, out, data_root, resume, progress, context)
    finally:
        close_distributed()


def _pretrain(config: PretrainConfig, out: Path, data_root: str | None, resume: bool, progress: bool,
              context: DistributedContext) -> list[dict[str, float]]:
    if has_checkpoint(out) and not resume:
        raise ValueError(f"{out}: a checkpoint ({STATE_NAME} or checkpoint-<step>/) exists: "
                         f"pass --resume to continue it, or choose another --out")
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)  # identical initialisation on every process
    module = PretrainingModel(config).to(context.device)
    module.student.check_values = module.teacher.check_values = False  # on the host instead
    checkpoint_blocks(module.student, TRANSFORMER_BLOCKS, config.activation_checkpointing)
    for network in (module.student, module.teacher):  # before compiling: graphs keep the kernel they traced
        network.set_attention_backends(config.attention_backends)
        set_mlp_kernel(network, config.mlp_kernel)
        set_qkv_kernel(network, config.qkv_kernel)
        set_norm_kernel(network, config.norm_kernel)
    if config.compile == "blocks":  # after checkpointing, before FSDP: both hook around the compiled forward
        compile_blocks(module, TRANSFORMER_BLOCKS)
    sharded = is_sharded(config) and context.enabled
    # Parameters gathered in the compute dtype (bf16 on CUDA): half the bytes per gather, and no
    # autocast copy of every gathered weight per forward (benchmarks/step_memory.py).
    replicated = apply_fsdp(module, context, FSDP_UNITS, training_dtype(context.device)) if sharded else []
    optimizer = adamw(parameter_groups(module, config.optim.weight_decay), config.optim.lr, context.device)
    start = load_checkpoint(out, module, optimizer, config) if resume else 0
    wrapped = module if sharded else wrap_data_parallel(module, context)
    step_fn = torch.compile(wrapped) if config.compile == "model" else wrapped

    loader = build_view_loader(config, data_root, module.student.config, start, context.rank, context.world_size)
    log = MetricsLog(out, start) if context.is_main else None
    autocast = training_autocast(context.device)
    bar = tqdm(total=config.max_steps, initial=start, desc="pretrain", disable=not (progress and context.is_main))
    rows: list[dict[str, float]] = []
    module.train()
    started = time.perf_counter()
    for step, views in zip(range(start, config.max_steps), loader):
        # Values checked here, on the host: on a GPU each check in the model would be a sync.
        views = tuple(to_device(checked_on_host(view), context.device) for view in views)
        lr = learning_rate(step, config)
        momentum = cosine_momentum(step, config.max_steps, config.optim.teacher_momentum,
                                   config.optim.final_teacher_momentum)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(config.seed * 1_000_003 + step * 7919 + context.rank)  # stochastic depth
        # Before the forward pass: the last step's gradients would otherwise stay allocated
        # through it, when memory peaks (benchmarks/step_memory.py).
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            total, terms = step_fn(views)
        total.backward()
        average_gradients(replicated)
        grad_norm = clip_grad_norm([p for g in optimizer.param_groups for p in g["params"]], config.optim.grad_clip)
        optimizer.step()
        with torch.no_grad():
            if "geo" in terms:  # the same update on every process: from all-reduced sums
                module.objective.update_prototypes(module.student.geo_context)
            module.objective.update_teacher_heads(momentum)
            ema_update(module.teacher, module.student, momentum)
        names = ["loss", *terms, "grad_norm"]
        # One collective and one read-back to the host (the step's only sync) for every logged
        # value; the gradient norm is the same on every process, so its mean is itself.
        logged = [total.detach(), *terms.values(), grad_norm.detach()]
        means = mean_across_processes(torch.stack([value.float() for value in logged]))
        values = dict(zip(names, means.tolist()))
        if not math.isfinite(values["loss"]):  # the same on every process: a mean over all
            bad = [name for name in terms if not math.isfinite(values[name])]
            raise NonFiniteLossError(
                f"step {step}: loss is {values['loss']} (non-finite terms: {', '.join(bad) or 'none individually'}); "
                f"stopped without saving, the last checkpoint in {out} is intact"
            )
        values.update(lr=lr, teacher_momentum=momentum, grad_norm=values.pop("grad_norm"))
        rows.append({"step": step, **values})
        done = step + 1
        if log is not None:
            log.add(step, values)
            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}")
            bar.update(1)
        if done % config.checkpoint_every == 0 or done == config.max_steps:
            if log is not None:
                log.flush()
            save_checkpoint(out, done, module, optimizer, config, context)
    bar.close()
    if context.is_main and rows:
        elapsed = time.perf_counter() - started
        print(f"pretrain: steps {start}..{config.max_steps - 1} in {elapsed:.1f}s; weights and state in {out}")
    return rows
