"""benchmarks/gpu_step.py on the CPU at tiny shapes: its report, its FLOP count, bf16 autocast."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from skysense.models.layers import TransformerBlock
from skysense.models.swin_v2 import SwinV2Block

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_step.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_step"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


gpu_step = _load_script()

TINY = gpu_step.Shapes(preset="tiny", swin_image=64, swin_batch=2, vit_image=16, vit_batch=4, fusion_tokens=8,
                       fusion_batch=16, step_batches=(2,), step_hr=128, step_s2_frames=1, step_s1_frames=1,
                       matmul_n=64)
RESULT_FIELDS = {"part", "implementation", "mode", "unit", "batch", "input_shape", "activation_checkpointing",
                 "parameters", "flops_per_step",
                 "compile_s", "compiled_graphs", "step_ms", "items_per_s", "tflops_per_s", "mfu", "peak_memory_gib", "peak_reserved_gib", "alloc_retries", "host_syncs",
                 "operators", "error"}


@pytest.mark.slow
def test_report_has_every_part_and_field(tmp_path: Path) -> None:
    options = gpu_step.Options(device="cpu", dtype="fp32", shapes=TINY, compile=False, warmup=0, repeats=1)
    report = json.loads(json.dumps(gpu_step.run_benchmark(options)))  # JSON-able as written
    assert report["device"] == "cpu" and report["dtype"] == "fp32" and report["autocast"] is False
    assert report["peak"]["tflops_per_s"] > 0 and report["peak"]["matmul_n"] == 64
    assert report["peak"]["copy_gb_per_s"] > 0
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
        assert r["peak_memory_gib"] is None and r["peak_reserved_gib"] is None and r["compile_s"] is None
    by_key = {(r["part"], r["implementation"]): r for r in rows}
    # Same architecture, same FLOPs and parameters: our ViT and fusion blocks against timm's.
    for part in ("vit", "fusion"):
        assert by_key[part, "skysense"]["flops_per_step"] == by_key[part, "timm"]["flops_per_step"]
        assert by_key[part, "skysense"]["parameters"] == by_key[part, "timm"]["parameters"]
    table = gpu_step.format_table(report)
    assert all(part in table for part in ("swin_v2", "vit", "fusion", "pretrain_step"))
    assert report["complete"] is True
    summary = {row["part"]: row for row in report["summary"]}
    assert summary["vit"]["ratio_to_timm"] == pytest.approx(by_key["vit", "skysense"]["mfu"] / by_key["vit", "timm"]["mfu"])
    assert summary["pretrain_step"]["timm_mfu"] is None and summary["pretrain_step"]["target_mfu"] == 0.45
    assert all(row["met"] is None for row in summary.values()), "H100 targets are not judged on a CPU"


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


def test_flops_leave_out_the_recomputation_of_checkpointed_blocks(monkeypatch) -> None:
    """The counted step runs checkpointed, as the timed ones (a step without checkpointing may
    not fit where they do), and counts what a step without checkpointing counts."""
    options = gpu_step.Options(device="cpu", dtype="fp32", shapes=TINY)
    recomputed = []
    running = gpu_step.Recomputation.running.__func__

    def watched(cls):
        recomputed.append(True)
        return running(cls)

    monkeypatch.setattr(gpu_step.Recomputation, "running", classmethod(watched))
    for part in ("swin_v2", "vit", "fusion"):
        plain, checkpointed = gpu_step.encoder_workloads(part, options)[0], gpu_step.encoder_workloads(part, options)[0]
        expected = gpu_step.count_flops(plain)
        for scope in ("all", "selective"):
            checkpointed.checkpoint(scope)
            recomputed.clear()
            assert gpu_step.count_flops(checkpointed) == expected, (part, scope)
            assert recomputed, f"{part}, {scope}: no block was recomputed while counting: the check proves nothing"


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
    counted = gpu_step.main(["--small", "--parts", "fusion,pretrain_step", "--meta-flops"])
    assert list(counted) == ["fusion/skysense", "fusion/timm"] and counted["fusion/skysense"] > 0


def test_sdpa_priority_decides_the_backend_of_every_row(monkeypatch, sdpa_choices) -> None:
    chosen = sdpa_choices
    monkeypatch.setattr(gpu_step, "SMALL", TINY)
    base = ["--device", "cpu", "--small", "--no-compile", "--parts", "fusion", "--warmup", "0", "--repeats", "1"]
    default = gpu_step.main(base)
    assert default["sdpa_priority"] is None
    assert set(chosen) == {int(torch.nn.attention.SDPBackend.FLASH_ATTENTION)}  # the CPU's own choice here
    chosen.clear()
    forced = gpu_step.main([*base, "--sdpa-priority", "math"])
    assert forced["sdpa_priority"] == ["math"] and "SDPA math" in gpu_step.format_table(forced)
    assert chosen and set(chosen) == {int(torch.nn.attention.SDPBackend.MATH)}
    assert all(r["error"] is None for r in forced["results"])
    with pytest.raises(ValueError, match="sdpa_priority"):
        gpu_step.main([*base, "--sdpa-priority", "fastest"])


def test_our_sdpa_restricts_our_attention_only(monkeypatch, sdpa_choices) -> None:
    chosen = sdpa_choices
    monkeypatch.setattr(gpu_step, "SMALL", TINY)
    report = gpu_step.main(["--device", "cpu", "--small", "--no-compile", "--parts", "fusion", "--warmup", "0",
                            "--repeats", "1", "--our-sdpa", "fusion=math"])
    assert report["our_sdpa"] == {"fusion": ["math"]} and "our fusion SDPA math" in gpu_step.format_table(report)
    backends = torch.nn.attention.SDPBackend
    # Ours ran the math path, timm's blocks the CPU's default flash kernel.
    assert set(chosen) == {int(backends.MATH), int(backends.FLASH_ATTENTION)}
    with pytest.raises(SystemExit):
        gpu_step.main(["--device", "cpu", "--small", "--our-sdpa", "hr=math"])
    # (d): the named encoders of the student and of the teacher, nothing else.
    options = gpu_step.Options(device="cpu", dtype="fp32", shapes=TINY, our_sdpa={"vit": ("math", "flash")})
    step = gpu_step.pretrain_model(options)
    for network in (step.pretraining.student, step.pretraining.teacher):
        for name, backends in (("s2_encoder", ("math", "flash")), ("s1_encoder", ("math", "flash")),
                               ("fusion", None), ("hr_encoder", None)):
            layers = [m for m in getattr(network, name).modules() if hasattr(m, "sdpa_backends")]
            assert layers and all(m.sdpa_backends == backends for m in layers), name


def test_our_bias_kernels_are_set_in_our_models_of_the_named_parts_only(monkeypatch) -> None:
    """``--our-mlp-kernel PARTS``, ``--our-qkv-kernel PARTS`` and ``--our-norm-kernel PARTS`` set our
    MLPs, attention layers and pre-norm blocks of those parts to their kernels (on the CPU, where
    they cannot run, the layers compute the same values another way), say so in the report, and
    leave timm's models and the other parts alone."""
    monkeypatch.setattr(gpu_step, "SMALL", TINY)
    report = gpu_step.main(["--device", "cpu", "--small", "--no-compile", "--parts", "fusion", "--warmup", "0",
                            "--repeats", "1", "--our-mlp-kernel", "fusion", "--our-qkv-kernel", "vit,fusion",
                            "--our-norm-kernel", "fusion"])
    assert report["our_mlp_kernel"] == ["fusion"] and report["our_qkv_kernel"] == ["vit", "fusion"]
    assert report["our_norm_kernel"] == ["fusion"]
    table = gpu_step.format_table(report)
    assert "our GELU kernel in fusion" in table and "our qkv kernel in vit, fusion" in table
    assert "our junction kernels in fusion" in table
    assert report["results"] and all(r["error"] is None for r in report["results"])
    for flag in ("--our-mlp-kernel", "--our-qkv-kernel", "--our-norm-kernel"):
        with pytest.raises(SystemExit):
            gpu_step.main(["--device", "cpu", "--small", flag, "hr"])
    options = gpu_step.Options(device="cpu", dtype="fp32", shapes=TINY, our_mlp_kernel=("vit",),
                               our_qkv_kernel=("fusion",), our_norm_kernel=("vit",))
    for part, mlp, qkv in (("vit", True, False), ("fusion", False, True)):
        models, _ = gpu_step.encoder_models(part, TINY, torch.device("cpu"))
        gpu_step.set_our_attention(part, models["skysense"], options)
        for setting, expected in (("gelu_kernel", mlp), ("qkv_kernel", qkv), ("norm_kernel", mlp)):
            layers = [m for m in models["skysense"].modules() if hasattr(m, setting)]
            assert layers and all(getattr(m, setting) is expected for m in layers), (part, setting)
            assert not any(hasattr(m, setting) for m in models["timm"].modules())
    step = gpu_step.pretrain_model(dataclasses.replace(options, our_mlp_kernel=("pretrain_step",),
                                                       our_qkv_kernel=("pretrain_step",),
                                                       our_norm_kernel=("pretrain_step",)))
    for network in (step.pretraining.student, step.pretraining.teacher):
        for setting in ("gelu_kernel", "qkv_kernel", "norm_kernel"):
            layers = [m for m in network.modules() if hasattr(m, setting)]
            assert layers and all(getattr(m, setting) for m in layers), setting


