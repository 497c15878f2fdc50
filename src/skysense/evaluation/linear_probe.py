"""Linear probe on frozen features: the paper's linear-evaluation protocol, full batch.

:func:`linear_probe` standardises the features with the training set's mean and standard
deviation, picks the weight decay on a held-out part of the training set (stratified by class
for single-label data), refits on the whole training set with it, and scores the test set:

* single-label (``labels`` (N,) int): softmax cross-entropy; overall accuracy (OA, as in the
  paper's scene-classification tables);
* multi-label (``labels`` (N, K) multi-hot): per-class sigmoid with binary cross-entropy; macro
  mean average precision (mAP, as reported for BigEarthNet).

Each fit minimises ``mean loss + weight_decay / 2 * ||W||^2`` (bias not decayed) with full-batch
L-BFGS (strong-Wolfe line search) in float64 from a zero initialisation. With ``weight_decay > 0``
the objective is strictly convex, so the optimum is unique: the result depends on the seed only
through the held-out split, and is reproducible run to run.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

DEFAULT_WEIGHT_DECAYS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
"""Weight decays tried on the held-out part of the training set."""

FALLBACK_WEIGHT_DECAY = 1e-3
"""Used when the training set is too small to hold any sample out."""


@dataclass
class ProbeResult:
    """Outcome of :func:`linear_probe`."""

    metric: str
    """``"accuracy"`` (single-label) or ``"mAP"`` (multi-label)."""
    score: float
    """The metric on the test set, in [0, 1]."""
    train_score: float
    """The metric on the training set (fit with the chosen weight decay)."""
    weight_decay: float
    """The chosen weight decay."""
    validation: dict[float, float] = field(default_factory=dict)
    """Held-out score of each weight decay tried (empty when nothing could be held out)."""
    num_train: int = 0
    num_test: int = 0
    num_validation: int = 0
    feature_dim: int = 0
    num_classes: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["validation"] = {f"{k:g}": v for k, v in self.validation.items()}
        return out


def standardize(train: torch.Tensor, *others: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, ...]:
    """``(x - mean) / std`` with the mean and standard deviation of ``train`` (per feature).

    Constant features (std below ``eps``) are only centred. Returns the standardised ``train``
    followed by each of ``others``, in float64.
    """
    mean, std = standardization(train, eps)
    return tuple((x.double() - mean) / std for x in (train, *others))


def standardization(train: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature ``(mean, std)`` (float64) that :func:`standardize` applies; std 1 where constant."""
    train = train.double()
    std = train.std(dim=0, unbiased=False)
    return train.mean(dim=0), torch.where(std < eps, torch.ones_like(std), std)


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch CPU threads (None: unchanged); the previous count is restored."""
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _check(features: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    if features.ndim != 2:
        raise ValueError(f"{name} features: expected (N, D), got shape {tuple(features.shape)}")
    if labels.shape[0] != features.shape[0]:
        raise ValueError(f"{name}: {features.shape[0]} feature rows but {labels.shape[0]} labels")
    if features.shape[0] == 0:
        raise ValueError(f"{name}: no samples")
    if not torch.isfinite(features).all():
        raise ValueError(f"{name} features: contain NaN or infinity")


def fit_linear(
    x: torch.Tensor,
    y: torch.Tensor,
    weight_decay: float,
    num_classes: int,
    multilabel: bool = False,
    max_iter: int = 500,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-batch L-BFGS fit of ``logits = x @ W.T + b``; returns ``(W, b)`` (float64).

    Args:
        x: (N, D) features (standardised).
        y: (N,) class indices, or (N, K) multi-hot when ``multilabel``.
    """
    x = x.double()
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    target = y.double() if multilabel else y.long()
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = F.linear(x, weight, bias)
        if multilabel:
            loss = F.binary_cross_entropy_with_logits(logits, target)
        else:
            loss = F.cross_entropy(logits, target)
        loss = loss + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Overall accuracy: fraction of samples whose arg-max class is the label."""
    return float((logits.argmax(dim=1) == labels).double().mean())


def _average_precision_own(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Average precision of one class (as scikit-learn / torchmetrics: tied scores are one step).

    ``AP = sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds, high to low.
    """
    order = torch.argsort(scores, descending=True, stable=True)
    s, t = scores[order], positive[order].double()
    tps = torch.cumsum(t, 0)
    ranks = torch.arange(1, len(s) + 1, dtype=torch.float64)
    # The last position of each group of tied scores is one threshold.
    last = torch.ones(len(s), dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    tps, ranks = tps[last], ranks[last]
    precision = tps / ranks
    recall = tps / tps[-1]
    steps = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((steps * precision).sum())


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor, use_torchmetrics: bool = False) -> float:
    """Macro mean over classes of the average precision (multi-label ``mAP``).

    Classes without any positive in ``targets`` have no defined AP and are left out of the mean
    (so torchmetrics and the own implementation agree).

    Args:
        scores: (N, K) scores (logits or probabilities; only their order matters).
        targets: (N, K) multi-hot {0, 1}.
        use_torchmetrics: True to compute it with torchmetrics (``multilabel_average_precision``,
            which must be installed) instead of the own implementation. The two agree within
            1e-6 (tests/evaluation/test_linear_probe.py); the own one is the default because
            importing torchmetrics took 3.7 s on a 2-core machine (it imports torchvision's
            models; ``python -X importtime``) for a computation of milliseconds, and a score
            should not depend on which extras are installed.

    Raises:
        ValueError: shapes differ, or no class has a positive.
    """
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"mAP: scores {tuple(scores.shape)} and targets {tuple(targets.shape)}: expected equal (N, K)")
    present = targets.sum(dim=0) > 0
    if not bool(present.any()):
        raise ValueError("mAP: no class has a positive sample")
    scores, targets = scores[:, present].double(), targets[:, present]
    if use_torchmetrics:
        from torchmetrics.functional.classification import multilabel_average_precision

        return float(multilabel_average_precision(scores.float(), targets.long(), num_labels=scores.shape[1],
                                                  average="macro", thresholds=None))
    return sum(_average_precision_own(scores[:, k], targets[:, k] > 0) for k in range(scores.shape[1])) / scores.shape[1]


