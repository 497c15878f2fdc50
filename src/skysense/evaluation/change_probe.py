"""Frozen-feature change detection: a per-pixel linear probe on Sentinel-2 feature differences.

This is the pretraining issue's evidence on OSCD: how much change information the frozen S2
encoder carries, pretrained versus randomly initialised, with nothing trained but a linear
classifier. (Fine-tuned change detection with a decoder is :mod:`skysense.downstream`.)

Protocol, for each scene (two dates, ``s2`` of shape (2, 10, H, W), and a 0/1 change ``mask``):

1. Each date is normalised with the model's statistics, zero-padded to a multiple of ``tile``
   and cut into non-overlapping ``tile`` x ``tile`` windows (default 64 px, the view size of the
   S2 pretraining config), which the S2 encoder embeds frame by frame
   (:meth:`SkySense.encode_frames`); the windows are stitched back into a (D, H/p, W/p) map at
   the encoder's patch stride ``p``.
2. The change feature of a location is ``|f_1 - f_2|``, the absolute difference of the two
   dates' features (the classic frozen-feature change vector).
3. Training pixels: ``train_pixels`` drawn uniformly (seeded) from the train scenes, so the
   change/no-change ratio is the natural one; each pixel's feature is the bilinear
   interpolation of the stride-``p`` map at the pixel centre (``grid_sample``, identical to
   ``F.interpolate(..., mode="bilinear", align_corners=False)``).
4. A logistic regression (:func:`~skysense.evaluation.linear_probe.fit_linear`, L-BFGS) is fit
   on the standardised features; 20 % of the training pixels are held out to choose the weight
   decay (best change F1) and then the decision threshold (the probability that maximises F1 on
   the held-out pixels, which handles the class imbalance).
5. Test scenes: the classifier is linear, and so are standardisation and bilinear upsampling,
   so the full-resolution logits equal the stride-``p`` logits upsampled; they are computed
   that way (cheap), thresholded, and true/false positives/negatives are summed over every
   pixel of every test scene. Reported: F1, precision and recall of the change class (global
   over the test pixels, as OSCD papers report), per-scene F1 and IoU.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from skysense.data.units import normalize
from skysense.evaluation.linear_probe import fit_linear, standardization, standardize

DEFAULT_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)


@dataclass
class ChangeProbeResult:
    """Outcome of :func:`change_probe` (all scores for the change class, in [0, 1])."""

    f1: float
    precision: float
    recall: float
    iou: float
    threshold: float
    weight_decay: float
    validation_f1: dict[float, float] = field(default_factory=dict)
    per_scene_f1: dict[str, float] = field(default_factory=dict)
    train_pixels: int = 0
    train_change_fraction: float = 0.0
    test_pixels: int = 0
    feature_dim: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["validation_f1"] = {str(k): v for k, v in self.validation_f1.items()}
        return out


def s2_feature_map(model: torch.nn.Module, s2: torch.Tensor, tile: int = 64, batch_size: int = 16) -> torch.Tensor:
    """Frame-wise S2 encoder features of a whole scene, embedded in windows and stitched.

    Args:
        model: a :class:`~skysense.models.SkySense` in eval mode.
        s2: (T, C, H, W) **normalised** frames.
        tile: window side in pixels (a multiple of the encoder's patch size).

    Returns:
        (T, D, ceil(H / tile) * tile / p, ...) features at the patch stride ``p``; the part past
        ``H / p`` and ``W / p`` belongs to the zero padding.
    """
    patch = model.config.s2.patch_size
    if tile <= 0 or tile % patch:
        raise ValueError(f"tile: expected a positive multiple of the S2 patch size {patch}, got {tile}")
    t, c, h, w = s2.shape
    rows, cols = -(-h // tile), -(-w // tile)
    padded = F.pad(s2, (0, cols * tile - w, 0, rows * tile - h))
    windows = (padded.reshape(t, c, rows, tile, cols, tile).permute(0, 2, 4, 1, 3, 5)
               .reshape(t * rows * cols, 1, c, tile, tile))
    device = next(model.parameters()).device  # the features come back to the CPU
    outputs = []
    for start in range(0, windows.shape[0], batch_size):
        chunk = windows[start:start + batch_size].to(device)
        valid = torch.ones(chunk.shape[:2], dtype=torch.bool, device=device)
        outputs.append(model.encode_frames("s2", chunk, valid)[:, 0].cpu())
    feats = torch.cat(outputs)  # (T * rows * cols, D, g, g)
    d, g = feats.shape[1], feats.shape[-1]
    return feats.reshape(t, rows, cols, d, g, g).permute(0, 3, 1, 4, 2, 5).reshape(t, d, rows * g, cols * g)


def change_feature(model: torch.nn.Module, sample: dict[str, Any], tile: int = 64) -> tuple[torch.Tensor, tuple[int, int]]:
    """``|f_1 - f_2|`` of a two-date sample at the patch stride, and the scene's (H, W)."""
    s2 = sample["s2"]
    if s2.ndim != 4 or s2.shape[0] != 2:
        raise ValueError(f"change probe: expected s2 of shape (2, C, H, W) (two dates), got {tuple(s2.shape)}")
    if "s2_mask" in sample and not bool(torch.as_tensor(sample["s2_mask"]).all()):
        raise ValueError(f"change probe: sample {sample.get('id', '?')} has an invalid date (s2_mask {sample['s2_mask'].tolist()})")
    normalized = normalize({"s2": s2.float()}, model.config)["s2"]
    feats = s2_feature_map(model, normalized, tile)
    return (feats[0] - feats[1]).abs(), (s2.shape[-2], s2.shape[-1])


def sample_pixel_features(diff: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, patch: int) -> torch.Tensor:
    """Bilinear features (N, D) of ``diff`` (D, h, w) at pixel centres (rows, cols) of the scene.

    A pixel centre ``r + 0.5`` lies at ``(r + 0.5) / patch`` in map cells, which is the
    ``align_corners=False`` convention of ``F.interpolate`` with scale ``patch``.
    """
    h, w = diff.shape[-2:]
    y = (rows.double() + 0.5) / (patch * h) * 2 - 1
    x = (cols.double() + 0.5) / (patch * w) * 2 - 1
    grid = torch.stack([x, y], dim=-1).to(diff.dtype)[None, None]  # (1, 1, N, 2)
    return F.grid_sample(diff[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0].T


def _f1_counts(pred: torch.Tensor, truth: torch.Tensor) -> tuple[int, int, int]:
    tp = int((pred & truth).sum())
    return tp, int((pred & ~truth).sum()), int((~pred & truth).sum())


def _f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def best_threshold(probability: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """The probability threshold maximising F1 of ``truth`` (bool) and that F1."""
    order = torch.argsort(probability, descending=True)
    p, t = probability[order], truth[order].long()
    tp = torch.cumsum(t, 0)
    fp = torch.cumsum(1 - t, 0)
    fn = int(t.sum()) - tp
    f1 = 2 * tp / (2 * tp + fp + fn).clamp_min(1)
    best = int(torch.argmax(f1))
    return float(p[best]), float(f1[best])


def change_probe(
    model: torch.nn.Module,
    train: Dataset,
    test: Dataset,
    tile: int = 64,
    train_pixels: int = 100_000,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    validation_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = True,
) -> ChangeProbeResult:
    """Fit a per-pixel linear change classifier on frozen S2 features; score F1 on ``test``.

    Args:
        model: a :class:`~skysense.models.SkySense` (its S2 encoder is used).
        train, test: datasets of two-date samples with ``s2`` (2, C, H, W) in model units and a
            0/1 ``mask`` (H, W), e.g. :class:`~skysense.data.datasets.oscd.OSCD` splits.
        train_pixels: pixels drawn uniformly from the train scenes (in proportion to their area).
    See the module docstring for the protocol.
    """
    if not weight_decays or any(w <= 0 for w in weight_decays):
        raise ValueError(f"weight_decays: expected positive values, got {list(weight_decays)}")
    if len(train) == 0 or len(test) == 0:
        raise ValueError(f"change probe: empty split (train {len(train)}, test {len(test)} scenes)")
    patch = model.config.s2.patch_size
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            scenes = [train[i] for i in range(len(train))]
            areas = torch.tensor([float(s["mask"].numel()) for s in scenes])
            counts = torch.floor(areas / areas.sum() * train_pixels).long()
            xs, ys = [], []
            for scene, n in tqdm(list(zip(scenes, counts.tolist())), desc="change probe: train scenes",
                                 disable=not progress, leave=False):
                diff, (h, w) = change_feature(model, scene, tile)
                flat = torch.randint(0, h * w, (max(n, 1),), generator=generator)
                rows, cols = flat // w, flat % w
                xs.append(sample_pixel_features(diff, rows, cols, patch).float())
                ys.append(scene["mask"].reshape(-1)[flat].bool())
            x, y = torch.cat(xs), torch.cat(ys)
            del scenes
        features_done = time.perf_counter()

        order = torch.randperm(len(y), generator=generator)
        k = int(round(validation_fraction * len(y)))
        val_idx, fit_idx = order[:k], order[k:]
        x_fit, x_val = standardize(x[fit_idx], x[val_idx])
        validation: dict[float, float] = {}
        fits = {}
        for wd in weight_decays:
            weight, bias = fit_linear(x_fit, y[fit_idx].long(), wd, 2)
            prob = torch.softmax(F.linear(x_val.double(), weight, bias), 1)[:, 1]
            validation[float(wd)] = best_threshold(prob, y[val_idx])[1] if k else 0.0
            fits[float(wd)] = (weight, bias)
        best = max(validation.values())
        chosen = max(wd for wd, s in validation.items() if s == best)
        # Refit on all training pixels with the chosen weight decay; the threshold comes from
        # the held-out pixels scored by the fit that did not see them.
        weight, bias = fits[chosen]
        prob_val = torch.softmax(F.linear(x_val.double(), weight, bias), 1)[:, 1]
        threshold = best_threshold(prob_val, y[val_idx])[0] if k else 0.5
        x_all, = standardize(x)
        mean, std = standardization(x)
        weight, bias = fit_linear(x_all, y.long(), chosen, 2)
        # Logit of "change" minus "no change" on raw (unstandardised) features.
        w_raw = (weight[1] - weight[0]) / std
        b_raw = float(bias[1] - bias[0]) - float((w_raw * mean).sum())
        logit_threshold = float(torch.logit(torch.tensor(threshold, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)))
        fit_done = time.perf_counter()

        tp = fp = fn = 0
        per_scene: dict[str, float] = {}
        test_count = 0
        with torch.inference_mode():
            for i in tqdm(range(len(test)), desc="change probe: test scenes", disable=not progress, leave=False):
                scene = test[i]
                diff, (h, w) = change_feature(model, scene, tile)
                logits = torch.einsum("d,dhw->hw", w_raw.to(diff.dtype), diff) + b_raw
                full = F.interpolate(logits[None, None], scale_factor=patch, mode="bilinear", align_corners=False)[0, 0, :h, :w]
                pred = full >= logit_threshold
                truth = scene["mask"].bool()
                counts3 = _f1_counts(pred, truth)
                tp, fp, fn = tp + counts3[0], fp + counts3[1], fn + counts3[2]
                per_scene[str(scene.get("id", i))] = round(_f1(*counts3), 4)
                test_count += h * w
    finally:
        model.train(was_training)
    end = time.perf_counter()
    return ChangeProbeResult(
        f1=_f1(tp, fp, fn),
        precision=tp / (tp + fp) if tp + fp else 0.0,
        recall=tp / (tp + fn) if tp + fn else 0.0,
        iou=tp / (tp + fp + fn) if tp + fp + fn else 0.0,
        threshold=threshold,
        weight_decay=chosen,
        validation_f1=validation,
        per_scene_f1=per_scene,
        train_pixels=len(y),
        train_change_fraction=float(y.float().mean()),
        test_pixels=test_count,
        feature_dim=x.shape[1],
        seconds={"train_features": round(features_done - start, 2), "fit": round(fit_done - features_done, 2),
                 "test": round(end - fit_done, 2)},
    )
