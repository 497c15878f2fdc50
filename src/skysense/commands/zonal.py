"""``skysense zonal``: the mean embedding of each region (parcel, building, sample point) of a GeoJSON.

    skysense zonal EMBEDDINGS.tif --regions fields.geojson --out fields.csv   # or .geojson

Reads an embedding raster written by ``skysense embed`` (GeoTIFF or Zarr) and writes one
embedding per feature (:mod:`skysense.inference.zonal`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from skysense.commands import add_embeddings_argument, add_output_flags
from skysense.inference.zonal import region_embeddings


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("zonal", help="an embedding per region of a GeoJSON (the mean over its pixels of "
                                                 "an embedding raster): .csv or .geojson")
    add_embeddings_argument(parser)
    parser.add_argument("--regions", type=Path, required=True,
                        help="a GeoJSON of Polygon / MultiPolygon / Point / MultiPoint features, in any CRS")
    parser.add_argument("--out", type=Path, required=True,
                        help=".csv (a row per feature: its properties, pixels, e0..) or .geojson (the features "
                             "with embedding and pixels added)")
    add_output_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    report = region_embeddings(args.embeddings, args.regions, args.out, overwrite=args.overwrite,
                               progress=not args.no_progress)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    missing = report.features - report.embedded
    note = f"; {missing} without an embedding (outside the raster or on nodata)" if missing else ""
    print(f"wrote {report.out}: {report.embedded} of {report.features} regions embedded ({report.channels} channels, "
          f"{report.pixels} pixels) in {report.seconds:.1f} s{note}")
    return 0
