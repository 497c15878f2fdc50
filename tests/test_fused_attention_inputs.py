"""Every attention call of the model passes inputs that CUDA's fused SDPA kernels take.

On CUDA, SDPA picks its memory-efficient (or cuDNN) kernel only for dense 4-D inputs whose
last dimension is contiguous, mask included, with equal batch and head counts for q, k and v
and, in bf16, a head width that is a multiple of 8; q, k, v and an additive mask in one
dtype (under autocast SDPA would otherwise cast them, one more pass over each). Anything else silently runs the math
path, which writes out every attention matrix: on the H100 the SwinV2-H blocks without a
shift did so, because their position bias was a permuted view (the compiled step's profile
held softmax-backward kernels next to the fused attention's). A CPU cannot run that dispatch,
so these tests record each call's inputs and check them against those rules, with SwinV2's
head padding set as on CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model_inputs import tiny_inputs
from skysense.config import SwinV2Config, preset_config
from skysense.models import swin_v2
from skysense.models.skysense import SkySense
from skysense.models.swin_v2 import SwinTransformerV2

CUDA_HEAD_MULTIPLE = 8  # bf16 and fp16 fused kernels on CUDA


def refusals(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> list[str]:
    """Why CUDA's memory-efficient kernel would refuse these SDPA inputs (empty: it takes them)."""
    reasons = []
    if not all(t.ndim == 4 for t in (q, k, v)):
        reasons.append(f"q, k, v are {q.ndim}-, {k.ndim}-, {v.ndim}-D, not 4-D")
    for name, t in (("q", q), ("k", k), ("v", v), ("mask", mask)):
        if t is not None and t.stride(-1) != 1:
            reasons.append(f"{name} {tuple(t.shape)} has last-dimension stride {t.stride(-1)}, not 1")
    if not (q.shape[0] == k.shape[0] == v.shape[0] and q.shape[-3] == k.shape[-3] == v.shape[-3]):
        reasons.append(f"batch or heads differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    dtypes = {t.dtype for t in (q, k, v)} | ({mask.dtype} if mask is not None and mask.dtype != torch.bool else set())
    if len(dtypes) > 1:  # under autocast SDPA would cast them first: one more pass over each
        reasons.append(f"q, k, v and mask come in {sorted(str(d) for d in dtypes)}, not one dtype")
    if q.shape[-1] % CUDA_HEAD_MULTIPLE:
        reasons.append(f"head width {q.shape[-1]} is not a multiple of {CUDA_HEAD_MULTIPLE}")
    return reasons


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Records the refusals of every SDPA call, with SwinV2's heads padded as on CUDA."""
    calls: list[list[str]] = []
    attention = F.scaled_dot_product_attention

    def recorded(q, k, v, attn_mask=None, *args, **kwargs):
        calls.append(refusals(q, k, v, attn_mask))
        return attention(q, k, v, attn_mask, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recorded)
    monkeypatch.setattr(swin_v2, "fused_head_multiple", lambda device: CUDA_HEAD_MULTIPLE)
    return calls


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("mask_padding", [False, True])
def test_swin_v2_attention_takes_the_fused_kernels(sdpa_calls, mask_padding, autocast):
    # 44-wide heads as SwinV2-H's, two or more per stage, every stage shifted; 100 px leaves
    # maps that are not a multiple of the window, so the padded-key mask is used too.
    config = SwinV2Config(embed_dim=88, depths=(2, 2), num_heads=(2, 4), window_size=8, mask_padding=mask_padding)
    torch.manual_seed(0)
    model = SwinTransformerV2(config).train()
    x = torch.randn(2, 3, 100, 100)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    out.float().square().mean().backward()
    assert len(sdpa_calls) == 4
    assert all(not reasons for reasons in sdpa_calls), sdpa_calls


@pytest.mark.parametrize("autocast", [False, True])
def test_skysense_attention_takes_the_fused_kernels(sdpa_calls, autocast):
    torch.manual_seed(0)
    model = SkySense(preset_config("tiny")).train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(**tiny_inputs())
    out.float().square().mean().backward()
    assert len(sdpa_calls) > 10  # SwinV2, both ViTs, the fusion and the geo-context
    assert all(not reasons for reasons in sdpa_calls), [r for r in sdpa_calls if r]


def test_the_check_refuses_a_permuted_bias():
    # The check itself: the layout the non-shifted SwinV2 blocks used to pass.
    q = torch.randn(4, 2, 64, 48)
    bias = torch.randn(64, 64, 2).permute(2, 0, 1)[None]
    assert refusals(q, q, q, bias) == ["mask (1, 2, 64, 64) has last-dimension stride 2, not 1"]
    assert refusals(q, q, q, bias.contiguous()) == []
