"""Two aligned views of one multi-modal sample for contrastive pretraining.

A sample holds any subset of ``hr`` (3, H, W), ``s2`` (T, 10, h, w) with ``s2_dates`` and
``s2_mask``, ``s1`` (T', 2, h', w') with its dates and mask, and ``lat``/``lon``; its modalities
cover the same ground (the dataset's footprint), each at its own resolution. Per view:

* **Geometry, shared by the modalities.** A random square crop of the footprint (the second
  view's centre lies inside the first crop, so they always share ground), optionally inside a
  random ``crop_size`` window first (large scenes such as OSCD cities). Crop boxes are drawn in
  pixels of the finest modality present and cut from every modality as the same fraction of
  the footprint, so a view's HR of ``hr_size`` px and S2/S1 of ``sentinel_size`` px show the
  same ground (the model fuses HR of H px with S2/S1 of H/32 px). Downsampling by k >= 2 first
  averages k x k pixels (no aliasing); resampling is bilinear with edge clamping. Then an
  optional transpose (``rotate``) and random horizontal and vertical flips, identical for all
  modalities of the view. A 90 degree rotation is a transpose plus a flip; the transpose is
  drawn once per pair, the flips per view, so each view takes each of the 8 orientations with
  probability 1/8 while the ground the views share stays an axis-aligned box in both.
* **Radiometry, per modality.** Brightness and contrast jitter ``U(-jitter, jitter)`` drawn for
  each modality separately (all frames of a series alike); the optional photometric
  augmentations of :class:`ViewAugment` on ``hr``.
* **Time, per series.** ``s2_frames`` / ``s1_frames`` valid frames drawn at random (kept in
  time order; the paper draws 20 S2 and 10 S1 frames per sample), each date moved by a random
  whole number of days in ``[-date_jitter, date_jitter]`` (circular over 1..366).
* **Modality dropout.** :func:`draw_kept_modalities` chooses which modalities a view keeps
  (never none); the caller draws it per batch, because a batch must share its modalities.
* **Local views (multi-crop).** Optionally ``local_views`` more, smaller views (DINO's
  multi-crop, Caron et al., 2021): each a random square of ``local_crop_scale`` of the footprint
  (or window), anywhere in it, cut from every modality alike at ``local_hr_size`` /
  ``local_sentinel_size`` px, with its own orientation, jitter, frames and augmentation. They
  carry no ``overlap``: only the image-level loss uses them (a student-only view predicting the
  teacher's embedding of the two large views), which is what made multi-crop pay on AID (see
  ``benchmarks/RESULTS.md``). A local view keeping S2/S1 must still put them on one fusion grid
  with its HR (for ``tiny``: 4 S2/S1 px with 128 HR px); HR-only data can use any size.

``overlap`` gives, per view, the shared ground as ``(x0, y0, x1, y1)`` fractions of that view;
after a flip the box runs backwards (x0 > x1 or y0 > y1), so sampling the box from its first to
its second corner visits the same ground in both views (see
:func:`skysense.pretrain.pixel_contrast.resample_to_overlap`).

All randomness comes from an explicit ``torch.Generator``: the same seed gives the same views in
any process, which makes runs on one or many processes, and resumed runs, identical. The
numbers drawn never depend on which modalities are dropped.

Optional stronger photometric augmentation (:class:`ViewAugment`, all off by default, so the
default views are exactly the basic ones above): per-channel colour jitter, random grayscale
and Gaussian blur, after SimCLR/BYOL (Chen et al., 2020; Grill et al., 2020). They act on the
normalised image (about zero mean, unit variance per band), so "colour" jitter is a random
per-band gain and offset plus a saturation change (blend with the band mean), and grayscale
puts the band mean in every band. Disabled parts draw no random numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ViewAugment:
    """Photometric augmentations applied to each view independently (0 disables a part)."""

    # Probability of colour jitter, and its strength s: per-band gain 1 + U(-s, s), per-band
    # offset U(-s/2, s/2), saturation factor 1 + U(-s, s).
    color_jitter_prob: float = 0.0
    color_jitter: float = 0.4
    grayscale_prob: float = 0.0
    blur_prob: float = 0.0
    # Gaussian blur sigma range, as a fraction of the view side (SimCLR: 0.1..2.0 px at 224 ~ 0.0005..0.009).
    blur_sigma: tuple[float, float] = (0.001, 0.02)

    @property
    def active(self) -> bool:
        return self.color_jitter_prob > 0 or self.grayscale_prob > 0 or self.blur_prob > 0


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (C, H, W) with reflect padding."""
    radius = max(1, int(round(2.5 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=image.dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = image.shape[0]
    out = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1).contiguous(), groups=c)
    out = F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1).contiguous(), groups=c)
    return out[0]


