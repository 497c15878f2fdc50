"""``torch.compile`` applied from outside the model: the whole module, or each block on its own.

Block-wise ("regional") compilation compiles the ``forward`` of every transformer block and
leaves the glue between blocks (patch embedding, patch merging, the fusion's token assembly,
the objectives' Sinkhorn-Knopp iterations) eager. It is what makes a compiled step practical:

* identical blocks share one compiled graph (with nn.Module inlining, parameters are graph
  inputs), so ViT-L's 24 blocks compile once instead of 24 times; SwinV2 needs one graph per
  stage shape and shift;
* data-dependent code outside the blocks (the convergence test of Sinkhorn-Knopp, the frame
  masks that keep invalid frames out of the encoders) does not break the compiled graphs;
* the hooks of activation checkpointing and of FSDP2 stay around the compiled ``forward``, as
  torchtitan arranges them, so the three compose. Selective checkpointing
  (:func:`skysense.distributed.matmul_outputs_saved`) is the exception: its policy must see the
  block's operators, which a compiled graph hides, so the checkpoint moves inside the graph
  (torch.compile traces ``torch.utils.checkpoint`` and keeps what the policy saves).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from skysense.models.swin_v2 import SwinV2Block

# Compiled variants one block ``forward`` may collect: every stage shape, shifted or not, the
# extra norm, training or no-grad (the EMA teacher), global or local views. Dynamo's default
# limit (8) would silently leave the rest eager.
RECOMPILE_LIMIT = 64


# Blocks whose compiled CPU kernels do not build under some torch releases: inductor's C++
# backend emits code that does not compile for SwinV2's blocks (pytorch/pytorch#179135, open:
# reported failing on 2.11 and working on 2.9; here 2.11.0 fails, 2.13.0 and 2.14.1 build).
# Such blocks stay eager on the CPU under those releases, with a warning; CUDA (Triton) and other
# backends are not affected. Releases not tried here (2.10, 2.12) are treated as affected.
CPU_INDUCTOR_BROKEN: dict[type[nn.Module], tuple[tuple[int, int], tuple[int, int], str]] = {
    SwinV2Block: ((2, 10), (2, 13), "pytorch/pytorch#179135"),
}


def torch_release() -> tuple[int, int]:
    """``(major, minor)`` of the running torch."""
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def _stays_eager(block: nn.Module, options: dict[str, Any]) -> str | None:
    """Why ``block`` must not be compiled with ``options`` on its device, or None."""
    if options.get("backend", "inductor") != "inductor":
        return None
    param = next(block.parameters(), None)
    if param is None or param.device.type != "cpu":
        return None
    for block_type, (first, end, issue) in CPU_INDUCTOR_BROKEN.items():
        if isinstance(block, block_type) and first <= torch_release() < end:
            return (f"{block_type.__name__} stays eager on the CPU: torch {torch.__version__}'s inductor C++ backend "
                    f"emits code that does not compile for it ({issue}); torch {end[0]}.{end[1]} or newer compiles it")
    return None


def raise_recompile_limit(limit: int = RECOMPILE_LIMIT) -> None:
    """Let one code object hold up to ``limit`` compiled variants (never lowers the setting)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))


def _traced_checkpoint(block: nn.Module) -> Any:
    """The ``context_fn`` to trace inside ``block``'s compiled forward (its composable
    checkpoint is then switched off), or None: a block checkpointed by
    :func:`skysense.distributed.apply_activation_checkpointing` with a ``context_fn`` that has
    ``traced_in_compile`` (selective checkpointing)."""
    from torch.distributed._composable.checkpoint_activation import checkpoint

    state = checkpoint.state(block)
    traced = getattr(getattr(block, "_checkpoint_context_fn", None), "traced_in_compile", None)
    if state is None or not state.enable_hook or traced is None:
        return None
    state.enable_hook = False  # the compiled graph checkpoints itself
    return traced


def _checkpointed(forward: Any, context_fn: Any) -> Any:
    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

    return checkpointed


def compile_blocks(model: nn.Module, block_types: tuple[type[nn.Module], ...], **options: Any) -> int:
    """Replace the ``forward`` of every submodule of ``block_types`` with its compiled version.

    ``options`` go to :func:`torch.compile`; the default is ``fullgraph=True`` (a block that
    does not compile to one graph is an error, not a silent slowdown) and ``dynamic=False`` (one
    graph per shape: the shapes of a run are few and fixed). Hooks registered on the blocks,
    before or after this call, run eagerly around the compiled forward. Blocks that the running
    torch cannot compile on their device (:data:`CPU_INDUCTOR_BROKEN`) stay eager, with a
    warning. Returns the number of blocks compiled.
    """
    options = {"fullgraph": True, "dynamic": False, **options}
    blocks = [m for m in model.modules() if isinstance(m, block_types)]
    if not blocks:
        names = ", ".join(t.__name__ for t in block_types)
        raise ValueError(f"compile_blocks: {type(model).__name__} holds no block of the types {names}")
    raise_recompile_limit()
    compiled = 0
    reasons: set[str] = set()
    for block in blocks:
        reason = _stays_eager(block, options)
        if reason is not None:
            reasons.add(reason)
            continue
        forward, context_fn = block.forward, _traced_checkpoint(block)
        if context_fn is not None:
            forward = _checkpointed(forward, context_fn)
        block.forward = torch.compile(forward, **options)
        compiled += 1
    for reason in sorted(reasons):
        warnings.warn(f"compile_blocks: {reason}", stacklevel=2)
    return compiled
