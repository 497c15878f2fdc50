"""The full model: modality subsets, masking, validation and presets."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from skysense import SkySense, preset_config
from skysense.parameters import count_parameters
from skysense.validation import checked_on_host

from broadcast_matmuls import BroadcastMatmuls
from model_inputs import tiny_inputs

SUBSETS = [("hr",), ("s2",), ("s1",), ("s2", "s1"), ("hr", "s2", "s1"), ("hr", "s2"), ("hr", "s1")]


def _subset(inputs: dict[str, torch.Tensor], modalities: tuple[str, ...]) -> dict[str, torch.Tensor]:
    keep = {k: v for k, v in inputs.items() if k in ("lat", "lon") or k.split("_")[0] in modalities}
    return keep


@pytest.mark.parametrize("modalities", SUBSETS, ids=["+".join(s) for s in SUBSETS])
def test_every_modality_subset_runs(tiny_model: SkySense, modalities: tuple[str, ...]) -> None:
    inputs = _subset(tiny_inputs(), modalities)
    with torch.no_grad():
        out = tiny_model.forward_features(**inputs)
    dim = tiny_model.config.fusion.embed_dim
    assert out["fused"].shape == (2, dim, 4, 4)
    assert out["geo"].shape == (2, 2 * dim, 4, 4)
    assert torch.isfinite(out["geo"]).all()
    assert ("hr_pyramid" in out) == ("hr" in modalities)
    if "hr" in modalities:
        assert [p.shape[-1] for p in out["hr_pyramid"]] == [32, 16, 8, 4]


def test_tiny_is_small() -> None:
    counts = count_parameters(preset_config("tiny"))
    assert counts["total"] < 10_000_000


def test_huge_encoders_match_paper_sizes() -> None:
    counts = count_parameters(preset_config("huge"))
    for part, paper in (("hr_encoder", 654e6), ("s2_encoder", 302e6), ("s1_encoder", 302e6)):
        assert abs(counts[part] - paper) / paper < 0.01, (part, counts[part])
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")


def test_info_command_prints_json() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "skysense.cli", "info", "--preset", "huge", "--json"],
        capture_output=True, text=True, check=True,
    )
    parameters = json.loads(result.stdout)["parameters"]
    assert set(parameters) == {"hr_encoder", "s2_encoder", "s1_encoder", "projections", "fusion", "geo_context", "total"}
    assert abs(parameters["hr_encoder"] - 654e6) / 654e6 < 0.01


def test_invalid_frames_do_not_change_the_output(tiny_model: SkySense) -> None:
    """A padded (invalid) frame, even full of NaN, must not influence the result."""
    inputs = tiny_inputs(batch=1, frames=(2, 1))
    with torch.no_grad():
        reference = tiny_model(**inputs)
        padded = dict(inputs)
        padded["s2"] = torch.cat([inputs["s2"], torch.full_like(inputs["s2"][:, :1], float("nan"))], dim=1)
        padded["s2_dates"] = torch.cat([inputs["s2_dates"], torch.tensor([[100]])], dim=1)
        padded["s2_mask"] = torch.tensor([[True, True, False]])
        result = tiny_model(**padded)
    torch.testing.assert_close(result, reference, rtol=1e-5, atol=1e-5)


def test_batch_with_different_sequence_lengths(tiny_model: SkySense) -> None:
    """Each sample of a padded batch equals that sample run alone."""
    a = tiny_inputs(batch=1, frames=(3, 2))
    b = tiny_inputs(batch=1, frames=(1, 2))
    b = {k: v * 0.5 if v.is_floating_point() and k not in ("lat", "lon") else v for k, v in b.items()}
    pad = torch.zeros_like(a["s2"][:, :2])
    batch = dict(a)
    for key in ("hr", "s1", "s1_dates", "lat", "lon"):
        batch[key] = torch.cat([a[key], b[key]])
    batch["s2"] = torch.cat([a["s2"], torch.cat([b["s2"], pad], dim=1)])
    batch["s2_dates"] = torch.cat([a["s2_dates"], torch.cat([b["s2_dates"], torch.ones(1, 2, dtype=torch.long)], 1)])
    batch["s2_mask"] = torch.tensor([[True] * 3, [True, False, False]])
    with torch.no_grad():
        together = tiny_model(**batch)
        alone = torch.cat([tiny_model(**a), tiny_model(**b)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


def test_dates_change_the_output(tiny_model: SkySense) -> None:
    inputs = _subset(tiny_inputs(batch=1), ("s2",))
    with torch.no_grad():
        first = tiny_model(**inputs)
        inputs["s2_dates"] = (inputs["s2_dates"] % 300) + 30
        second = tiny_model(**inputs)
    assert not torch.allclose(first, second)


def test_hr_size_not_multiple_of_window_is_padded(tiny_model: SkySense) -> None:
    with torch.no_grad():
        out = tiny_model.forward_features(hr=torch.randn(1, 3, 100, 70))
    assert [p.shape[-2:] for p in out["hr_pyramid"]] == [(25, 18), (13, 9), (7, 5), (4, 3)]
    assert out["fused"].shape[-2:] == (4, 3)


BAD_INPUTS = [
    (lambda x: x.update(s2=x["s2"][:, :, :9]), "s2: band count: expected 10, got 9"),
    (lambda x: x.update(s1=x["s1"][0]), "s1: rank: expected 5 dims"),
    (lambda x: x.update(hr=x["hr"].to(torch.uint8)), "hr: dtype: expected a floating-point tensor"),
    (lambda x: x["s2"].__setitem__((0, 1, 3, 0, 0), float("nan")), "s2: values: expected finite numbers"),
    (lambda x: x["s1"].__setitem__((1, 0, 0, 0, 0), float("inf")), "s1: values: expected finite numbers"),
    (lambda x: x["s2_dates"].__setitem__((0, 0), 367), "s2_dates: day of year: expected values within 1..366"),
    (lambda x: x["s1_dates"].__setitem__((0, 0), 0), "s1_dates: day of year"),
    (lambda x: x.update(s2_dates=x["s2_dates"].float()), "s2_dates: dtype"),
    (lambda x: x.update(s2=torch.randn(2, 3, 10, 8, 8)), "modalities do not cover the same ground"),
    (lambda x: x.update(lat=torch.tensor([91.0, 0.0])), "lat: degrees"),
    (lambda x: x.update(s1=x["s1"][:1], s1_dates=x["s1_dates"][:1]), "s1: batch size: expected 2"),
    (lambda x: x.pop("s2_dates"), "s2_dates: required"),
]


@pytest.mark.parametrize("change, message", BAD_INPUTS)
def test_bad_input_is_named(tiny_model: SkySense, change, message: str) -> None:
    inputs = tiny_inputs()
    change(inputs)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        tiny_model(**inputs)


VALUE_ERRORS = [(change, message) for change, message in BAD_INPUTS if "values" in message or "day of year" in message
                or "degrees" in message]


@pytest.mark.parametrize("change, message", VALUE_ERRORS)
def test_value_checks_run_on_the_host_with_the_same_errors(tiny_model: SkySense, change, message: str) -> None:
    """The training loops check values on the host batch (no GPU sync) and switch the model's
    value checks off; the errors are the model's."""
    inputs = tiny_inputs()
    change(inputs)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        checked_on_host(inputs)
    tiny_model.check_values = False
    try:
        with torch.no_grad():
            tiny_model(**inputs)  # unchecked: the model no longer reads the values
    finally:
        tiny_model.check_values = True