def augment_view(crop: torch.Tensor, augment: ViewAugment, g: torch.Generator) -> torch.Tensor:
    """The optional photometric augmentations of one (C, H, W) view (see :class:`ViewAugment`)."""
    if augment.color_jitter_prob > 0 and torch.rand((), generator=g) < augment.color_jitter_prob:
        s = augment.color_jitter
        c = crop.shape[0]
        gain = 1 + (torch.rand(c, 1, 1, generator=g) * 2 - 1) * s
        offset = (torch.rand(c, 1, 1, generator=g) - 0.5) * s
        saturation = 1 + (torch.rand((), generator=g).item() * 2 - 1) * s
        crop = crop * gain + offset
        gray = crop.mean(0, keepdim=True)
        crop = gray + (crop - gray) * saturation
    if augment.grayscale_prob > 0 and torch.rand((), generator=g) < augment.grayscale_prob:
        crop = crop.mean(0, keepdim=True).expand_as(crop)
    if augment.blur_prob > 0 and torch.rand((), generator=g) < augment.blur_prob:
        lo, hi = augment.blur_sigma
        sigma = (lo + (hi - lo) * torch.rand((), generator=g).item()) * crop.shape[-1]
        if sigma > 0.2:
            crop = _gaussian_blur(crop, sigma)
    return crop


MODALITIES: tuple[str, ...] = ("hr", "s2", "s1")
"""Image modalities of a sample, in the order their random numbers are drawn."""

SERIES: tuple[str, ...] = ("s2", "s1")

DAYS_IN_CYCLE = 366
"""Date jitter wraps around the day-of-year range 1..366."""

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class ViewConfig:
    """How the two views of a sample are cut (see the module docstring); defaults keep every frame."""

    # Side of each view in pixels: HR, and S2/S1 (HR of H px fuses with S2/S1 of H/32 px).
    hr_size: int = 128
    sentinel_size: int = 4
    # Range of a crop's side as a fraction of the footprint's (or window's) shorter side.
    crop_scale: tuple[float, float] = (0.4, 1.0)
    # Side of a random window, in pixels of the finest modality, that both views are cut from;
    # None (or a sample smaller than it): the whole sample.
    crop_size: int | None = None
    rotate: bool = False
    # Strength of the per-modality brightness and contrast jitter (0: none).
    jitter: float = 0.4
    # Valid frames drawn per view from each series (None: every frame, the series as given).
    s2_frames: int | None = None
    s1_frames: int | None = None
    # Largest change, in days, of each frame's day of year.
    date_jitter: int = 0
    # Probability that a view drops each modality (never all of them); see draw_kept_modalities.
    modality_dropout: float = 0.0
    augment: ViewAugment = field(default_factory=ViewAugment)
    # Multi-crop (DINO, Caron et al., 2021): extra small "local" views per sample, cut anywhere in
    # the same footprint (or window), at ``local_hr_size`` / ``local_sentinel_size`` px, with their
    # side a ``local_crop_scale`` fraction of the footprint's shorter side. 0: two views only.
    local_views: int = 0
    local_hr_size: int = 32
    local_sentinel_size: int = 1
    local_crop_scale: tuple[float, float] = (0.1, 0.4)

    def __post_init__(self) -> None:
        def fail(name: str, expected: str, got: object) -> None:
            raise ValueError(f"views: {name}: expected {expected}, got {got!r}")

        for name in ("hr_size", "sentinel_size"):
            if getattr(self, name) < 1:
                fail(name, "a positive number of pixels", getattr(self, name))
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            fail("crop_scale", "0 < low <= high <= 1", self.crop_scale)
        if self.crop_size is not None and self.crop_size < 1:
            fail("crop_size", "a positive number of pixels or None", self.crop_size)
        for name in ("s2_frames", "s1_frames"):
            value = getattr(self, name)
            if value is not None and value < 1:
                fail(name, "at least 1 frame, or None for all", value)
        if self.jitter < 0:
            fail("jitter", ">= 0", self.jitter)
        if self.date_jitter < 0:
            fail("date_jitter", "a number of days >= 0", self.date_jitter)
        if not 0 <= self.modality_dropout < 1:
            fail("modality_dropout", "a probability in [0, 1)", self.modality_dropout)
        if self.local_views < 0:
            fail("local_views", "a number of views >= 0", self.local_views)
        for name in ("local_hr_size", "local_sentinel_size"):
            if getattr(self, name) < 1:
                fail(name, "a positive number of pixels", getattr(self, name))
        low, high = self.local_crop_scale
        if not 0 < low <= high <= 1:
            fail("local_crop_scale", "0 < low <= high <= 1", self.local_crop_scale)

    def frames(self, modality: str) -> int | None:
        return {"s2": self.s2_frames, "s1": self.s1_frames}[modality]


