"""SDPA's kernels on the attention calls of our models: which backend is fastest for each shape.

On the H100 (run 1, ``device_runs/2026-11-27-h100/run1-gpu_step.json``) the GEMMs of ViT-L/4 ran
at the measured matmul peak, while cuDNN's attention did 32-token sequences (the fusion, part
(c)) at about 13 TFLOP/s and 257-token ones (ViT-L/4, part (b)) at about 112 (FLOPs by the
formula, forward x 3; benchmarks/RESULTS.md): attention was 15-16% of both steps' GPU time. Short sequences fill few of a flash kernel's tiles, so another
backend may do better. This measures forward + backward of every distinct attention call the
parts of ``benchmarks/gpu_step.py`` make, once per SDPA backend (cuDNN, flash, memory-efficient,
math) and for the model's explicit ``softmax(q k^T + bias) v`` (``attention_backends:
[explicit]``), and names the fastest.

The calls are recorded, not written down: each part's model runs once on the meta device at
the benchmark's shapes while SDPA's arguments are captured (shapes, the mask's shape and
whether it takes a gradient). SwinV2's heads are padded as on CUDA.

    python benchmarks/attention_backends.py --json attention.json        # CUDA, huge shapes, bf16
    python benchmarks/attention_backends.py --device cpu --small         # a CPU smoke run

A backend that refuses a call (e.g. flash with a mask, or any fused kernel on the CPU) is
listed as refused; "default" is what SDPA picks by itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_step  # noqa: E402  (beside this file)

from skysense.config import preset_config  # noqa: E402
from skysense.models import SDPA_BACKENDS, swin_v2  # noqa: E402
from skysense.models import short_attention  # noqa: E402
from skysense.models.attention import explicit_attention  # noqa: E402
from skysense.models.skysense import SkySense  # noqa: E402
from skysense.validation import checked_on_host  # noqa: E402

# "default": SDPA's own choice; "explicit": skysense.models.attention.explicit_attention, the
# model's own softmax(q k^T * scale + mask) v in the inputs' dtype.
BACKENDS: dict[str, list[SDPBackend] | None] = {
    "default": None, **{name: [backend] for name, backend in SDPA_BACKENDS.items()}, "explicit": None, "short": None,
}
# Backends that are ours, not SDPA's: their values are checked before they are timed (the short
# kernel has never run on a GPU).
OURS = ("explicit", "short")


@dataclass(frozen=True)
class AttentionCall:
    """One distinct SDPA call: shapes, and the mask's shape and gradient (None: no mask)."""

    query: tuple[int, ...]
    key: tuple[int, ...]
    mask: tuple[int, ...] | None
    mask_grad: bool
    scale: float | None

    @property
    def forward_flops(self) -> int:
        """``q k^T`` and ``p v``: 4 B H L S D."""
        *batch, length, dim = self.query
        return 4 * length * self.key[-2] * dim * int(torch.tensor(batch).prod())


def record_calls(run: Callable[[], Any]) -> dict[AttentionCall, int]:
    """The distinct SDPA calls ``run`` makes, with how many times each, SwinV2's heads padded as
    on CUDA (``run`` builds and runs a model on the meta device)."""
    calls: dict[AttentionCall, int] = {}
    attention, head_multiple = F.scaled_dot_product_attention, swin_v2.fused_head_multiple

    def recorded(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        call = AttentionCall(tuple(q.shape), tuple(k.shape), None if attn_mask is None else tuple(attn_mask.shape),
                             attn_mask is not None and attn_mask.requires_grad, scale)
        calls[call] = calls.get(call, 0) + 1
        return attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)

    F.scaled_dot_product_attention, swin_v2.fused_head_multiple = recorded, lambda device: 8
    try:
        run()
    finally:
        F.scaled_dot_product_attention, swin_v2.fused_head_multiple = attention, head_multiple
    return calls


def part_calls(part: str, shapes: gpu_step.Shapes) -> dict[AttentionCall, int]:
    """The attention calls of one forward of part ``part`` (swin_v2, vit, fusion or pretrain_step,
    the student's forward at the first of ``shapes.step_batches``, both views stacked)."""
    meta = torch.device("meta")
    if part in ("swin_v2", "vit", "fusion"):
        def run() -> None:
            models, x = gpu_step.encoder_models(part, shapes, meta)
            models["skysense"](x)
    elif part == "pretrain_step":
        def run() -> None:
            with meta:
                model = SkySense(preset_config(shapes.preset))
            model.check_values = False
            views = gpu_step.pretrain_views(shapes, shapes.step_batches[0], torch.device("cpu"),
                                            torch.Generator().manual_seed(0))
            # The loop's view batching (skysense.pretrain.view_batching): both views in one pass.
            # Values checked on the host, as the loop does (all-valid frame masks are dropped).
            views = [checked_on_host(view) for view in views]
            model.forward_features(**{key: torch.cat([views[0][key], views[1][key]]).to(meta) for key in views[0]})
    else:
        raise ValueError(f"unknown part {part!r}; expected swin_v2, vit, fusion or pretrain_step")
    return record_calls(run)