def test_profiled_rows_say_how_much_of_the_step_ran_kernels(monkeypatch) -> None:
    from skysense.compilation import compile_blocks

    monkeypatch.setattr(gpu_step, "compile_blocks", lambda model, blocks, **options: compile_blocks(
        model, blocks, backend="eager"))  # dynamo only: the row, not inductor, is under test
    options = gpu_step.Options(device="cpu", dtype="fp32", shapes=TINY, warmup=0, repeats=1, parts=("fusion",),
                               profile=True)
    report = gpu_step.run_benchmark(options)
    compiled = [r for r in report["results"] if r["mode"] == "compiled"]
    assert len(compiled) == 2 and all(r["error"] is None for r in compiled)
    for r in compiled:
        top = r["top_operators"]
        assert 0 < top[0]["ms_per_step"] <= r["kernel_ms_per_step"]
        assert r["kernel_ms_per_step"] == pytest.approx(top[0]["ms_per_step"] / top[0]["share"])
        kinds = r["kernel_ms_by_kind"]
        assert sum(kinds.values()) == pytest.approx(r["kernel_ms_per_step"]) and kinds["matmul"] > 0, kinds
    assert all("kernel_ms_per_step" not in r for r in report["results"] if r["mode"] == "eager")
    table = gpu_step.format_table(report)
    assert "fusion         skysense compiled: operators' own time" in table and "% without); " in table


