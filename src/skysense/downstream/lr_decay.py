"""Layer-wise learning-rate decay for fine-tuning (BEiT / MAE / Swin fine-tuning recipes).

A parameter at layer ``l`` of a stack of ``L`` layers learns at ``lr * decay ** (L + 1 - l)``:
the layers next to the head learn fastest, the embeddings slowest. Each stack is counted on its
own:

* **HR SwinV2**: patch embedding = layer 0; the blocks of all stages in order = 1..N; a stage's
  patch merging shares the layer of the stage's first block; a stage's output norm shares the
  layer of its last block; ``L = N``.
* **S2 / S1 ViT**: patch embedding, position embedding, class token = 0; block ``i`` = ``i + 1``;
  anything after the blocks = ``depth + 1``; ``L = depth``.
* **Fusion**: the S2/S1 projections, the day-of-year table, the input projection and the extra
  token = 0; block ``i`` = ``i + 1``; ``L = depth``.
* **Everything else** (task heads; the geo-context prototypes are a buffer, not trained) learns
  at ``lr`` (scale 1).

Weight decay applies to weight matrices only: biases, norms, tokens, position embeddings, the
day-of-year table and SwinV2's ``logit_scale`` are not decayed.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from skysense.config import SkySenseConfig

NO_DECAY_NAMES = ("pos_embed", "cls_token", "extra_token", "day_of_year", "logit_scale", "mask_token")


def _block_index(parts: list[str], after: str) -> int:
    return int(parts[parts.index(after) + 1])


def layer_of(name: str, config: SkySenseConfig, prefix: str = "encoder.") -> tuple[str, int, int]:
    """``(stack, layer, L)`` of an encoder parameter named ``prefix + ...``; stack ``"head"`` otherwise."""
    if not name.startswith(prefix):
        return "head", 0, 0
    parts = name[len(prefix):].split(".")
    top = parts[0]
    if top == "hr_encoder":
        depths = list(config.hr.depths)
        total = sum(depths)
        if parts[1] in ("patch_embed", "patch_norm"):
            return "hr", 0, total
        if parts[1] == "stages":
            stage = int(parts[2])
            before = sum(depths[:stage])
            if parts[3] == "downsample":
                return "hr", before + 1, total
            return "hr", before + _block_index(parts, "blocks") + 1, total
        if parts[1] == "out_norms":
            stage = int(parts[2])
            return "hr", sum(depths[: stage + 1]), total
        return "hr", total, total
    if top in ("s2_encoder", "s1_encoder"):
        vit = config.s2 if top == "s2_encoder" else config.s1
        stack = top.split("_")[0]
        if parts[1] in ("patch_embed", "pos_embed", "cls_token"):
            return stack, 0, vit.depth
        if parts[1] == "blocks":
            return stack, int(parts[2]) + 1, vit.depth
        return stack, vit.depth + 1, vit.depth
    if top in ("fusion", "s2_projection", "s1_projection"):
        depth = config.fusion.depth
        if top == "fusion" and parts[1] == "blocks":
            return "fusion", int(parts[2]) + 1, depth
        return "fusion", 0, depth
    return "encoder_other", 0, 0


def lr_scale(name: str, config: SkySenseConfig, decay: float, prefix: str = "encoder.") -> float:
    """Learning-rate multiplier of a parameter (module docstring)."""
    stack, layer, total = layer_of(name, config, prefix)
    if stack in ("head", "encoder_other"):
        return 1.0
    return decay ** (total + 1 - layer)


def decays_weight(name: str, param_ndim: int) -> bool:
    """Whether weight decay applies (matrices and conv kernels, minus tokens and tables)."""
    return param_ndim >= 2 and not any(name.endswith(n) or f".{n}" in name for n in NO_DECAY_NAMES)


def parameter_groups(model: nn.Module, config: SkySenseConfig, weight_decay: float, layer_decay: float,
                     prefix: str = "encoder.", skip: Iterable[str] = ()) -> list[dict]:
    """AdamW parameter groups, one per (lr scale, decayed or not); each group carries ``lr_scale``.

    Args:
        model: the task model (encoder parameters under ``prefix``).
        layer_decay: the per-layer factor (1.0: no decay).
        skip: name prefixes to leave out (e.g. a frozen encoder).
    """
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay: expected in (0, 1], got {layer_decay}")
    groups: dict[tuple[float, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad or any(name.startswith(s) for s in skip):
            continue
        scale = lr_scale(name, config, layer_decay, prefix)
        decayed = decays_weight(name, param.ndim)
        key = (scale, decayed)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "lr_scale": scale,
                           "weight_decay": weight_decay if decayed else 0.0}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], k[1]))]
