"""Bytes of live storages as a step runs, on any device, and where the large ones were made.

:class:`LiveBytes` counts every storage the operators in its context create (``benchmarks/
step_memory.py`` runs it on fake tensors to estimate a step's peak without allocating it).
:class:`LiveSites` also remembers where each large storage was made, so that when a step runs
out of memory the bytes alive at that moment can be listed by origin
(``benchmarks/gpu_step.py`` does so when part (d) does not fit).
"""

from __future__ import annotations

import functools
import os
import sys
import weakref
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import skysense

GIB = 2**30
# Where library code lives: its frames are skipped when naming the line that made a storage.
LIBRARY_PATHS = ("/torch/", "/site-packages/", "/dist-packages/", "/lib/python3")
# The skysense package's folder. Frames are matched against it, not against a "/skysense/" in
# their path: a clone is usually a folder named skysense too, holding the benchmarks and tests.
PACKAGE = str(Path(skysense.__file__).resolve().parent) + os.sep


@functools.lru_cache(maxsize=4096)
def in_package(filename: str) -> bool:
    """Whether a frame's file is part of the skysense package."""
    return not filename.startswith("<") and str(Path(filename).resolve()).startswith(PACKAGE)


@functools.lru_cache(maxsize=4096)
def package_path(filename: str) -> str:
    """A package file's path inside the package (``models/layers.py``)."""
    return str(Path(filename).resolve())[len(PACKAGE):]


def _ours(filename: str) -> bool:
    """Whether a frame's file is our code (skysense, the benchmarks, tests, a user's script)."""
    if filename.endswith("live_memory.py") or filename.startswith("<"):
        return False
    return in_package(filename) or not any(path in filename for path in LIBRARY_PATHS)


def innermost_frame(accept: Callable[[str], bool]) -> Any:
    """The innermost frame of the caller's stack whose file name ``accept`` takes, or None."""
    frame = sys._getframe(1)
    while frame is not None and not accept(frame.f_code.co_filename):
        frame = frame.f_back
    return frame


class LiveBytes(TorchDispatchMode):
    """Bytes of every storage alive, and their peak, over the operators run in its context.

    Storages are counted once however many tensors view them, and leave the count when their
    last tensor goes. Values an operator would read back to the host (``.item()``, ``bool``,
    ``nonzero``) cannot exist on fake tensors: ``.item()`` answers 0 (False), ``nonzero`` answers
    ``nonzero_rows`` rows (at most the input's size). ``nonzero_rows=None``: real tensors, no
    stand-ins.
    """

    def __init__(self, nonzero_rows: int | None) -> None:
        super().__init__()
        self.nonzero_rows = nonzero_rows
        self.sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def track(self, tensor: torch.Tensor) -> int | None:
        """Count ``tensor``'s storage; its key when it was not counted yet, else None."""
        if isinstance(tensor, DTensor):  # FSDP2's sharded parameters, gradients, moments
            tensor = tensor.to_local()
        storage = tensor.untyped_storage()
        key = id(storage)  # storages keep one Python object while they live
        if key in self.sizes:
            return None
        size = storage.nbytes()
        self.sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)
        return key

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key)

    def resized(self, storage: torch.UntypedStorage) -> None:
        """A storage's size changed in place (FSDP2 frees and re-allocates gathered parameters so)."""
        key = id(storage)
        if key in self.sizes:
            self.live += storage.nbytes() - self.sizes[key]
            self.sizes[key] = storage.nbytes()
            self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        fake = self.nonzero_rows is not None
        if fake and func is torch.ops.aten._local_scalar_dense.default:
            return False if args[0].dtype == torch.bool else 0
        if fake and func is torch.ops.aten.nonzero.default:
            out = torch.zeros(min(self.nonzero_rows, args[0].numel()), args[0].ndim, dtype=torch.long,
                              device=args[0].device)
        else:
            out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.track(tensor)
        return out


class LiveSites(LiveBytes):
    """:class:`LiveBytes` on real tensors that remembers the origin of every storage of at least
    ``min_bytes``: the operator that made it and, in the backward pass, the autograd node that
    ran it, else the innermost line of our code (not torch's, the standard library's or
    another installed package's) below it.

    Storages tracked before the step (:meth:`track_state`) are "model state"; smaller storages
    are counted together.
    """

    def __init__(self, min_bytes: int = 2**20) -> None:
        super().__init__(nonzero_rows=None)
        self.min_bytes = min_bytes
        self.origins: dict[int, str] = {}
        self._operator = "model state"

    def track_state(self, tensors) -> None:
        """Count ``tensors`` (parameters, gradients, optimizer moments, inputs) as model state."""
        self._operator = "model state"
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                self.track(tensor)

    def track(self, tensor: torch.Tensor) -> int | None:
        key = super().track(tensor)
        if key is not None and self.sizes[key] >= self.min_bytes:
            self.origins[key] = self._operator if self._operator == "model state" else self._where()
        return key

    def _free(self, key: int) -> None:
        super()._free(key)
        self.origins.pop(key, None)

    def _where(self) -> str:
        node = torch._C._current_autograd_node()
        if node is not None:
            return f"{self._operator} in {node.name()}"
        frame = innermost_frame(_ours)
        if frame is None:
            return self._operator
        name = frame.f_code.co_filename
        return f"{self._operator} at {name.rsplit('/', 1)[-1]}:{frame.f_lineno} ({frame.f_code.co_name})"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._operator = func.overloadpacket.__name__
        return super().__torch_dispatch__(func, types, args, kwargs)

    def by_origin(self, top: int = 12) -> list[dict[str, Any]]:
        """The live bytes grouped by origin, largest first: ``top`` origins, then the rest."""
        totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for key, size in self.sizes.items():
            origin = self.origins.get(key, f"storages under {self.min_bytes // 2**20} MiB")
            totals[origin][0] += size
            totals[origin][1] += 1
        ranked = sorted(totals.items(), key=lambda item: -item[1][0])
        rows = [{"origin": origin, "gib": size / GIB, "storages": count} for origin, (size, count) in ranked[:top]]
        rest = ranked[top:]
        if rest:
            rows.append({"origin": f"{len(rest)} other origins", "gib": sum(s for _, (s, _) in rest) / GIB,
                         "storages": sum(c for _, (_, c) in rest)})
        return rows
