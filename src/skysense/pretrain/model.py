"""The module pretraining optimises: student, EMA teacher and the objective with its heads.

Kept apart from the loop (:mod:`skysense.pretrain.loop`) so that a step can be built and timed
without the data pipeline and its raster stack (``benchmarks/gpu_step.py`` does).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from skysense.config import preset_config
from skysense.distributed import gather_rows
from skysense.models import SkySense
from skysense.pretrain.config import PretrainConfig
from skysense.pretrain.objective import SkySensePretrainingObjective
from skysense.pretrain.teacher import build_teacher
from skysense.pretrain.view_batching import encode_views


class PretrainingModel(nn.Module):
    """Student, EMA teacher and the objective (with its heads) as one module."""

    def __init__(self, config: PretrainConfig) -> None:
        super().__init__()
        model_config = preset_config(config.preset)
        self.student = SkySense(model_config)
        if config.hr_bands is not None:
            self.student.with_hr_bands(config.hr_bands)
        self.objective = SkySensePretrainingObjective(model_config, config.objective)
        self.teacher = build_teacher(self.student)
        self.batch_views = config.batch_views

    def train(self, mode: bool = True) -> "PretrainingModel":
        """Student and heads follow ``mode``; the teacher stays in eval mode (no stochastic depth
        or dropout in the EMA targets, as in DINO)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, views: tuple[dict[str, torch.Tensor], ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        student = encode_views(self.student.forward_features, views, self.batch_views)
        with torch.no_grad():  # the teacher sees the two views only, not the local ones (multi-crop)
            teacher = encode_views(self.teacher.forward_features, views[:2], self.batch_views)
        total, terms = self.objective(student, teacher, views, prototypes=self.student.geo_context)
        terms.update(collapse_monitors(student, teacher))
        return total, terms


@torch.no_grad()
def collapse_monitors(student: list[dict], teacher: list[dict]) -> dict[str, torch.Tensor]:
    """Signals of representation collapse, on the pooled fused features of the global batch.

    ``monitor/feature_std``: per-dimension std over the batch of L2-normalised features, times
    sqrt(D): about 1 for spread features, 0 when every sample maps to one point.
    ``monitor/teacher_similarity``: mean cosine similarity between different samples' teacher
    features: near 1 means collapse.
    """
    s = gather_rows(torch.nn.functional.normalize(student[0]["fused"].float().mean((-2, -1)), dim=1))[0]
    t = gather_rows(torch.nn.functional.normalize(teacher[0]["fused"].float().mean((-2, -1)), dim=1))[0]
    monitors = {}
    if s.shape[0] > 1:  # a spread needs two samples (a global batch of one: on one GPU at batch 1)
        monitors["monitor/feature_std"] = s.std(0).mean() * math.sqrt(s.shape[1])
    if t.shape[0] > 1:
        sim = t @ t.T
        off = sim.sum() - sim.diagonal().sum()
        monitors["monitor/teacher_similarity"] = off / (t.shape[0] * (t.shape[0] - 1))
    return monitors


def parameter_groups(module: PretrainingModel, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; norms, biases, tokens and tables are not decayed."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad or name.startswith("teacher."):
            continue
        (decay if param.ndim >= 2 and "day_of_year" not in name else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
