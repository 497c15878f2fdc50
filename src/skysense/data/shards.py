"""WebDataset-style tar shards of samples, written atomically, and a reader split over ranks and workers.

Layout of a shard folder (written by :func:`write_shards`, ``skysense shard`` on the command line)::

    <out>/shard-000000.tar    samples 0 .. S-1
    <out>/shard-000001.tar    samples S .. 2S-1
    ...
    <out>/index.json          dataset, split, and every shard's sample keys (written last)

Each sample ``<key>`` (its index in the dataset, ``%08d``) is a run of consecutive tar members,
as in WebDataset (a key is the member name up to its first dot)::

    <key>.json            metadata: the sample's JSON-able values (``id``, ...), its ``crs``
                          (WKT) and ``transform`` values, and each tensor's dtype and shape
    <key>.<name>.npy      each tensor of the sample (``hr``, ``s2``, ``s2_dates``, ``lat``, ...)

so ``webdataset`` or plain ``tar`` read them too. Samples are stored as the dataset returns them
(model units, not normalised), so one set of shards serves any model. Each shard is written to
a temporary file and renamed; member times and owners are zeroed, so the same data gives
byte-identical shards, and a run that was interrupted keeps the shards it finished.

:class:`ShardDataset` streams the samples: per epoch, shards are shuffled with the seed and dealt
to the ``world_size x num_workers`` readers ("lanes") in turn, and each shard's samples are
read in a shuffled order, so every sample is read exactly once per epoch, whatever the number of
ranks and workers, as long as there are at least as many shards as lanes.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from tqdm import tqdm

from skysense.weights import atomic_write

INDEX_NAME = "index.json"
FORMAT = "skysense-shards"
FORMAT_VERSION = 1
KEY_DIGITS = 8

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A 63-bit seed that depends on every value (SplitMix64 steps); for ``torch.Generator``."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (int(value) & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state >> 1


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


def sample_key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


# -- encoding -------------------------------------------------------------------------------------

def encode_sample(sample: Mapping[str, Any]) -> dict[str, bytes]:
    """A sample dict -> ``{member suffix: bytes}``: ``json`` plus one ``<name>.npy`` per tensor.

    Raises:
        ValueError: a key with a dot, or a value that is neither a tensor, JSON-able, a CRS nor an
            affine transform (names the key and its type).
    """
    from affine import Affine

    meta: dict[str, Any] = {"sample": {}, "crs": {}, "affine": {}, "tensors": {}}
    members: dict[str, bytes] = {}
    for key, value in sample.items():
        if "." in key:
            raise ValueError(f"shards: sample key {key!r}: must not contain '.' (it separates tar member names)")
        if isinstance(value, torch.Tensor):
            array = value.detach().cpu().numpy()
            buffer = io.BytesIO()
            np.save(buffer, array, allow_pickle=False)
            members[f"{key}.npy"] = buffer.getvalue()
            meta["tensors"][key] = {"dtype": str(array.dtype), "shape": list(array.shape)}
        elif isinstance(value, Affine):
            meta["affine"][key] = list(value)[:6]
        elif hasattr(value, "to_wkt"):
            meta["crs"][key] = value.to_wkt()
        elif value is None or isinstance(value, (str, int, float, bool)):
            meta["sample"][key] = value
        else:
            raise ValueError(f"shards: sample key {key!r}: cannot store a {type(value).__name__} "
                             "(expected a tensor, str/int/float/bool, a CRS or an affine transform)")
    return {"json": json.dumps(meta, sort_keys=True).encode(), **members}


def decode_sample(members: Mapping[str, bytes], where: str = "") -> dict[str, Any]:
    """Inverse of :func:`encode_sample`; ``where`` names the shard and key in errors."""
    if "json" not in members:
        raise ValueError(f"shards: {where}: no .json member (got {sorted(members)})")
    meta = json.loads(members["json"])
    sample: dict[str, Any] = dict(meta["sample"])
    for key, spec in meta["tensors"].items():
        data = members.get(f"{key}.npy")
        if data is None:
            raise ValueError(f"shards: {where}: tensor {key!r} listed in the metadata has no {key}.npy member")
        array = np.load(io.BytesIO(data), allow_pickle=False)
        if str(array.dtype) != spec["dtype"] or list(array.shape) != spec["shape"]:
            raise ValueError(f"shards: {where}: {key}.npy: expected {spec['dtype']} {spec['shape']}, "
                             f"got {array.dtype} {list(array.shape)}")
        sample[key] = torch.from_numpy(array)
    if meta["crs"]:
        from rasterio.crs import CRS

        sample.update({key: CRS.from_wkt(wkt) for key, wkt in meta["crs"].items()})
    if meta["affine"]:
        from affine import Affine

        sample.update({key: Affine(*values) for key, values in meta["affine"].items()})
    return sample


def _split_member(name: str) -> tuple[str, str]:
    key, _, suffix = name.partition(".")
    return key, suffix


# -- writing --------------------------------------------------------------------------------------

def _write_tar(path: Path, samples: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
    path.chmod(0o644)  # the temporary file is private; the shard is not
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, sample in samples:
            for suffix, data in encode_sample(sample).items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))


def _write_json(path: Path, value: Any) -> None:
    path.chmod(0o644)
    path.write_text(json.dumps(value, indent=1) + "\n")


def shard_keys(path: Path) -> list[str]:
    """The sample keys of a shard, in order (reads only the tar headers)."""
    keys: list[str] = []
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            key, _ = _split_member(member.name)
            if not keys or keys[-1] != key:
                keys.append(key)
    return keys


def write_shards(
    samples: Sequence[Mapping[str, Any]], out: str | Path, samples_per_shard: int = 256,
    dataset: str = "", split: str | None = None, progress: bool = True,
) -> "ShardIndex":
    """Write ``samples`` (a dataset of sample dicts) as tar shards plus ``index.json`` under ``out``.

    A shard already in ``out`` with the expected sample keys is kept (its writing finished:
    shards are renamed into place complete), so an interrupted run continues where it stopped.

    Raises:
        ValueError: ``out`` already holds a finished index, a shard there holds other samples,
            or a sample cannot be stored.
    """
    if samples_per_shard < 1:
        raise ValueError(f"shards: samples_per_shard: expected >= 1, got {samples_per_shard}")
    out = Path(out)
    if (out / INDEX_NAME).exists():
        raise ValueError(f"{out / INDEX_NAME} exists: these shards are finished; choose another --out")
    total = len(samples)
    if total == 0:
        raise ValueError(f"shards: {dataset or 'the dataset'} has no samples to write")
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    bar = tqdm(total=total, desc=f"shard {dataset}".strip(), unit="sample", disable=not progress)
    for number in range(math.ceil(total / samples_per_shard)):
        indices = range(number * samples_per_shard, min(total, (number + 1) * samples_per_shard))
        keys = [sample_key(i) for i in indices]
        path = out / shard_name(number)
        if path.exists():
            found = shard_keys(path)
            if found != keys:
                raise ValueError(f"{path}: holds samples {found[:1]}..{found[-1:]} ({len(found)}), expected "
                                 f"{keys[0]}..{keys[-1]} ({len(keys)}) for {samples_per_shard} per shard; remove it")
        else:
            atomic_write(path, lambda p: _write_tar(p, [(sample_key(i), samples[i]) for i in indices]))
        bar.update(len(keys))
        shards.append({"name": path.name, "keys": keys})
    bar.close()
    index = {"format": FORMAT, "version": FORMAT_VERSION, "dataset": dataset, "split": split,
             "samples": total, "samples_per_shard": samples_per_shard, "shards": shards}
    atomic_write(out / INDEX_NAME, lambda p: _write_json(p, index))
    return ShardIndex.load(out)


# -- reading --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardInfo:
    name: str
    keys: tuple[str, ...]


@dataclass(frozen=True)
class ShardIndex:
    """The ``index.json`` of a shard folder."""

    directory: Path
    dataset: str
    split: str | None
    shards: tuple[ShardInfo, ...]

    @property
    def samples(self) -> int:
        return sum(len(s.keys) for s in self.shards)

    @classmethod
    def load(cls, directory: str | Path) -> "ShardIndex":
        directory = Path(directory)
        path = directory / INDEX_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no shard index; expected a folder written by `skysense shard`")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
        if data.get("format") != FORMAT or data.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: format {data.get('format')!r} version {data.get('version')!r}; "
                             f"expected {FORMAT!r} version {FORMAT_VERSION}")
        shards = tuple(ShardInfo(s["name"], tuple(s["keys"])) for s in data["shards"])
        for shard in shards:
            if not (directory / shard.name).is_file():
                raise FileNotFoundError(f"{directory / shard.name}: listed in {path} but missing")
        return cls(directory, data.get("dataset", ""), data.get("split"), shards)


def read_shard(path: str | Path, order: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
    """The samples of one shard: in file order, or in ``order`` (keys) by seeking."""
    path = Path(path)
    with tarfile.open(path, "r:") as tar:
        members: dict[str, dict[str, tarfile.TarInfo]] = {}
        for member in tar.getmembers():
            key, suffix = _split_member(member.name)
            members.setdefault(key, {})[suffix] = member
        for key in (order if order is not None else list(members)):
            if key not in members:
                raise ValueError(f"shards: {path}: no sample {key!r}")
            data = {suffix: tar.extractfile(info).read() for suffix, info in members[key].items()}
            yield decode_sample(data, where=f"{path} sample {key}")


def _process_group() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardDataset(IterableDataset):
    """The samples of a shard folder, each once per epoch, split over ranks and DataLoader workers.

    Args:
        directory: a folder written by :func:`write_shards`.
        seed: seeds the per-epoch shard order and each shard's sample order.
        shuffle: False reads shards and samples in index order (shards still dealt in turn).
        epochs: how many passes over the data; None: without end.
        rank, world_size: this process's share; default: the torch.distributed process group
            (0 and 1 without one).
    """

    def __init__(self, directory: str | Path, seed: int = 0, shuffle: bool = True, epochs: int | None = 1,
                 rank: int | None = None, world_size: int | None = None) -> None:
        self.index = ShardIndex.load(directory)
        self.seed, self.shuffle, self.epochs = seed, shuffle, epochs
        self.rank, self.world_size = rank, world_size

    def lane_shards(self, epoch: int, lane: int, lanes: int) -> list[int]:
        """Indices of the shards lane ``lane`` of ``lanes`` reads in ``epoch``, in reading order."""
        count_ = len(self.index.shards)
        if lanes > count_:
            raise ValueError(f"shards: {self.index.directory} has {count_} shards for {lanes} readers "
                             "(ranks x DataLoader workers); write smaller shards (--samples-per-shard) or use "
                             "fewer workers")
        if self.shuffle:
            order = torch.randperm(count_, generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch)))
        else:
            order = torch.arange(count_)
        return order[lane::lanes].tolist()

    def sample_order(self, epoch: int, shard: int) -> list[str]:
        keys = self.index.shards[shard].keys
        if not self.shuffle:
            return list(keys)
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, shard))
        return [keys[i] for i in torch.randperm(len(keys), generator=g).tolist()]

    def lane_samples(self, lane: int, lanes: int, skip: int = 0) -> Iterator[dict[str, Any]]:
        """The sample stream of one lane, epoch after epoch, less its first ``skip`` samples.

        Skipping reads no sample (counts come from the index), so resuming is cheap.
        """
        epochs = count() if self.epochs is None else range(self.epochs)
        for epoch in epochs:
            for shard in self.lane_shards(epoch, lane, lanes):
                order = self.sample_order(epoch, shard)
                if skip >= len(order):
                    skip -= len(order)
                    continue
                order, skip = order[skip:], 0
                yield from read_shard(self.index.directory / self.index.shards[shard].name, order)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world_size = _process_group()
        rank = rank if self.rank is None else self.rank
        world_size = world_size if self.world_size is None else self.world_size
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        yield from self.lane_samples(rank * workers + worker, world_size * workers)
