"""The SkySense pretraining objective (Guo et al., 2024), composed of the per-objective modules.

For two views of each multi-modal sample, the student's and the EMA teacher's features (the
dicts of :meth:`SkySense.forward_features`) enter:

* multi-granularity contrast (pixel, object, image levels) on each source present: ``hr`` (last
  pyramid level), ``s2`` and ``s1`` (per-frame ViT features averaged over the valid frames, so
  the views may hold different frames of the same series) and ``fused``;
* cross-modal alignment of the pooled ``hr``, ``s2``, ``s1`` student features, in each view;
* geo-context prototype learning on ``fused`` when ``lat``/``lon`` and a prototype bank are given.

Choices where the paper is silent: one projection head per source shared by the three levels
(iBOT/DINOv2's shared head; Zhou et al., 2022), each level keeping its own centre; every weight
1; each level's loss is the mean over the sources present, so adding a modality does not change
the scale of the total. The objective owns the student heads and their EMA teacher copies
(``teacher_heads``), so its ``state_dict`` carries everything a resumed run needs besides the
two encoders.

Image-level loss (``image_loss``): ``"dino"`` (default, the self-distillation above) or
``"infonce"`` (:class:`~skysense.pretrain.image_contrast.InfoNCEImageContrastLoss`: contrast of
the two views' pooled embeddings with in-batch negatives, keys from the EMA teacher or the
student). A level whose weight is 0 is skipped entirely (no head, no clustering), so e.g.
``pixel_weight: 0, object_weight: 0`` trains with the image level only, at less cost.

Multi-crop: the student may also encode local views (``data.local_views``), given after the two
views; they enter the image level only, as extra queries against the teacher's two views
(DINO's pairing). Pixel, object, cross-modal and geo terms use the two views.

Each view's input dict may hold ``overlap``: (B, 4) ``(x0, y0, x1, y1)`` fractions of that view
covering the ground shared with the other view (default: the whole view, i.e. the views differ
only in non-geometric augmentations).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from skysense.config import SkySenseConfig
from skysense.models.geo_context import GeoContextPrototypes
from skysense.pretrain.cross_modal import CrossModalAlignment
from skysense.pretrain.geo_prototypes import GeoPrototypeLoss
from skysense.pretrain.heads import DINOHead
from skysense.pretrain.image_contrast import ImageContrastLoss, InfoNCEImageContrastLoss
from skysense.pretrain.object_contrast import ObjectContrastLoss, teacher_average
from skysense.pretrain.pixel_contrast import PixelContrastLoss, resample_to_overlap
from skysense.pretrain.teacher import build_teacher, ema_update

SOURCES: tuple[str, ...] = ("hr", "s2", "s1", "fused")
"""Feature sources of the multi-granularity contrast, in the order their terms are reported."""

Features = Mapping[str, torch.Tensor | list[torch.Tensor]]


@dataclass
class HeadConfig:
    """Sizes of each source's :class:`DINOHead` (DINO uses 2048 / 256 / 65536; ours is smaller)."""

    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    out_dim: int = 8192
    layers: int = 3


@dataclass
class PretrainObjectiveConfig:
    """Weights and hyper-parameters of :class:`SkySensePretrainingObjective` (all unpublished)."""

    head: HeadConfig = field(default_factory=HeadConfig)
    student_temperature: float = 0.1
    teacher_temperature: float = 0.04
    center_momentum: float = 0.9
    num_clusters: int = 8
    cluster_rounds: int = 3
    sinkhorn_epsilon: float = 0.05
    # Sinkhorn-Knopp of the object clustering and of the geo prototypes: with sinkhorn_stop_early,
    # rounds until the plan meets its tolerance (tested every 10th round), at most
    # sinkhorn_iterations; without, exactly sinkhorn_iterations rounds (SwAV: 3). Each test reads
    # a value back to the host, which on a GPU drains the queue and idles the GPU while Python
    # queues the next work; without tests the pretraining step reads nothing back.
    sinkhorn_iterations: int = 1000
    sinkhorn_stop_early: bool = True
    cross_modal_dim: int = 256
    cross_modal_temperature: float = 0.07
    learnable_temperature: bool = True
    geo_temperature: float = 0.1
    prototype_momentum: float = 0.99
    # Image-level loss: "dino" (centred, sharpened self-distillation) or "infonce" (contrast with
    # in-batch negatives; see skysense.pretrain.image_contrast). Keys of "infonce": "teacher"
    # (EMA teacher's other view, MoCo v3 style) or "student" (SimCLR's NT-Xent).
    image_loss: str = "dino"
    infonce_temperature: float = 0.2
    infonce_keys: str = "teacher"
    pixel_weight: float = 1.0
    object_weight: float = 1.0
    image_weight: float = 1.0
    cross_modal_weight: float = 1.0
    geo_weight: float = 1.0


