"""benchmarks/swin_attention.py: SwinV2-H's window-attention layers, SDPA against the short kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark_scripts import BENCHMARKS, SRC, load_benchmark

swin_attention = load_benchmark("swin_attention")


def test_the_layers_of_swinv2_h_add_up_to_its_24_blocks() -> None:
    rows = swin_attention.layer_shapes(swin_attention.gpu_step.HUGE)
    assert sum(r["blocks"] for r in rows) == 24
    # 512 px, patch 4: maps of 128, 64, 32 and 16 tokens a side, all wider than the 8-token window,
    # so every stage alternates plain and shifted blocks; stage 3 has 9 of each.
    assert [(r["stage"], r["shifted"], r["blocks"]) for r in rows] == [
        (0, False, 1), (0, True, 1), (1, False, 1), (1, True, 1), (2, False, 9), (2, True, 9), (3, False, 1), (3, True, 1)]
    assert [(r["dim"], r["heads"], r["side"]) for r in rows[::2]] == [(352, 8, 128), (704, 16, 64), (1408, 32, 32),
                                                                     (2816, 64, 16)]


def _run(tmp_path: Path, *extra: str, interpret: bool = False) -> dict:
    out = tmp_path / "swin_attention.json"
    env = {**os.environ, "PYTHONPATH": str(SRC), "TRITON_INTERPRET": "1" if interpret else "0"}
    result = subprocess.run([sys.executable, str(BENCHMARKS / "swin_attention.py"), "--device", "cpu", "--small",
                             "--warmup", "0", "--repeats", "1", "--no-compile", "--json", str(out), *extra],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "one step's window attention" in result.stdout
    return json.loads(out.read_text())


def test_cpu_run_times_both_settings_and_says_the_kernel_did_not_run(tmp_path: Path) -> None:
    report = _run(tmp_path)
    rows = report["rows"]
    kinds = swin_attention.layer_shapes(swin_attention.gpu_step.SMALL)
    assert len(rows) == 2 * len(kinds) and {r["setting"] for r in rows} == {"sdpa", "short"}
    assert all(r["ms"] > 0 for r in rows)
    for setting in ("sdpa", "short"):
        total = sum(r["ms"] * r["blocks"] for r in rows if r["setting"] == setting)
        assert abs(report["step_ms"][setting] - total) < 1e-6
    assert report["ratio_sdpa_over_short"] == report["step_ms"]["sdpa"] / report["step_ms"]["short"]
    assert report["short_ran_everywhere"] is False  # on the CPU SDPA runs for "short"


@pytest.mark.slow
def test_under_the_interpreter_the_kernel_takes_every_layer(tmp_path: Path) -> None:
    report = _run(tmp_path, interpret=True)
    assert report["short_ran_everywhere"] is True
