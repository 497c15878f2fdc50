"""``skysense export``: encoders to ONNX and ``torch.export`` with dynamic batch and spatial size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import skysense.models.swin_v2 as swin_v2
from skysense import SkySense
from skysense.inference.export import compare_onnx, export_encoders, export_friendly

onnx = pytest.importorskip("onnx", reason='ONNX export needs the export extra: pip install -e ".[export]"')
pytest.importorskip("onnxruntime", reason='ONNX export needs the export extra: pip install -e ".[export]"')
pytest.importorskip("onnxscript", reason='ONNX export needs the export extra: pip install -e ".[export]"')

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model() -> SkySense:
    torch.manual_seed(0)
    return SkySense.from_preset("tiny").eval()


@pytest.fixture(scope="module")
def sentinel_export(model: SkySense, tmp_path_factory: pytest.TempPathFactory):
    return export_encoders(model, tmp_path_factory.mktemp("export") / "sentinel.onnx", encoders=("s2", "s1"))


def _symbolic_dims(path: Path) -> dict[str, list]:
    graph = onnx.load(str(path)).graph
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}


@pytest.mark.slow
def test_vit_encoders_run_under_onnxruntime_at_other_sizes(model: SkySense, sentinel_export) -> None:
    dims = _symbolic_dims(sentinel_export.onnx)
    assert list(dims) == ["s2", "s1"]
    for name, shape in dims.items():
        assert shape[1] == model.config.inputs[name].bands.__len__()
        assert all(isinstance(d, str) for d in (shape[0], shape[2], shape[3])), shape
    meta = {p.key: p.value for p in onnx.load(str(sentinel_export.onnx)).metadata_props}
    assert json.loads(meta["skysense_config"])["preset"] == "tiny"
    g = torch.Generator().manual_seed(3)
    # Exported with batch 2, S2 64 x 48 and S1 48 x 64; checked at other batches and sizes,
    # 64 x 64 included (the ViT's stored position grid, which the eager code does not resize).
    for batch, s2_size, s1_size in ((1, (40, 56), (20, 16)), (3, (64, 64), (8, 12))):
        inputs = {"s2": torch.randn(batch, 10, *s2_size, generator=g), "s1": torch.randn(batch, 2, *s1_size, generator=g)}
        errors = compare_onnx(model, sentinel_export.onnx, inputs)
        assert max(errors.values()) <= TOLERANCE, errors


@pytest.mark.slow
def test_vit_program_runs_at_other_sizes_and_rejects_unsupported_ones(model: SkySense, sentinel_export) -> None:
    program = torch.export.load(str(sentinel_export.program)).module()
    g = torch.Generator().manual_seed(4)
    s2, s1 = torch.randn(1, 10, 36, 20, generator=g), torch.randn(5, 2, 4, 8, generator=g)
    with torch.no_grad():
        got = program(s2, s1)
        expected = (model.s2_encoder.forward_features(s2), model.s1_encoder.forward_features(s1))
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= TOLERANCE
    with pytest.raises(AssertionError, match=r"Guard failed: .*size\(\)\[2\] % 4 == 0"):  # a multiple of the patch
        program(torch.randn(1, 10, 30, 20), s1)


@pytest.mark.slow
def test_hr_swin_exports_with_dynamic_batch_and_sizes(model: SkySense, tmp_path: Path) -> None:
    result = export_encoders(model, tmp_path / "hr.onnx", encoders=("hr",))
    assert result.program.is_file() and result.output_names == ("hr_features",)
    g = torch.Generator().manual_seed(5)
    program = torch.export.load(str(result.program)).module()
    # Exported at batch 2, 512 x 768; checked at batch 1 and 3 and other multiples of 256.
    for shape in ((1, 3, 768, 512), (3, 3, 512, 1024)):
        x = torch.randn(shape, generator=g)
        errors = compare_onnx(model, result.onnx, {"hr": x})
        assert errors["hr_features"] <= TOLERANCE, errors
        with torch.no_grad():
            assert (program(x)[0] - model.hr_encoder.forward_features(x)).abs().max() <= TOLERANCE
    # 640: not a multiple of 256 (the stage-4 map in whole windows; torch prints it with or without parentheses)
    with pytest.raises(AssertionError, match=r"Guard failed: .*// 32\)? % 8 == 0"):
        program(torch.randn(1, 3, 640, 512))
    with pytest.raises(AssertionError, match=r"Guard failed: .*size\(\)\[2\] >= 512"):
        program(torch.randn(1, 3, 256, 256))


def test_export_context_leaves_the_eager_model_as_it_was(model: SkySense) -> None:
    cached, attention = swin_v2.shifted_window_mask, F.scaled_dot_product_attention
    x = torch.randn(1, 10, 64, 64)
    with torch.no_grad():
        before = model.s2_encoder.forward_features(x)
        with export_friendly(model):
            assert swin_v2.shifted_window_mask is cached.__wrapped__
            assert F.scaled_dot_product_attention is not attention
            during = model.s2_encoder.forward_features(x)
        after = model.s2_encoder.forward_features(x)
    assert swin_v2.shifted_window_mask is cached and F.scaled_dot_product_attention is attention
    assert "position_embedding" not in vars(model.s2_encoder)
    assert torch.equal(before, after)
    assert (during - before).abs().max() <= 1e-5  # explicit attention, resized 16 x 16 grid: same values


@pytest.mark.slow
def test_export_command_writes_both_files_and_checks_them(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from skysense.cli import main

    out = tmp_path / "s1.onnx"
    assert main(["export", "--format", "onnx", "--preset", "tiny", "--encoders", "s1", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert out.is_file() and out.with_suffix(".pt2").is_file()
    assert report["check"]["sizes"]["s1"] == [1, 2, 20, 16]
    assert report["check"]["max_abs_error"]["s1_features"] <= TOLERANCE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s1.onnx", "s1.pt2"]  # no scratch left behind
    assert np.isfinite(report["seconds"])
