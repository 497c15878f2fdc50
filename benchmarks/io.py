"""Data-loading throughput of a pre-training sample read from GeoTIFFs, against one model step.

A pre-training sample here is one place with an HR image (3 x 512 x 512, uint8), 20 Sentinel-2
frames (10 x 64 x 64, uint16) and 10 Sentinel-1 frames (2 x 64 x 64, float32 dB), each frame
its own GeoTIFF, listed in a JSON-lines manifest and read by
:class:`skysense.data.datasets.ManifestDataset`. The script:

1. writes ``--places`` such samples into a temporary folder, cutting real values out of
   ``$SKYSENSE_DATA`` where present (S2: ``samples/hydro_s2`` L2A patches; S1:
   ``samples/ssl4eo_s12`` VV/VH; HR: ``samples/loveda`` tiles), else synthetic values (a note
   is printed);
2. times a torch DataLoader (``collate`` of :mod:`skysense.data.sample`) over them with 0, 1
   and 2 workers: the second of two passes with persistent workers, so process start-up is
   not counted; MB/s counts the bytes of the files read;
3. times a forward + backward step of ``SkySense.from_preset('tiny')`` on one batch, cropped to
   the model's grid rule (HR of H px fuses with S2/S1 of H/32 px: 512 px with 16 x 16 crops),
   and prints load time per batch / step time (above 1: reading is the bottleneck).

    python benchmarks/io.py [--places 32] [--batch-size 4] [--compress none|deflate]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import from_origin
from torch.utils.data import DataLoader

from skysense.data import data_root
from skysense.data.datasets import ManifestDataset
from skysense.data.sample import collate
from skysense.data.units import normalize

S2_FRAMES, S1_FRAMES, SENTINEL_PX, HR_PX = 20, 10, 64, 512
HYDRO_TO_MODEL = [1, 2, 3, 4, 5, 6, 7, 8, 10, 11]
"""Model bands B2..B12 in the 12-band Hydro patches, assuming the order B1..B8, B8A, B9, B11, B12."""


def _write(path: Path, data: np.ndarray, compress: str, res: float = 10.0) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0], dtype=data.dtype,
                   crs="EPSG:32633", transform=from_origin(400000.0, 5340000.0, res, res))
    if compress != "none":
        profile["compress"] = compress
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path.stat().st_size


class Sources:
    """Real pixel sources under $SKYSENSE_DATA, or synthetic fallbacks (with notes)."""

    def __init__(self, root: Path | None, rng: np.random.Generator) -> None:
        self.rng, self.notes = rng, []
        self.s2 = self._stack(root, "samples/hydro_s2", "*.tif", lambda d: d[HYDRO_TO_MODEL], "S2")
        self.s1 = self._stack(root, "samples/ssl4eo_s12/s1", "*/*", self._ssl4eo_s1, "S1")
        self.hr = self._stack(root, "samples/loveda/img_dir", "*.png", lambda d: d, "HR")

    @staticmethod
    def _read(path: Path) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                return src.read()

    def _ssl4eo_s1(self, folder: Path) -> np.ndarray:
        return np.concatenate([self._read(folder / f"{b}.tif") for b in ("VV", "VH")]).astype(np.float32)

    def _stack(self, root, sub, pattern, convert, what):
        folder = None if root is None else root / sub
        paths = sorted(folder.glob(pattern)) if folder is not None and folder.is_dir() else []
        if not paths:
            self.notes.append(f"{what}: {sub} not found under $SKYSENSE_DATA: synthetic values")
            return None
        arrays = []
        for p in paths:
            arrays.append(convert(p) if p.is_dir() else convert(self._read(p)))
        self.notes.append(f"{what}: real values cropped from {len(arrays)} rasters of {sub}")
        return arrays

    def crop(self, arrays, bands, size, dtype, synthetic) -> np.ndarray:
        if arrays is None:
            return synthetic((bands, size, size)).astype(dtype)
        a = arrays[self.rng.integers(len(arrays))]
        y, x = (int(self.rng.integers(0, a.shape[i] - size + 1)) for i in (1, 2))
        return np.ascontiguousarray(a[:, y:y + size, x:x + size]).astype(dtype)


def write_places(folder: Path, places: int, compress: str) -> tuple[Path, float, list[str]]:
    rng = np.random.default_rng(0)
    src = Sources(data_root(), rng)
    records, total = [], 0
    for p in range(places):
        pid = f"place{p:03d}"
        hr = src.crop(src.hr, 3, HR_PX, np.uint8, lambda s: rng.integers(0, 255, s))
        total += _write(folder / "hr" / f"{pid}.tif", hr, compress, res=0.3)
        s2, s1 = [], []
        for t in range(S2_FRAMES):
            data = src.crop(src.s2, 10, SENTINEL_PX, np.uint16, lambda s: rng.integers(200, 4000, s))
            name = f"s2/{pid}_{t:02d}.tif"
            total += _write(folder / name, data, compress)
            s2.append({"path": name, "date": f"2020-{1 + t * 11 // S2_FRAMES:02d}-{1 + t % 28:02d}"})
        for t in range(S1_FRAMES):
            data = src.crop(src.s1, 2, SENTINEL_PX, np.float32, lambda s: rng.normal(-15, 4, s))
            name = f"s1/{pid}_{t:02d}.tif"
            total += _write(folder / name, data, compress)
            s1.append({"path": name, "date": f"2020-{1 + t:02d}-15"})
        records.append({"id": pid, "lat": 45.0 + p * 0.01, "lon": 7.0, "hr": f"hr/{pid}.tif", "s2": s2, "s1": s1})
    (folder / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return folder, total / places / 1e6, src.notes


def time_loader(dataset, workers: int, batch_size: int) -> float:
    """Samples per second of the second pass (persistent workers: start-up excluded)."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                        persistent_workers=workers > 0, shuffle=False)
    for _ in loader:  # warm-up pass: worker start, file-system cache
        pass
    start = time.perf_counter()
    count = sum(batch["s2"].shape[0] for batch in loader)
    return count / (time.perf_counter() - start)


