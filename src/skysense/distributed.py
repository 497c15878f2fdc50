"""Scale applied from outside the model: process groups, DDP, FSDP2, activation checkpointing.

The model code knows nothing of ranks. One code path serves a plain ``python`` process and
``torchrun --nproc-per-node N``: the backend is NCCL on CUDA and gloo on the CPU.

Two ways to share the work of N processes (torchtitan's split, Liang et al., 2024):

* :func:`wrap_data_parallel`: every process holds the whole model; DDP averages gradients.
* :func:`apply_fsdp`: FSDP2 (``torch.distributed.fsdp.fully_shard``) shards parameters,
  gradients and optimizer state over the processes, one communication group per transformer
  block, so a model larger than one GPU trains. Parameters become ``DTensor`` shards
  (``Shard(0)``): an EMA between two modules sharded the same way is a local operation.
"""

from __future__ import annotations

import functools
import gc
import os
import types
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistributedContext:
    """Join the process group that torchrun describes in the environment, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def close_distributed() -> None:
    """Leave the process group, after freeing what still refers to it.

    FSDP modules sit in reference cycles; left to the interpreter's exit, they are destroyed
    after the group and the process aborts ("terminate called without an active exception"),
    seen in about one run in five of a 2-process gloo test before this collection.
    """
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def is_distributed() -> bool:
    """Whether torch.distributed is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` in place over all processes with ``"sum"`` or ``"max"``; returns it.

    Identity in a single process. Gloo and NCCL hand every process the same bits (checked for
    gloo in tests/pretrain/test_global_batch_objectives.py), so decisions taken on the result,
    e.g. stopping an iteration, agree across processes.
    """
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
    if op not in ops:
        raise ValueError(f"all_reduce_: op must be one of {sorted(ops)}, got {op!r}")
    if is_distributed():
        dist.all_reduce(tensor, op=ops[op])
    return tensor


def gather_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every process's rows of ``tensor`` (B, ...), in rank order, with gradients flowing back.

    Returns ``(rows (N * B, ...), first)``, this process's rows being ``first..first + B - 1``;
    ``(tensor, 0)`` in a single process. Every process must give the same shape. The backward
    sums each process's gradient into the owner of the rows, so a loss on this process's rows
    against all rows, averaged over processes by DDP or FSDP, has the gradient of one process
    holding the whole batch (CLIP's global-batch contrast, Radford et al., 2021).
    """
    if not is_distributed():
        return tensor, 0
    return _GatherRows.apply(tensor), dist.get_rank() * tensor.shape[0]


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0; the backward sums the gradients of every process (one all-reduce
    of the gathered gradient, small for the (B, E) embeddings this serves) and keeps own rows."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rows = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        first = dist.get_rank() * ctx.rows
        return grad[first : first + ctx.rows]


def mean_across_processes(value: torch.Tensor) -> torch.Tensor:
    """Average a tensor over all processes (identity in a single process)."""
    if is_distributed():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def wrap_data_parallel(module: nn.Module, context: DistributedContext) -> nn.Module:
    """DDP over all processes; unused heads (absent modalities) are allowed."""
    if not context.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True)


def apply_fsdp(
    module: nn.Module, context: DistributedContext, unit_types: tuple[type[nn.Module], ...],
    param_dtype: torch.dtype | None = None,
) -> list[nn.Parameter]:
    """Shard ``module`` in place with FSDP2 over all processes.

    Every submodule of one of ``unit_types`` (e.g. each transformer block) becomes its own
    communication group: its parameters are all-gathered just before its forward, freed
    after it, and its gradients reduce-scattered (averaged) in the backward pass. The
    remaining parameters form the root group of ``module``. A unit must be entered through
    its ``forward`` (``unit(x)``), which is how the encoders call their blocks. Call this after
    :func:`checkpoint_blocks` and before building the optimizer, whose
    parameters must be the sharded ones.

    fully_shard refuses 0-d parameters (it shards dim 0), e.g. a learnable temperature: they
    stay whole on every process and are returned. Average their gradients with
    :func:`average_gradients` after each backward, as DDP would.

    ``param_dtype`` (e.g. ``torch.bfloat16`` when training in bf16 autocast): parameters are
    all-gathered in this dtype, so the gathers move half the bytes and autocast finds its
    matmul weights already cast (it would otherwise make a bf16 copy of every gathered weight,
    once per forward of its unit). Gradients are reduced and kept in float32, the shards and
    AdamW's moments stay float32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not context.enabled:
        raise ValueError("apply_fsdp: needs a process group of several processes (run under torchrun)")
    mesh = init_device_mesh(context.device.type, (context.world_size,))
    scalars = [p for p in module.parameters() if p.ndim == 0]
    units = [m for m in module.modules() if isinstance(m, unit_types)]
    # Innermost units first: fully_shard must see a unit's sharded children before the unit.
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for unit in reversed(units):
        fully_shard(unit, mesh=mesh, ignored_params=set(scalars), mp_policy=policy)
    fully_shard(module, mesh=mesh, ignored_params=set(scalars), mp_policy=policy)
    return scalars


def average_gradients(parameters: list[nn.Parameter]) -> None:
    """Average the gradients of replicated parameters over all processes, in one collective."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads or not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that also takes a mix of FSDP shards and whole tensors.

    Returns the total gradient norm over all processes as a plain tensor.
    """
    from torch.distributed.tensor import DTensor

    with_grad = [p for p in parameters if p.grad is not None]
    groups = [[p for p in with_grad if isinstance(p.grad, DTensor)],
              [p for p in with_grad if not isinstance(p.grad, DTensor)]]
    groups = [group for group in groups if group]
    if len(groups) < 2:
        return full_value(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
    norms = [full_value(torch.nn.utils.get_total_norm([p.grad for p in group])) for group in groups]
    total = torch.linalg.vector_norm(torch.stack(norms))
    for group in groups:
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a ``DTensor`` (a collective when it is sharded); others as is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def check_checkpointing_setting(setting: object) -> None:
    """Raise ``ValueError`` naming ``activation_checkpointing`` (or its network's key) unless
    ``setting`` is one of its values in pretraining and fine-tuning: False, True, "selective",
    or a mapping from networks of a SkySense model (:data:`skysense.models.skysense.NETWORKS`)
    to one of those three."""
    if isinstance(setting, Mapping):
        from skysense.models.skysense import NETWORKS

        for network, value in setting.items():
            if network not in NETWORKS:
                raise ValueError(f"activation_checkpointing: unknown network {network!r}; expected among "
                                 f"{list(NETWORKS)}")
            _check_checkpointing_value(value, f"activation_checkpointing.{network}")
        return
    _check_checkpointing_value(setting, "activation_checkpointing")


def _check_checkpointing_value(value: object, key: str) -> None:
    if not (value is False or value is True or value == "selective"):
        raise ValueError(f"{key}: expected true, false or 'selective'"
                         f"{'' if '.' in key else ' (or a mapping of networks to those)'}, got {value!r}")


def checkpoint_blocks(model: nn.Module, block_types: tuple[type[nn.Module], ...],
                      setting: bool | str | Mapping[str, bool | str]) -> int:
    """Apply an ``activation_checkpointing`` setting to the blocks of ``model``: False, nothing;
    True, each block recomputes its whole forward; "selective", each keeps its matmul and
    attention outputs (:func:`matmul_outputs_saved`). A mapping applies a setting per network of
    a SkySense ``model`` (``{"hr": True, "s2": True, "s1": True, "fusion": "selective"}``: the
    encoders recompute, the fusion transformer keeps its matmul outputs; networks not named are
    not checkpointed). Returns the number of blocks checkpointed."""
    check_checkpointing_setting(setting)
    if isinstance(setting, Mapping):
        network = getattr(model, "network", None)
        if network is None:
            raise ValueError(f"activation_checkpointing: a mapping of networks needs a SkySense model, "
                             f"got {type(model).__name__}")
        networks = {name: network(name) for name in setting}
        return sum(checkpoint_blocks(networks[name], block_types, value)
                   for name, value in setting.items() if networks[name] is not None)
    if setting is False:
        return 0
    if setting == "selective":
        return checkpoint_forwards(model, block_types, matmul_outputs_saved())
    return apply_activation_checkpointing(model, block_types)


def checkpoint_forwards(model: nn.Module, block_types: tuple[type[nn.Module], ...],
                        context_fn: Callable[[], tuple[AbstractContextManager, AbstractContextManager]]) -> int:
    """Checkpoint every block of the given types by wrapping its ``forward`` in
    ``torch.utils.checkpoint.checkpoint`` with ``context_fn`` (selective checkpointing:
    :func:`matmul_outputs_saved`). Hooks on the block stay outside the checkpointed region, in
    the forward pass and in the recomputation alike, which selective checkpointing needs under
    FSDP2: the composable checkpoint of :func:`apply_activation_checkpointing` reruns the block's
    hooks inside the recomputation, so FSDP2's cast of the block's inputs to the gathered
    parameters' dtype (bf16 on CUDA) reaches the replay of operators the forward pass did not
    record, and the backward pass fails ("profiler._record_function_enter_new.default encountered
    during backward but not found in storage"). Parameter names are unchanged; blocks already
    checkpointed either way are left as they are. Under ``compile: blocks``
    (:func:`skysense.compilation.compile_blocks`) the wrapped forward is compiled, the checkpoint
    traced inside the block's graph. Returns the number of blocks checkpointed by this call."""
    blocks = [m for m in model.modules() if isinstance(m, block_types) and block_checkpointing(m) == "off"]
    for block in blocks:
        if "forward" in vars(block):
            raise ValueError(f"checkpoint_forwards: {type(block).__name__}.forward was already replaced "
                             f"(compiled?); checkpoint the blocks before compiling them")
        # A method bound to the block, not a closure over it: a deep copy of the model (the EMA
        # teacher's) then runs its own block, not the original's.
        block.forward = types.MethodType(_checkpointed_forward, block)
        block._checkpoint_context_fn = context_fn
        block._forward_checkpointed = True
    return len(blocks)


def _checkpointed_forward(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    import torch.utils.checkpoint

    return torch.utils.checkpoint.checkpoint(type(block).forward, block, *args, use_reentrant=False,
                                             context_fn=block._checkpoint_context_fn, **kwargs)


def block_checkpointing(block: nn.Module) -> str:
    """How ``block`` recomputes its activations: "off"; "full" (its whole forward); "selective"
    (its matmul and attention outputs kept: a ``context_fn`` with ``traced_in_compile``)."""
    from torch.distributed._composable import checkpoint

    if not getattr(block, "_forward_checkpointed", False) and checkpoint.state(block) is None:
        return "off"
    return "selective" if getattr(getattr(block, "_checkpoint_context_fn", None), "traced_in_compile", None) else "full"


def matmul_outputs_saved() -> Callable[[], tuple[AbstractContextManager, AbstractContextManager]]:
    """``context_fn`` of selective activation checkpointing (:func:`checkpoint_forwards`).

    A checkpointed block keeps the outputs of its matrix products and attention kernels for the
    backward pass and recomputes everything else (norms, activations, casts, copies), so the
    recomputation is memory-bound element-wise work instead of the block's whole forward. At
    the paper's batch of 3 on one device the pretraining step peaks at an estimated 70.5 GiB
    with it, 90.7 without checkpointing and 39.5 with every block fully recomputed
    (``benchmarks/step_memory.py --batches 3 --checkpointing selective``). The blocks must not
    modify those outputs in place (torch raises if they do).

    Under ``compile: blocks`` the checkpoint is inside each block's compiled graph (the compiled
    forward is :func:`checkpoint_forwards`'s, or :func:`skysense.compilation.compile_blocks` moves
    a composable checkpoint's ``traced_in_compile`` inside), where torch.compile applies the
    policy to the graph's operators: outside it, a compiled block's matmuls would reach the
    policy as inductor's ``out=`` kernels and be recomputed.
    """
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu")
    saved = {getattr(aten, name).default for name in names if hasattr(aten, name)}
    from skysense.models import short_attention
    from skysense.models.attention import explicit_attention  # noqa: F401  (registers the operator)

    saved.add(torch.ops.skysense.explicit_attention.default)  # attention_backends: [explicit]
    if short_attention.register_operators():  # attention_backends: [short] (needs Triton)
        saved.update((torch.ops.skysense.short_attention.default, torch.ops.skysense.short_attention_qkv.default))

    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    context_fn = functools.partial(create_selective_checkpoint_contexts, policy)
    context_fn.traced_in_compile = context_fn  # type: ignore[attr-defined]  (see compile_blocks)
    return context_fn


def apply_activation_checkpointing(
    model: nn.Module,
    block_types: tuple[type[nn.Module], ...],
    context_fn: Callable[[], tuple[AbstractContextManager, AbstractContextManager]] | None = None,
) -> int:
    """Recompute the activations of every block of the given types in the backward pass.

    Uses the composable ``checkpoint``, which hooks the block instead of wrapping it, so
    parameter names (state dicts, the EMA teacher's name matching, FSDP units) are unchanged.
    Blocks already checkpointed are left as they are (so a second call can extend the first).
    ``context_fn``: as ``torch.utils.checkpoint.checkpoint``'s, the two context managers a
    block's forward pass and its recomputation run under (for example a selective policy of
    ``torch.utils.checkpoint.create_selective_checkpoint_contexts``); None: none. A
    ``context_fn`` with a ``traced_in_compile`` attribute (:func:`matmul_outputs_saved`) names
    the one :func:`skysense.compilation.compile_blocks` traces inside a compiled block instead.
    Returns the number of blocks checkpointed by this call.
    """
    from torch.distributed._composable import checkpoint

    options = {} if context_fn is None else {"context_fn": context_fn}
    blocks = [m for m in model.modules() if isinstance(m, block_types) and block_checkpointing(m) == "off"]
    for block in blocks:
        checkpoint(block, **options)
        block._checkpoint_context_fn = context_fn
    return len(blocks)
