"""Tar shards: round trip, atomic and resumable writing, the split over ranks x workers, and
pretraining from shards (``data.shards``) with exact resume of the stream."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from affine import Affine
from rasterio.crs import CRS
from torch.utils.data import DataLoader

from skysense import SkySense
from skysense.config import preset_config
from skysense.data.datasets import ManifestDataset
from skysense.data.shards import INDEX_NAME, ShardDataset, ShardIndex, read_shard, write_shards
from skysense.pretrain.config import PretrainConfig
from skysense.pretrain.data import PairMaker, ShardViewBatches
from skysense.pretrain.loop import pretrain
from skysense.pretrain.views import ViewConfig

from test_multimodal_views import HEAD, write_manifest


def make_samples(count: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(count):
        frames = 1 + i % 3
        samples.append({
            "id": f"s{i}", "hr": torch.rand(3, 8, 8, generator=g),
            "s2": torch.rand(frames, 10, 2, 2, generator=g), "s2_dates": torch.arange(1, frames + 1) * 7,
            "s2_mask": torch.tensor([True] * frames), "lat": torch.tensor(float(i)), "lon": torch.tensor(-1.5),
            "label": torch.tensor(i % 4), "crs": CRS.from_epsg(32632), "transform": Affine(10, 0, 5e5, 0, -10, 4e6),
        })
    return samples


def assert_same_sample(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert b[key].dtype == value.dtype and torch.equal(b[key], value), key
        else:
            assert b[key] == value, key


def test_round_trip_equals_the_source_samples(tmp_path: Path) -> None:
    samples = make_samples(7)
    index = write_shards(samples, tmp_path / "a", samples_per_shard=3, dataset="toy", progress=False)
    assert [len(s.keys) for s in index.shards] == [3, 3, 1] and index.samples == 7
    read = [s for shard in index.shards for s in read_shard(tmp_path / "a" / shard.name)]
    for source, back in zip(samples, read, strict=True):
        assert_same_sample(source, back)
    with tarfile.open(tmp_path / "a" / "shard-000000.tar") as tar:  # plain WebDataset-style members
        assert tar.getnames()[:3] == ["00000000.json", "00000000.hr.npy", "00000000.s2.npy"]
    # Same data, same bytes.
    write_shards(samples, tmp_path / "b", samples_per_shard=3, progress=False)
    for shard in index.shards:
        assert (tmp_path / "a" / shard.name).read_bytes() == (tmp_path / "b" / shard.name).read_bytes()


def test_interrupted_writing_resumes_and_refuses_foreign_shards(tmp_path: Path) -> None:
    samples = make_samples(5)
    out = tmp_path / "shards"
    write_shards(samples, out, samples_per_shard=2, progress=False)
    kept = (out / "shard-000000.tar").stat().st_mtime_ns
    (out / INDEX_NAME).unlink()
    (out / "shard-000002.tar").unlink()
    write_shards(samples, out, samples_per_shard=2, progress=False)  # rewrites only the missing shard
    assert (out / "shard-000000.tar").stat().st_mtime_ns == kept and ShardIndex.load(out).samples == 5
    assert not list(out.glob(".*"))  # no temporary files left
    with pytest.raises(ValueError, match="finished"):
        write_shards(samples, out, samples_per_shard=2, progress=False)
    (out / INDEX_NAME).unlink()
    with pytest.raises(ValueError, match=r"shard-000000.tar: holds samples .* remove it"):
        write_shards(samples, out, samples_per_shard=3, progress=False)


@pytest.mark.slow
def test_cli_shards_a_manifest_dataset_and_reads_it_back(tmp_path: Path) -> None:
    root = write_manifest(tmp_path / "data", places=3)
    out = tmp_path / "shards"
    result = subprocess.run([sys.executable, "-m", "skysense.cli", "shard", "--dataset", "manifest", "--data-root",
                             str(root), "--out", str(out), "--samples-per-shard", "2", "--no-progress"],
                            capture_output=True, text=True, check=True)
    assert json.loads(result.stdout)["samples"] == 3 and json.loads(result.stdout)["shards"] == 2
    source = ManifestDataset(root)
    stream = ShardDataset(out, shuffle=False)
    back = list(stream)
    assert len(back) == len(source) == 3
    for i, sample in enumerate(back):
        assert_same_sample(source[i], sample)


def _ids_by_reader(directory: Path, world_size: int, workers: int, epochs: int) -> dict[tuple[int, int], list[str]]:
    """Sample ids read by each (rank, worker), through real DataLoader worker processes."""
    by_reader = {}
    for rank in range(world_size):
        dataset = ShardDataset(directory, seed=3, epochs=epochs, rank=rank, world_size=world_size)
        loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                            collate_fn=lambda s: (s["id"], torch.utils.data.get_worker_info().id))
        for sample_id, worker in loader:
            by_reader.setdefault((rank, worker), []).append(sample_id)
    return by_reader


def test_two_ranks_by_two_workers_read_each_sample_once_per_epoch(tmp_path: Path) -> None:
    samples = make_samples(11)
    write_shards(samples, tmp_path, samples_per_shard=2, progress=False)  # 6 shards for 4 readers
    one = _ids_by_reader(tmp_path, world_size=2, workers=2, epochs=1)
    assert len(one) == 4 and all(one.values())
    assert Counter(i for ids in one.values() for i in ids) == Counter(s["id"] for s in samples)
    two = _ids_by_reader(tmp_path, world_size=2, workers=2, epochs=2)
    assert Counter(i for ids in two.values() for i in ids) == Counter(2 * [s["id"] for s in samples])
    assert two == _ids_by_reader(tmp_path, world_size=2, workers=2, epochs=2)  # deterministic
    assert any(ids[:len(one[r])] != ids[len(one[r]):] for r, ids in two.items())  # reshuffled per epoch
    with pytest.raises(ValueError, match="6 shards for 8 readers"):
        next(iter(ShardDataset(tmp_path, world_size=8, rank=0).lane_samples(0, 8)))


def test_skipping_a_lane_reads_the_rest_of_the_same_stream(tmp_path: Path) -> None:
    write_shards(make_samples(9), tmp_path, samples_per_shard=2, progress=False)
    stream = ShardDataset(tmp_path, seed=5, epochs=3)
    full = [s["id"] for s in stream.lane_samples(1, 2)]
    assert len(full) >= 3 * 3  # 2 of the 5 shards per epoch
    for skip in (0, 1, 2, 5, len(full) - 1):
        assert [s["id"] for s in stream.lane_samples(1, 2, skip)] == full[skip:]


def _batches(loader: DataLoader) -> list[tuple]:
    return [tuple(sorted((k, v.clone()) for view in pair for k, v in view.items())) for pair in loader]


def test_shard_batches_resume_exactly_with_workers(tmp_path: Path) -> None:
    write_shards(make_samples(12), tmp_path, samples_per_shard=1, progress=False)
    model_config = preset_config("tiny")
    make_pair = PairMaker(model_config, ViewConfig(hr_size=128, sentinel_size=4, rotate=True, s2_frames=1,
                                                   date_jitter=2))
    shards = ShardDataset(tmp_path, seed=4, epochs=None)

    def run(start: int, stop: int) -> list:
        batches = ShardViewBatches(shards, make_pair, batch_size=4, seed=4, start=start, stop=stop, rank=1,
                                   world_size=2)
        return list(DataLoader(batches, batch_size=None, num_workers=2))

    straight, resumed = run(0, 7), run(3, 7)
    assert len(straight) == 7 and len(resumed) == 4
    for a, b in zip(straight[3:], resumed, strict=True):
        for view_a, view_b in zip(a, b):
            assert view_a.keys() == view_b.keys()
            assert all(torch.equal(view_a[k], view_b[k]) for k in view_a)
    assert straight[0][0]["hr"].shape == (2, 3, 128, 128)  # this rank's half of the global batch


@pytest.mark.slow
def test_pretraining_reads_shards(tmp_path: Path) -> None:
    root = write_manifest(tmp_path / "data", places=4)
    write_shards(ManifestDataset(root), tmp_path / "shards", samples_per_shard=1, progress=False)
    config = PretrainConfig.from_dict({
        "preset": "tiny", "batch_size": 2, "max_steps": 2, "seed": 0, "checkpoint_every": 2,
        "data": {"shards": str(tmp_path / "shards"), "view_size": 128, "s2_frames": 2, "num_workers": 2},
        "optim": {"lr": 0.001, "warmup_steps": 1},
        "objective": HEAD,
    })
    rows = pretrain(config, tmp_path / "run", progress=False)
    assert [r["step"] for r in rows] == [0, 1]
    assert all(np.isfinite(v) for r in rows for v in r.values()) and "pixel/s1" in rows[0]
    assert SkySense.from_pretrained(str(tmp_path / "run")).config.preset == "tiny"
    config.data.num_workers = 8
    with pytest.raises(ValueError, match="4 shards for 8 readers"):
        pretrain(config, tmp_path / "other", progress=False)
