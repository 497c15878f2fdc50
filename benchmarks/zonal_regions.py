"""An embedding per parcel of a real scene: ``region_embeddings`` against an in-memory reference.

Embeds the OSCD Rennes scene (both dates, ``tiny`` from random init, fused level: 128 channels on
the 10 m grid) unless ``--embeddings`` names a raster already written, lays a grid of square
parcels over it (``--parcels`` per side, outlined in longitude / latitude, as a user's field layer
would be) plus one sample point per parcel centre, and computes one embedding per feature two ways:

* ``skysense.inference.zonal.region_embeddings`` (what ``skysense zonal`` runs: each region's
  window read on its own, the GeoJSON reprojected per feature);
* a reference that holds the whole raster in memory, burns every parcel's id at once with
  ``rasterio.features.rasterize`` (the parcels do not overlap) and averages with ``np.bincount``.

Prints both times, their ratio, the largest difference between the two, and the peak memory.

    SKYSENSE_DATA=../shared/data python benchmarks/zonal_regions.py --parcels 30
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import rasterio.features
import rasterio.warp

CITY = "oscd/images/rennes"


def parcels(path: Path, crs, transform, height: int, width: int, per_side: int) -> int:
    """A ``per_side`` x ``per_side`` grid of square parcels (a 1-pixel lane between them) and their
    centre points over the raster, in longitude / latitude: the number of parcels."""
    size = min(height, width) // per_side
    features = []
    for i in range(per_side):
        for j in range(per_side):
            x0, y0, x1, y1 = j * size, i * size, (j + 1) * size - 1, (i + 1) * size - 1
            ring = [transform * c for c in ((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0))]
            centre = transform * ((x0 + x1) / 2, (y0 + y1) / 2)
            xs, ys = rasterio.warp.transform(crs, "EPSG:4326", [p[0] for p in ring] + [centre[0]],
                                             [p[1] for p in ring] + [centre[1]])
            features.append({"type": "Feature", "properties": {"parcel": f"{i}-{j}"}, "geometry": {
                "type": "Polygon", "coordinates": [[[x, y] for x, y in zip(xs[:-1], ys[:-1])]]}})
            features.append({"type": "Feature", "properties": {"sample": f"{i}-{j}"}, "geometry": {
                "type": "Point", "coordinates": [xs[-1], ys[-1]]}})
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return per_side * per_side


def reference(raster: Path, regions: Path) -> tuple[np.ndarray, float]:
    """Mean embedding per parcel (features 0, 2, 4, ...) with the whole raster in memory."""
    started = time.perf_counter()
    with rasterio.open(raster) as src:
        data, crs, transform = src.read().astype(np.float32), src.crs, src.transform
    collection = json.loads(regions.read_text())
    polygons = [f["geometry"] for f in collection["features"] if f["geometry"]["type"] == "Polygon"]
    shapes = [(rasterio.warp.transform_geom("EPSG:4326", crs, g), k + 1) for k, g in enumerate(polygons)]
    ids = rasterio.features.rasterize(shapes, out_shape=data.shape[1:], transform=transform, dtype="int32")
    flat, channels = ids.reshape(-1), data.reshape(data.shape[0], -1)
    valid = np.isfinite(channels).all(axis=0) & (flat > 0)
    counts = np.bincount(flat[valid], minlength=len(shapes) + 1)[1:]
    sums = np.stack([np.bincount(flat[valid], weights=c[valid], minlength=len(shapes) + 1)[1:] for c in channels])
    return (sums / np.maximum(counts, 1)).T, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parcels", type=int, default=30, help="parcels per side of the grid")
    parser.add_argument("--embeddings", type=Path, default=None, help="an embedding raster (default: embed Rennes)")
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON")
    args = parser.parse_args()
    from skysense.cli import main as skysense
    from skysense.inference.zonal import region_embeddings

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        raster, embed_seconds = args.embeddings, None
        if raster is None:
            data = os.environ.get("SKYSENSE_DATA")
            if not data:
                raise SystemExit("set SKYSENSE_DATA to the shared data folder, or pass --embeddings")
            city = Path(data) / CITY
            raster = work / "rennes.tif"
            started = time.perf_counter()
            assert skysense(["embed", "--s2", str(city / "imgs_1"), str(city / "imgs_2"), "--s2-offset", "0",
                             "--s2-level", "L1C", "--preset", "tiny", "--out", str(raster), "--no-progress",
                             "--no-preview"]) == 0
            embed_seconds = round(time.perf_counter() - started, 1)
        with rasterio.open(raster) as src:
            n = parcels(work / "parcels.geojson", src.crs, src.transform, src.height, src.width, args.parcels)
            shape = (src.count, src.height, src.width)
        started = time.perf_counter()
        report = region_embeddings(raster, work / "parcels.geojson", work / "parcels.csv", progress=False)
        ours = time.perf_counter() - started
        rows = (work / "parcels.csv").read_text().splitlines()[1:]
        values = np.array([[float(v) for v in row.split(",")[-shape[0]:]] for row in rows[0::2]])
        expected, theirs = reference(raster, work / "parcels.geojson")
    result = {"raster": list(shape), "embed_seconds": embed_seconds, "parcels": n, "points": n,
              "features": report.features, "embedded": report.embedded, "pixels": report.pixels,
              "region_embeddings_seconds": round(ours, 3), "in_memory_reference_seconds": round(theirs, 3),
              "ratio_ours_over_reference": round(ours / theirs, 2),
              "max_abs_difference": float(np.abs(values - expected).max()),
              "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
