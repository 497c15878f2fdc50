"""EMA teacher with stop-gradient, as in DINO (Caron et al., 2021) and DINOv2.

The teacher is a copy of the student whose parameters follow an exponential moving average of
the student's and never receive gradients. SkySense (Guo et al., 2024) pretrains this way; the
momentum schedule is unpublished, so DINO's cosine schedule from 0.996 to 1.0 is the default.

The teacher is built in eval mode: DINO builds its teacher without stochastic depth, and eval
mode switches drop-path off here. Keep it there (do not call ``train()`` on it).
"""

from __future__ import annotations

import copy
import math
from typing import TypeVar

import torch
from torch import nn

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def build_teacher(student: ModuleT) -> ModuleT:
    """A deep copy of ``student`` with ``requires_grad=False`` everywhere, in eval mode."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``t <- m t + (1 - m) s`` for every parameter; buffers are copied from the student.

    Raises ``ValueError`` when the two modules do not have the same parameter and buffer names.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"ema_update: momentum must be in [0, 1], got {momentum}")
    for kind, t_items, s_items in (
        ("parameters", teacher.named_parameters(), student.named_parameters()),
        ("buffers", teacher.named_buffers(), student.named_buffers()),
    ):
        t_dict, s_dict = dict(t_items), dict(s_items)
        if t_dict.keys() != s_dict.keys():
            missing = sorted(set(t_dict) ^ set(s_dict))
            raise ValueError(f"ema_update: teacher and student {kind} differ: {missing[:5]}")
        if kind == "parameters":
            # Multi-tensor kernels: a few launches for all of SwinV2-H + ViT-L x 2 + the fusion
            # instead of one per parameter (thousands). One lerp, t + (1 - m) (s - t), reads
            # each teacher weight and writes it once (a multiply and an add did both twice).
            names = list(t_dict)
            # (No .detach() of the student's: under no_grad it would only add an operator per tensor.)
            torch._foreach_lerp_([t_dict[n] for n in names], [s_dict[n] for n in names], 1.0 - momentum)
        else:
            for name, t in t_dict.items():
                t.copy_(s_dict[name])


def cosine_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """DINO's schedule: ``final - (final - base) (cos(pi step / total) + 1) / 2``; ``base`` at 0."""
    if total_steps <= 0:
        raise ValueError(f"cosine_momentum: total_steps must be positive, got {total_steps}")
    progress = min(max(step, 0), total_steps) / total_steps
    return final - (final - base) * (math.cos(math.pi * progress) + 1.0) / 2.0
