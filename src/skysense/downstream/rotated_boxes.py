"""Oriented boxes: conversions, the IoU of convex quadrilaterals, rotated NMS. Pure torch.

Two forms, both in pixels of ``hr`` (x right, y down):

* corners ``(N, 8)``: x1, y1, ..., x4, y4, as DOTA, DIOR-R and FAIR1M annotate them (any
  convex quadrilateral, either winding);
* ``(N, 5)`` cx, cy, w, h, angle: a rectangle whose side ``w`` points along ``angle`` radians
  from the x axis (towards y, i.e. clockwise on screen). :func:`regularize` picks, of the
  rectangle's equivalent descriptions, the one with ``angle`` in [-pi/4, pi/4): ``w`` is then
  the side nearer to horizontal, which keeps a horizontal proposal's width and height close to
  the target's (the Rotated Faster R-CNN regresses from horizontal proposals).

:func:`corners_to_rbox` fits the smallest-area rectangle around four corners (one of its sides
lies along an edge of the quadrilateral, so the four edge directions are tried), as
``cv2.minAreaRect`` does for DOTA's annotations in mmrotate.

:func:`quad_iou` intersects convex quadrilaterals exactly: the intersection polygon's vertices
are each one's corners inside the other and the crossings of their edges; sorted by angle
around their mean, the shoelace formula gives its area. :func:`quad_coverage` is the fraction
of one quadrilateral inside another, :func:`rotated_nms` greedy NMS on the IoU. Only pairs whose
axis-aligned hulls overlap are intersected, in chunks, so memory stays bounded for thousands of
boxes.
"""

from __future__ import annotations

import math

import torch

PAIRS = 65536
"""Pairs of quadrilaterals intersected at once (each holds 24 candidate vertices)."""


def regularize(rbox: torch.Tensor) -> torch.Tensor:
    """The same rectangles with ``angle`` in [-pi/4, pi/4) (``w`` and ``h`` swapped where turned)."""
    cx, cy, w, h, angle = rbox.unbind(-1)
    turns = torch.floor((angle + math.pi / 4) / (math.pi / 2))
    angle = angle - turns * (math.pi / 2)
    odd = torch.remainder(turns, 2) == 1
    return torch.stack([cx, cy, torch.where(odd, h, w), torch.where(odd, w, h), angle], dim=-1)


def rbox_to_corners(rbox: torch.Tensor) -> torch.Tensor:
    """(N, 5) -> (N, 8) corners, starting at (-w/2, -h/2) in the box's frame, clockwise on screen."""
    cx, cy, w, h, angle = rbox.unbind(-1)
    c, s = torch.cos(angle), torch.sin(angle)
    corners = []
    for dx, dy in ((-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)):
        x, y = dx * w, dy * h
        corners += [cx + x * c - y * s, cy + x * s + y * c]
    return torch.stack(corners, dim=-1)


def corners_to_rbox(corners: torch.Tensor) -> torch.Tensor:
    """(N, 8) -> (N, 5): the smallest-area enclosing rectangle, regularized (module docstring)."""
    if corners.ndim != 2 or corners.shape[1] != 8:
        raise ValueError(f"corners: expected (N, 8), got shape {tuple(corners.shape)}")
    points = corners.reshape(-1, 4, 2).double()
    edges = torch.roll(points, -1, dims=1) - points
    angles = torch.atan2(edges[..., 1], edges[..., 0])  # (N, 4) candidate directions
    c, s = torch.cos(angles), torch.sin(angles)
    # coordinates of every point along (u) and across (v) each candidate direction: (N, 4 dirs, 4 points)
    u = points[:, None, :, 0] * c[..., None] + points[:, None, :, 1] * s[..., None]
    v = -points[:, None, :, 0] * s[..., None] + points[:, None, :, 1] * c[..., None]
    u0, u1, v0, v1 = u.amin(-1), u.amax(-1), v.amin(-1), v.amax(-1)
    area = (u1 - u0) * (v1 - v0)
    best = area.argmin(dim=1, keepdim=True)
    pick = lambda t: t.gather(1, best).squeeze(1)  # noqa: E731
    u0, u1, v0, v1, c, s, angle = (pick(t) for t in (u0, u1, v0, v1, c, s, angles))
    mu, mv = (u0 + u1) / 2, (v0 + v1) / 2
    rbox = torch.stack([mu * c - mv * s, mu * s + mv * c, u1 - u0, v1 - v0, angle], dim=-1)
    return regularize(rbox).to(corners.dtype)


def _cross(o: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a[..., 0] - o[..., 0]) * (b[..., 1] - o[..., 1]) - (a[..., 1] - o[..., 1]) * (b[..., 0] - o[..., 0])


def _inside(points: torch.Tensor, polygon: torch.Tensor) -> torch.Tensor:
    """(..., P, 2) points inside (or on) the convex (..., 4, 2) polygon, either winding: (..., P)."""
    start = polygon[..., None, :, :]
    end = torch.roll(polygon, -1, dims=-2)[..., None, :, :]
    side = _cross(start, end, points[..., :, None, :])  # (..., P, 4)
    eps = 1e-9 * (1 + polygon.abs().amax(dim=(-1, -2)))[..., None, None]
    return (side >= -eps).all(-1) | (side <= eps).all(-1)


def _area(polygon: torch.Tensor) -> torch.Tensor:
    x, y = polygon[..., 0], polygon[..., 1]
    return 0.5 * (x * torch.roll(y, -1, -1) - torch.roll(x, -1, -1) * y).sum(-1).abs()