@dataclass
class AttentionInputs:
    """Random inputs of one call, made on the device once for every backend."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    grad: torch.Tensor
    qkv: torch.Tensor | None = None  # the projection output q, k and v are views of (unmasked calls)

    @classmethod
    def make(cls, call: AttentionCall, device: torch.device, dtype: torch.dtype) -> "AttentionInputs":
        """Unmasked calls (the ViTs' and the fusion's blocks) get q, k and v as those blocks make
        them: views of an (N, L, 3C) projection output that needs a gradient, split along the
        channels, each viewed as (N, H, L, D), strided; masked ones (SwinV2's windows, after the
        cosine normalisation) contiguous tensors. A backend that copies strided inputs pays for
        it here as in the model (the explicit product on the H100, 2026-11-28, did not, when
        every input was contiguous), and so does one whose three gradients autograd
        concatenates into the projection's (the short kernel's qkv entry writes it whole)."""
        g = torch.Generator(device=device).manual_seed(0)

        def tensor(shape: tuple[int, ...], grad: bool) -> torch.Tensor:
            return torch.randn(shape, generator=g, device=device, dtype=dtype).requires_grad_(grad)

        mask = None if call.mask is None else tensor(call.mask, call.mask_grad)
        if call.mask is None and call.query == call.key:
            n, heads, length, width = call.query
            qkv = tensor((n, length, 3 * heads * width), True)
            q, k, v = _split_heads(qkv, heads)
            return cls(q, k, v, mask, tensor(call.query, False), qkv)
        q, k, v = tensor(call.query, True), tensor(call.key, True), tensor(call.key, True)
        return cls(q, k, v, mask, tensor(call.query, False))

    def upcast(self) -> "AttentionInputs":
        """The same values in float32, as new leaves laid out alike (a reference to check against)."""
        def leaf(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().float().requires_grad_(t.requires_grad)

        if self.qkv is not None:
            qkv = leaf(self.qkv)
            return AttentionInputs(*_split_heads(qkv, self.q.shape[1]), None, self.grad.float(), qkv)
        return AttentionInputs(leaf(self.q), leaf(self.k), leaf(self.v), leaf(self.mask), self.grad.float())


def _split_heads(qkv: torch.Tensor, heads: int) -> list[torch.Tensor]:
    """q, k, v of an (N, L, 3C) projection output as (N, H, L, D) views, as the blocks split it."""
    n, length, width3 = qkv.shape
    return [t.reshape(n, length, heads, -1).transpose(1, 2) for t in qkv.split(width3 // 3, -1)]


def backend_forward(call: AttentionCall, inputs: AttentionInputs, backend: str) -> Callable[[], torch.Tensor]:
    """The forward pass of ``call`` with ``backend`` on ``inputs``, as the model's layers make it;
    RuntimeError when the backend does not take the call."""
    q, k, v, mask, qkv = inputs.q, inputs.k, inputs.v, inputs.mask, inputs.qkv
    heads = q.shape[1]
    if backend == "short":
        if mask is not None or qkv is None or not short_attention.supports_qkv(qkv, heads):
            raise RuntimeError(f"short: timed here without a mask, up to {short_attention.MAX_LENGTH} tokens, heads "
                               f"up to {short_attention.MAX_WIDTH} wide, CUDA (SwinV2's calls: "
                               f"benchmarks/swin_attention.py); got q {tuple(q.shape)} on {q.device}")
        return lambda: short_attention.short_attention_qkv(qkv, heads, None, call.scale)  # as the layers call it
    if backend == "explicit":
        return lambda: explicit_attention(q, k, v, mask, call.scale)
    if BACKENDS[backend] is None:
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=call.scale)

    def forced() -> torch.Tensor:
        with sdpa_kernel(BACKENDS[backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=call.scale)

    return forced


def _forward_backward(forward: Callable[[], torch.Tensor], inputs: AttentionInputs) -> list[torch.Tensor]:
    """Run ``forward`` and its backward pass with ``inputs.grad``; the output and the inputs'
    gradients (the projection's where the inputs are its views), which it then clears."""
    out = forward()
    grad = inputs.grad
    if out.dim() == 3:  # the qkv entry's (N, L, C)
        grad = grad.transpose(1, 2).reshape(out.shape)
    out.backward(grad)
    leaves = [inputs.qkv] if inputs.qkv is not None else [inputs.q, inputs.k, inputs.v, inputs.mask]
    results = [out.detach() if out.dim() == 4 else out.detach().unflatten(-1, (inputs.q.shape[1], -1)).transpose(1, 2)]
    for t in leaves:
        if t is not None and t.grad is not None:
            results.append(t.grad)
    for t in (inputs.q, inputs.k, inputs.v, inputs.mask, inputs.qkv):  # each step alike: no accumulation
        if t is not None:
            t.grad = None
    return results


def check_values(call: AttentionCall, inputs: AttentionInputs, backend: str, slack: float = 4.0) -> None:
    """RuntimeError unless ``backend``'s output and gradients are within ``slack`` times SDPA's
    default's error (plus 1e-3) of SDPA's math in float32 on the same inputs: a kernel of ours
    that computes something else (a wrong stride or layout gives errors of the values' own
    size) is refused, not timed. The slack leaves room for rounding that differs from SDPA's
    kernel in bf16 (the explicit product rounds its scores to bf16, for one), so that a right
    kernel is not refused."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = _forward_backward(backend_forward(call, inputs, backend), inputs)
        default = _forward_backward(backend_forward(call, inputs, "default"), inputs)
        exact_inputs = inputs.upcast()
        exact = _forward_backward(backend_forward(call, exact_inputs, "math"), exact_inputs)
    names = ["output", *(f"gradient {i + 1} of {len(exact) - 1}" for i in range(len(exact) - 1))]
    for what, a, b, ref in zip(names, ours, default, exact, strict=True):
        error, default_error = (a.float() - ref).abs().max().item(), (b.float() - ref).abs().max().item()
        if not error <= slack * default_error + 1e-3:
            raise RuntimeError(f"{backend}: wrong values: {what} off by {error:.3g} from SDPA's float32 math, "
                               f"SDPA's default by {default_error:.3g}")


def time_backend(call: AttentionCall, inputs: AttentionInputs, backend: str, device: torch.device,
                 warmup: int, repeats: int) -> float:
    """Median seconds of forward + backward of ``call`` with ``backend``; raises RuntimeError
    when the backend refuses it (ours, :data:`OURS`, also when its values are wrong)."""
    forward = backend_forward(call, inputs, backend)
    if backend in OURS:
        check_values(call, inputs, backend)

    def step() -> None:
        _forward_backward(forward, inputs)

    with warnings.catch_warnings():  # a forced backend that refuses says why at length
        warnings.simplefilter("ignore")
        times = gpu_step.time_steps(step, device, warmup, repeats)
    return statistics.median(times)


def default_choice(call: AttentionCall, device: torch.device, dtype: torch.dtype) -> str:
    """The backend SDPA picks by itself for ``call`` (with gradients)."""
    q = torch.empty(call.query, device=device, dtype=dtype, requires_grad=True)
    k = torch.empty(call.key, device=device, dtype=dtype, requires_grad=True)
    mask = None if call.mask is None else torch.empty(call.mask, device=device, dtype=dtype,
                                                       requires_grad=call.mask_grad)
    choice = torch._fused_sdp_choice(q, k, k, mask, 0.0, False, scale=call.scale)
    names = {int(member): name for name, member in SDPBackend.__members__.items()}
    return names.get(int(choice), str(choice)).lower()


def run(parts: tuple[str, ...], shapes: gpu_step.Shapes, device: torch.device, dtype: torch.dtype,
        warmup: int, repeats: int, budget_s: float | None = None) -> dict[str, Any]:
    """Every distinct call of ``parts`` timed with every backend; the report."""
    start = time.perf_counter()
    rows = []
    for part in parts:
        for call, count in part_calls(part, shapes).items():
            row: dict[str, Any] = {"part": part, **dataclasses.asdict(call), "calls_per_forward": count,
                                   "forward_flops": call.forward_flops,
                                   "default_is": default_choice(call, device, dtype), "ms": {}, "refused": {}}
            inputs = AttentionInputs.make(call, device, dtype)
            for backend in BACKENDS:
                if budget_s is not None and time.perf_counter() - start > budget_s:
                    row["refused"][backend] = "skipped: out of time (--budget)"
                    continue
                try:
                    row["ms"][backend] = time_backend(call, inputs, backend, device, warmup, repeats) * 1e3
                except (RuntimeError, torch.OutOfMemoryError) as error:
                    row["refused"][backend] = gpu_step.error_text(error)
            del inputs
            gpu_step.release(device)
            timed = row["ms"]
            row["fastest"] = min(timed, key=timed.get) if timed else None
            rows.append(row)
            print(format_row(row), flush=True)
    return {"device": gpu_step.device_name(device), "torch": torch.__version__, "dtype": str(dtype).split(".")[-1],
            "warmup": warmup, "repeats": repeats, "rows": rows}


def format_row(row: dict[str, Any]) -> str:
    mask = "-" if row["mask"] is None else f"{tuple(row['mask'])}{' grad' if row['mask_grad'] else ''}"
    timed = row["ms"]
    cells = " ".join(f"{name}={timed[name]:.3f}" if name in timed else f"{name}=refused" for name in BACKENDS)
    fastest = row["fastest"]
    speedup = (f" {timed['default'] / timed[fastest]:.2f}x over default" if fastest and "default" in timed
               else "")
    tflops = (f", {3 * row['forward_flops'] / timed[fastest] / 1e9:.1f} TFLOP/s (3x forward)" if fastest else "")
    return (f"{row['part']:<13} q {tuple(row['query'])} k {tuple(row['key'])} mask {mask} x{row['calls_per_forward']}: "
            f"default picks {row['default_is']}; ms fwd+bwd {cells}; fastest {fastest}{speedup}{tflops}")


# The backends --our-sdpa-from may name: SDPA's own and the short-sequence kernel, which reads
# strided inputs as they come and sits in the compiled graph. "explicit" is timed but not chosen: on the
# H100 (2026-11-28) it beat cuDNN 1.65x on the fusion's call here, with contiguous inputs, and
# lost inside the compiled fusion, where its batched products copied the strided q, k and v of
# the qkv split (72 copies, 17.7 ms per step: benchmarks/RESULTS.md).
CHOSEN_AUTOMATICALLY = ("default", *SDPA_BACKENDS, "short")


def faster_backends(report: dict[str, Any], min_speedup: float = 1.1) -> dict[str, str]:
    """For each of (a)-(c) (swin_v2, vit, fusion) in ``report``: the backend (SDPA's, or "short") whose forward +
    backward time, summed over the part's calls (each times its calls per forward), beats SDPA's
    default by ``min_speedup`` or more. Only backends that took every call of the part compete,
    and a part with an untimed default is left out (SDPA's own choice stays)."""
    chosen = {}
    for part in ("swin_v2", "vit", "fusion"):
        rows = [row for row in report["rows"] if row["part"] == part]
        if not rows:
            continue
        totals = {backend: sum(row["ms"][backend] * row["calls_per_forward"] for row in rows)
                  for backend in CHOSEN_AUTOMATICALLY if all(backend in row["ms"] for row in rows)}
        if "default" not in totals:
            continue
        best = min(totals, key=totals.get)
        if best != "default" and totals["default"] >= min_speedup * totals[best]:
            chosen[part] = best
    return chosen


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny models and shapes (a CPU smoke run)")
    parser.add_argument("--parts", default="swin_v2,vit,fusion,pretrain_step")
    parser.add_argument("--step-batch", type=int, default=3, help="per-device batch of the pretraining step")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--budget", type=float, metavar="SECONDS", help="skip what starts after this many seconds")
    parser.add_argument("--json", metavar="PATH", help="also write the report here (atomically)")
    parser.add_argument("--our-sdpa-from", metavar="PATH",
                        help="measure nothing: read a report written with --json and print gpu_step.py's "
                             "--our-sdpa flags for the parts where a backend beat the default by --min-speedup")
    parser.add_argument("--min-speedup", type=float, default=1.1)
    args = parser.parse_args(argv)
    if args.our_sdpa_from:
        import json

        chosen = faster_backends(json.loads(Path(args.our_sdpa_from).read_text()), args.min_speedup)
        print(" ".join(f"--our-sdpa {part}={backend}" for part, backend in chosen.items()))
        return chosen
    device = torch.device(args.device)
    shapes = dataclasses.replace(gpu_step.SMALL if args.small else gpu_step.HUGE, step_batches=(args.step_batch,))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    report = run(parts, shapes, device, dtype, args.warmup, args.repeats, args.budget)
    if args.json:
        gpu_step.write_json(report, Path(args.json))
    return report


if __name__ == "__main__":
    main()
