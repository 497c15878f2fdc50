"""benchmarks/bias_kernels.py: our MLPs and attention layers with and without the kernels that sum
their bias gradients, and the choice it hands gpu_step.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark_scripts import BENCHMARKS, SRC, load_benchmark

bias_kernels = load_benchmark("bias_kernels")


def test_the_rows_are_the_layers_of_parts_a_to_c() -> None:
    rows = bias_kernels.row_shapes(bias_kernels.gpu_step.HUGE)
    shapes = [(r["kind"], r["part"], r["dim"], r.get("hidden", r.get("heads")), r["sequences"] * r["tokens"], r["blocks"])
              for r in rows]
    # ViT-L/4: 256 frames of 257 tokens, 1024 wide, 16 heads, 24 blocks; SwinV2-H's four stages at
    # 512 px, batch 8; the fusion: 2048 sequences of 32 tokens, 16 heads, 24 blocks.
    assert shapes == [("mlp", "vit", 1024, 4096, 256 * 257, 24),
                      ("qkv", "vit", 1024, 16, 256 * 257, 24), ("qkv", "fusion", 1024, 16, 2048 * 32, 24),
                      ("norm", "vit", 1024, 4096, 256 * 257, 24),
                      ("mlp", "swin_v2", 352, 1408, 8 * 128 * 128, 2), ("mlp", "swin_v2", 704, 2816, 8 * 64 * 64, 2),
                      ("mlp", "swin_v2", 1408, 5632, 8 * 32 * 32, 18), ("mlp", "swin_v2", 2816, 11264, 8 * 16 * 16, 2)]


def _row(kind: str, part: str, plain: float, kernel: float, blocks: int = 1, ran: bool = True,
         error: str | None = None) -> dict:
    return {"kind": kind, "part": part, "plain_ms": plain, "kernel_ms": kernel, "blocks": blocks, "kernel_ran": ran,
            "error": error}


def test_a_kernel_is_chosen_only_where_it_ran_checked_out_and_won_by_the_margin(tmp_path: Path) -> None:
    rows = [_row("mlp", "vit", 1.0, 0.9, 24), _row("mlp", "swin_v2", 1.0, 0.99, 2), _row("mlp", "swin_v2", 1.0, 0.97, 18),
            _row("qkv", "vit", 1.0, 0.97, 24), _row("qkv", "fusion", 1.0, 0.8, 24),
            _row("norm", "vit", 1.0, 0.975, 24)]
    report = {"parts": bias_kernels.part_totals(rows)}
    assert report["parts"]["mlp"]["vit"]["ratio"] == pytest.approx(1 / 0.9)
    assert report["parts"]["mlp"]["swin_v2"]["ratio"] == pytest.approx(20 / (2 * 0.99 + 18 * 0.97))  # 1.029
    # (d) sums its rows: MLPs 44 / (21.6 + 1.98 + 17.46) = 1.072; attention 48 / (23.28 + 19.2) = 1.130
    assert bias_kernels.chosen_parts(report, "mlp") == ["vit", "fusion", "pretrain_step"]  # the fusion's MLPs: ViT's row
    assert bias_kernels.chosen_parts(report, "qkv") == ["fusion", "pretrain_step"]
    # a whole block's 1.026 passes the blocks' margin (1.02), not the layers' (1.05); 1.010 does not
    assert bias_kernels.chosen_parts(report, "norm") == ["vit", "fusion", "pretrain_step"]
    slower = {"parts": bias_kernels.part_totals([_row("norm", "vit", 1.0, 0.99, 24)])}
    assert bias_kernels.chosen_parts(slower, "norm") == []
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    result = subprocess.run([sys.executable, str(BENCHMARKS / "bias_kernels.py"), "--choice-from", str(path)],
                            env={**os.environ, "PYTHONPATH": str(SRC)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["--our-mlp-kernel", "vit,fusion,pretrain_step", "--our-qkv-kernel",
                                     "fusion,pretrain_step", "--our-norm-kernel", "vit,fusion,pretrain_step"]
    for bad in (_row("mlp", "vit", 1.0, 0.5, 24, ran=False), _row("mlp", "vit", 1.0, 0.5, 24, error="values differ")):
        totals = bias_kernels.part_totals([bad, *rows[1:3]])
        assert totals["mlp"]["vit"]["ratio"] is None and not totals["mlp"]["pretrain_step"]["sound"]
        assert bias_kernels.chosen_parts({"parts": totals}, "mlp") == []


@pytest.mark.slow
def test_a_cpu_run_under_the_interpreter_runs_both_kernels_and_checks_their_values(tmp_path: Path) -> None:
    out = tmp_path / "bias_kernels.json"
    env = {**os.environ, "PYTHONPATH": str(SRC), "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, str(BENCHMARKS / "bias_kernels.py"), "--device", "cpu", "--small",
                             "--warmup", "0", "--repeats", "1", "--no-compile", "--json", str(out)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert len(rows) == len(bias_kernels.row_shapes(bias_kernels.gpu_step.SMALL))
    for row in rows:
        assert row["kernel_ran"] and row["error"] is None and row["plain_ms"] > 0 and row["kernel_ms"] > 0, row
        # the output, the input gradient and every parameter's gradient, the biases among them
        mlp = {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
        attention = {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
        norms = {f"norm{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
        layer = {"mlp": mlp, "qkv": attention,
                 "norm": norms | {f"mlp.{n}" for n in mlp} | {f"attn.{n}" for n in attention}}[row["kind"]]
        assert set(row["differences"]) == {"out", "x"} | layer
        assert max(row["differences"].values()) <= bias_kernels.TOLERANCE
    assert set(report["parts"]["mlp"]) == {"vit", "fusion", "swin_v2", "pretrain_step"}
    assert set(report["parts"]["qkv"]) == {"vit", "fusion", "pretrain_step"}
    assert set(report["parts"]["norm"]) == {"vit", "fusion", "pretrain_step"}
    assert "chosen:" in result.stdout
