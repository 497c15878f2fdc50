"""Linear-probe accuracy on AID of each HR pyramid level (and the fused map), for one model.

Extracts, once per split, the average pool of every HR level and of the fused map, then runs
:func:`skysense.evaluation.linear_probe.linear_probe` on several subsets of them. The
``all`` subset is exactly what ``skysense evaluate linear-probe --dataset aid`` scores.

    SKYSENSE_DATA=../shared/data python benchmarks/probe_levels.py --weights runs/aid-tiny
    SKYSENSE_DATA=../shared/data python benchmarks/probe_levels.py --random-init --seed 0
    ... --weights DIR --teacher     # the EMA teacher of DIR/training_state.pt instead
"""

from __future__ import annotations

import argparse
import json

import torch

from skysense.data.datasets import DATASETS, dataset_root
from skysense.evaluation.features import extract_features
from skysense.evaluation.linear_probe import linear_probe
from skysense.models import SkySense

SUBSETS = {"l0": [0], "l1": [1], "l2": [2], "l3": [3], "fused": [4], "l3+fused": [3, 4], "l2+l3": [2, 3],
           "all": [0, 1, 2, 3, 4]}


def pool_levels(out: dict) -> torch.Tensor:
    return torch.cat([level.mean(dim=(-2, -1)) for level in out["hr_pyramid"]] + [out["fused"].mean(dim=(-2, -1))], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights")
    source.add_argument("--random-init", action="store_true")
    parser.add_argument("--teacher", action="store_true", help="probe the EMA teacher of --weights")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.random_init:
        torch.manual_seed(args.seed)
        model = SkySense.from_preset(args.preset)
    else:
        model = SkySense.from_pretrained(args.weights)
        if args.teacher:
            state = torch.load(f"{args.weights}/training_state.pt", weights_only=True, map_location="cpu")["module"]
            model.load_state_dict({k[len("teacher."):]: v for k, v in state.items() if k.startswith("teacher.")})
    root = dataset_root("aid", args.data_root)
    import skysense.evaluation.features as features

    features.pool_features = pool_levels  # every level, kept apart so subsets can be probed
    xtr, ytr = extract_features(model, DATASETS["aid"](root, split="train"), progress=False)
    xte, yte = extract_features(model, DATASETS["aid"](root, split="test"), progress=False)
    dims = list(model.config.hr.out_dims) + [model.config.fusion.embed_dim]
    edges = [0]
    for d in dims:
        edges.append(edges[-1] + d)
    scores = {}
    for name, parts in SUBSETS.items():
        def take(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x[:, edges[i]:edges[i + 1]] for i in parts], 1)
        scores[name] = round(linear_probe(take(xtr), ytr, take(xte), yte, num_classes=30).score, 4)
    print(json.dumps({"model": args.weights or f"{args.preset} random init (seed {args.seed})",
                      "teacher": args.teacher, "accuracy": scores}))


if __name__ == "__main__":
    main()