@pytest.mark.parametrize("name, kind", [
    ("fmha_cutlassB_bf16_aligned_64x64_k64_seqaligned_sm80", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "attention"),
    ("nvjet_sm90_tst_128x256_64x4_1x2_h_bz_coopA_NNN", "matmul"),
    ("sm80_xmma_gemm_f32f32_f32f32_f32_nn_n_tilesize64x64x8", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_bf16_64x64_32x6_nn_align2>", "matmul"),
    ("triton_poi_fused_gelu_gelu_backward_view_5", "compiled (triton / inductor)"),
    ("void at::native::elementwise_kernel<128, 2, direct_copy_kernel_cuda", "copy"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, MeanOps>", "other"),
])
def test_kernels_are_classed_by_name(name: str, kind: str) -> None:
    assert gpu_step.kernel_kind(name) == kind


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


def _quick(**changes) -> "gpu_step.Options":
    return gpu_step.Options(**{"device": "cpu", "dtype": "fp32", "shapes": TINY, "compile": False, "warmup": 0,
                               "repeats": 1, **changes})


def test_a_spent_budget_skips_the_rest_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    report = gpu_step.run_benchmark(_quick(parts=("fusion", "pretrain_step"), budget_s=0.0, json_path=path))
    assert [r["error"] for r in report["results"]] == ["skipped: the time budget (0 s) was spent"] * 3
    assert json.loads(path.read_text()) == json.loads(json.dumps(report))


def test_a_run_cut_short_keeps_its_rows(tmp_path: Path, monkeypatch) -> None:
    """The JSON is rewritten after every row: a run killed in (d) still holds (c)."""

    def killed(run) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(gpu_step, "run_pretrain_step", killed)
    path = tmp_path / "report.json"
    with pytest.raises(KeyboardInterrupt):
        gpu_step.run_benchmark(_quick(parts=("fusion", "pretrain_step"), json_path=path))
    report = json.loads(path.read_text())
    assert report["complete"] is False
    assert [(r["part"], r["implementation"], r["error"]) for r in report["results"]] == [
        ("fusion", "skysense", None), ("fusion", "timm", None)]


def _checkpointing_on(step: "gpu_step.PretrainStep") -> str:
    """The activation checkpointing (d)'s student runs with now (gpu_step.CHECKPOINTING), read
    from the blocks' checkpoint switches, so a step run with them off counts as "off"."""
    from torch.distributed._composable.checkpoint_activation import checkpoint

    student = step.pretraining.student
    blocks = [m for m in student.modules() if isinstance(m, (TransformerBlock, SwinV2Block))]
    on = [m for m in blocks if checkpoint.state(m) is not None and checkpoint.state(m).enable_hook]
    if not on:
        return "off"
    switch = student._benchmark_checkpointing
    if len(on) < len(blocks):
        assert set(on) == {m for m in student.fusion.modules() if isinstance(m, TransformerBlock)}
        assert not switch.fusion.selective
        return "fusion"
    if switch.fusion.selective:
        return "selective" if switch.others.selective else "selective-fusion"
    return "all"


def _out_of_memory_unless(*fitting: str) -> Callable:
    """(d)'s step, raising a (simulated) CUDA OOM unless its student runs with one of the
    ``fitting`` checkpointing settings (every step counts: the FLOP count's too)."""
    forward = gpu_step.PretrainStep.forward

    def step(self) -> None:
        if _checkpointing_on(self) not in fitting:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        forward(self)

    return step


@pytest.mark.slow
def test_pretrain_step_retries_the_paper_batch_with_the_fusion_checkpointed(monkeypatch) -> None:
    """(d): a first batch that does not fit is tried again with each next checkpointing setting
    until one fits, the next batches keep it; the FLOPs do not count the recomputation."""
    monkeypatch.setattr(gpu_step.PretrainStep, "forward", _out_of_memory_unless("fusion", "all"))
    shapes = dataclasses.replace(TINY, step_batches=(2, 3))
    rows = gpu_step.run_benchmark(_quick(shapes=shapes, parts=("pretrain_step",)))["results"]
    assert [(r["batch"], r["activation_checkpointing"], (r["error"] or "")[:16]) for r in rows] == [
        (2, "off", "OutOfMemoryError"), (2, "selective", "OutOfMemoryError"), (2, "selective-fusion", "OutOfMemoryError"),
        (2, "fusion", ""), (3, "fusion", "")]
    monkeypatch.undo()
    plain = gpu_step.run_benchmark(_quick(shapes=dataclasses.replace(TINY, step_batches=(3,)),
                                          parts=("pretrain_step",)))["results"]
    # Equal but for Sinkhorn-Knopp's rounds (two small products each, and as many rounds as it
    # takes to converge, which float rounding can move by one check: 2e-6 of this step seen on
    # torch 2.11). Counting the recomputation would add a third of the fusion's FLOPs.
    assert rows[4]["flops_per_step"] == pytest.approx(plain[0]["flops_per_step"], rel=1e-4)
    # (d)'s eager row also counts one step's host syncs (Sinkhorn's tests, the geo regions) and launches.
    assert 3 < plain[0]["host_syncs"] <= 3 + 2 * 18 and plain[0]["operators"] > 1000, plain[0]


@pytest.mark.slow
def test_pretrain_step_keeps_matmul_outputs_when_that_fits(monkeypatch) -> None:
    monkeypatch.setattr(gpu_step.PretrainStep, "forward", _out_of_memory_unless("selective", "fusion", "all"))
    shapes = dataclasses.replace(TINY, step_batches=(2, 3))
    rows = gpu_step.run_benchmark(_quick(shapes=shapes, parts=("pretrain_step",)))["results"]
    assert [(r["batch"], r["activation_checkpointing"], (r["error"] or "")[:16]) for r in rows] == [
        (2, "off", "OutOfMemoryError"), (2, "selective", ""), (3, "selective", "")]


@pytest.mark.slow
def test_pretrain_step_checkpoints_every_block_when_the_fusion_alone_is_not_enough(monkeypatch) -> None:
    monkeypatch.setattr(gpu_step.PretrainStep, "forward", _out_of_memory_unless("all"))
    shapes = dataclasses.replace(TINY, step_batches=(2, 3))
    rows = gpu_step.run_benchmark(_quick(shapes=shapes, parts=("pretrain_step",)))["results"]
    assert [(r["batch"], r["activation_checkpointing"], (r["error"] or "")[:16]) for r in rows] == [
        (2, "off", "OutOfMemoryError"), (2, "selective", "OutOfMemoryError"),
        (2, "selective-fusion", "OutOfMemoryError"), (2, "fusion", "OutOfMemoryError"), (2, "all", ""), (3, "all", "")]


@pytest.mark.slow
def test_a_step_that_ran_out_of_memory_in_adamw_leaves_nothing_to_the_next_setting(monkeypatch) -> None:
    """H100, 2026-11-28: batch 3 without checkpointing ran out of memory while AdamW was making
    its state; the model kept the half-made state, so the next settings ran out of memory too and
    the last one failed with KeyError: 'exp_avg_sq' (a fresh process fitted it in 40.5 GiB).
    Each retry now starts from a model built anew."""
    def half_made_state(self, closure=None):
        """AdamW's first step running out of memory between the first parameter's two moments."""
        first = next(p for group in self.param_groups for p in group["params"] if p.grad is not None)
        self.state[first].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(first))
        raise torch.OutOfMemoryError("CUDA out of memory (simulated, in AdamW's state)")

    forward = gpu_step.PretrainStep.forward

    def step(self) -> None:
        with monkeypatch.context() as patch:
            if _checkpointing_on(self) == "off":
                patch.setattr(torch.optim.AdamW, "step", half_made_state)
            forward(self)

    monkeypatch.setattr(gpu_step.PretrainStep, "forward", step)
    rows = gpu_step.run_benchmark(_quick(shapes=dataclasses.replace(TINY, step_batches=(2,)),
                                         parts=("pretrain_step",)))["results"]
    assert [(r["batch"], r["activation_checkpointing"], (r["error"] or "")[:16]) for r in rows] == [
        (2, "off", "OutOfMemoryError"), (2, "selective", "")], rows


def test_flops_leave_out_head_padding(monkeypatch) -> None:
    """On CUDA our SwinV2 pads heads to a multiple of 8; the MFU counts the model's own FLOPs."""
    from skysense.config import SwinV2Config
    from skysense.models import swin_v2

    torch.manual_seed(0)
    model = swin_v2.SwinTransformerV2(SwinV2Config(embed_dim=44, depths=(2,), num_heads=(1,), window_size=4))
    workload = gpu_step.Workload("swin_v2", "skysense", "image", 2, "", model,
                                 gpu_step.encoder_step(torch.randn(2, 3, 32, 32), _quick()), (swin_v2.SwinV2Block,))
    unpadded = gpu_step.count_flops(workload)
    monkeypatch.setattr(swin_v2, "fused_head_multiple", lambda device: 8)
    assert gpu_step.count_flops(workload) == unpadded
    with FlopCounterMode(display=False, custom_mapping=gpu_step.attention_flop_formulas()) as padded:
        workload.step(model)
    assert padded.get_total_flops() > unpadded, "the padding was not on: the check proves nothing"


def _swin_formula(config, image: int) -> float:
    """PERFORMANCE.md's forward FLOPs of SwinV2 per image: 24 N C^2 + 4 N M^2 C per block, plus
    the patch embedding and patch merging (2 N 4C 2C each) that the formula leaves out."""
    side, total = image // config.patch_size, 2 * (image // config.patch_size) ** 2 * config.embed_dim * 3 * 16
    for stage, (depth, width) in enumerate(zip(config.depths, config.out_dims)):
        if stage:
            side //= 2
            total += 2 * side * side * (2 * width) * width
        n = side * side
        total += depth * (24 * n * width**2 + 4 * n * config.window_size**2 * width)
    return total


@pytest.mark.slow
def test_paper_shapes_count_the_same_flops_as_timm_and_the_formula() -> None:
    """At issue 7's shapes (counted on the meta device: no memory, no compute), our parts do
    exactly the work of timm's, and SwinV2-H's is PERFORMANCE.md's formula: the MFU of the two
    implementations is comparable."""
    shapes = gpu_step.HUGE
    flops = gpu_step.meta_flops(shapes)
    for part in ("swin_v2", "vit", "fusion"):
        assert flops[part, "skysense"] == flops[part, "timm"], part
    hr = gpu_step.preset_config("huge").hr
    expected = 3 * shapes.swin_batch * _swin_formula(hr, shapes.swin_image)
    assert flops["swin_v2", "skysense"] == pytest.approx(expected, rel=0.005)
    fusion = gpu_step.preset_config("huge").fusion
    n, d = shapes.fusion_tokens, fusion.embed_dim
    # On the meta device attention's backward is 2x its forward (see meta_flops).
    assert flops["fusion", "skysense"] == shapes.fusion_batch * fusion.depth * 3 * (24 * n * d * d + 4 * n * n * d)


# Installed here but not on the lent GPU machines' image (benchmarks/gpu_step_device.sh runs
# skysense from src/ there, uninstalled).
NOT_ON_THE_GPU_IMAGE = ("rasterio", "zarr", "bigearthnet_common", "affine", "pyproj")
BLOCKER = f"""
import importlib.abc, runpy, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {NOT_ON_THE_GPU_IMAGE!r}:
            raise ImportError("not on the GPU image: " + name)
sys.meta_path.insert(0, Blocker())
sys.argv = [{str(SCRIPT)!r}, "--help"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_the_benchmark_needs_no_raster_stack() -> None:
    """The GPU image has torch and timm but no rasterio: the benchmark must import without it."""
    import subprocess

    result = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--step-batch" in result.stdout


def test_pretrain_step_runs_every_objective() -> None:
    """(d) is the full step: every level of the multi-granularity contrast for every modality,
    cross-modal alignment and the geo-context prototypes."""
    options = _quick()
    model = gpu_step.pretrain_model(options)
    gpu_step.pretrain_workload(model, 2, options)
    _, terms = model.pretraining(model.views)
    expected = {f"{level}/{m}" for level in ("pixel", "object", "image") for m in ("hr", "s2", "s1", "fused")}
    assert expected | {"cross_modal", "geo"} <= set(terms)


def test_a_part_that_cannot_be_built_does_not_stop_the_others(monkeypatch) -> None:
    def too_old(part, options):
        raise TypeError("VisionTransformer.__init__() got an unexpected keyword argument 'final_norm'")

    monkeypatch.setattr(gpu_step, "encoder_workloads", too_old)
    report = gpu_step.run_benchmark(_quick(parts=("vit", "pretrain_step")))
    assert report["part_errors"] == {"vit": "TypeError: VisionTransformer.__init__() got an unexpected keyword "
                                            "argument 'final_norm'"}
    assert [r["part"] for r in report["results"]] == ["pretrain_step"] and report["results"][0]["error"] is None
    assert "vit            failed: TypeError" in gpu_step.format_table(report)


@pytest.mark.slow
def test_device_script_writes_its_three_files(tmp_path: Path) -> None:
    """benchmarks/gpu_step_device.sh, run here on the CPU (its arguments go to gpu_step.py)."""
    import os
    import subprocess

    script = SCRIPT.parent / "gpu_step_device.sh"
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", str(script), "--device", "cpu", "--small", "--no-compile", "--parts", "fusion",
                             "--warmup", "0", "--repeats", "1"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["environment.txt", "gpu_step.json", "gpu_step.log"]
    assert "torch" in (tmp_path / "environment.txt").read_text()
    report = json.loads((tmp_path / "gpu_step.json").read_text())
    assert report["complete"] and report["budget_s"] == 360 and len(report["results"]) == 2
    assert "fusion" in (tmp_path / "gpu_step.log").read_text()
    # TAG names a second run's files, so two runs of one device call keep both reports
    env["TAG"] = "second"
    result = subprocess.run(["bash", str(script), "--device", "cpu", "--small", "--no-compile", "--parts", "vit",
                             "--warmup", "0", "--repeats", "1"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "environment.txt", "gpu_step-second.json", "gpu_step-second.log", "gpu_step.json", "gpu_step.log"]
    assert json.loads((tmp_path / "gpu_step-second.json").read_text())["results"][0]["part"] == "vit"
    assert json.loads((tmp_path / "gpu_step.json").read_text())["results"][0]["part"] == "fusion"


@pytest.mark.parametrize("image_loss,keys", [("dino", "teacher"), ("infonce", "teacher"), ("infonce", "student")])
def test_pretrain_step_creates_its_tensors_on_the_inputs_device(image_loss: str, keys: str) -> None:
    """A GPU step must not build tensors on the CPU (a device mismatch there; never run here).

    Checked on the CPU: once the model, optimizer and inputs exist, the default device becomes
    ``meta``; a tensor made without ``device=`` then lands on ``meta``, and the first operation
    mixing it with the real tensors fails at that line.
    """
    options = _quick()
    config = gpu_step.pretrain_config(TINY, 2)
    config.objective.image_loss, config.objective.infonce_keys = image_loss, keys
    model = gpu_step.PretrainStep(config, options)
    model.pretraining.train()
    gpu_step.pretrain_workload(model, 2, options)
    model()  # the optimizer and its state, on the real device
    torch.set_default_device("meta")
    try:
        model()
    finally:
        torch.set_default_device(None)


def test_the_pretraining_step_copies_no_weight_per_row() -> None:
    """The EMA teacher's encoders and heads run without weight gradients; F.linear on their
    strided 4-D features would broadcast each weight over a batched matmul (one copy per
    image row or location). The whole step (student, teacher, objective, backward) runs none."""
    from broadcast_matmuls import BroadcastMatmuls

    options = gpu_step.Options(device="cpu", dtype="bf16", shapes=gpu_step.SMALL)
    model = gpu_step.pretrain_model(options)
    workload = gpu_step.pretrain_workload(model, 2, options)
    with BroadcastMatmuls() as seen:
        workload.step(model)
    assert seen.broadcast == []


@pytest.mark.slow
def test_a_paper_batch_that_never_fits_is_traced_and_smaller_batches_are_measured(monkeypatch) -> None:
    """(d): when the paper's batch runs out of memory with every block checkpointed, one more
    step of it records what was alive at the failure, by origin; then smaller batches are tried
    so the step's speed is measured all the same, and the target is not judged met."""
    forward = gpu_step.PretrainStep.forward

    def step(self) -> None:
        batch = self.views[0]["hr"].shape[0]
        if batch >= 2:
            kept = torch.zeros(batch, 2**20)  # 8 MiB per sample, made here and alive at the failure
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated, {kept.shape})")
        forward(self)

    monkeypatch.setattr(gpu_step.PretrainStep, "forward", step)
    report = gpu_step.run_benchmark(_quick(shapes=dataclasses.replace(TINY, step_batches=(2, 3)),
                                           parts=("pretrain_step",)))
    rows = report["results"]
    assert [(r["batch"], r["activation_checkpointing"], (r["error"] or "")[:16]) for r in rows] == [
        (2, "off", "OutOfMemoryError"), (2, "selective", "OutOfMemoryError"),
        (2, "selective-fusion", "OutOfMemoryError"), (2, "fusion", "OutOfMemoryError"), (2, "all", "OutOfMemoryError"),
        (1, "all", "")]
    failure = rows[4]["memory_at_failure"]
    assert failure["error"].startswith("OutOfMemoryError")
    assert failure["allocator_gib"] is None  # the CUDA allocator's count, on a GPU only
    origins = {o["origin"]: o["gib"] for o in failure["by_origin"]}
    made_here = [origin for origin in origins if origin.startswith("zeros at test_gpu_step_benchmark.py:")]
    assert len(made_here) == 1 and origins[made_here[0]] == pytest.approx(2 * 2**20 * 4 / 2**30), origins
    assert origins["model state"] > 0
    assert "host_syncs" in rows[5] and rows[5]["host_syncs"] is not None  # counted where it first fitted
    summary = {row["part"]: row for row in gpu_step.summary({**report, "device": "cuda"})}["pretrain_step"]
    assert summary["skysense_batch"] == 1 and summary["at_paper_batch"] is False and summary["met"] is False
    assert "2.0 GiB alive" not in gpu_step.format_table(report)
    assert "batch 2: " in gpu_step.format_table(report) and "did not fit" in gpu_step.format_table(
        {**report, "device": "cuda"})


