"""Pretraining batches: two aligned views per image, in an order fixed by (seed, step).

Global sample position ``p = step * batch_size + k`` picks image ``perm_epoch[p % N]`` with
``epoch = p // N`` and a per-epoch permutation seeded by the run's seed, and its views are cut
with a generator seeded by ``(seed, p)``. Nothing depends on the number of processes or on
where a run was resumed, so 1 process, N processes and a resumed run see identical data.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from skysense.config import SkySenseConfig
from skysense.data.units import normalize
from skysense.pretrain.views import ViewAugment, two_views

ViewPair = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]


class ViewPairDataset(Dataset):
    """Wraps an image dataset; item ``(index, view_seed)`` -> two normalised aligned views."""

    def __init__(self, images: Dataset, model_config: SkySenseConfig, view_size: int,
                 crop_scale: tuple[float, float], augment: ViewAugment | None = None) -> None:
        self.images = images
        self.model_config = model_config
        self.view_size = view_size
        self.crop_scale = crop_scale
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> ViewPair:
        index, view_seed = key
        sample = normalize(dict(self.images[index]), self.model_config)
        if "hr" not in sample:
            raise ValueError(f"pretraining views: sample {index} has no 'hr' image; got keys {sorted(sample)}")
        generator = torch.Generator().manual_seed(view_seed)
        first, second = two_views(sample["hr"], self.view_size, self.crop_scale, generator, self.augment)
        return first, second


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields, for steps ``start..stop-1``, this rank's share of each global batch."""

    def __init__(self, num_items: int, batch_size: int, seed: int, start: int, stop: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by the {world_size} processes")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.start, self.stop = start, stop
        self.rank, self.world_size = rank, world_size
        self._perms: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.num_items, generator=g)}
        return self._perms[epoch]

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        local = self.batch_size // self.world_size
        for step in range(self.start, self.stop):
            first = step * self.batch_size + self.rank * local
            batch = []
            for position in range(first, first + local):
                epoch, offset = divmod(position, self.num_items)
                batch.append((int(self._permutation(epoch)[offset]), (self.seed << 32) + position))
            yield batch


def collate_view_pairs(pairs: Sequence[ViewPair]) -> ViewPair:
    """Stack each view's tensors over the batch."""
    return tuple(  # type: ignore[return-value]
        {key: torch.stack([pair[v][key] for pair in pairs]) for key in pairs[0][v]} for v in range(2)
    )
