"""Multi-modal pretraining views: same ground across modalities, orientation, time, dropout, seeds;
a few pretraining steps on a manifest of HR + S2 + S1 places and on the OSCD train cities."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F
from rasterio.transform import from_origin

from skysense import SkySense
from skysense.config import preset_config
from skysense.pretrain.config import PretrainConfig
from skysense.pretrain.data import PairMaker, StepBatchSampler, collate_view_pairs, step_seed
from skysense.pretrain.loop import pretrain
from skysense.pretrain.pixel_contrast import resample_to_overlap
from skysense.pretrain.views import ViewConfig, draw_kept_modalities, multimodal_views

FOOTPRINT = 320.0  # metres on each side
HR_SIDE, SENTINEL_SIDE = 256, 8  # 1.25 m and 40 m pixels: the model's 32:1 ratio
VIEWS = ViewConfig(hr_size=128, sentinel_size=4, crop_scale=(0.5, 1.0), rotate=True, jitter=0.0)

HEAD = {"head": {"hidden_dim": 64, "bottleneck_dim": 32, "out_dim": 128}, "num_clusters": 2, "cluster_rounds": 1,
        "sinkhorn_iterations": 20}


def coordinates(side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) in metres of the pixel centres of a ``side`` px grid over the footprint, each (side, side)."""
    centres = (torch.arange(side, dtype=torch.float32) + 0.5) * FOOTPRINT / side
    return centres[None, :].expand(side, side), centres[:, None].expand(side, side)


def coordinate_sample(s2_frames: int = 3) -> dict[str, torch.Tensor]:
    """HR, S2 and S1 whose first two bands hold each pixel's ground x and y; S2 band 3 its frame index."""
    hx, hy = coordinates(HR_SIDE)
    sx, sy = coordinates(SENTINEL_SIDE)
    s2 = torch.zeros(s2_frames, 10, SENTINEL_SIDE, SENTINEL_SIDE)
    s2[:, 0], s2[:, 1] = sx, sy
    s2[:, 2] = torch.arange(s2_frames, dtype=torch.float32)[:, None, None]
    s1 = torch.stack([sx, sy])[None].repeat(2, 1, 1, 1)
    return {
        "hr": torch.stack([hx, hy, hx + hy]),
        "s2": s2, "s2_dates": torch.arange(1, s2_frames + 1) * 30, "s2_mask": torch.ones(s2_frames, dtype=torch.bool),
        "s1": s1, "s1_dates": torch.tensor([50, 250]), "s1_mask": torch.ones(2, dtype=torch.bool),
        "lat": torch.tensor(48.0), "lon": torch.tensor(11.0),
    }


def orientation(x_map: torch.Tensor, y_map: torch.Tensor) -> tuple[bool, int, int]:
    """(transposed, sign of x along its axis, sign of y along its axis) of a view's coordinate maps."""
    transposed = bool((x_map[-1, :] - x_map[0, :]).abs().mean() > (x_map[:, -1] - x_map[:, 0]).abs().mean())
    x_axis = 0 if transposed else 1
    dx = (x_map.select(x_axis, -1) - x_map.select(x_axis, 0)).mean()
    dy = (y_map.select(1 - x_axis, -1) - y_map.select(1 - x_axis, 0)).mean()
    return transposed, int(torch.sign(dx)), int(torch.sign(dy))


def test_views_cover_the_same_ground_in_every_modality_and_orientation() -> None:
    sample = coordinate_sample()
    seen = set()
    for seed in range(40):
        for view in multimodal_views(sample, VIEWS, torch.Generator().manual_seed(seed)):
            assert view["hr"].shape == (3, 128, 128)
            assert view["s2"].shape == (3, 10, 4, 4) and view["s1"].shape == (2, 2, 4, 4)
            # Each S2/S1 pixel sees the ground of the 32 x 32 HR pixels the model fuses it with.
            hr_cells = F.avg_pool2d(view["hr"][None, :2], 32)[0]
            for m in ("s2", "s1"):
                torch.testing.assert_close(view[m][:, :2], hr_cells.expand_as(view[m][:, :2]), atol=0.01, rtol=0)
            seen.add(orientation(view["hr"][0], view["hr"][1]))
            assert orientation(view["s2"][0, 0], view["s2"][0, 1]) == orientation(view["hr"][0], view["hr"][1])
    assert len(seen) == 8, seen  # all rotations by 90 degrees, with and without flips


