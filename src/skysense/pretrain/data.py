"""Pretraining batches: two aligned multi-modal views per sample, in an order fixed by (seed, step).

From a dataset (``data.dataset``): global sample position ``p = step * batch_size + k`` picks
sample ``perm_epoch[p % N]`` with ``epoch = p // N`` and a per-epoch permutation seeded by the
run's seed. Nothing depends on the number of processes or workers, or on where a run was
resumed, so 1 process, N processes and a resumed run see identical data.

From shards (``data.shards``, written by ``skysense shard``): a stream, read by
``world_size x max(1, num_workers)`` lanes (:class:`~skysense.data.shards.ShardDataset`); step
``s`` of rank ``r`` takes the next local batch of lane ``r * W + s % W``, so the data depend on
the seed, the number of processes and ``num_workers``, and a resumed run (same values) repeats
an uninterrupted one: each lane skips, without reading them, the samples of the steps before.

Either way, sample ``k`` of step ``s`` gets its views from a generator seeded by
``(seed, p)`` and its modality dropout from one seeded by ``(seed, s)``, shared by the whole
global batch (a batch must share its modalities).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from skysense.config import HR_BANDS, SkySenseConfig
from skysense.data.datasets import DATASETS, dataset_root, options_with_hr_bands
from skysense.data.sample import collate
from skysense.data.shards import ShardDataset, mix_seed
from skysense.data.units import is_normalized, normalize
from skysense.pretrain.config import PretrainConfig
from skysense.pretrain.views import MODALITIES, ViewConfig, draw_kept_modalities, multimodal_views

ViewPair = tuple[dict[str, torch.Tensor], ...]
"""The two aligned views of a sample, then its local views (``data.local_views``, usually none)."""
ViewKey = tuple[int, int, int]
"""(sample index, view seed, step seed)."""


def view_seed(seed: int, position: int) -> int:
    """Seed of the views of the sample at global position ``position`` of a run."""
    return (seed << 32) + position


def step_seed(seed: int, step: int) -> int:
    """Seed of the modality dropout of every sample of global step ``step``."""
    return mix_seed(seed, step)


class PairMaker:
    """One sample (model units or normalised) -> two normalised aligned views (a :data:`ViewPair`)."""

    def __init__(self, model_config: SkySenseConfig, views: ViewConfig) -> None:
        self.model_config = model_config
        self.views = views

    def check_grids(self, present: Sequence[str]) -> None:
        """The views' modalities must land on one fusion grid (the model's same-ground rule);
        the local views' too, when there are any."""
        v = self.views
        self._check_grid(present, v.hr_size, v.sentinel_size, "data.view_size", "data.sentinel_view_size")
        if v.local_views:
            self._check_grid(present, v.local_hr_size, v.local_sentinel_size, "data.local_view_size",
                             "data.local_sentinel_view_size")

    def _check_grid(self, present: Sequence[str], hr_size: int, sentinel_size: int, hr_key: str,
                    sentinel_key: str) -> None:
        cfg = self.model_config
        grids = {}
        for m in present:
            if m == "hr":
                grids[m] = -(-hr_size // cfg.hr_stride)
            else:
                patch = (cfg.s2 if m == "s2" else cfg.s1).patch_size
                grids[m] = -(-sentinel_size // patch) * patch
        if len(set(grids.values())) > 1:
            patch = cfg.s2.patch_size
            raise ValueError(
                f"views: the modalities {list(present)} would not cover one fusion grid "
                f"({', '.join(f'{m} -> {g}x{g}' for m, g in grids.items())}): S2/S1 views "
                f"({sentinel_key}) must be 1/{cfg.hr_stride} of the HR views ({hr_key}) and a "
                f"multiple of the ViT patch {patch}, e.g. {cfg.hr_stride * patch} and {patch}; got {hr_size} "
                f"and {sentinel_size}"
            )

    def __call__(self, sample: Mapping[str, Any], view_seed: int, step_seed: int) -> ViewPair:
        if not is_normalized(sample):
            sample = normalize(dict(sample), self.model_config)
        present = [m for m in MODALITIES if sample.get(m) is not None]
        self.check_grids(present)
        keep = None
        if self.views.modality_dropout > 0:
            g = torch.Generator().manual_seed(step_seed)
            keep = [draw_kept_modalities(present, self.views.modality_dropout, g) for _ in range(2)]
        return tuple(multimodal_views(sample, self.views, torch.Generator().manual_seed(view_seed), keep))


class ViewPairDataset(Dataset):
    """Wraps a sample dataset; item ``(index, view_seed, step_seed)`` -> two normalised aligned views.

    ``cache``: keep each normalised sample in memory once read (per DataLoader worker), for
    small datasets of large scenes (OSCD: 8 train cities, about 250 MB as float32).
    """

    def __init__(self, samples: Dataset, make_pair: PairMaker, cache: bool = False) -> None:
        self.samples = samples
        self.make_pair = make_pair
        self.cache: dict[int, Mapping[str, Any]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.samples)

    def sample(self, index: int) -> Mapping[str, Any]:
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        sample = normalize(dict(self.samples[index]), self.make_pair.model_config)
        if self.cache is not None:
            self.cache[index] = sample
        return sample

    def __getitem__(self, key: ViewKey) -> ViewPair:
        index, views, step = key
        try:
            return self.make_pair(self.sample(index), views, step)
        except ValueError as error:
            raise ValueError(f"pretraining views of sample {index}: {error}") from error


class StepBatchSampler(Sampler[list[ViewKey]]):
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

    def __iter__(self) -> Iterator[list[ViewKey]]:
        local = self.batch_size // self.world_size
        for step in range(self.start, self.stop):
            first = step * self.batch_size + self.rank * local
            batch = []
            for position in range(first, first + local):
                epoch, offset = divmod(position, self.num_items)
                batch.append((int(self._permutation(epoch)[offset]), view_seed(self.seed, position),
                               step_seed(self.seed, step)))
            yield batch


def collate_view_pairs(pairs: Sequence[ViewPair]) -> ViewPair:
    """Each view's tensors over the batch; series of different lengths padded with invalid frames."""
    return tuple(collate([pair[v] for pair in pairs]) for v in range(len(pairs[0])))  # type: ignore[return-value]


class ShardViewBatches(IterableDataset):
    """Collated local batches of view pairs for steps ``start..stop-1``, read from shards.

    Use with ``DataLoader(batch_size=None)``: worker ``w`` of ``W`` serves steps
    ``start + w, start + w + W, ...`` (the DataLoader's round-robin order), all of lane
    ``step % W``, skipping that lane's samples of the steps before ``start``.
    """

    def __init__(self, shards: ShardDataset, make_pair: PairMaker, batch_size: int, seed: int, start: int,
                 stop: int, rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by the {world_size} processes")
        self.shards, self.make_pair = shards, make_pair
        self.batch_size, self.seed, self.start, self.stop = batch_size, seed, start, stop
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[ViewPair]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        local = self.batch_size // self.world_size
        lane = (self.start + worker) % workers
        before = len(range(lane, self.start, workers))
        stream = self.shards.lane_samples(self.rank * workers + lane, self.world_size * workers, before * local)
        for step in range(self.start + worker, self.stop, workers):
            first = step * self.batch_size + self.rank * local
            pairs = []
            for position in range(first, first + local):
                sample = next(stream, None)
                if sample is None:
                    raise ValueError(f"shards: {self.shards.index.directory}: the stream ended at step {step}")
                pairs.append(self.make_pair(sample, view_seed(self.seed, position), step_seed(self.seed, step)))
            yield collate_view_pairs(pairs)


def build_sample_dataset(config: PretrainConfig, data_root: str | None) -> Dataset:
    """The dataset named by ``data.dataset`` (with ``data.dataset_options``; ``hr_bands`` from
    the config's when they are not R, G, B), ``data.split`` only."""
    name = config.data.dataset
    if name not in DATASETS:
        raise ValueError(f"data.dataset: unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    root = dataset_root(name, data_root or config.data.root)
    options = options_with_hr_bands(name, config.data.dataset_options, config.hr_bands or HR_BANDS)
    try:
        dataset = DATASETS[name](root, split=config.data.split, **options)
    except TypeError as error:
        raise ValueError(f"data.dataset_options {options}: not accepted by {name}: {error}") from None
    bands = dataset.bands.get("hr")
    if config.hr_bands is not None and bands is not None and tuple(bands) != config.hr_bands:
        raise ValueError(f"hr_bands: the model takes {list(config.hr_bands)}; {name} reads {list(bands)}")
    return dataset


def build_view_loader(config: PretrainConfig, data_root: str | None, model_config: SkySenseConfig, start: int,
                      rank: int = 0, world_size: int = 1) -> DataLoader:
    """The DataLoader of view-pair batches for steps ``start..max_steps-1`` of this rank.

    Reads ``data.shards`` when set (``data.dataset`` is then ignored), else ``data.dataset``.
    """
    data = config.data
    make_pair = PairMaker(model_config, data.view_config(model_config))
    workers = data.num_workers
    if data.shards:
        shards = ShardDataset(data.shards, seed=config.seed, epochs=None)
        lanes = world_size * max(1, workers)
        if lanes > len(shards.index.shards):
            raise ValueError(f"data.shards: {data.shards} has {len(shards.index.shards)} shards for {lanes} readers "
                             f"({world_size} processes x {max(1, workers)} workers); write smaller shards or "
                             "lower data.num_workers")
        batches = ShardViewBatches(shards, make_pair, config.batch_size, config.seed, start, config.max_steps,
                                   rank, world_size)
        return DataLoader(batches, batch_size=None, num_workers=workers, persistent_workers=workers > 0)
    pairs = ViewPairDataset(build_sample_dataset(config, data_root), make_pair, cache=data.cache)
    sampler = StepBatchSampler(len(pairs), config.batch_size, config.seed, start, config.max_steps, rank, world_size)
    return DataLoader(pairs, batch_sampler=sampler, collate_fn=collate_view_pairs, num_workers=workers,
                      persistent_workers=workers > 0)