def source_map(features: Features, view: Mapping[str, torch.Tensor], source: str) -> torch.Tensor:
    """The (B, D, H, W) map of one source; Sentinel frames averaged over the view's valid frames."""
    if source == "hr":
        return features["hr_pyramid"][-1]  # type: ignore[index]
    if source == "fused":
        return features["fused"]  # type: ignore[return-value]
    frames = features[source]
    assert isinstance(frames, torch.Tensor)
    valid = view.get(f"{source}_mask")
    if valid is None:
        return frames.mean(1)
    weights = valid.to(frames.dtype)[:, :, None, None, None]
    return (frames * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class SkySensePretrainingObjective(nn.Module):
    """Pixel, object and image contrast per source, cross-modal alignment and geo prototypes."""

    def __init__(self, model_config: SkySenseConfig, config: PretrainObjectiveConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or PretrainObjectiveConfig()
        dims = {"hr": model_config.hr.out_dims[-1], "s2": model_config.s2.embed_dim,
                "s1": model_config.s1.embed_dim, "fused": model_config.fusion.embed_dim}
        h = config.head
        self.heads = nn.ModuleDict({
            s: DINOHead(dims[s], h.out_dim, h.hidden_dim, h.bottleneck_dim, h.layers) for s in SOURCES
        })
        self.teacher_heads = build_teacher(self.heads)
        temps = (config.student_temperature, config.teacher_temperature, config.center_momentum)
        self.pixel = nn.ModuleDict({s: PixelContrastLoss(h.out_dim, *temps) for s in SOURCES})
        self.object = nn.ModuleDict({
            s: ObjectContrastLoss(h.out_dim, config.num_clusters, config.cluster_rounds, config.sinkhorn_epsilon,
                                  config.sinkhorn_iterations, *temps, sinkhorn_stop_early=config.sinkhorn_stop_early)
            for s in SOURCES
        })
        if config.image_loss == "dino":
            self.image = nn.ModuleDict({s: ImageContrastLoss(h.out_dim, *temps) for s in SOURCES})
        elif config.image_loss == "infonce":
            self.image = nn.ModuleDict({
                s: InfoNCEImageContrastLoss(config.infonce_temperature, config.infonce_keys) for s in SOURCES
            })
        else:
            raise ValueError(f"image_loss: expected 'dino' or 'infonce', got {config.image_loss!r}")
        self.cross_modal = CrossModalAlignment(
            {m: dims[m] for m in ("hr", "s2", "s1")}, config.cross_modal_dim, config.cross_modal_temperature,
            config.learnable_temperature,
        )
        self.geo = GeoPrototypeLoss(config.geo_temperature, config.sinkhorn_epsilon, config.prototype_momentum,
                                    config.sinkhorn_iterations, config.sinkhorn_stop_early)

    def train(self, mode: bool = True) -> "SkySensePretrainingObjective":
        super().train(mode)
        self.teacher_heads.eval()
        return self

    def forward(
        self,
        student: Sequence[Features],
        teacher: Sequence[Features],
        views: Sequence[Mapping[str, torch.Tensor]],
        prototypes: GeoContextPrototypes | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its named terms, detached (``pixel/hr``, ..., ``cross_modal``, ``geo``).

        Args:
            student, teacher: ``forward_features`` outputs for the two views (teacher's under
                ``torch.no_grad``).
            views: the two input dicts given to the models (for ``s2_mask``, ``s1_mask``,
                ``lat``, ``lon`` and the optional ``overlap`` boxes).
            prototypes: the student's :class:`GeoContextPrototypes`; None skips the geo term.
        """
        if not (len(teacher) == 2 and len(student) == len(views) >= 2):
            raise ValueError(f"pretraining objective: needs two views (teacher) and as many student outputs as "
                             f"input dicts (two, plus any local views); got {len(student)} student, "
                             f"{len(teacher)} teacher and {len(views)} input dicts")
        c = self.config
        terms: dict[str, torch.Tensor] = {}
        level_weights = {"pixel": c.pixel_weight, "object": c.object_weight, "image": c.image_weight}
        # Local views (multi-crop, after the first two) enter the image level only.
        local_outputs, local_views = list(student[2:]), list(views[2:])
        student, views = student[:2], views[:2]
        present = [s for s in SOURCES if all(_has(out, s) for out in list(student) + list(teacher) + local_outputs)]
        if not present:
            raise ValueError("pretraining objective: no feature source is present in all four outputs")
        maps, aligned = {}, {}
        for source in present:
            s_maps = [source_map(out, view, source) for out, view in zip(student, views)]
            t_maps = [source_map(out, view, source) for out, view in zip(teacher, views)]
            size = (s_maps[0].shape[-2], s_maps[0].shape[-1])
            maps[source] = s_maps, t_maps
            aligned[source] = tuple([resample_to_overlap(m, view.get("overlap"), size) for m, view in zip(ms, views)]
                                    for ms in (s_maps, t_maps))
        # The object level's clusterings of the sources with the same number of pixels are solved
        # together (a level whose weight is 0 is not computed: no heads, no clustering).
        assignments = self.object_assignments({s: a[1] for s, a in aligned.items()}) if c.object_weight else {}
        for source in present:
            (s_maps, t_maps), (s_aligned, t_aligned) = maps[source], aligned[source]
            heads = (self.heads[source], self.teacher_heads[source])
            if c.pixel_weight:
                terms[f"pixel/{source}"] = self.pixel[source](s_aligned, t_aligned, *heads)
            if c.object_weight:
                terms[f"object/{source}"] = self.object[source](s_aligned, t_aligned, *heads, assignment=assignments[source])
            if c.image_weight:
                local_maps = [source_map(out, view, source) for out, view in zip(local_outputs, local_views)]
                terms[f"image/{source}"] = self.image[source](s_maps + local_maps, t_maps, *heads)
        levels = [
            weight * torch.stack([terms[f"{level}/{s}"] for s in present]).mean()
            for level, weight in level_weights.items() if weight
        ]
        first = source_map(student[0], views[0], present[0])
        total = torch.stack(levels).sum() if levels else first.new_zeros(())
        modalities = [m for m in ("hr", "s2", "s1") if m in present]
        if len(modalities) >= 2:
            terms["cross_modal"] = torch.stack([
                self.cross_modal({m: source_map(out, view, m).mean((-2, -1)) for m in modalities})
                for out, view in zip(student, views)
            ]).mean()
            total = total + c.cross_modal_weight * terms["cross_modal"]
        if prototypes is not None and "fused" in present and "lat" in views[0]:
            terms["geo"] = self.geo([out["fused"] for out in student], [out["fused"] for out in teacher],
                                    views[0]["lat"], views[0]["lon"], prototypes)
            total = total + c.geo_weight * terms["geo"]
        return total, {name: value.detach() for name, value in terms.items()}

    @torch.no_grad()
    def object_assignments(self, teacher_aligned: Mapping[str, Sequence[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Each source's object clustering (:meth:`ObjectContrastLoss.assign` of its averaged
        teacher views), sources with the same number of pixels solved in one Sinkhorn-Knopp call
        per round (:meth:`ObjectContrastLoss.assign_together`; their losses share settings)."""
        groups: dict[int, list[str]] = {}
        for source, t_aligned in teacher_aligned.items():
            groups.setdefault(t_aligned[0].shape[-2] * t_aligned[0].shape[-1], []).append(source)
        found: dict[str, torch.Tensor] = {}
        for sources in groups.values():
            together = self.object[sources[0]].assign_together([teacher_average(teacher_aligned[s]) for s in sources])
            found.update(zip(sources, together))
        return found

    @torch.no_grad()
    def update_teacher_heads(self, momentum: float) -> None:
        """EMA of the teacher heads towards the student heads; call after the optimiser step."""
        ema_update(self.teacher_heads, self.heads, momentum)

    @torch.no_grad()
    def update_prototypes(self, prototypes: GeoContextPrototypes) -> None:
        """EMA of the geo-context prototypes with the last teacher features; after the step."""
        self.geo.update_prototypes(prototypes)


def _has(features: Features, source: str) -> bool:
    return ("hr_pyramid" if source == "hr" else source) in features
