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
OWN_CODE = ("skysense", "gpu_step.py")


class HostSyncCounter(TorchDispatchMode):
    """Counts the operators that would wait for a GPU, by the line of our code that called them.

    ``counts``: ``{(operator, "file:line: code"): n}``. A boolean-mask index (``x[mask]``)
    counts once, as ``aten.index.Tensor (bool mask)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[tuple[str, str]] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
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
        if any(part in frame.filename for part in OWN_CODE):
            return f"{Path(frame.filename).name}:{frame.lineno}: {frame.line}"
    return "(outside skysense)"


def pretraining_step_syncs(batch: int = 2) -> HostSyncCounter:
    """Counts one pretraining step of the tiny preset (after one uncounted step), as
    ``benchmarks/gpu_step.py`` runs it, without the optimizer (see the module docstring)."""
    options = gpu_step.Options(device="cpu", dtype="fp32", shapes=gpu_step.SMALL)
    model = gpu_step.pretrain_model(options)
    gpu_step.pretrain_workload(model, batch, options)
    model()
    counter = HostSyncCounter()
    step = model.optimizer.step
    model.optimizer.step = lambda *args, **kwargs: _uncounted(counter, step, *args, **kwargs)
    with counter:
        model()
    return counter


def _uncounted(counter: HostSyncCounter, fn, *args, **kwargs):
    before = counter.counts.copy()
    result = fn(*args, **kwargs)
    counter.counts = before
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2, help="per-view batch (default 2)")
    parser.add_argument("--per-line", action="store_true", help="list the syncs by source line")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    counter = pretraining_step_syncs(args.batch)
    print(f"host syncs in one pretraining step (tiny, batch {args.batch}, optimizer excluded): {counter.total}")
    if args.per_line:
        for (name, where), n in counter.counts.most_common():
            print(f"{n:5d}  {name:34s} {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
