"""Objectives that look across the batch are global under torch.distributed: 2 gloo processes
holding halves of a global batch get what 1 process holding it all gets.

Covered: Sinkhorn-Knopp (dense and grouped), the geo-context prototype assignment and EMA (with
a region on both processes, one on rank 0 only, one on rank 1 only), :class:`GeoPrototypeLoss`,
and the cross-modal InfoNCE (loss and gradients, averaged over processes as DDP does), each in
2 processes started with ``torch.multiprocessing.spawn``; then the pretraining loop on
multi-modal places in several geo regions under torchrun, DDP and FSDP against 1 process.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from skysense.config import GeoContextConfig, preset_config
from skysense.models.geo_context import GeoContextPrototypes, region_index
from skysense.pretrain import CrossModalAlignment, GeoPrototypeLoss
from skysense.pretrain.heads import DINOHead
from skysense.pretrain.image_contrast import InfoNCEImageContrastLoss
from skysense.pretrain.config import PretrainConfig
from skysense.pretrain.loop import pretrain
from skysense.pretrain.model import PretrainingModel
from skysense.sinkhorn import sinkhorn_knopp
from test_fsdp import _restored, _run, _torchrun
from test_multimodal_views import MANIFEST_CONFIG, write_manifest

GEO = GeoContextConfig(lat_bands=2, lon_bins=2, num_prototypes=4)
DIM, SIDE, IMAGES = 8, 4, 4
# Regions of the 4 images (rank 0 holds images 0-1, rank 1 images 2-3): region 3 is on both
# processes, region 0 on rank 0 only, region 1 on rank 1 only.
LAT = torch.tensor([45.0, -45.0, 45.0, -45.0])
LON = torch.tensor([90.0, -90.0, 90.0, 90.0])


def _global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "teacher": [torch.randn(IMAGES, DIM, SIDE, SIDE, generator=g) for _ in range(2)],
        "student": [torch.randn(IMAGES, DIM, SIDE, SIDE, generator=g) for _ in range(2)],
        "dense": torch.randn(3, 24, 5, generator=g),
        "hr": torch.randn(IMAGES, 12, generator=g),
        "s2": torch.randn(IMAGES, 10, generator=g),
        "s1": torch.randn(IMAGES, 6, generator=g),
    }


def _pixels(maps: torch.Tensor) -> torch.Tensor:
    return maps.flatten(2).transpose(1, 2).flatten(0, 1)  # (B*H*W, D)


def _compute(rank: int, world: int) -> dict[str, torch.Tensor]:
    """Everything compared, on this process's share of the global batch."""
    data = _global_batch()
    share = slice(rank * IMAGES // world, (rank + 1) * IMAGES // world)
    torch.manual_seed(1)
    bank = GeoContextPrototypes(GEO, DIM)
    torch.manual_seed(2)
    alignment = CrossModalAlignment({"hr": 12, "s2": 10, "s1": 6}, embed_dim=16)
    out: dict[str, torch.Tensor] = {"initial": bank.prototypes.clone()}

    pixels = _pixels(data["teacher"][0][share])
    regions = bank.regions(LAT[share], LON[share]).repeat_interleave(SIDE * SIDE)
    out["assignment"] = bank.assign(pixels, regions, distributed=True)
    dense = data["dense"].chunk(world, dim=1)[rank]
    out["dense"] = sinkhorn_knopp(dense, epsilon=0.1, iterations=500, tolerance=1e-6, distributed=True)
    out["dense_scaling"] = sinkhorn_knopp(dense.tanh(), epsilon=0.1, iterations=500, tolerance=1e-6,
                                          distributed=True, score_bound=1.0)  # the scaling domain
    bank.ema_update(pixels, regions, out["assignment"], momentum=0.5, distributed=True)
    out["ema"] = bank.prototypes.clone()

    criterion = GeoPrototypeLoss(momentum=0.5)
    out["geo_loss"] = criterion([m[share] for m in data["student"]], [m[share] for m in data["teacher"]],
                                LAT[share], LON[share], bank)
    criterion.update_prototypes(bank)
    out["prototypes"] = bank.prototypes.clone()

    loss = alignment({m: data[m][share] for m in ("hr", "s2", "s1")})
    loss.backward()
    out["cross_modal"] = loss.detach()
    for name, param in alignment.named_parameters():
        out[f"grad/{name}"] = param.grad

    # Image-level InfoNCE: teacher keys (with a local view, multi-crop) and student keys.
    for keys, views in (("teacher", 3), ("student", 2)):
        torch.manual_seed(3)
        head = DINOHead(DIM, 16, hidden_dim=12, bottleneck_dim=6)
        teacher_head = DINOHead(DIM, 16, hidden_dim=12, bottleneck_dim=6)
        student_maps = [m[share] for m in (data["student"] + data["teacher"][:1])[:views]]
        loss = InfoNCEImageContrastLoss(keys=keys)(student_maps, [m[share] for m in data["teacher"]], head,
                                                   teacher_head)
        loss.backward()
        out[f"infonce/{keys}"] = loss.detach()
        out[f"infonce_grad/{keys}"] = head.mlp[0].weight.grad
    return out


def _worker(rank: int, world: int, folder: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder / 'rendezvous'}", rank=rank, world_size=world)
    try:
        torch.save(_compute(rank, world), folder / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def one_process() -> dict[str, torch.Tensor]:
    return _compute(0, 1)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, torch.Tensor]]:
    folder = tmp_path_factory.mktemp("global_batch")
    mp.spawn(_worker, args=(2, folder), nprocs=2, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_assignments_are_those_of_the_global_batch(two_processes: list[dict[str, torch.Tensor]],
                                                   one_process: dict[str, torch.Tensor]) -> None:
    one = one_process
    both = torch.cat([r["assignment"] for r in two_processes])
    torch.testing.assert_close(both, one["assignment"], rtol=0, atol=1e-5)
    for key in ("dense", "dense_scaling"):
        torch.testing.assert_close(torch.cat([r[key] for r in two_processes], dim=1), one[key], rtol=0, atol=1e-5)
    # Balanced per region over the global batch; region 3 is split between the processes.
    bank = GeoContextPrototypes(GEO, DIM)
    regions = bank.regions(LAT, LON).repeat_interleave(SIDE * SIDE)
    assert sorted(set(regions.tolist())) == [0, 1, 3]
    for region, images in ((3, 2), (0, 1), (1, 1)):
        mass = both[regions == region].sum(0)
        torch.testing.assert_close(mass, torch.full((4,), images * SIDE * SIDE / 4), rtol=0, atol=1e-3)
    # Teeth: rank 0 balancing region 3 over its own pixels alone gets another assignment.
    pixels = _pixels(_global_batch()["teacher"][0])
    torch.manual_seed(1)
    bank = GeoContextPrototypes(GEO, DIM)
    half = IMAGES // 2 * SIDE * SIDE
    local = bank.assign(pixels[:half], regions[:half])
    assert (local - one["assignment"][:half]).abs().max() > 1e-2


def test_prototype_updates_are_global_and_identical_on_every_process(
        two_processes: list[dict[str, torch.Tensor]], one_process: dict[str, torch.Tensor]) -> None:
    one = one_process
    for key in ("ema", "prototypes"):
        assert torch.equal(two_processes[0][key], two_processes[1][key]), key
        torch.testing.assert_close(two_processes[0][key], one[key], rtol=0, atol=1e-5, msg=key)
    moved = (one["ema"] - one["initial"]).abs().amax((1, 2)) > 0
    assert moved.tolist() == [True, True, False, True]  # the regions present, and only those
    mean_loss = (two_processes[0]["geo_loss"] + two_processes[1]["geo_loss"]) / 2
    torch.testing.assert_close(mean_loss, one["geo_loss"], rtol=0, atol=1e-5)


def test_cross_modal_contrast_uses_the_global_batch(two_processes: list[dict[str, torch.Tensor]],
                                                    one_process: dict[str, torch.Tensor]) -> None:
    one = one_process
    mean_loss = (two_processes[0]["cross_modal"] + two_processes[1]["cross_modal"]) / 2
    torch.testing.assert_close(mean_loss, one["cross_modal"], rtol=0, atol=1e-6)
    grads = [k for k in one if k.startswith("grad/")]
    assert "grad/log_logit_scale" in grads and len(grads) == 4
    for key in grads:  # DDP averages the gradients of the processes
        mean = (two_processes[0][key] + two_processes[1][key]) / 2
        torch.testing.assert_close(mean, one[key], rtol=0, atol=1e-6, msg=key)
    # Teeth: each process contrasting within its own half gives another loss.
    torch.manual_seed(2)
    alignment = CrossModalAlignment({"hr": 12, "s2": 10, "s1": 6}, embed_dim=16)
    data = _global_batch()
    with torch.no_grad():
        halves = [alignment({m: data[m][s] for m in ("hr", "s2", "s1")}) for s in (slice(0, 2), slice(2, 4))]
    assert abs(float(sum(halves) / 2 - one["cross_modal"])) > 1e-3


@pytest.mark.parametrize("keys", ["teacher", "student"])
def test_image_infonce_uses_the_global_batch(keys: str, two_processes: list[dict[str, torch.Tensor]],
                                             one_process: dict[str, torch.Tensor]) -> None:
    one = one_process
    mean_loss = (two_processes[0][f"infonce/{keys}"] + two_processes[1][f"infonce/{keys}"]) / 2
    torch.testing.assert_close(mean_loss, one[f"infonce/{keys}"], rtol=0, atol=1e-6)
    mean_grad = (two_processes[0][f"infonce_grad/{keys}"] + two_processes[1][f"infonce_grad/{keys}"]) / 2
    torch.testing.assert_close(mean_grad, one[f"infonce_grad/{keys}"], rtol=1e-4, atol=1e-5)
    # Teeth: negatives from each process's own half only give another loss.
    data = _global_batch()
    torch.manual_seed(3)
    head = DINOHead(DIM, 16, hidden_dim=12, bottleneck_dim=6)
    teacher_head = DINOHead(DIM, 16, hidden_dim=12, bottleneck_dim=6)
    views = 3 if keys == "teacher" else 2
    with torch.no_grad():
        halves = [InfoNCEImageContrastLoss(keys=keys)([m[s] for m in (data["student"] + data["teacher"][:1])[:views]],
                                                      [m[s] for m in data["teacher"]], head, teacher_head)
                  for s in (slice(0, 2), slice(2, 4))]
    assert abs(float(sum(halves) / 2 - one[f"infonce/{keys}"])) > 1e-3


# -- the pretraining loop: 1 process and 2 (DDP, FSDP) on multi-modal places in several regions --

PLACES = [(48.0, 11.0), (48.5, 11.2), (-33.0, 151.0), (-33.5, 151.3), (10.0, 20.0), (60.0, -100.0)]


def _metrics(out: Path) -> list[dict[str, float]]:
    with (out / "metrics.csv").open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


@pytest.mark.slow
def test_multimodal_geo_run_of_two_processes_matches_one(tmp_path: Path) -> None:
    """Every logged term (geo, cross-modal, contrast, monitors) of the first steps and the
    prototypes after them: 2 processes (DDP and FSDP) = 1 process, within 1e-4."""
    root = write_manifest(tmp_path / "data")
    manifest = root / "manifest.jsonl"
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    for record, (lat, lon) in zip(records, PLACES, strict=True):
        record["lat"], record["lon"] = lat, lon
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    geo = preset_config("tiny").geo_context
    regions = region_index(torch.tensor([p[0] for p in PLACES]), torch.tensor([p[1] for p in PLACES]),
                           geo.lat_bands, geo.lon_bins)
    assert len(set(regions.tolist())) == 4  # so the processes of a step hold different regions

    base = {**MANIFEST_CONFIG, "max_steps": 3, "checkpoint_every": 3,
            "data": {**MANIFEST_CONFIG["data"], "modality_dropout": 0.0}}
    configs = {}
    for strategy in ("ddp", "fsdp"):
        configs[strategy] = tmp_path / f"{strategy}.yaml"
        configs[strategy].write_text(yaml.safe_dump({**base, "distributed": {"strategy": strategy}}))
        _run(_torchrun(2, "-m", "skysense.cli", "pretrain", "--config", str(configs[strategy]), "--data-root",
                       str(root), "--no-progress", "--out", str(tmp_path / strategy)))
    pretrain(PretrainConfig.from_yaml(configs["ddp"]), tmp_path / "one", data_root=str(root), progress=False)

    one = _metrics(tmp_path / "one")
    assert len(one) == 3 and {"geo", "cross_modal", "pixel/s1", "monitor/feature_std"} <= set(one[0])
    for strategy in ("ddp", "fsdp"):
        two = _metrics(tmp_path / strategy)
        assert [r.keys() for r in two] == [r.keys() for r in one]
        for key in one[0]:
            np.testing.assert_allclose([r[key] for r in two], [r[key] for r in one], rtol=1e-5, atol=1e-4,
                                       err_msg=f"{strategy}: {key}")

    name = "student.geo_context.prototypes"
    torch.manual_seed(base["seed"])  # as the run initialises its model
    initial = PretrainingModel(PretrainConfig.from_yaml(configs["ddp"])).state_dict()[name]
    reference = torch.load(tmp_path / "one" / "training_state.pt", weights_only=True)["module"][name]
    assert ((reference - initial).abs().amax((1, 2)) > 0).sum() == 4, "the prototypes of the 4 regions moved"
    ddp = torch.load(tmp_path / "ddp" / "training_state.pt", weights_only=True)["module"][name]
    _, fsdp, _ = _restored(configs["fsdp"], tmp_path / "fsdp")
    for strategy, prototypes in (("ddp", ddp), ("fsdp", fsdp[name])):
        torch.testing.assert_close(prototypes, reference, rtol=0, atol=1e-4, msg=strategy)


def test_collapse_monitors_need_two_samples() -> None:
    """One sample has no spread: the monitors are left out, not NaN with a warning (an H100
    run of one sample per GPU warned 'degrees of freedom is <= 0')."""
    import warnings

    from skysense.pretrain.model import collapse_monitors

    g = torch.Generator().manual_seed(0)
    one = [{"fused": torch.randn(1, 8, 2, 2, generator=g)}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert collapse_monitors(one, one) == {}
    two = [{"fused": torch.randn(2, 8, 2, 2, generator=g)}]
    monitors = collapse_monitors(two, two)
    assert set(monitors) == {"monitor/feature_std", "monitor/teacher_similarity"}
    assert all(torch.isfinite(v) for v in monitors.values())
