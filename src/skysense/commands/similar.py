"""``skysense similar``: how much every pixel looks like examples outlined in a GIS.

    skysense similar EMBEDDINGS.tif --examples solar-farms.geojson --out similarity.tif

The cosine similarity of each pixel's embedding to the mean of the examples' embeddings, one band
per class of examples (:mod:`skysense.inference.similarity`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from skysense.commands import add_output_flags
from skysense.inference.similarity import similarity_map


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("similar", help="cosine similarity of every pixel of an embedding raster to "
                                                   "examples in a GeoJSON (one band per class of examples)")
    parser.add_argument("embeddings", type=Path, help="an embedding raster written by skysense embed (.tif or .zarr)")
    parser.add_argument("--examples", type=Path, required=True,
                        help="a GeoJSON of example polygons or points, in any CRS; a 'class' property groups them")
    parser.add_argument("--out", type=Path, required=True, help="the similarity GeoTIFF")
    parser.add_argument("--class-key", default="class", help="the property that names an example's class")
    add_output_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    report = similarity_map(args.embeddings, args.examples, args.out, args.class_key, args.overwrite,
                            progress=not args.no_progress)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    print(f"wrote {report.out}: {len(report.classes)} band(s) x {report.height} x {report.width} in "
          f"{report.seconds:.1f} s; examples per band {report.examples}")
    print(f"mean similarity {report.mean}; largest {report.maximum}")
    return 0
