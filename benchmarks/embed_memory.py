"""Peak memory and throughput of ``skysense embed`` on a real scene and on one of 4x its area.

The scene is an OSCD city from ``$SKYSENSE_DATA/oscd`` (Sentinel-2 L1C, two dates, one file per
band at 10/20/60 m, ``dates.txt``). The script writes, into a temporary folder, the city as it is
(1x) and a 2 x 2 mosaic of it (4x the area: every band file tiled twice along each axis, the
same origin and pixel size), both in the OSCD layout. Each is embedded by ``skysense embed`` in a
fresh process; the peak resident memory of that process (``ru_maxrss`` from ``wait4``) and the
run's own time are printed, with the throughput in fusion-grid pixels (10 m S2 pixels) per
second. Bounded memory means the 4x run peaks at no more than 1.2 times the 1x run; the script
exits with status 1 otherwise.

    python benchmarks/embed_memory.py [--city paris] [--level fused] [--threads 2] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning

from skysense.config import S2_BANDS
from skysense.data import data_root
from skysense.data.rasters import find_band_files

MAX_RATIO = 1.2


def write_mosaic(city: Path, out: Path, repeat: int) -> tuple[int, int]:
    """Copy ``city`` (OSCD layout) into ``out`` with every band tiled ``repeat`` x ``repeat``;
    returns the B2 (10 m) size."""
    import warnings

    out.mkdir(parents=True)
    (out / "dates.txt").write_text((city / "dates.txt").read_text())
    for date in ("imgs_1", "imgs_2"):
        for band, path in find_band_files(city / date, S2_BANDS).items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                with rasterio.open(path) as src:
                    data = np.tile(src.read(), (1, repeat, repeat))
                    profile = src.profile
            profile.update(width=data.shape[2], height=data.shape[1], tiled=True, blockxsize=256, blockysize=256)
            (out / date).mkdir(exist_ok=True)
            with rasterio.open(out / date / path.name, "w", **profile) as dst:
                dst.write(data)
    with rasterio.open(find_band_files(out / "imgs_1", ["B2"])["B2"]) as src:
        return src.height, src.width


def embed_in_subprocess(scene: Path, out: Path, args: argparse.Namespace) -> dict:
    """Run ``skysense embed`` on ``scene`` in a new process; its report plus peak RSS in MiB."""
    command = [sys.executable, "-m", "skysense.cli", "embed", "--s2", str(scene / "imgs_1"), str(scene / "imgs_2"),
               "--s2-offset", "0", "--s2-level", "L1C", "--preset", "tiny", "--out", str(out), "--level", args.level,
               "--dtype", args.dtype, "--threads", str(args.threads), "--no-progress", "--json"]
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True)
        _, status, usage = os.wait4(process.pid, 0)  # the rusage of this child alone
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        if process.returncode != 0:
            raise SystemExit(f"skysense embed failed ({process.returncode}):\n{stderr.read()}")
        report = json.loads(stdout.read())
    report["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux: KiB
    report["process_wall_s"] = wall
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--city", default="paris", help="OSCD city folder (default paris, 408 x 390 px)")
    parser.add_argument("--level", default="fused", choices=("fused", "s2"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    root = data_root()
    if root is None or not (root / "oscd" / "images" / args.city).is_dir():
        print("needs the OSCD images under $SKYSENSE_DATA/oscd/images (set SKYSENSE_DATA)", file=sys.stderr)
        return 2
    city = root / "oscd" / "images" / args.city
    rows = []
    with tempfile.TemporaryDirectory(prefix="skysense-embed-bench-") as tmp:
        for repeat in (1, 2):
            scene = Path(tmp) / f"{args.city}_x{repeat * repeat}"
            height, width = write_mosaic(city, scene, repeat)
            report = embed_in_subprocess(scene, Path(tmp) / f"{scene.name}.tif", args)
            pixels = height * width
            rows.append((f"{args.city} x{repeat * repeat}", height, width, report, pixels))
    print(f"skysense embed, OSCD {args.city} (S2 L1C, 2 dates), tiny preset (random init), level {args.level}, "
          f"{args.dtype}, {args.threads} torch threads, defaults: window 64, overlap 16, block 256, batch 4")
    header = ("scene", "S2 pixels (10 m)", "peak RSS MiB", "embed s", "pixels/s", "windows", "process wall s")
    widths = (10, 22, 12, 7, 8, 7, 14)
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    for name, height, width, report, pixels in rows:
        cells = (name, f"{height} x {width} = {pixels:,}", f"{report['peak_rss_mib']:.0f}", f"{report['seconds']:.1f}",
                 f"{pixels / report['seconds']:,.0f}", str(report["windows_computed"]), f"{report['process_wall_s']:.1f}")
        print(" | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))))
    print("load average (1, 5, 15 min) at the end: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    ratio = rows[1][3]["peak_rss_mib"] / rows[0][3]["peak_rss_mib"]
    verdict = "within" if ratio <= MAX_RATIO else "ABOVE"
    print(f"peak RSS ratio 4x / 1x: {ratio:.3f} ({verdict} the {MAX_RATIO} bound)")
    return 0 if ratio <= MAX_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