@pytest.mark.slow
def test_whole_model_compile_with_cuda_graphs_runs_and_is_reported() -> None:
    """``--compile-scope model --compile-mode reduce-overhead``: one graph per model, replayed as
    CUDA graphs on a GPU (on the CPU inductor skips the graphs); an unknown mode is refused."""
    report = gpu_step.main(["--device", "cpu", "--small", "--parts", "fusion", "--compile-scope", "model",
                            "--compile-mode", "reduce-overhead", "--warmup", "1", "--repeats", "1"])
    assert report["compile_scope"] == "model" and report["compile_mode"] == "reduce-overhead"
    compiled = [r for r in report["results"] if r["mode"] == "compiled"]
    assert len(compiled) == 2 and all(r["error"] is None and r["step_ms"] > 0 for r in compiled), compiled
    assert all(r["compiled_graphs"] == 1 for r in compiled), compiled  # one graph per whole model
    with pytest.raises(ValueError, match="compile_mode: expected one of"):
        gpu_step.run_benchmark(_quick(compile_mode="fastest"))


def test_the_compile_cache_is_loaded_first_and_saved_after_every_compiled_row(tmp_path: Path, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(gpu_step.compile_cache, "load", lambda path: calls.append(("load", path)) or
                        {"loaded_bytes": 7, "loaded_entries": 1})
    monkeypatch.setattr(gpu_step.compile_cache, "save", lambda path: calls.append(("save", path)) or
                        {"saved_bytes": 9, "saved_entries": 2})

    def measured(workload, mode, flops, peak, options):
        calls.append((mode, workload.implementation))
        return {**gpu_step.empty_row(workload, mode, flops), "error": "not measured in this test"}

    monkeypatch.setattr(gpu_step, "measure", measured)
    path = tmp_path / "compile.cache"
    report = gpu_step.run_benchmark(_quick(parts=("fusion",), compile=True, compile_cache=path))
    assert calls == [("load", path), ("eager", "skysense"), ("compiled", "skysense"), ("save", path),
                     ("eager", "timm"), ("compiled", "timm"), ("save", path)]
    assert report["compile_cache"] == {"path": str(path), "loaded_bytes": 7, "loaded_entries": 1,
                                       "saved_bytes": 9, "saved_entries": 2}
    assert f"compile cache {path}: loaded 7 bytes (1 entries), saved 9 bytes (2 entries)" in gpu_step.format_table(report)


def test_selective_checkpointing_moves_inside_compiled_blocks() -> None:
    """After a "selective" setting, compile_blocks traces the policy inside each block's graph:
    the blocks' composable checkpoints are switched off and the step still runs."""
    from torch.distributed._composable.checkpoint_activation import checkpoint

    from skysense.compilation import compile_blocks

    options = gpu_step.Options(device="cpu", dtype="fp32", shapes=TINY)
    workload = gpu_step.encoder_workloads("fusion", options)[0]
    workload.checkpoint("selective")
    states = [checkpoint.state(m) for m in workload.model.modules() if isinstance(m, TransformerBlock)]
    assert states and all(state.enable_hook for state in states)
    torch._dynamo.reset()
    try:
        assert compile_blocks(workload.model, workload.blocks, backend="aot_eager") == len(states)
        assert not any(state.enable_hook for state in states)
        workload.step(workload.model)
    finally:
        torch._dynamo.reset()


def test_a_memory_cap_sets_the_allocators_fraction_of_the_card(monkeypatch) -> None:
    """--memory-cap-gib: an H200 (139.8 GiB) asked the H100's question: the allocator's fraction
    is the cap over the card's total; a cap above the card or off CUDA is an error naming both."""
    fractions = []
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: type("Properties", (), {"total_memory": int(139.8 * 2**30)})())
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda fraction, device: fractions.append((fraction, str(device))))
    cap = gpu_step.cap_device_memory(torch.device("cuda"), gpu_step.H100_ALLOCATOR_GIB)
    assert fractions == [(pytest.approx(78.3 / 139.8), "cuda")]
    assert cap == {"gib": 78.3, "device_total_gib": pytest.approx(139.8), "fraction": pytest.approx(78.3 / 139.8)}
    with pytest.raises(ValueError, match=r"at most cuda's 139.80 GiB, got 150"):
        gpu_step.cap_device_memory(torch.device("cuda"), 150)
    with pytest.raises(ValueError, match="the device is cpu"):
        gpu_step.run_benchmark(gpu_step.Options(device="cpu", shapes=TINY, memory_cap_gib=78.3))


