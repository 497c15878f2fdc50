"""benchmarks/block_traffic.py's count of inductor's plan for an H100, made on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def _planned(code: str) -> subprocess.CompletedProcess:
    """``code`` run in a fresh process (the H100 plan changes Triton's driver and inductor's
    settings for good), from the repository, with inductor's caches off; it must succeed."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_the_h100_plan_counts_forward_and_backward_kernels_with_the_short_kernel() -> None:
    """With ``--plan h100`` nothing runs, yet both graphs of a SwinV2 block are planned: the
    short kernels' two operators (forward and backward) are counted as attention, and the
    block's element-wise kernels with them; the qkv entry moves fewer bytes than SDPA's path."""
    code = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, "benchmarks")
        import block_traffic as bt
        bt.plan_for_h100()
        bt._quiet_metrics_log()
        from skysense.models.swin_v2 import SwinV2Block
        import torch._inductor.metrics as metrics
        for attention in (None, ["short"]):
            torch.manual_seed(0)
            block = SwinV2Block(88, 2, 4, True, 4.0, 0.0, 1e-5, False)
            totals = bt.block_bytes(block, torch.randn(2, 8, 8, 88), attention)
            ops = sorted({str(origin.target) for node, _ in metrics.nodes_num_elem for inner in node.get_nodes()
                          for origin in (getattr(inner.node, "origins", None) or ()) if "skysense" in str(origin.target)})
            print(attention is not None, ",".join(ops) or "-", round(sum(totals.values())), round(totals["attention"]))
        """)
    result = _planned(code)
    rows = [line.split() for line in result.stdout.splitlines()]
    (sdpa_short, sdpa_ops, sdpa_total, _), (short, ops, total, attention) = rows
    assert sdpa_short == "False" and sdpa_ops == "-" and short == "True", rows
    assert ops == "skysense.short_attention_qkv.default,skysense.short_attention_qkv_backward.default", rows
    assert 0 < int(attention) and int(total) < int(sdpa_total), rows


@pytest.mark.slow
def test_a_shifted_block_moves_about_what_an_unshifted_one_does() -> None:
    """A shifted SwinV2 block rolls its input and output, not the attention's (SwinV2Block.forward):
    in the H100 plan the norm's backward kernel then writes the attention's gradient in the
    windows' layout itself. Rolled around the attention, the shifted block moved 16.6 bytes per
    element more than the unshifted one (the gradient rolled by a kernel of its own); now 2.6."""
    code = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, "benchmarks")
        import block_traffic as bt
        bt.plan_for_h100()
        bt._quiet_metrics_log()
        from skysense.models.swin_v2 import SwinV2Block
        for shifted in (False, True):
            torch.manual_seed(0)
            block = SwinV2Block(88, 2, 4, shifted, 4.0, 0.0, 1e-5, False)
            x = torch.randn(2, 8, 8, 88)
            moved = bt.block_bytes(block, x, ["short"])["element-wise"]
            # less the weights' casts: kernels that write one 2-D buffer
            weights = sum(b for b, kind, _, out in bt.kernel_rows() if kind == "element-wise" and out.count(",") == 1)
            print((moved - weights) / x.numel())
        """)
    result = _planned(code)
    unshifted, shifted = (float(line) for line in result.stdout.split())
    assert 0 < shifted - unshifted < 8, (unshifted, shifted)


@pytest.mark.slow
def test_the_h100_plan_counts_the_bias_kernels_as_element_wise_and_fewer_bytes() -> None:
    """With the MLP kernel (``--mlp-kernel``) a transformer block's GELU backward and first bias
    gradient are one opaque operator in the H100 plan, and with the qkv kernel (``--qkv-kernel``)
    the qkv gradient's assembly and its bias's sum: both counted as element-wise work, not
    matmuls. The block moves 8 bytes per element of its input less with the first (the bias
    gradient no longer reads the GELU's input gradient back) and 6 less with the second (nor the
    qkv gradient); its matmuls and attention move the same."""
    code = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, "benchmarks")
        import block_traffic as bt
        bt.plan_for_h100()
        bt._quiet_metrics_log()
        from skysense.models.layers import TransformerBlock
        import torch._inductor.metrics as metrics
        ours = {"skysense.gelu_bias_backward", "skysense.qkv_gradient"}
        for mlp, qkv in ((False, False), (True, False), (True, True)):
            torch.manual_seed(0)
            x = torch.randn(64, 32, 256)
            totals = bt.block_bytes(TransformerBlock(256, 4, 4.0, 0.0, 1e-6), x, None, mlp, qkv)
            kinds = sorted({bt._kind(node) for node, _ in metrics.nodes_num_elem if bt._origins(node) & ours})
            print(mlp, qkv, ",".join(kinds) or "-", *(f"{totals[k] / x.numel():.2f}" for k in bt.KINDS))
        """)
    result = _planned(code)
    rows = [line.split() for line in result.stdout.splitlines()]
    assert [row[:3] for row in rows] == [["False", "False", "-"], ["True", "False", "element-wise"],
                                         ["True", "True", "element-wise"]], result.stdout
    (plain, mlp, both) = [[float(v) for v in row[3:]] for row in rows]
    for before, after, saved in ((plain, mlp, 8), (mlp, both, 6)):
        matmul, attention, elementwise = (a - b for a, b in zip(after, before))
        assert abs(matmul) < 0.05 and attention == 0, result.stdout  # fc1 and qkv read no bias vector now
        assert -saved - 0.5 < elementwise < -saved + 1.0, result.stdout