def draw_kept_modalities(present: Sequence[str], probability: float, generator: torch.Generator) -> tuple[str, ...]:
    """The modalities a view keeps: each of ``present`` dropped with ``probability``, never all.

    Always draws the same four numbers, whatever ``present`` is, so samples that share a
    generator seed (a batch) keep the same modalities. When every modality would be dropped,
    one of them, chosen at random, is kept.
    """
    present = [m for m in MODALITIES if m in present]
    if not present:
        raise ValueError(f"modality dropout: no modality among {MODALITIES} in {list(present)}")
    draws = torch.rand(len(MODALITIES) + 1, generator=generator).tolist()
    kept = [m for m, u in zip(MODALITIES, draws) if m in present and u >= probability]
    if not kept:
        kept = [present[min(int(draws[-1] * len(present)), len(present) - 1)]]
    return tuple(kept)


def _crop_box(side_h: float, side_w: float, scale: tuple[float, float], g: torch.Generator,
              centre: tuple[float, float] | None = None) -> Box:
    """A square crop box (x0, y0, x1, y1) in pixels, inside the image."""
    short = min(side_h, side_w)
    size = short * (scale[0] + (scale[1] - scale[0]) * torch.rand((), generator=g).item())
    if centre is None:
        cx = size / 2 + (side_w - size) * torch.rand((), generator=g).item()
        cy = size / 2 + (side_h - size) * torch.rand((), generator=g).item()
    else:
        cx = min(max(centre[0], size / 2), side_w - size / 2)
        cy = min(max(centre[1], size / 2), side_h - size / 2)
    return cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2


def _resize_crop(image: torch.Tensor, box: Box, size: int) -> torch.Tensor:
    """Crop ``image`` (C, H, W) to ``box`` in pixels and resample it to (C, size, size).

    Shrinking by a factor k >= 2 first averages k x k pixels (floor(k)), so fine detail is not
    aliased; then bilinear samples at the centres of ``size`` x ``size`` cells of the box, with
    the edge pixels repeated outside the image.
    """
    x0, y0, x1, y1 = box
    factor = min(x1 - x0, y1 - y0) / size
    pool = int(factor) if factor >= 2 else 1
    if pool > 1 and min(image.shape[-2:]) >= pool:
        image = F.avg_pool2d(image[None].float(), pool)[0]
        x0, y0, x1, y1 = (v / pool for v in box)
    h, w = image.shape[-2:]
    xs = x0 + (torch.arange(size, dtype=torch.float32) + 0.5) * (x1 - x0) / size
    ys = y0 + (torch.arange(size, dtype=torch.float32) + 0.5) * (y1 - y0) / size
    grid = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None]), dim=-1)
    grid = torch.stack([grid[..., 0] / w, grid[..., 1] / h], dim=-1) * 2 - 1
    return F.grid_sample(image[None].float(), grid[None], mode="bilinear", padding_mode="border",
                         align_corners=False)[0]


def _cut(x: torch.Tensor, fraction: Box, size: int) -> torch.Tensor:
    """The part ``fraction`` (of the footprint) of a (C, H, W) or (T, C, H, W) tensor, resampled."""
    h, w = x.shape[-2:]
    box = (fraction[0] * w, fraction[1] * h, fraction[2] * w, fraction[3] * h)
    flat = x.reshape((-1,) + tuple(x.shape[-2:]))
    return _resize_crop(flat, box, size).reshape(tuple(x.shape[:-2]) + (size, size))


def _jitter(x: torch.Tensor, strength: float, g: torch.Generator) -> torch.Tensor:
    """Brightness and contrast change of a normalised (..., C, H, W) tensor, about each band's mean."""
    if strength <= 0:
        return x
    brightness, contrast = ((torch.rand(2, generator=g) * 2 - 1) * strength).tolist()
    mean = x.mean(dim=(-2, -1), keepdim=True)
    return (x - mean) * (1 + contrast) + mean + brightness


