"""benchmarks/gpu_step.py on the CPU at tiny shapes: its report, its FLOP count, bf16 autocast."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_step.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_step"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


gpu_step = _load_script()

TINY = gpu_step.Shapes(preset="tiny", swin_image=64, swin_batch=2, vit_image=16, vit_batch=4, fusion_tokens=8,
                       fusion_batch=16, step_batch=2, step_hr=128, step_s2_frames=1, step_s1_frames=1, matmul_n=64)
RESULT_FIELDS = {"part", "implementation", "mode", "unit", "batch", "input_shape", "parameters", "flops_per_step",
                 "compile_s", "step_ms", "items_per_s", "tflops_per_s", "mfu", "peak_memory_gib", "error"}


def test_report_has_every_part_and_field(tmp_path: Path) -> None:
    options = gpu_step.Options(device="cpu", dtype="fp32", shapes=TINY, compile=False, warmup=0, repeats=1)
    report = json.loads(json.dumps(gpu_step.run_benchmark(options)))  # JSON-able as written
    assert report["device"] == "cpu" and report["dtype"] == "fp32" and report["autocast"] is False
    assert report["peak"]["tflops_per_s"] > 0 and report["peak"]["matmul_n"] == 64
    rows = report["results"]
    assert [(r["part"], r["implementation"], r["mode"]) for r in rows] == [
        ("swin_v2", "skysense", "eager"), ("swin_v2", "timm", "eager"),
        ("vit", "skysense", "eager"), ("vit", "timm", "eager"),
        ("fusion", "skysense", "eager"), ("fusion", "timm", "eager"),
        ("pretrain_step", "skysense", "eager"),
    ]
    for r in rows:
        assert set(r) == RESULT_FIELDS
        assert r["error"] is None, r
        assert r["flops_per_step"] > 0 and r["parameters"] > 0 and r["step_ms"] > 0
        assert r["items_per_s"] == pytest.approx(r["batch"] / (r["step_ms"] / 1e3))
        assert r["mfu"] == pytest.approx(r["tflops_per_s"] / report["peak"]["tflops_per_s"])
        assert r["peak_memory_gib"] is None and r["compile_s"] is None
    by_key = {(r["part"], r["implementation"]): r for r in rows}
    # Same architecture, same FLOPs and parameters: our ViT and fusion blocks against timm's.
    for part in ("vit", "fusion"):
        assert by_key[part, "skysense"]["flops_per_step"] == by_key[part, "timm"]["flops_per_step"]
        assert by_key[part, "skysense"]["parameters"] == by_key[part, "timm"]["parameters"]
    table = gpu_step.format_table(report)
    assert all(part in table for part in ("swin_v2", "vit", "fusion", "pretrain_step"))


def test_flops_follow_the_transformer_formula() -> None:
    """Fusion blocks, per sequence and block: forward 24 N d^2 (linears) + 4 N^2 d (attention).

    Backward: twice the linears; attention 2.5 times, as torch counts fused attention's backward
    (it recomputes the scores), so the CPU kernel's formula is checked too.
    """
    options = gpu_step.Options(device="cpu", dtype="fp32", shapes=TINY)
    config = gpu_step.preset_config("tiny").fusion
    n, d, b = TINY.fusion_tokens, config.embed_dim, TINY.fusion_batch
    expected = config.depth * b * (3 * 24 * n * d * d + 3.5 * 4 * n * n * d)
    for workload in gpu_step.encoder_workloads("fusion", options):
        assert gpu_step.count_flops(workload) == expected, workload.implementation


@pytest.mark.parametrize("part", ["swin_v2", "vit", "fusion"])
def test_bf16_autocast_matches_fp32(part: str) -> None:
    models, x = gpu_step.encoder_models(part, TINY, torch.device("cpu"))
    model = models["skysense"].eval()
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    error = ((low.float() - reference).norm() / reference.norm()).item()
    assert error > 0, "autocast changed nothing: the comparison proves nothing"
    # bf16 keeps 8 significant bits (relative rounding 2^-8 = 0.4%); allow 10 roundings' worth
    # over the whole network.
    assert error < 10 * 2**-8, f"{part}: bf16 output differs from fp32 by {error:.4f} (relative norm)"


def test_command_line_writes_json(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(gpu_step, "SMALL", TINY)
    path = tmp_path / "out" / "report.json"
    gpu_step.main(["--device", "cpu", "--small", "--no-compile", "--parts", "fusion", "--warmup", "0",
                   "--repeats", "1", "--activation-checkpointing", "--json", str(path)])
    report = json.loads(path.read_text())
    assert report["activation_checkpointing"] is True
    assert [(r["part"], r["implementation"]) for r in report["results"]] == [("fusion", "skysense"), ("fusion", "timm")]
    assert all(r["error"] is None for r in report["results"])
    with pytest.raises(SystemExit):
        gpu_step.main(["--device", "cpu", "--parts", "swin"])


def test_swin_head_padding_changes_nothing(monkeypatch) -> None:
    """The CUDA path pads SwinV2-H's 44-wide heads to 48; forced on the CPU it gives the same
    outputs and gradients."""
    from skysense.config import SwinV2Config
    from skysense.models import swin_v2

    config = SwinV2Config(embed_dim=44, depths=(2, 2), num_heads=(1, 2), window_size=4)
    torch.manual_seed(0)
    model = swin_v2.SwinTransformerV2(config)
    x = torch.randn(2, 3, 32, 32)
    results = {}
    for multiple in (1, 8):
        monkeypatch.setattr(swin_v2, "fused_head_multiple", lambda device, m=multiple: m)
        model.zero_grad()
        out = model(x)
        out.square().mean().backward()
        results[multiple] = (out.detach(), model.stages[0].blocks[1].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(results[8][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[8][1], results[1][1], rtol=1e-5, atol=1e-7)
