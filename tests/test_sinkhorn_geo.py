"""Sinkhorn-Knopp balance, region grid, prototype attention and EMA updates."""

from __future__ import annotations

import math

import pytest
import torch

from skysense import sinkhorn_knopp
from skysense.config import GeoContextConfig
from skysense.models.geo_context import GeoContextPrototypes, region_index


@pytest.mark.parametrize("n, k", [(64, 8), (37, 5), (200, 100)])
def test_sinkhorn_marginals_match_targets(n: int, k: int) -> None:
    g = torch.Generator().manual_seed(n)
    features = torch.nn.functional.normalize(torch.randn(n, 16, generator=g), dim=1)
    prototypes = torch.nn.functional.normalize(torch.randn(k, 16, generator=g), dim=1)
    q = sinkhorn_knopp(features @ prototypes.T, epsilon=0.05, iterations=1000)
    assert torch.allclose(q.sum(1), torch.ones(n), atol=1e-3)
    assert torch.allclose(q.sum(0), torch.full((k,), n / k), atol=1e-3)


def test_sinkhorn_custom_marginals() -> None:
    scores = torch.randn(30, 4, generator=torch.Generator().manual_seed(0))
    rows = torch.linspace(0.5, 1.5, 30)
    cols = torch.tensor([0.1, 0.2, 0.3, 0.4]) * rows.sum()
    q = sinkhorn_knopp(scores, iterations=1000, row_sums=rows, col_sums=cols)
    assert torch.allclose(q.sum(1), rows, atol=1e-3)
    assert torch.allclose(q.sum(0), cols, atol=1e-3)


def test_sinkhorn_rejects_unequal_totals() -> None:
    with pytest.raises(ValueError, match="must be equal"):
        sinkhorn_knopp(torch.zeros(4, 2), row_sums=torch.ones(4), col_sums=torch.ones(2))


def test_sinkhorn_follows_the_scores() -> None:
    """With a clear preference and balanced sizes, each sample goes to its preferred cluster."""
    scores = torch.eye(4).repeat(5, 1)  # 20 samples, 5 preferring each of 4 clusters
    q = sinkhorn_knopp(scores, epsilon=0.05)
    assert torch.equal(q.argmax(1), torch.arange(4).repeat(5))