def test_overlap_boxes_sample_the_same_ground_in_both_views() -> None:
    sample = coordinate_sample()
    misaligned = 0
    for seed in range(20):
        views = multimodal_views(sample, VIEWS, torch.Generator().manual_seed(seed))
        maps = [resample_to_overlap(v["hr"][None, :2], v["overlap"][None], (16, 16))[0] for v in views]
        torch.testing.assert_close(maps[0], maps[1], atol=0.05, rtol=0)  # metres
        whole = [resample_to_overlap(v["hr"][None, :2], None, (16, 16))[0] for v in views]
        misaligned += bool((whole[0] - whole[1]).abs().max() > 5.0)
    assert misaligned >= 18  # without the boxes the views do not line up: the check has teeth


def test_frames_drawn_in_time_order_from_valid_frames_with_bounded_date_jitter() -> None:
    sample = coordinate_sample(s2_frames=10)
    sample["s2_dates"] = torch.tensor([1, 30, 60, 100, 150, 200, 250, 300, 340, 366])
    sample["s2_mask"][[3, 7]] = False
    sample["s2"][[3, 7]] = float("nan")  # invalid frames may hold anything
    config = ViewConfig(hr_size=128, sentinel_size=4, s2_frames=4, s1_frames=1, date_jitter=3, jitter=0.0)
    moved = 0
    for seed in range(30):
        for view in multimodal_views(sample, config, torch.Generator().manual_seed(seed)):
            assert view["s2"].shape[0] == 4 and view["s1"].shape[0] == 1
            assert bool(view["s2_mask"].all()) and bool(torch.isfinite(view["s2"]).all())
            frames = view["s2"][:, 2].mean((-2, -1)).round().long()
            assert frames.tolist() == sorted(set(frames.tolist())) and not {3, 7} & set(frames.tolist())
            original = sample["s2_dates"][frames]
            shift = (view["s2_dates"] - original + 183) % 366 - 183  # circular difference in days
            assert int(shift.abs().max()) <= 3
            assert int(view["s2_dates"].min()) >= 1 and int(view["s2_dates"].max()) <= 366
            moved += int((shift != 0).sum())
    assert moved > 100  # the dates do move


def test_modality_dropout_never_empties_a_view_and_is_shared_by_a_batch() -> None:
    everything = ("hr", "s2", "s1")
    kept_sets = set()
    for seed in range(300):
        kept = draw_kept_modalities(everything, 0.5, torch.Generator().manual_seed(seed))
        assert kept and set(kept) <= set(everything)
        kept_sets.add(kept)
        assert draw_kept_modalities(("s2",), 0.95, torch.Generator().manual_seed(seed)) == ("s2",)
    assert len(kept_sets) == 7  # every non-empty subset occurs

    model_config = preset_config("tiny")
    make_pair = PairMaker(model_config, ViewConfig(hr_size=128, sentinel_size=4, modality_dropout=0.6))
    sample = coordinate_sample()
    sample["normalized"] = True  # coordinates stand for normalised values here
    sampler = StepBatchSampler(num_items=1, batch_size=4, seed=2, start=0, stop=25)
    dropped_any = False
    for batch in sampler:
        pairs = [make_pair(sample, views, step) for _, views, step in batch]
        first, second = collate_view_pairs(pairs)  # one batch: the samples share their modalities
        for view in (first, second):
            present = {m for m in ("hr", "s2", "s1") if m in view}
            assert present
            dropped_any |= len(present) < 3
            for m in ("s2", "s1"):
                assert (m in view) == (f"{m}_dates" in view) == (f"{m}_mask" in view)
    assert dropped_any


def test_views_are_determined_by_their_seeds() -> None:
    config = ViewConfig(hr_size=128, sentinel_size=4, rotate=True, s2_frames=2, date_jitter=4, modality_dropout=0.3)
    make_pair = PairMaker(preset_config("tiny"), config)
    sample = coordinate_sample()
    sample["normalized"] = True

    def flat(pair):
        return [(v, k, t) for v, view in enumerate(pair) for k, t in sorted(view.items())]

    a, b, c = (flat(make_pair(sample, 11, 5)), flat(make_pair(sample, 11, 5)), flat(make_pair(sample, 12, 5)))
    assert [(v, k) for v, k, _ in a] == [(v, k) for v, k, _ in b]
    assert all(torch.equal(x, y) for (_, _, x), (_, _, y) in zip(a, b))
    assert not all(torch.equal(x, y) for (_, k, x), (_, k2, y) in zip(a, c) if k == k2 and x.shape == y.shape)
    assert step_seed(0, 1) != step_seed(0, 2) != step_seed(1, 1)


def test_view_sizes_must_share_the_fusion_grid() -> None:
    make_pair = PairMaker(preset_config("tiny"), ViewConfig(hr_size=128, sentinel_size=8))
    with pytest.raises(ValueError, match=r"hr -> 4x4, s2 -> 8x8.*sentinel_view_size"):
        make_pair({**coordinate_sample(), "normalized": True}, 0, 0)
    data = PretrainConfig.from_dict({"data": {"view_size": 256}}).data
    assert data.view_config(preset_config("tiny")).sentinel_size == 8
    with pytest.raises(ValueError, match="modality_dropout"):
        ViewConfig(modality_dropout=1.0)


