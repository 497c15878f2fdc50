"""Two aligned views of one image for contrastive pretraining.

Each view is a random resized crop (the second crop's centre lies inside the first, so they
always share ground), optionally flipped horizontally and vertically, with its own brightness
and contrast jitter. ``overlap`` gives, per view, the shared ground as ``(x0, y0, x1, y1)``
fractions of that view; after a flip the box runs backwards (x0 > x1 or y0 > y1), so sampling
the box from its first to its second corner visits the same ground in both views.

All randomness comes from an explicit ``torch.Generator``: the same seed gives the same views in
any process, which makes runs on one or many processes, and resumed runs, identical.

Optional stronger photometric augmentation (:class:`ViewAugment`, all off by default, so the
default views are exactly the basic ones above): per-channel colour jitter, random grayscale
and Gaussian blur, after SimCLR/BYOL (Chen et al., 2020; Grill et al., 2020). They act on the
normalised image (about zero mean, unit variance per band), so "colour" jitter is a random
per-band gain and offset plus a saturation change (blend with the band mean), and grayscale
puts the band mean in every band. Disabled parts draw no random numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def _crop_box(side_h: int, side_w: int, scale: tuple[float, float], g: torch.Generator,
              centre: tuple[float, float] | None = None) -> tuple[float, float, float, float]:
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


def _resize_crop(image: torch.Tensor, box: tuple[float, float, float, float], size: int) -> torch.Tensor:
    """Bilinear crop of ``image`` (C, H, W) to ``box`` in pixels, output (C, size, size)."""
    _, h, w = image.shape
    x0, y0, x1, y1 = box
    xs = x0 + (torch.arange(size, dtype=torch.float32) + 0.5) * (x1 - x0) / size
    ys = y0 + (torch.arange(size, dtype=torch.float32) + 0.5) * (y1 - y0) / size
    grid = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None]), dim=-1)
    grid = torch.stack([grid[..., 0] / w, grid[..., 1] / h], dim=-1) * 2 - 1
    return F.grid_sample(image[None].float(), grid[None], mode="bilinear", align_corners=False)[0]


def two_views(
    image: torch.Tensor, size: int, scale: tuple[float, float], generator: torch.Generator,
    augment: ViewAugment | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Two aligned views of a normalised ``image`` (C, H, W): ``[{"hr", "overlap"}, ...]``.

    ``augment``: optional extra photometric augmentations, after the brightness/contrast jitter.
    """
    _, h, w = image.shape
    first = _crop_box(h, w, scale, generator)
    u, v = torch.rand(2, generator=generator).tolist()
    centre = (first[0] + u * (first[2] - first[0]), first[1] + v * (first[3] - first[1]))
    second = _crop_box(h, w, scale, generator, centre)
    shared = (max(first[0], second[0]), max(first[1], second[1]),
              min(first[2], second[2]), min(first[3], second[3]))
    views = []
    for box in (first, second):
        crop = _resize_crop(image, box, size)
        bw, bh = box[2] - box[0], box[3] - box[1]
        overlap = [(shared[0] - box[0]) / bw, (shared[1] - box[1]) / bh,
                   (shared[2] - box[0]) / bw, (shared[3] - box[1]) / bh]
        if torch.rand((), generator=generator) < 0.5:
            crop = crop.flip(-1)
            overlap[0], overlap[2] = 1 - overlap[0], 1 - overlap[2]
        if torch.rand((), generator=generator) < 0.5:
            crop = crop.flip(-2)
            overlap[1], overlap[3] = 1 - overlap[1], 1 - overlap[3]
        brightness, contrast = (torch.rand(2, generator=generator) * 0.8 - 0.4).tolist()
        mean = crop.mean(dim=(-2, -1), keepdim=True)
        crop = (crop - mean) * (1 + contrast) + mean + brightness
        if augment is not None and augment.active:
            crop = augment_view(crop, augment, generator)
        views.append({"hr": crop.contiguous(), "overlap": torch.tensor(overlap, dtype=torch.float32)})
    return views