def _intersection(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Areas of the intersections of paired quadrilaterals A[i] and B[i], each (P, 4, 2): (P,)."""
    # edge crossings: edge i of A (p + t r) with edge j of B (q + u s)
    p, r = A[:, :, None, :], (torch.roll(A, -1, 1) - A)[:, :, None, :]
    q, s = B[:, None, :, :], (torch.roll(B, -1, 1) - B)[:, None, :, :]
    denom = r[..., 0] * s[..., 1] - r[..., 1] * s[..., 0]
    qp = q - p
    parallel = denom.abs() <= 1e-12
    safe = torch.where(parallel, torch.ones_like(denom), denom)
    t = (qp[..., 0] * s[..., 1] - qp[..., 1] * s[..., 0]) / safe
    u = (qp[..., 0] * r[..., 1] - qp[..., 1] * r[..., 0]) / safe
    crossing = ~parallel & (t >= 0) & (t <= 1) & (u >= 0) & (u <= 1)
    crossings = (p + t[..., None] * r).reshape(-1, 16, 2)
    points = torch.cat([A, B, crossings], dim=1)  # (P, 24, 2)
    valid = torch.cat([_inside(A, B), _inside(B, A), crossing.reshape(-1, 16)], dim=1)
    count = valid.sum(-1)
    weight = valid.to(points.dtype)[..., None]
    centre = (points * weight).sum(1) / count.clamp_min(1)[:, None].to(points.dtype)
    angle = torch.atan2(points[..., 1] - centre[:, None, 1], points[..., 0] - centre[:, None, 0])
    angle = torch.where(valid, angle, torch.full_like(angle, 10.0))  # invalid ones sort last
    order = angle.argsort(dim=-1)
    ordered = points.gather(1, order[..., None].expand(-1, -1, 2))
    kept = valid.gather(1, order)
    # invalid slots repeat the first valid vertex: they add nothing to the shoelace sum
    ordered = torch.where(kept[..., None], ordered, ordered[:, :1])
    return torch.where(count >= 3, _area(ordered), torch.zeros_like(count, dtype=points.dtype))


def _quads(name: str, value: torch.Tensor) -> torch.Tensor:
    """(N, 8) corners as (N, 4, 2) float64 on the host; the error names ``name``."""
    if value.ndim != 2 or value.shape[1] != 8:
        raise ValueError(f"{name}: expected (N, 8) corners, got shape {tuple(value.shape)}")
    return value.detach().cpu().double().reshape(-1, 4, 2)


def _pairwise_intersection(qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
    """(N, M) intersection areas of (N, 4, 2) and (M, 4, 2) quadrilaterals, float64 (module docstring)."""
    low_a, high_a, low_b, high_b = qa.amin(1), qa.amax(1), qb.amin(1), qb.amax(1)
    touching = ((torch.minimum(high_a[:, None], high_b[None]) - torch.maximum(low_a[:, None], low_b[None])) > 0).all(-1)
    i, j = torch.nonzero(touching, as_tuple=True)
    inter = torch.zeros(qa.shape[0], qb.shape[0], dtype=torch.float64)
    for start in range(0, i.numel(), PAIRS):
        ii, jj = i[start:start + PAIRS], j[start:start + PAIRS]
        inter[ii, jj] = _intersection(qa[ii], qb[jj])
    return inter


def _like(values: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return values.to(device=a.device, dtype=a.dtype if a.is_floating_point() else torch.float32)


def quad_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) IoU of convex quadrilaterals given as (N, 8) and (M, 8) corners (module docstring).

    Only pairs whose axis-aligned hulls overlap are intersected exactly; the others are 0.
    """
    qa, qb = _quads("quad_iou: a", a), _quads("quad_iou: b", b)
    inter = _pairwise_intersection(qa, qb)
    union = _area(qa)[:, None] + _area(qb)[None] - inter
    return _like(torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter)), a)


def quad_coverage(part: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """(N, M): the fraction of each of the N quadrilaterals ``part`` (N, 8) that lies inside each of
    the M quadrilaterals ``whole`` (M, 8); 0 for a part of no area."""
    qa, qb = _quads("quad_coverage: part", part), _quads("quad_coverage: whole", whole)
    inter = _pairwise_intersection(qa, qb)
    area = _area(qa)[:, None]
    return _like(torch.where(area > 0, inter / area.clamp_min(1e-12), torch.zeros_like(inter)), part)


def rotated_nms(rbox: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices of the boxes kept by greedy NMS at IoU ``threshold``, highest score first."""
    if rbox.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=rbox.device)
    order = torch.argsort(scores, descending=True, stable=True)
    corners = rbox_to_corners(rbox[order].detach().cpu().double())
    overlaps = quad_iou(corners, corners) > threshold
    suppressed = torch.zeros(order.shape[0], dtype=torch.bool)
    keep = []
    for i in range(order.shape[0]):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= overlaps[i]
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]


def batched_rotated_nms(rbox: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor,
                        threshold: float) -> torch.Tensor:
    """:func:`rotated_nms` within each class: indices kept, highest score first.

    One pass for all classes: each class's boxes are moved along x, far beyond every other's.
    """
    if rbox.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=rbox.device)
    span = float((rbox[:, 0].abs() + rbox[:, 2].abs() + rbox[:, 3].abs()).max()) * 2 + 1
    shifted = rbox.clone()
    shifted[:, 0] += classes.to(rbox.dtype) * span
    return rotated_nms(shifted, scores, threshold)
