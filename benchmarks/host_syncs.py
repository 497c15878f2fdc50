"""Host-device synchronisations in one pretraining step, counted on the CPU.

On a GPU, PyTorch queues kernels and returns at once; the CPU runs ahead and the GPU never
waits for Python. An operation whose result the CPU needs (``.item()``, ``bool(t)``, an
``if`` on a tensor, ``nonzero``, ``unique``, boolean-mask indexing) waits until the GPU has
finished everything queued before it, and the GPU then idles until the CPU queues the next
kernels. Each one costs little; hundreds per step cost a large share of a step.

These operations go through the same PyTorch operators on every device, so counting them is
possible without a GPU: :class:`HostSyncCounter` counts them in a CPU run, by the source line
in ``skysense`` (or this benchmark) that asked for them. What it cannot see, being on the CPU:
syncs inside an operator's CUDA implementation (``torch.bincount``, ``repeat_interleave``
without ``output_size``), and ``.tolist()`` / ``.cpu()`` of a CUDA tensor; the code avoids
those by review.

    PYTHONPATH=src python benchmarks/host_syncs.py             # tiny preset, two views of 2
    PYTHONPATH=src python benchmarks/host_syncs.py --per-line  # and where each comes from

It also counts the operators that compute (views and other metadata-only operators left out),
about one kernel launch each on a GPU, and prints both counts for the step as the loop runs it
(the views of one shape stacked into one pass, ``batch_views``) and with one pass per view.

The optimizer is left out of the count: on the CPU, ``torch.optim.AdamW`` reads its step counter
with ``.item()`` per parameter, which on a GPU is a host tensor (or, fused, a device tensor read
on the device) and no sync.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_step  # noqa: E402
from live_memory import in_package  # noqa: E402

from skysense.sinkhorn import sinkhorn_knopp  # noqa: E402

# Operators whose output (value or shape) the host must read back from the device.
READ_BACK = {
    "aten._local_scalar_dense.default",  # .item(), bool(t), int(t), float(t), if t: ...
    "aten.nonzero.default",
    "aten.nonzero_static.default",
    "aten.masked_select.default",
    "aten._unique2.default",
    "aten.unique_dim.default",
    "aten.unique_consecutive.default",
}


class HostSyncCounter(TorchDispatchMode):
    """Counts the operators that would wait for a GPU, by the line of our code that called them.

    ``counts``: ``{(operator, "file:line: code"): n}``. A boolean-mask index (``x[mask]``)
    counts once, as ``aten.index.Tensor (bool mask)``. ``operators``: the operators dispatched
    that compute, views (``func.is_view``) and ``_unsafe_view`` left out.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[tuple[str, str]] = Counter()
        self.operators = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if not (func.is_view or name == "aten._unsafe_view.default"):
            self.operators += 1
        if name in READ_BACK or (name.startswith("aten.index") and _has_bool_index(args)):
            if name.startswith("aten.index"):
                name = "aten.index.Tensor (bool mask)"
            self.counts[name, _caller()] += 1
        return func(*args, **(kwargs or {}))


def _has_bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()):
        if in_package(frame.filename) or frame.filename.endswith("gpu_step.py"):
            return f"{Path(frame.filename).name}:{frame.lineno}: {frame.line}"
    return "(outside skysense)"


def pretraining_step_syncs(batch: int = 2, batch_views: bool = True,
                           sinkhorn_rounds: int | None = None) -> HostSyncCounter:
    """Counts one pretraining step of the tiny preset (after one uncounted step), as
    ``benchmarks/gpu_step.py`` runs it, without the optimizer (see the module docstring).
    ``batch_views=False``: one pass of each encoder per view. ``sinkhorn_rounds``: exactly that
    many Sinkhorn-Knopp rounds, no convergence tests (``gpu_step.py --sinkhorn-rounds``)."""
    options = gpu_step.Options(device="cpu", dtype="fp32", shapes=gpu_step.SMALL, sinkhorn_rounds=sinkhorn_rounds)
    model = gpu_step.pretrain_model(options)
    model.pretraining.batch_views = batch_views
    gpu_step.pretrain_workload(model, batch, options)
    model()
    return count_step(model)


def count_step(model: "gpu_step.PretrainStep") -> HostSyncCounter:
    """One step of ``model`` (after its first: the optimizer holds its state) counted, the
    optimizer's own step left out (see the module docstring)."""
    counter = HostSyncCounter()
    step = model.optimizer.step
    model.optimizer.step = lambda *args, **kwargs: _uncounted(counter, step, *args, **kwargs)
    try:
        with counter:
            model()
    finally:
        model.optimizer.step = step
    return counter


