"""benchmarks/gelu_backward.py: our MLPs with and without the GELU backward kernel, and the choice
it hands gpu_step.py."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SRC = BENCHMARKS.parent / "src"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


gelu_backward = _load("gelu_backward")


def test_the_mlps_are_those_of_parts_a_and_b() -> None:
    rows = gelu_backward.mlp_shapes(gelu_backward.gpu_step.HUGE)
    # ViT-L/4: 256 frames of 257 tokens, 1024 wide, 24 blocks; SwinV2-H's four stages at 512 px, batch 8.
    assert rows[0] == {"part": "vit", "label": "ViT", "dim": 1024, "hidden": 4096, "tokens": 256 * 257, "blocks": 24}
    assert [(r["dim"], r["hidden"], r["tokens"], r["blocks"]) for r in rows[1:]] == [
        (352, 1408, 8 * 128 * 128, 2), (704, 2816, 8 * 64 * 64, 2), (1408, 5632, 8 * 32 * 32, 18),
        (2816, 11264, 8 * 16 * 16, 2)]


def _row(part: str, plain: float, kernel: float, blocks: int = 1, ran: bool = True, error: str | None = None) -> dict:
    return {"part": part, "plain_ms": plain, "kernel_ms": kernel, "blocks": blocks, "kernel_ran": ran, "error": error}


def test_the_kernel_is_chosen_only_where_it_ran_checked_out_and_won_by_the_margin(tmp_path: Path) -> None:
    rows = [_row("vit", 1.0, 0.9, 24), _row("swin_v2", 1.0, 0.99, 2), _row("swin_v2", 1.0, 0.97, 18)]
    report = {"parts": gelu_backward.part_totals(rows)}
    assert report["parts"]["vit"]["ratio"] == pytest.approx(1 / 0.9)
    assert report["parts"]["swin_v2"]["ratio"] == pytest.approx(20 / (2 * 0.99 + 18 * 0.97))  # 1.029: under 1.05
    # (d) sums every row: 44 / (21.6 + 1.98 + 17.46) = 1.072
    assert gelu_backward.chosen_parts(report) == ["vit", "fusion", "pretrain_step"]
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    result = subprocess.run([sys.executable, str(BENCHMARKS / "gelu_backward.py"), "--our-mlp-kernel-from", str(path)],
                            env={**os.environ, "PYTHONPATH": str(SRC)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "--our-mlp-kernel vit,fusion,pretrain_step"
    for bad in (_row("vit", 1.0, 0.5, 24, ran=False), _row("vit", 1.0, 0.5, 24, error="values differ")):
        totals = gelu_backward.part_totals([bad, *rows[1:]])
        assert totals["vit"]["ratio"] is None and not totals["pretrain_step"]["sound"]
        assert gelu_backward.chosen_parts({"parts": totals}) == []


@pytest.mark.slow
def test_a_cpu_run_under_the_interpreter_runs_the_kernel_and_checks_its_values(tmp_path: Path) -> None:
    out = tmp_path / "gelu_backward.json"
    env = {**os.environ, "PYTHONPATH": str(SRC), "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, str(BENCHMARKS / "gelu_backward.py"), "--device", "cpu", "--small",
                             "--warmup", "0", "--repeats", "1", "--no-compile", "--json", str(out)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert len(rows) == len(gelu_backward.mlp_shapes(gelu_backward.gpu_step.SMALL))
    for row in rows:
        assert row["kernel_ran"] and row["error"] is None and row["plain_ms"] > 0 and row["kernel_ms"] > 0
        # output, input gradient and the four parameters' gradients, fc1's bias among them
        assert set(row["differences"]) == {"out", "x", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
        assert max(row["differences"].values()) <= gelu_backward.TOLERANCE
    assert set(report["parts"]) == {"vit", "fusion", "swin_v2", "pretrain_step"}
    assert "chosen:" in result.stdout