def model_step_seconds(batch: dict, repeats: int = 3) -> float:
    from skysense import SkySense

    torch.manual_seed(0)
    model = SkySense.from_preset("tiny")
    crop = HR_PX // model.config.hr_stride  # grid rule: S2/S1 of H/32 px fuse with HR of H px
    off = (SENTINEL_PX - crop) // 2
    inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    for m in ("s2", "s1"):
        inputs[m] = inputs[m][..., off:off + crop, off:off + crop].contiguous()
    normalize(inputs, model.config)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        out = model(**{k: v for k, v in inputs.items() if k != "normalized"})
        out.float().pow(2).mean().backward()
        if i:  # first step is warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--places", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--compress", default="none", choices=("none", "deflate", "lzw"))
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory(prefix="skysense_io_") as tmp:
        folder, mb_per_sample, notes = write_places(Path(tmp), args.places, args.compress)
        for note in notes:
            print(f"note: {note}")
        dataset = ManifestDataset(folder)
        files = 1 + S2_FRAMES + S1_FRAMES
        print(f"{len(dataset)} places; per sample: HR 3x{HR_PX}x{HR_PX}, S2 {S2_FRAMES}x10x{SENTINEL_PX}x{SENTINEL_PX}, "
              f"S1 {S1_FRAMES}x2x{SENTINEL_PX}x{SENTINEL_PX}; {files} GeoTIFFs ({args.compress}), "
              f"{mb_per_sample:.2f} MB on disk; batch size {args.batch_size}")
        print()
        print(f"{'workers':>7} | {'samples/s':>9} | {'MB/s':>7} | {'s/batch':>7}")
        print(f"{'-' * 7}-+-{'-' * 9}-+-{'-' * 7}-+-{'-' * 7}")
        rates = {}
        for workers in (int(w) for w in args.workers.split(",")):
            rate = time_loader(dataset, workers, args.batch_size)
            rates[workers] = rate
            print(f"{workers:>7} | {rate:>9.1f} | {rate * mb_per_sample:>7.1f} | {args.batch_size / rate:>7.3f}")
        batch = collate([dataset[i] for i in range(args.batch_size)])
        step = model_step_seconds(batch)
        print()
        print(f"tiny model forward+backward, batch {args.batch_size}: HR 3x{HR_PX}x{HR_PX}, "
              f"S2 {S2_FRAMES} / S1 {S1_FRAMES} frames cropped to {HR_PX // 32}x{HR_PX // 32}: {step:.3f} s/step")
        for workers, rate in rates.items():
            ratio = (args.batch_size / rate) / step
            verdict = "reading is the bottleneck" if ratio > 1 else "compute-bound"
            print(f"  load/step ratio with {workers} worker(s): {ratio:.3f} ({verdict})")


if __name__ == "__main__":
    main()