def finetuning_step_syncs(host_checks: bool = True, batch: int = 2) -> HostSyncCounter:
    """Counts the forward pass, loss and backward pass of fine-tuning the tiny preset for semantic
    change detection on HR, S2 and S1 pairs with geo-context (the task that uses every input).
    ``host_checks``: as the fine-tuning loop runs it (values checked on the host batch, the
    encoder's checks off); False: the encoder checks the values it is given."""
    from skysense.downstream.tasks import TaskSpec, build_task_model
    from skysense.models import SkySense
    from skysense.validation import checked_on_host

    spec = TaskSpec("change", 2, modalities=("hr", "s2", "s1"), geo_context=True, semantic_classes=3)
    model = build_task_model(SkySense.from_preset("tiny"), spec).train()
    model.encoder.check_values = not host_checks
    g = torch.Generator().manual_seed(0)
    inputs = {"hr": torch.randn(batch, 3, 128, 128, generator=g), "hr_post": torch.randn(batch, 3, 128, 128, generator=g),
              "lat": torch.tensor([48.1, -33.9] * batch)[:batch], "lon": torch.tensor([11.6, 151.2] * batch)[:batch]}
    for m, bands in (("s2", 10), ("s1", 2)):
        inputs[m] = torch.randn(batch, 2, bands, 4, 4, generator=g)
        inputs[f"{m}_dates"] = torch.tensor([[100, 200]] * batch)
        inputs[f"{m}_mask"] = torch.ones(batch, 2, dtype=torch.bool)
    for key, classes in (("mask", 2), ("change", 2), ("mask_post", 3)):
        inputs[key] = torch.randint(-1, classes, (batch, 128, 128), generator=g)  # -1: unlabelled
    if host_checks:
        inputs = checked_on_host(inputs)
    counter = HostSyncCounter()
    with counter:
        total, _ = model.loss(model(inputs), inputs)
        total.backward()
    return counter


def sinkhorn_operators_per_round(score_bound: float | None, grouped: bool) -> float:
    """Operators (views excluded) per Sinkhorn-Knopp round on cosine scores: 6 images x 256
    pixels x 8 clusters (dense, the object clustering's shape) or 256 rows in 3 groups (the geo
    prototypes' form), the difference between 20 and 10 rounds over 10, no early stop."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.nn.functional.normalize(torch.randn(6, 256, 64, generator=g), dim=-1)
    centroids = torch.nn.functional.normalize(torch.randn(6, 8, 64, generator=g), dim=-1)
    scores = pixels @ centroids.transpose(1, 2)
    kwargs: dict = {"groups": torch.arange(256) % 3, "num_groups": 3} if grouped else {}
    if grouped:
        scores = scores[0]
    counts = []
    for rounds in (10, 20):
        with HostSyncCounter() as counter:
            sinkhorn_knopp(scores, 0.05, rounds, tolerance=0.0, score_bound=score_bound, **kwargs)
        counts.append(counter.operators)
    return (counts[1] - counts[0]) / 10


def _uncounted(counter: HostSyncCounter, fn, *args, **kwargs):
    before = counter.counts.copy(), counter.operators
    result = fn(*args, **kwargs)
    counter.counts, counter.operators = before
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2, help="per-view batch (default 2)")
    parser.add_argument("--per-line", action="store_true", help="list the syncs by source line")
    parser.add_argument("--sinkhorn-rounds", type=int, default=3, metavar="N",
                        help="the last row's fixed number of Sinkhorn-Knopp rounds (default 3, SwAV's)")
    args = parser.parse_args(argv)
    print(f"one pretraining step (tiny, batch {args.batch} per view, optimizer excluded):")
    for batch_views, rounds in ((False, None), (True, None), (True, args.sinkhorn_rounds)):
        torch.manual_seed(0)
        counter = pretraining_step_syncs(args.batch, batch_views, rounds)
        if batch_views and rounds is None:
            default = counter
        label = "views stacked (the loop's default)" if batch_views else "one pass per view"
        if rounds is not None:
            label = f"stacked, Sinkhorn {rounds} rounds, no tests"
        print(f"  {label:38s} host syncs {counter.total:4d}   operators (views excluded) {counter.operators:6d}")
    counter = default
    print("fine-tuning step (semantic change on HR, S2, S1 with geo-context; forward, loss, backward):")
    for host_checks in (False, True):
        label = "values checked on the host (the loop)" if host_checks else "values checked in the model"
        print(f"  {label:38s} host syncs {finetuning_step_syncs(host_checks).total:4d}")
    print("Sinkhorn-Knopp operators per round (cosine scores):")
    for grouped in (False, True):
        log_domain, scaling = (sinkhorn_operators_per_round(bound, grouped) for bound in (None, 1.0))
        print(f"  {'grouped (geo regions)' if grouped else 'dense (object clustering)':38s} log domain {log_domain:5.1f}"
              f"   scaling domain {scaling:5.1f}")
    if args.per_line:  # of the pretraining loop's default
        for (name, where), n in counter.counts.most_common():
            print(f"{n:5d}  {name:34s} {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