def _score(logits: torch.Tensor, labels: torch.Tensor, multilabel: bool) -> float:
    return mean_average_precision(logits, labels) if multilabel else accuracy(logits, labels)


def holdout_split(labels: torch.Tensor, fraction: float, seed: int, multilabel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(fit, validation)`` of a training set; stratified per class when single-label.

    Single-label: each class with at least two samples gives ``round(fraction * n)`` of them (at
    least one, never all) to validation; a class with one sample stays in ``fit``. Multi-label:
    a random ``round(fraction * N)`` (never all). Deterministic for a given ``seed``.
    """
    generator = torch.Generator().manual_seed(seed)
    n = labels.shape[0]
    if multilabel:
        order = torch.randperm(n, generator=generator)
        k = min(round(fraction * n), n - 1)
        return order[k:].sort().values, order[:k].sort().values
    fit, val = [], []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        k = 0 if len(members) < 2 else min(max(round(fraction * len(members)), 1), len(members) - 1)
        val.append(members[:k])
        fit.append(members[k:])
    return torch.cat(fit).sort().values, torch.cat(val).sort().values


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    validation_fraction: float = 0.2,
    seed: int = 0,
    num_classes: int | None = None,
    max_iter: int = 500,
    threads: int | None = 1,
) -> ProbeResult:
    """Train a linear classifier on frozen training features; score it on the test features.

    Multi-label when the labels are 2-D (N, K) multi-hot, single-label when 1-D class indices.

    Args:
        weight_decays: candidates; the one with the best held-out score wins (ties: the larger).
        validation_fraction: part of the training set held out to choose the weight decay.
        seed: seeds the held-out split (the fits themselves are deterministic).
        num_classes: single-label: number of classes (default: largest label seen + 1).
        threads: torch CPU threads during the fits (restored afterwards; None: unchanged). The
            default 1 is fastest: the matrices are small (N x D x K), so a thread pool only adds
            synchronisation, and on a loaded machine its spinning threads made a probe of 120
            samples take minutes instead of seconds.
    """
    _check(train_features, train_labels, "train")
    _check(test_features, test_labels, "test")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"feature dims differ: train {train_features.shape[1]}, test {test_features.shape[1]}")
    if not weight_decays or any(w <= 0 for w in weight_decays):
        raise ValueError(f"weight_decays: expected positive values, got {list(weight_decays)}")
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction: expected in [0, 1), got {validation_fraction}")
    multilabel = train_labels.ndim == 2
    if multilabel:
        if test_labels.ndim != 2 or test_labels.shape[1] != train_labels.shape[1]:
            raise ValueError(f"multi-label: train labels {tuple(train_labels.shape)}, test {tuple(test_labels.shape)}")
        classes = train_labels.shape[1]
    else:
        if train_labels.ndim != 1 or test_labels.ndim != 1:
            raise ValueError("labels: expected (N,) class indices or (N, K) multi-hot")
        train_labels, test_labels = train_labels.long(), test_labels.long()
        seen = int(max(train_labels.max(), test_labels.max())) + 1
        classes = num_classes if num_classes is not None else seen
        if classes < seen or int(min(train_labels.min(), test_labels.min())) < 0:
            raise ValueError(f"labels: expected class indices in [0, {classes}), got up to {seen - 1}")

    with _threads(threads):
        return _probe(train_features, train_labels, test_features, test_labels, weight_decays,
                      validation_fraction, seed, classes, multilabel, max_iter)


def _probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    weight_decays: Sequence[float],
    validation_fraction: float,
    seed: int,
    classes: int,
    multilabel: bool,
    max_iter: int,
) -> ProbeResult:
    fit_idx, val_idx = holdout_split(train_labels, validation_fraction, seed, multilabel)
    if multilabel and len(val_idx) and not bool((train_labels[val_idx].sum(0) > 0).any()):
        val_idx = val_idx[:0]
    validation: dict[float, float] = {}
    if len(val_idx) and len(fit_idx):
        # The statistics of the fit part only, so the held-out part plays the test set's role.
        x_fit, x_val = standardize(train_features[fit_idx], train_features[val_idx])
        for wd in weight_decays:
            w, b = fit_linear(x_fit, train_labels[fit_idx], wd, classes, multilabel, max_iter)
            validation[float(wd)] = _score(F.linear(x_val, w, b), train_labels[val_idx], multilabel)
        best = max(validation.values())
        chosen = max(wd for wd, s in validation.items() if s == best)
    else:
        chosen = FALLBACK_WEIGHT_DECAY

    x_train, x_test = standardize(train_features, test_features)
    w, b = fit_linear(x_train, train_labels, chosen, classes, multilabel, max_iter)
    return ProbeResult(
        metric="mAP" if multilabel else "accuracy",
        score=_score(F.linear(x_test, w, b), test_labels, multilabel),
        train_score=_score(F.linear(x_train, w, b), train_labels, multilabel),
        weight_decay=chosen,
        validation=validation,
        num_train=int(train_features.shape[0]),
        num_test=int(test_features.shape[0]),
        num_validation=int(len(val_idx)),
        feature_dim=int(train_features.shape[1]),
        num_classes=int(classes),
    )
