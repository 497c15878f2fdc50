"""Host-device synchronisations of the pretraining step, counted on the CPU
(benchmarks/host_syncs.py): on a GPU each one idles the GPU until Python queues more work."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import host_syncs  # noqa: E402

from skysense.config import GeoContextConfig  # noqa: E402
from skysense.models.geo_context import GeoContextPrototypes  # noqa: E402
from skysense.sinkhorn import sinkhorn_knopp  # noqa: E402


def test_the_counter_sees_every_kind_of_read_back() -> None:
    x = torch.arange(6.0)
    with host_syncs.HostSyncCounter() as counter:
        x.sum().item()
        bool((x > 2).any())
        x[x > 2]
        torch.nonzero(x)
        torch.unique(x)
        x * 2  # no read-back
    names = sorted(name for name, _ in counter.counts.elements())
    assert names == sorted(["aten._local_scalar_dense.default"] * 2 + ["aten.index.Tensor (bool mask)",
                            "aten.nonzero.default", "aten._unique2.default"]), names
    assert all("test_host_syncs.py" not in where for _, where in counter.counts)  # only our package's lines


def test_pretraining_step_reads_back_only_sinkhorn_convergence_tests() -> None:
    """Input validation, frame masks, the fusion's key mask, the geo prototypes' per-region
    loops and Sinkhorn's sum check read back 187 values per step at these shapes before, and
    the list of present regions 3 more (two assignments, one EMA update); what is left:
    Sinkhorn-Knopp's convergence test every 10th round, and nothing with a fixed number of
    rounds."""
    torch.manual_seed(0)
    counter = host_syncs.pretraining_step_syncs(batch=2)
    by_line = {where.split(":")[0] + ":" + where.split(": ", 1)[1]: n for (_, where), n in counter.counts.items()}
    assert {where.split(":")[0] for where in by_line} == {"sinkhorn.py"}, counter.counts
    # Sinkhorn-Knopp runs at most 20 rounds here (the tiny objective): at most 2 tests per call.
    assert 0 < counter.total <= 2 * 10, counter.counts
    torch.manual_seed(0)
    counter = host_syncs.pretraining_step_syncs(batch=2, sinkhorn_rounds=3)
    assert counter.total == 0, counter.counts


def test_sync_free_assignment_and_update_equal_the_read_back_ones() -> None:
    """A bound on the regions present and a fixed number of Sinkhorn-Knopp rounds read nothing
    back, and give the plan and prototype update of the default path (when both run as many
    rounds); regions the bound adds but no feature holds stay as they were."""
    torch.manual_seed(3)
    geo = GeoContextPrototypes(GeoContextConfig(lat_bands=2, lon_bins=4, num_prototypes=4), dim=16)
    features = torch.randn(40, 16)
    regions = torch.tensor([5] * 24 + [1] * 16)
    rounds = 37
    plan = geo.assign(features, regions, iterations=rounds, tolerance=1e-12)  # never met: all rounds
    with host_syncs.HostSyncCounter() as counter:
        free = geo.assign(features, regions, bound=6, iterations=rounds, tolerance=None)
    torch.testing.assert_close(free, plan, rtol=1e-5, atol=1e-6)
    before = geo.prototypes.clone()
    geo.ema_update(features, regions, plan, momentum=0.9)
    expected, geo.prototypes = geo.prototypes, before.clone()
    with counter:
        geo.ema_update(features, regions, free, momentum=0.9, bound=6)
    assert counter.total == 0, counter.counts
    torch.testing.assert_close(geo.prototypes, expected, rtol=1e-5, atol=1e-6)
    unchanged = [r for r in range(8) if r not in (1, 5)]
    assert torch.equal(geo.prototypes[unchanged], before[unchanged])


def test_sinkhorn_tests_convergence_every_check_every_rounds() -> None:
    torch.manual_seed(0)
    scores = torch.randn(64, 8)
    counts = {}
    for every in (1, 10):
        with host_syncs.HostSyncCounter() as counter:
            q = sinkhorn_knopp(scores, epsilon=0.1, iterations=200, tolerance=1e-4, check_every=every)
        counts[every] = counter.total
        torch.testing.assert_close(q.sum(1), torch.ones(64))
        assert (q.sum(0) - 8.0).abs().max() < 1e-4  # converged within the tolerance either way
    assert counts[1] >= 5 * counts[10] > 0, counts
    with pytest.raises(ValueError, match="check_every must be at least 1, got 0"):
        sinkhorn_knopp(scores, check_every=0)


def test_sinkhorn_scaling_domain_stops_early_with_a_problem_that_has_no_rows() -> None:
    g = torch.Generator().manual_seed(0)
    scores = F.normalize(torch.randn(30, 16, generator=g), dim=-1) @ F.normalize(torch.randn(4, 16, generator=g), dim=-1).T
    groups = torch.arange(30) % 3  # problem 3 of 4 has no rows
    with host_syncs.HostSyncCounter() as counter:
        plan = sinkhorn_knopp(scores, 0.05, 1000, groups=groups, num_groups=4, score_bound=1.0)
    assert not plan.isnan().any() and counter.total < 20, counter.total  # stopped before 200 rounds, not 1000
    torch.testing.assert_close(plan, sinkhorn_knopp(scores, 0.05, 1000, groups=groups, num_groups=4),
                               rtol=1e-3, atol=1e-4)


def test_fine_tuning_reads_nothing_back_once_values_are_checked_on_the_host() -> None:
    """The encoder's value checks (NaN/inf, days of year, lat/lon) and the loss's test for a
    batch with nothing labelled read back 13 values per step before; the loop now checks
    values on the host batch and the loss needs no test."""
    torch.manual_seed(0)
    assert host_syncs.finetuning_step_syncs(host_checks=True).total == 0
    assert host_syncs.finetuning_step_syncs(host_checks=False).total > 0  # the counter sees the model's checks
