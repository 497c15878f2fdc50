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
  torchtitan arranges them, so the three compose.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Compiled variants one block ``forward`` may collect: every stage shape, shifted or not, the
# extra norm, training or no-grad (the EMA teacher), global or local views. Dynamo's default
# limit (8) would silently leave the rest eager.
RECOMPILE_LIMIT = 64


def raise_recompile_limit(limit: int = RECOMPILE_LIMIT) -> None:
    """Let one code object hold up to ``limit`` compiled variants (never lowers the setting)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))


def compile_blocks(model: nn.Module, block_types: tuple[type[nn.Module], ...], **options: Any) -> int:
    """Replace the ``forward`` of every submodule of ``block_types`` with its compiled version.

    ``options`` go to :func:`torch.compile`; the default is ``fullgraph=True`` (a block that
    does not compile to one graph is an error, not a silent slowdown) and ``dynamic=False`` (one
    graph per shape: the shapes of a run are few and fixed). Hooks registered on the blocks,
    before or after this call, run eagerly around the compiled forward. Returns the number of
    blocks compiled.
    """
    options = {"fullgraph": True, "dynamic": False, **options}
    blocks = [m for m in model.modules() if isinstance(m, block_types)]
    if not blocks:
        names = ", ".join(t.__name__ for t in block_types)
        raise ValueError(f"compile_blocks: {type(model).__name__} holds no block of the types {names}")
    raise_recompile_limit()
    for block in blocks:
        block.forward = torch.compile(block.forward, **options)
    return len(blocks)