def test_region_grid_is_equal_area_and_covers_the_globe() -> None:
    lat = torch.linspace(-90, 90, 2001)
    lon = torch.zeros_like(lat)
    bands = region_index(lat, lon, lat_bands=64, lon_bins=64) // 64
    assert bands.min() == 0 and bands.max() == 63
    # Equal area: uniform points on the sphere (uniform in sin(lat)) fill bands evenly.
    sin_lat = torch.linspace(-1, 1, 64001)[:-1] + 1 / 64000
    lat_uniform = torch.rad2deg(torch.asin(sin_lat))
    counts = torch.bincount(region_index(lat_uniform, torch.zeros_like(lat_uniform), 64, 64) // 64, minlength=64)
    assert counts.min() >= 990 and counts.max() <= 1010
    corners = region_index(torch.tensor([-90.0, 90.0, 0.0]), torch.tensor([-180.0, 180.0, 0.0]), 64, 64)
    assert corners.tolist() == [0, 64 * 64 - 1, 32 * 64 + 32]


def test_geo_context_attends_to_its_region_only() -> None:
    torch.manual_seed(0)
    geo = GeoContextPrototypes(GeoContextConfig(lat_bands=4, lon_bins=4, num_prototypes=3), dim=8)
    features = torch.randn(1, 8, 2, 2)
    lat, lon = torch.tensor([10.0]), torch.tensor([20.0])
    out = geo(features, lat, lon)
    assert out.shape == (1, 16, 2, 2)
    assert torch.equal(out[:, :8], features)
    region = int(geo.regions(lat, lon))
    protos = geo.prototypes[region]
    query = features[0, :, 0, 0]
    expected = torch.softmax(protos @ query / math.sqrt(8), 0) @ protos
    torch.testing.assert_close(out[0, 8:, 0, 0], expected)
    other = geo.prototypes.clone()
    other[region] = 0
    geo.prototypes.copy_(other)
    assert torch.equal(geo(features, lat, lon)[:, 8:], torch.zeros(1, 8, 2, 2))


def test_assignment_is_balanced_per_region() -> None:
    torch.manual_seed(1)
    geo = GeoContextPrototypes(GeoContextConfig(lat_bands=2, lon_bins=2, num_prototypes=4), dim=16)
    features = torch.randn(40, 16)
    regions = torch.tensor([0] * 24 + [3] * 16)
    s = geo.assign(features, regions)
    assert torch.allclose(s.sum(1), torch.ones(40), atol=1e-3)
    assert torch.allclose(s[:24].sum(0), torch.full((4,), 6.0), atol=1e-3)
    assert torch.allclose(s[24:].sum(0), torch.full((4,), 4.0), atol=1e-3)


def test_ema_update_is_exact() -> None:
    torch.manual_seed(2)
    geo = GeoContextPrototypes(GeoContextConfig(lat_bands=2, lon_bins=2, num_prototypes=3), dim=4)
    before = geo.prototypes.clone()
    features = torch.randn(5, 4)
    regions = torch.tensor([1, 1, 1, 2, 2])
    s = torch.rand(5, 3)
    s[:, 2] = 0  # prototype 2 gets no mass and must stay unchanged
    geo.ema_update(features, regions, s, momentum=0.9)
    for r, rows in ((1, slice(0, 3)), (2, slice(3, 5))):
        target = (s[rows].T @ features[rows]) / s[rows].sum(0)[:, None]
        expected = 0.9 * before[r, :2] + 0.1 * target[:2]
        torch.testing.assert_close(geo.prototypes[r, :2], expected)
        assert torch.equal(geo.prototypes[r, 2], before[r, 2])
    assert torch.equal(geo.prototypes[0], before[0])
    assert torch.equal(geo.prototypes[3], before[3])


@pytest.mark.parametrize("bound", [2, 3, 16])
def test_present_regions_within_a_bound_match_the_read_back_ones(bound: int) -> None:
    geo = GeoContextPrototypes(GeoContextConfig(lat_bands=2, lon_bins=8, num_prototypes=3), dim=4)
    regions = torch.tensor([9, 2, 9, 9, 2, 2, 9])
    present, group = geo.present_regions(regions)
    bounded, bounded_group = geo.present_regions(regions, bound=bound)
    assert present.tolist() == [2, 9]
    assert len(bounded) == min(bound, 16) and len(set(bounded.tolist())) == len(bounded)  # no region twice
    assert bounded[:2].tolist() == [2, 9] and torch.equal(bounded_group, group)  # the same groups first
    assert torch.equal(bounded[bounded_group], regions)
    with pytest.raises(RuntimeError, match="more regions hold features than the bound 1"):
        geo.present_regions(regions, bound=1)


def _cosines(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(*shape[:-1], 16, generator=g), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(*shape[:-2], shape[-1], 16, generator=g), dim=-1)
    return a @ b.transpose(-2, -1)


@pytest.mark.parametrize("epsilon", [0.05, 0.1])
@pytest.mark.parametrize("problem", ["dense", "batched", "grouped", "marginals"])
def test_sinkhorn_scaling_domain_gives_the_log_domain_plan(problem: str, epsilon: float) -> None:
    """With scores bounded by the caller the rounds run on diag(u) K diag(v): the same iterates,
    round for round (fixed rounds here, no early stop), as the log domain."""
    kwargs: dict = {}
    scores = _cosines(6, 64, 8) if problem == "batched" else _cosines(64, 8)
    if problem == "grouped":
        kwargs = {"groups": torch.arange(64) % 3, "num_groups": 3}
    if problem == "marginals":
        rows = torch.linspace(0.5, 1.5, 64)
        kwargs = {"row_sums": rows, "col_sums": torch.tensor([1, 2, 3, 4, 4, 3, 2, 1.0]) / 20 * rows.sum()}
    for rounds in (1, 7, 60):
        log_plan = sinkhorn_knopp(scores, epsilon, rounds, tolerance=0.0, **kwargs)
        scaled = sinkhorn_knopp(scores, epsilon, rounds, tolerance=0.0, score_bound=1.0, **kwargs)
        torch.testing.assert_close(scaled, log_plan, rtol=1e-4, atol=1e-6)
    assert (scaled.sum(-1) - (kwargs.get("row_sums", 1.0))).abs().max() < 1e-5


@pytest.mark.parametrize("problem", ["dense", "batched", "grouped"])
def test_sinkhorn_runs_in_float32_under_autocast(problem: str) -> None:
    """Mixed-precision training calls it under bf16 autocast, which would run the scaling
    domain's products in bf16 (rows then summed to 1 only within about 1%)."""
    scores = _cosines(6, 64, 8) if problem == "batched" else _cosines(64, 8)
    kwargs = {"groups": torch.arange(64) % 3, "num_groups": 3} if problem == "grouped" else {}
    for bound in (None, 1.0):
        plan = sinkhorn_knopp(scores, 0.05, 200, score_bound=bound, **kwargs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = sinkhorn_knopp(scores, 0.05, 200, score_bound=bound, **kwargs)
        assert mixed.dtype == torch.float32
        assert torch.equal(mixed, plan), f"score_bound={bound}: {(mixed - plan).abs().max():.2e} from float32"


def test_sinkhorn_scaling_domain_is_used_only_within_its_range() -> None:
    scores = _cosines(64, 8)
    # 2 * 1 / 0.01 = 200 > SCALING_RANGE: the log domain, bit for bit.
    assert torch.equal(sinkhorn_knopp(scores, 0.01, 50, score_bound=1.0), sinkhorn_knopp(scores, 0.01, 50))
    with_bound = sinkhorn_knopp(scores, 0.05, 50, tolerance=0.0, score_bound=1.0)
    assert not torch.equal(with_bound, sinkhorn_knopp(scores, 0.05, 50, tolerance=0.0))  # another computation...
    torch.testing.assert_close(with_bound, sinkhorn_knopp(scores, 0.05, 50, tolerance=0.0))  # ...same plan


def test_sinkhorn_batched_equals_one_problem_at_a_time():
    torch.manual_seed(0)
    scores = torch.randn(5, 40, 4)
    batched = sinkhorn_knopp(scores, epsilon=0.1, iterations=2000, tolerance=1e-6)
    assert batched.shape == (5, 40, 4)
    for b in range(5):
        single = sinkhorn_knopp(scores[b], epsilon=0.1, iterations=2000, tolerance=1e-6)
        torch.testing.assert_close(batched[b], single, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(batched[b].sum(0), torch.full((4,), 10.0), atol=1e-4, rtol=0)