# -- pretraining on multi-modal data ----------------------------------------------------------------

def _write_tif(path: Path, data: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=data.dtype, crs="EPSG:32632", transform=from_origin(690000, 5340000, 40, 40)) as dst:
        dst.write(data)
    return str(path)


def write_manifest(root: Path, places: int = 6) -> Path:
    """``places`` places with a 256 px HR image, 2-3 S2 frames and 1-2 S1 frames of 8 px (32:1)."""
    rng = np.random.default_rng(0)
    records = []
    for p in range(places):
        hr = (rng.integers(0, 120, (3, 1, 1)) + rng.integers(0, 100, (3, HR_SIDE, HR_SIDE))).astype(np.uint8)
        record = {"id": f"place-{p}", "lat": 40.0 + p, "lon": 10.0 - p,
                  "hr": _write_tif(root / "hr" / f"{p}.tif", hr), "s2": [], "s1": []}
        for t in range(2 + p % 2):
            s2 = rng.integers(300, 3000, (10, SENTINEL_SIDE, SENTINEL_SIDE)).astype(np.uint16)
            record["s2"].append({"path": _write_tif(root / "s2" / f"{p}_{t}.tif", s2), "date": f"2021-0{t + 3}-1{p}"})
        for t in range(1 + p % 2):
            s1 = rng.uniform(-22, -4, (2, SENTINEL_SIDE, SENTINEL_SIDE)).astype(np.float32)
            record["s1"].append({"path": _write_tif(root / "s1" / f"{p}_{t}.tif", s1), "date": f"2021-0{t + 4}-0{p + 1}"})
        records.append(record)
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def _changed(before: SkySense, after: SkySense, encoder: str) -> bool:
    a, b = getattr(before, encoder).state_dict(), getattr(after, encoder).state_dict()
    return any(not torch.equal(a[k], b[k]) for k in a)


MANIFEST_CONFIG = {
    "preset": "tiny", "batch_size": 4, "max_steps": 2, "seed": 1, "checkpoint_every": 2,
    "data": {"dataset": "manifest", "view_size": 128, "crop_scale": [0.5, 1.0], "rotate": True, "s2_frames": 2,
             "s1_frames": 1, "date_jitter": 5, "modality_dropout": 0.2, "num_workers": 0},
    "optim": {"lr": 0.001, "warmup_steps": 1},
    "objective": HEAD,
}


@pytest.mark.slow
def test_pretraining_on_hr_s2_s1_manifest_writes_weights(tmp_path: Path) -> None:
    root = write_manifest(tmp_path / "data")
    config = PretrainConfig.from_dict(MANIFEST_CONFIG)
    rows = pretrain(config, tmp_path / "run", data_root=str(root), progress=False)
    assert [r["step"] for r in rows] == [0, 1]
    assert all(np.isfinite(v) for r in rows for v in r.values())
    terms = set().union(*rows)
    assert {"pixel/hr", "pixel/s2", "pixel/s1", "object/fused", "cross_modal", "geo"} <= terms
    torch.manual_seed(config.seed)
    initial = SkySense.from_preset("tiny")
    trained = SkySense.from_pretrained(str(tmp_path / "run"))
    for encoder in ("hr_encoder", "s2_encoder", "s1_encoder", "fusion"):
        assert _changed(initial, trained, encoder), encoder


@pytest.mark.slow
@pytest.mark.real_data
def test_pretraining_s2_branch_on_oscd_train_cities(tmp_path: Path, data_root: Path) -> None:
    oscd = data_root / "oscd"
    if not oscd.is_dir():
        pytest.skip(f"real data {oscd} not present")
    config = PretrainConfig.from_dict({
        "preset": "tiny", "batch_size": 4, "max_steps": 2, "seed": 0, "checkpoint_every": 2,
        "data": {"dataset": "oscd", "split": "train", "cache": True, "crop_size": 32, "sentinel_view_size": 16,
                 "rotate": True, "date_jitter": 5, "num_workers": 0},
        "optim": {"lr": 0.001, "warmup_steps": 1},
        "objective": HEAD,
    })
    rows = pretrain(config, tmp_path, data_root=str(oscd), progress=False)
    assert all(np.isfinite(v) for r in rows for v in r.values())
    assert {"pixel/s2", "object/s2", "image/fused", "geo"} <= set(rows[0]) and "pixel/hr" not in rows[0]
    torch.manual_seed(config.seed)
    initial = SkySense.from_preset("tiny")
    trained = SkySense.from_pretrained(str(tmp_path))
    assert _changed(initial, trained, "s2_encoder") and not _changed(initial, trained, "hr_encoder")
