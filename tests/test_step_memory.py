"""benchmarks/step_memory.py: the pretraining step's peak memory on fake tensors."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_step  # noqa: E402
import live_memory  # noqa: E402
import step_memory  # noqa: E402

from skysense.models.swin_v2 import shifted_window_mask  # noqa: E402
from skysense.pretrain.model import parameter_groups  # noqa: E402


@functools.lru_cache(maxsize=None)
def _estimate(batch: int, checkpointing: str = "off", world: int = 1) -> step_memory.StepMemory:
    """Each estimate once per session (several seconds each at tiny shapes)."""
    return step_memory.estimate(batch, checkpointing, gpu_step.SMALL, world)


def test_live_bytes_counts_storages_once_and_frees_them() -> None:
    with live_memory.LiveBytes(nonzero_rows=3) as live:
        a = torch.ones(1000)  # 4000 bytes
        view = a[10:20]  # same storage: nothing more
        b = a * 2  # 4000 more
        assert (live.live, live.peak) == (8000, 8000)
        del a
        assert live.live == 8000  # the view keeps the storage
        del view, b
        assert live.live == 0 and live.peak == 8000
        c = torch.ones(10, 10)
        assert torch.nonzero(c).shape == (3, 2)  # the stand-in for a value read back
        assert (c.sum() > 0).item() is False


@pytest.mark.slow
def test_tiny_step_state_is_weights_gradients_and_adamw_moments() -> None:
    row = _estimate(2)
    with torch.device("meta"):
        model = gpu_step.PretrainStep(gpu_step.pretrain_config(gpu_step.SMALL, 2), gpu_step.Options(device="cpu"))
    trained = [p for group in parameter_groups(model.pretraining, 0.0) for p in group["params"]]
    every = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    views = gpu_step.pretrain_views(gpu_step.SMALL, 2, torch.device("cpu"), torch.Generator().manual_seed(0))
    inputs = sum(t.numel() * t.element_size() for view in views for key, t in view.items()
                 if not key.endswith("_mask"))  # all-valid masks are left out on the host
    # Gradient + two moments per trained value (fp32), and fused AdamW's step count per tensor.
    expected = every + 3 * sum(p.numel() * 4 for p in trained) + 4 * len(trained) + inputs
    # Within 1%: SwinV2's cached shift masks are alive too, and a parameter the step leaves
    # without a gradient has no moments.
    assert abs(row.state_gib * step_memory.GIB / expected - 1) < 0.01, (row.state_gib * step_memory.GIB, expected)
    assert row.peak_gib > row.state_gib
    # No fake mask stays cached for a later real run (the tiny HR map is 32 x 32 at stage 1).
    assert type(shifted_window_mask(32, 32, 8, 4, torch.device("cpu"))) is torch.Tensor


@pytest.mark.slow
def test_checkpointing_and_batch_move_the_peak_the_expected_way() -> None:
    off2, all2, selective2 = _estimate(2), _estimate(2, "all"), _estimate(2, "selective")
    selective_fusion2 = _estimate(2, "selective-fusion")  # the encoders recomputed, the fusion selective
    off4 = _estimate(4)
    # At these small shapes "all" and "selective-fusion" peak alike (0.103 GiB over a 0.094 state):
    # the encoders' activations do not set it (huge at batch 3: 39.5, 62.1, 70.5, 90.7 GiB).
    assert all2.peak_gib <= selective_fusion2.peak_gib < selective2.peak_gib < off2.peak_gib < off4.peak_gib
    assert all2.state_gib == off2.state_gib == selective2.state_gib == selective_fusion2.state_gib


def test_resizing_a_storage_in_place_is_counted() -> None:
    """FSDP2 frees gathered parameters with ``untyped_storage().resize_(0)``, which is no operator."""
    live = live_memory.LiveBytes(nonzero_rows=1)
    with live, step_memory.resizes_reported_to(live):
        gathered = torch.ones(256)
        assert live.live == 1024
        gathered.untyped_storage().resize_(0)
        assert live.live == 0
        gathered.untyped_storage().resize_(2048)
        assert (live.live, live.peak) == (2048, 2048)


@pytest.mark.slow
def test_fsdp_shards_the_state_over_the_devices() -> None:
    one, four = _estimate(2), _estimate(2, world=4)
    # Weights, gradients and moments shard 4 ways; buffers (the geo prototypes) do not.
    assert four.state_gib < one.state_gib / 2
    assert four.peak_gib < one.peak_gib
    assert four.world == 4
    # Selective checkpointing under FSDP2's bf16 gathers, as on CUDA: on torch 2.14 the composable
    # checkpoint replayed FSDP2's input cast and the backward pass failed (RESULTS.md, session 20).
    selective = _estimate(2, "selective", world=4)
    assert selective.state_gib == four.state_gib and selective.peak_gib < four.peak_gib


def test_fake_tensors_are_counted_as_the_real_step_would_be() -> None:
    """The same tiny step run for real on the CPU (real values: Sinkhorn stops early, regions
    are the real ones) and counted the same way gives the same state and nearly the same peak."""
    fake, real = _estimate(2), step_memory.estimate(2, "off", gpu_step.SMALL, fake=False)
    assert abs(real.state_gib / fake.state_gib - 1) < 0.01, (real, fake)
    assert abs(real.peak_gib / fake.peak_gib - 1) < 0.01, (real, fake)


def test_live_sites_name_where_the_bytes_alive_at_a_failure_were_made() -> None:
    """At an out-of-memory error, the bytes alive are listed by origin: the model state, the
    operator and our line that made each large storage, the autograd node in the backward."""
    weight = torch.randn(256, 256, requires_grad=True)
    sites = live_memory.LiveSites(min_bytes=2**18)
    sites.track_state([weight])
    kept = []
    with sites:
        x = torch.randn(1024, 256)  # 1 MiB
        kept.append(torch.relu(x @ weight))  # 1 MiB, saved for the backward
        (kept[0] * 2).sum().backward()  # the gradient: 256 KiB, made in the backward
        small = torch.ones(8)  # under min_bytes
    rows = {row["origin"]: row for row in sites.by_origin()}
    assert rows["model state"]["gib"] == weight.numel() * 4 / 2**30
    made_here = [origin for origin in rows if origin.startswith(("relu at test_step_memory.py:", "randn at test_"))]
    assert len(made_here) == 2 and all("(test_live_sites_name_where" in origin for origin in made_here), sorted(rows)
    assert any(origin.startswith("mm in MmBackward0") for origin in rows), sorted(rows)
    assert rows["storages under 0 MiB"]["storages"] >= 1 and small.numel() == 8
    assert sum(row["gib"] for row in rows.values()) * 2**30 == sites.live


def test_stacks_capped_cuts_every_stack_and_restores_the_preset() -> None:
    from skysense.config import preset_config

    before = preset_config("huge")
    with step_memory.stacks_capped("huge", 2):
        capped = preset_config("huge")
    assert capped.hr.depths == (2, 2, 2, 2) and capped.s2.depth == capped.s1.depth == capped.fusion.depth == 2
    assert capped.hr.embed_dim == before.hr.embed_dim and capped.fusion.embed_dim == before.fusion.embed_dim
    assert preset_config("huge") == before
    with step_memory.stacks_capped("huge", None):
        assert preset_config("huge") == before


@pytest.mark.slow
def test_step_operators_are_counted_by_name_and_by_our_line() -> None:
    import step_operators

    counter = step_operators.count(2, "all", 3, gpu_step.SMALL)
    assert counter.by_name["addmm"] > 0 and "device" not in counter.by_name
    assert sum(counter.by_line.values()) == sum(counter.by_name.values())
    assert any(line.startswith("models/layers.py:") for _, line in counter.by_line)
    # The EMA teacher's update is multi-tensor: one lerp, no per-tensor detach.
    assert not any(line.startswith("pretrain/teacher.py:") and name == "detach" for name, line in counter.by_line)