def test_a_row_over_the_memory_cap_is_not_counted() -> None:
    """A row that reserved more than the cap (the allocator should have refused) says so and
    leaves the summary: a (d) that only fits the larger card must not meet the H100's target."""
    report = gpu_step.run_benchmark(_quick(parts=("fusion",)))
    fused = [r for r in report["results"] if r["implementation"] == "skysense"][0]
    report["memory_cap"] = {"gib": 78.3, "device_total_gib": 139.8, "fraction": 78.3 / 139.8}
    fused["peak_reserved_gib"] = 78.2
    assert [r for r in gpu_step.summary(report) if r["part"] == "fusion"][0]["skysense_mfu"] == fused["mfu"]
    fused["peak_reserved_gib"] = 90.1
    assert [r for r in gpu_step.summary(report) if r["part"] == "fusion"][0]["skysense_mfu"] is None
    table = gpu_step.format_table(report)
    assert "memory capped at 78.3 of 139.80 GiB" in table
    assert "fusion         skysense eager batch 16: reserved 90.10 GiB, over the 78.3 GiB cap" in table
    # Verdicts on another card say which: an H200's memory-bound kernels run faster than an H100's.
    report["device"] = "cuda"
    for name, note in (("NVIDIA H200", True), ("NVIDIA H100 80GB HBM3", False)):
        report["device_name"] = name
        assert ("(on an NVIDIA H200, not an H100)" in gpu_step.format_table(report)) is note, name


