"""benchmarks/attention_backends.py on the CPU at tiny shapes: the calls it records and times."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmark_scripts import load_benchmark

attention_backends = load_benchmark("attention_backends")


def test_records_the_calls_of_each_part_with_swin_heads_padded_as_on_cuda() -> None:
    shapes = attention_backends.gpu_step.SMALL
    swin = attention_backends.part_calls("swin_v2", shapes)
    # Tiny SwinV2 at 64 px: 16x16, 8x8, 4x4 and 2x2 maps, window 8, two blocks per stage.
    assert sum(swin.values()) == 8
    assert all(call.mask is not None and call.mask_grad and call.scale == 1.0 for call in swin)
    assert all(call.query[-1] % 8 == 0 for call in swin)
    fusion = attention_backends.part_calls("fusion", shapes)
    assert [(call.query, call.mask) for call in fusion] == [((shapes.fusion_batch, 4, shapes.fusion_tokens, 32), None)]
    step = attention_backends.part_calls("pretrain_step", shapes)
    # The student's forward on both views: SwinV2's 8 blocks, both ViTs, the fusion, the geo-context.
    assert sum(step.values()) > 8 and any(call.query[-1] == 128 for call in step)


def test_times_every_backend_that_takes_a_call_and_names_the_fastest(tmp_path: Path) -> None:
    path = tmp_path / "attention.json"
    report = attention_backends.main(["--device", "cpu", "--small", "--parts", "fusion,swin_v2", "--warmup", "0",
                                      "--repeats", "1", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(report))
    rows = report["rows"]
    assert {row["part"] for row in rows} == {"fusion", "swin_v2"}
    for row in rows:
        assert set(row["ms"]) | set(row["refused"]) == set(attention_backends.BACKENDS)
        # No fused kernel of CUDA runs on a CPU; the math path and the explicit product always do.
        assert {"cudnn", "efficient", "short"} <= set(row["refused"]) and {"math", "explicit", "default"} <= set(row["ms"])
        assert row["fastest"] in row["ms"] and row["ms"][row["fastest"]] == min(row["ms"].values())
        assert row["forward_flops"] > 0
    fusion = next(row for row in rows if row["part"] == "fusion")
    assert fusion["default_is"] == "flash_attention" and "flash" in fusion["ms"]
    swin = [row for row in rows if row["part"] == "swin_v2"]
    assert all(row["default_is"] == "math" and "flash" in row["refused"] for row in swin)  # a mask with a gradient


def test_our_sdpa_flags_name_a_backend_only_where_it_wins_over_every_call_of_the_part(tmp_path: Path, capsys) -> None:
    def row(part: str, count: int, **ms: float) -> dict:
        return {"part": part, "calls_per_forward": count, "ms": ms}

    report = {"rows": [
        # fusion: efficient 2x faster than the default; explicit faster still, but never chosen
        # (it lost inside the compiled model on the H100).
        row("fusion", 24, default=2.0, efficient=1.0, math=3.0, explicit=0.5),
        # vit: flash 1.05x only, under the threshold.
        row("vit", 24, default=1.05, flash=1.0),
        # swin_v2: efficient wins the frequent call but refused the other, so math (1.2x over
        # the whole part) is named; the rare call's weight is its count.
        row("swin_v2", 18, default=1.2, efficient=0.5, math=1.0),
        row("swin_v2", 2, default=1.2, math=1.0),
        row("pretrain_step", 1, default=9.0, math=1.0),  # (d)'s calls are not a part of --our-sdpa
    ]}
    assert attention_backends.faster_backends(report) == {"swin_v2": "math", "fusion": "efficient"}
    assert attention_backends.faster_backends(report, min_speedup=1.5) == {"fusion": "efficient"}
    short_wins = {"rows": [row("fusion", 24, default=2.0, efficient=1.5, short=1.0)]}
    assert attention_backends.faster_backends(short_wins) == {"fusion": "short"}
    path = tmp_path / "attention.json"
    path.write_text(json.dumps(report))
    assert attention_backends.main(["--our-sdpa-from", str(path)]) == {"swin_v2": "math", "fusion": "efficient"}
    assert capsys.readouterr().out.strip() == "--our-sdpa swin_v2=math --our-sdpa fusion=efficient"


def test_unmasked_calls_get_q_k_v_strided_as_the_blocks_make_them() -> None:
    """The ViTs' and the fusion's q, k, v are views of one (N, L, 3C) projection; SwinV2's,
    normalised, are contiguous. A backend that copies strided inputs must pay for it here too."""
    call = attention_backends.AttentionCall((2, 4, 8, 16), (2, 4, 8, 16), None, False, None)
    inputs = attention_backends.AttentionInputs.make(call, torch.device("cpu"), torch.float32)
    assert inputs.q.shape == (2, 4, 8, 16) and inputs.q.stride() == (8 * 3 * 64, 16, 3 * 64, 1)
    assert inputs.k.data_ptr() == inputs.q.data_ptr() + 64 * inputs.q.element_size()
    masked = attention_backends.AttentionCall((2, 4, 8, 16), (2, 4, 8, 16), (1, 4, 8, 8), True, 1.0)
    inputs = attention_backends.AttentionInputs.make(masked, torch.device("cpu"), torch.float32)
    assert inputs.q.is_contiguous() and inputs.mask.requires_grad


def test_a_backend_of_ours_with_wrong_values_is_refused_not_timed(monkeypatch) -> None:
    call = attention_backends.AttentionCall((2, 4, 8, 16), (2, 4, 8, 16), None, False, None)
    inputs = attention_backends.AttentionInputs.make(call, torch.device("cpu"), torch.float32)
    cpu = torch.device("cpu")
    assert attention_backends.time_backend(call, inputs, "explicit", cpu, 0, 1) > 0
    right = attention_backends.explicit_attention
    monkeypatch.setattr(attention_backends, "explicit_attention", lambda *args: right(*args) * 1.01)
    with pytest.raises(RuntimeError, match="explicit: wrong values: output off by"):
        attention_backends.time_backend(call, inputs, "explicit", cpu, 0, 1)


def test_the_value_check_compares_every_gradient_of_a_masked_call(monkeypatch) -> None:
    """SwinV2's calls: q, k, v and the position bias's mask each get a gradient; a backend
    wrong in the last of them (the mask's) is refused too."""
    call = attention_backends.AttentionCall((2, 4, 8, 16), (2, 4, 8, 16), (1, 4, 8, 8), True, 1.0)
    inputs = attention_backends.AttentionInputs.make(call, torch.device("cpu"), torch.float32)
    attention_backends.check_values(call, inputs, "explicit")
    right = attention_backends.explicit_attention

    def wrong_mask_gradient(q, k, v, mask, scale):
        return right(q, k, v, mask * 0.5 + mask.detach() * 0.5, scale)  # same values, half the mask's gradient

    monkeypatch.setattr(attention_backends, "explicit_attention", wrong_mask_gradient)
    with pytest.raises(RuntimeError, match="explicit: wrong values: gradient 4 of 4 off by"):
        attention_backends.check_values(call, inputs, "explicit")
