"""Helpers shared by the downstream tests."""

from __future__ import annotations

import torch


class Samples(torch.utils.data.Dataset):
    """A list of sample dicts as a dataset (each item a shallow copy)."""

    def __init__(self, samples: list[dict]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return dict(self.samples[index])
