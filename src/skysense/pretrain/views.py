"""Two aligned views of one image for contrastive pretraining.

Each view is a random resized crop (the second crop's centre lies inside the first, so they
always share ground), optionally flipped horizontally and vertically, with its own brightness
and contrast jitter. ``overlap`` gives, per view, the shared ground as ``(x0, y0, x1, y1)``
fractions of that view; after a flip the box runs backwards (x0 > x1 or y0 > y1), so sampling
the box from its first to its second corner visits the same ground in both views.

All randomness comes from an explicit ``torch.Generator``: the same seed gives the same views in
any process, which makes runs on one or many processes, and resumed runs, identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    image: torch.Tensor, size: int, scale: tuple[float, float], generator: torch.Generator
) -> list[dict[str, torch.Tensor]]:
    """Two aligned views of a normalised ``image`` (C, H, W): ``[{"hr", "overlap"}, ...]``."""
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
        views.append({"hr": crop.contiguous(), "overlap": torch.tensor(overlap, dtype=torch.float32)})
    return views