@pytest.mark.slow
def test_the_huge_pretraining_step_compiles_into_few_graphs() -> None:
    """(d) at huge's structure (depths, extra norms, drop-path schedules, window and input
    shapes, batch 1) with narrow widths, every block selectively checkpointed as the H100's ladder
    will most likely leave it, compiled block-wise (aot_eager: dynamo and AOTAutograd as under
    inductor, without building kernels). The H100 run of 2026-11-28 failed here with dynamo's
    recompile limit (one graph per drop-path rate); now 27 graphs (counted on torch 2.14.1), no
    graph break, and a second step compiles nothing."""
    from skysense.compilation import compile_blocks
    from skysense.models.layers import DropPath

    shapes = dataclasses.replace(gpu_step.HUGE, step_batches=(1,))
    options = gpu_step.Options(device="cpu", dtype="fp32", shapes=shapes, sinkhorn_rounds=30)
    model = gpu_step.narrow_huge_model(options)
    rates = {round(m.p, 6) for m in model.modules() if isinstance(m, DropPath)}
    assert len(rates) == 40, "the drop-path schedules the H100 failed on are not there"
    workload = gpu_step.pretrain_workload(model, 1, options)
    workload.checkpoint("selective")
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    assert compile_blocks(model, workload.blocks, backend="aot_eager") == 192  # 24 + 24 x 3 student, teacher
    try:
        workload.step(model)
        graphs = counters["stats"]["unique_graphs"]
        workload.step(model)
        assert counters["stats"]["unique_graphs"] == graphs, "the second step compiled again"
    finally:
        torch._dynamo.reset()
    assert 20 <= graphs <= 32 and not counters["graph_break"], (graphs, dict(counters["graph_break"]))