def _footprint(sample: Mapping[str, Any], present: Sequence[str]) -> tuple[int, int]:
    """(H, W) of the finest modality present (most pixels): the frame crop boxes are drawn in."""
    finest = max(present, key=lambda m: sample[m].shape[-1] * sample[m].shape[-2])
    h, w = sample[finest].shape[-2:]
    return int(h), int(w)


def _crop_pair(h: int, w: int, config: ViewConfig, g: torch.Generator) -> tuple[Box, Box, Box, Box]:
    """Two crop boxes, their shared box and the window they were drawn in (x, y, side_w, side_h),
    in pixels of the reference modality."""
    ox = oy = 0.0
    side_h, side_w = float(h), float(w)
    if config.crop_size is not None and config.crop_size < min(h, w):
        side_h = side_w = float(config.crop_size)
        ox, oy = (torch.rand(2, generator=g) * torch.tensor([w - side_w, h - side_h])).tolist()
    first = _crop_box(side_h, side_w, config.crop_scale, g)
    u, v = torch.rand(2, generator=g).tolist()
    centre = (first[0] + u * (first[2] - first[0]), first[1] + v * (first[3] - first[1]))
    second = _crop_box(side_h, side_w, config.crop_scale, g, centre)
    first, second = ((b[0] + ox, b[1] + oy, b[2] + ox, b[3] + oy) for b in (first, second))
    shared = (max(first[0], second[0]), max(first[1], second[1]),
              min(first[2], second[2]), min(first[3], second[3]))
    return first, second, shared, (ox, oy, side_w, side_h)