def test_host_check_leaves_out_full_masks_only_and_the_output_is_unchanged(tiny_model: SkySense) -> None:
    inputs = tiny_inputs()
    inputs["s2_mask"] = torch.ones(inputs["s2"].shape[:2], dtype=torch.bool)
    inputs["s1_mask"] = torch.ones(inputs["s1"].shape[:2], dtype=torch.bool)
    inputs["s1_mask"][0, -1] = False
    checked = checked_on_host(inputs)
    assert "s2_mask" not in checked and torch.equal(checked["s1_mask"], inputs["s1_mask"])
    assert set(inputs) - set(checked) == {"s2_mask"}
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(**checked), tiny_model(**inputs), rtol=0, atol=0)


def test_host_check_covers_the_after_image_of_a_change_pair() -> None:
    inputs = tiny_inputs()
    inputs["hr_post"] = inputs["hr"].clone()
    checked_on_host(inputs)
    inputs["hr_post"][1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"hr_post: values: expected finite numbers, got NaN or inf, first at index \(1, 2, 3, 4\)"):
        checked_on_host(inputs)


def test_no_modality_is_an_error(tiny_model: SkySense) -> None:
    with pytest.raises(ValueError, match="at least one of hr, s2, s1"):
        tiny_model()


def test_tiny_forward_is_deterministic_and_trains() -> None:
    torch.manual_seed(3)
    model = SkySense.from_preset("tiny").train()
    inputs = tiny_inputs()
    out = model(**inputs)
    out.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name in ("hr_encoder.patch_embed.weight", "s2_encoder.patch_embed.proj.weight",
                 "s1_encoder.blocks.0.attn.qkv.weight", "fusion.day_of_year", "fusion.extra_token"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name


@pytest.mark.parametrize("requires_grad", [True, False], ids=["student", "frozen"])
def test_no_weight_is_copied_per_location(requires_grad: bool) -> None:
    """A frozen model (the EMA teacher: weights without gradients, under no_grad) projects the
    fusion inputs as one matrix product. F.linear on a strided 4-D input would broadcast the
    weight over a batched matmul instead, one copy per location and frame (8.9 GB in bf16 at
    huge, per-GPU batch 3, two views); a real CPU step of that size was killed in it."""
    torch.manual_seed(0)
    model = SkySense.from_preset("tiny").eval().requires_grad_(requires_grad)
    inputs = tiny_inputs()
    with torch.set_grad_enabled(requires_grad), BroadcastMatmuls() as seen:
        out = model.forward_features(**inputs)
    assert seen.broadcast == []
    assert torch.isfinite(out["fused"]).all()