@pytest.mark.slow
def test_a_compiled_step_that_does_not_fit_tries_the_next_checkpointing(monkeypatch) -> None:
    """(d): the compiled row runs at the setting the eager ladder left; when the compiled step
    runs out of memory there, the next settings are compiled anew on a fresh model, in turn."""
    from skysense.compilation import compile_blocks

    forward = gpu_step.PretrainStep.forward

    def compiled(model, blocks, **options):
        model.compiled_with = _checkpointing_on(model)  # read before compiling switches hooks off
        return compile_blocks(model, blocks, backend="eager")  # dynamo only: the ladder is under test

    def step(self) -> None:
        setting = getattr(self, "compiled_with", None)
        fits = ("all",) if setting is not None else ("selective", "fusion", "all")
        if (setting or _checkpointing_on(self)) not in fits:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        forward(self)

    monkeypatch.setattr(gpu_step, "compile_blocks", compiled)
    monkeypatch.setattr(gpu_step.PretrainStep, "forward", step)
    rows = gpu_step.run_benchmark(_quick(compile=True, parts=("pretrain_step",)))["results"]
    assert [(r["mode"], r["activation_checkpointing"], (r["error"] or "")[:16]) for r in rows] == [
        ("eager", "off", "OutOfMemoryError"), ("eager", "selective", ""), ("compiled", "selective", "OutOfMemoryError"),
        ("compiled", "selective-fusion", "OutOfMemoryError"), ("compiled", "fusion", "OutOfMemoryError"),
        ("compiled", "all", "")]
    assert rows[5]["flops_per_step"] == rows[1]["flops_per_step"] and rows[5]["compiled_graphs"] > 0