def _frames(sample: Mapping[str, Any], m: str, config: ViewConfig,
            g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """This view's frames of series ``m``: (indices, dates, valid mask) after drawing and date jitter."""
    frames = sample[m].shape[0]
    valid = sample.get(f"{m}_mask")
    valid = torch.ones(frames, dtype=torch.bool) if valid is None else valid.bool()
    dates = sample.get(f"{m}_dates")
    limit = config.frames(m)
    if limit is None:
        chosen = torch.arange(frames)
    else:
        candidates = valid.nonzero().flatten()
        if not len(candidates):
            raise ValueError(f"views: {m}: no valid frame to draw from ({m}_mask is all False)")
        order = torch.randperm(len(candidates), generator=g)[:limit]
        chosen = candidates[order.sort().values]
    valid = valid[chosen]
    if dates is not None:
        dates = dates[chosen]
        if config.date_jitter > 0:
            shift = torch.randint(-config.date_jitter, config.date_jitter + 1, dates.shape, generator=g)
            moved = (dates - 1 + shift) % DAYS_IN_CYCLE + 1
            dates = torch.where(valid, moved, dates)
    return chosen, dates, valid


def _render_view(
    sample: Mapping[str, Any], present: Sequence[str], config: ViewConfig, box: Box, footprint: tuple[int, int],
    sizes: tuple[int, int], transpose: bool, g: torch.Generator,
) -> tuple[dict[str, torch.Tensor], bool, bool]:
    """One view: every modality cut to ``box`` (pixels of the footprint) at ``sizes`` (HR, S2/S1)
    px, transposed and flipped alike, jittered per modality. Returns the view and its flips."""
    h, w = footprint
    fraction = (box[0] / w, box[1] / h, box[2] / w, box[3] / h)
    flip_x = bool(torch.rand((), generator=g) < 0.5)
    flip_y = bool(torch.rand((), generator=g) < 0.5)
    view: dict[str, torch.Tensor] = {}
    for m in present:
        x = sample[m]
        if m in SERIES:
            chosen, dates, valid = _frames(sample, m, config, g)
            x = x[chosen]
            if dates is not None:
                view[f"{m}_dates"] = dates.contiguous()
            view[f"{m}_mask"] = valid.contiguous()
        x = _cut(x, fraction, sizes[0] if m == "hr" else sizes[1])
        if transpose:
            x = x.transpose(-1, -2)
        if flip_x:
            x = x.flip(-1)
        if flip_y:
            x = x.flip(-2)
        x = _jitter(x, config.jitter, g)
        if m == "hr" and config.augment.active:
            x = augment_view(x, config.augment, g)
        view[m] = x.contiguous()
    for key in ("lat", "lon"):
        if sample.get(key) is not None:
            view[key] = torch.as_tensor(sample[key], dtype=torch.float32)
    return view, flip_x, flip_y


def _drop(view: dict[str, torch.Tensor], present: Sequence[str], kept: Sequence[str], index: int
          ) -> dict[str, torch.Tensor]:
    dropped = set(present) - set(kept)
    if dropped == set(present):
        raise ValueError(f"views: keep: view {index + 1} keeps none of the sample's modalities {list(present)}")
    return {k: t for k, t in view.items() if k.split("_")[0] not in dropped}


def multimodal_views(
    sample: Mapping[str, Any], config: ViewConfig, generator: torch.Generator,
    keep: Sequence[Sequence[str]] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Two aligned views of a normalised multi-modal ``sample`` (see the module docstring), then
    ``config.local_views`` small local views.

    Args:
        sample: ``hr`` (3, H, W), ``s2`` (T, 10, h, w), ``s2_dates``, ``s2_mask``, ``s1`` ...,
            ``lat``, ``lon`` (any subset of the modalities, at least one); other keys are ignored.
        keep: for each of the two views, the modalities it keeps (e.g. from
            :func:`draw_kept_modalities`); None keeps all. Local view ``k`` keeps what view
            ``k % 2`` keeps.

    Returns:
        ``[view_1, view_2, local_1, ...]``: the two views with the kept modalities at ``hr_size``
        / ``sentinel_size`` px, their ``*_dates`` and ``*_mask``, ``lat``/``lon`` when given, and
        ``overlap`` (4,); the local views alike at ``local_hr_size`` / ``local_sentinel_size`` px,
        without ``overlap``. The local views draw their random numbers after the two views, so
        the two views do not depend on ``local_views``.
    """
    present = [m for m in MODALITIES if sample.get(m) is not None]
    if not present:
        raise ValueError(f"views: the sample has none of {MODALITIES}; got keys {sorted(sample)}")
    for m in present:
        rank = 3 if m == "hr" else 4
        if sample[m].ndim != rank:
            raise ValueError(f"views: {m}: expected {rank} dims ({'C, H, W' if rank == 3 else 'T, C, H, W'}), "
                             f"got shape {tuple(sample[m].shape)}")
    if keep is not None and len(keep) != 2:
        raise ValueError(f"views: keep: expected one modality list per view (2), got {len(keep)}")
    g = generator
    footprint = _footprint(sample, present)
    first, second, shared, window = _crop_pair(*footprint, config, g)
    transpose = config.rotate and bool(torch.rand((), generator=g) < 0.5)
    views = []
    for v, box in enumerate((first, second)):
        bw, bh = box[2] - box[0], box[3] - box[1]
        overlap = [(shared[0] - box[0]) / bw, (shared[1] - box[1]) / bh,
                   (shared[2] - box[0]) / bw, (shared[3] - box[1]) / bh]
        if transpose:
            overlap = [overlap[1], overlap[0], overlap[3], overlap[2]]
        view, flip_x, flip_y = _render_view(sample, present, config, box, footprint,
                                            (config.hr_size, config.sentinel_size), transpose, g)
        if flip_x:
            overlap[0], overlap[2] = 1 - overlap[0], 1 - overlap[2]
        if flip_y:
            overlap[1], overlap[3] = 1 - overlap[1], 1 - overlap[3]
        view["overlap"] = torch.tensor(overlap, dtype=torch.float32)
        views.append(view if keep is None else _drop(view, present, keep[v], v))
    ox, oy, side_w, side_h = window
    for k in range(config.local_views):
        box = _crop_box(side_h, side_w, config.local_crop_scale, g)
        box = (box[0] + ox, box[1] + oy, box[2] + ox, box[3] + oy)
        local_transpose = config.rotate and bool(torch.rand((), generator=g) < 0.5)
        view, _, _ = _render_view(sample, present, config, box, footprint,
                                  (config.local_hr_size, config.local_sentinel_size), local_transpose, g)
        views.append(view if keep is None else _drop(view, present, keep[k % 2], 2 + k))
    return views


def two_views(
    image: torch.Tensor, size: int, scale: tuple[float, float], generator: torch.Generator,
    augment: ViewAugment | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Two aligned views of a normalised HR ``image`` (C, H, W): ``[{"hr", "overlap"}, ...]``.

    The HR-only case of :func:`multimodal_views` (no rotation, jitter 0.4). ``augment``:
    optional extra photometric augmentations, after the brightness/contrast jitter.
    """
    config = ViewConfig(hr_size=size, crop_scale=tuple(scale), augment=augment or ViewAugment())
    return multimodal_views({"hr": image}, config, generator)