@pytest.mark.slow
def test_the_ladder_can_start_from_a_checkpointing_setting(monkeypatch) -> None:
    """--step-checkpointing selective: on an 80 GB card the paper's batch needs an estimated
    90.7 GiB without checkpointing, so the device call starts (d) where it can fit."""
    monkeypatch.setattr(gpu_step.PretrainStep, "forward", _out_of_memory_unless("fusion", "all"))
    rows = gpu_step.run_benchmark(_quick(parts=("pretrain_step",), step_checkpointing="selective"))["results"]
    assert [(r["activation_checkpointing"], (r["error"] or "")[:16]) for r in rows] == [
        ("selective", "OutOfMemoryError"), ("selective-fusion", "OutOfMemoryError"), ("fusion", "")]
    table = gpu_step.format_table({**gpu_step.run_benchmark(_quick(parts=())), "results": rows})
    width = len("eager, selective-fusion")  # the longest mode, its column's width
    assert f"pretrain_step  skysense  {'eager, selective':<{width}}     2 OutOfMemoryError" in table, table
    assert f"pretrain_step  skysense  {'eager, fusion':<{width}}     2 " in table, table
    with pytest.raises(SystemExit):
        gpu_step.main(["--device", "cpu", "--small", "--step-checkpointing", "some"])
