"""``skysense similar``: how much every pixel looks like examples outlined in a GIS.

    skysense similar EMBEDDINGS.tif --examples solar-farms.geojson --out similarity.tif

The cosine similarity of each pixel's embedding to the mean of the examples' embeddings, one band
per class of examples (:mod:`skysense.inference.similarity`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from skysense.commands import add_embeddings_argument, add_min_pixels_argument, add_output_flags
from skysense.commands.predict import print_polygons
from skysense.inference.polygons import class_map_polygons
from skysense.inference.similarity import matches_map, similarity_map


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("similar", help="cosine similarity of every pixel of an embedding raster to "
                                                   "examples in a GeoJSON (one band per class of examples)")
    add_embeddings_argument(parser)
    parser.add_argument("--examples", type=Path, required=True,
                        help="a GeoJSON of example polygons or points, in any CRS; a 'class' property groups them")
    parser.add_argument("--out", type=Path, required=True, help="the similarity GeoTIFF")
    parser.add_argument("--class-key", default="class", help="the property that names an example's class")
    matches = parser.add_argument_group("matches (the pixels most like the examples, as polygons)")
    matches.add_argument("--threshold", type=float, default=None,
                         help="also write OUT.matches.tif (the most similar band where it reaches this cosine "
                              "similarity) and its regions as OUT.matches.geojson")
    add_min_pixels_argument(matches)
    matches.add_argument("--wgs84", action="store_true",
                         help="the matches' polygons in longitude / latitude instead of the raster's CRS")
    add_output_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.threshold is None and (args.min_pixels != 1 or args.wgs84):
        raise ValueError("similar: --min-pixels and --wgs84 apply to the matches' polygons (--threshold)")
    if args.threshold is not None and not -1.0 <= args.threshold <= 1.0:
        raise ValueError(f"similar: --threshold is a cosine similarity in [-1, 1], got {args.threshold}")
    report = similarity_map(args.embeddings, args.examples, args.out, args.class_key, args.overwrite,
                            progress=not args.no_progress)
    polygons = None
    if args.threshold is not None:
        report.extra["matches"] = matches_map(report.out, args.threshold)
        polygons = class_map_polygons(report.extra["matches"]["matches_path"],
                                      Path(report.extra["matches"]["matches_path"]).with_suffix(".geojson"),
                                      min_pixels=args.min_pixels, wgs84=args.wgs84, overwrite=True,
                                      progress=not args.no_progress)
        report.extra["polygons"] = polygons.to_dict()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    print(f"wrote {report.out}: {len(report.classes)} band(s) x {report.height} x {report.width} in "
          f"{report.seconds:.1f} s; examples per band {report.examples}")
    print(f"mean similarity {report.mean}; largest {report.maximum}")
    if polygons is not None:
        print(f"matches (similarity >= {args.threshold}): {report.extra['matches']['pixels_per_class']} pixels in "
              f"{report.extra['matches']['matches_path']}")
        print_polygons(polygons, False)
    return 0
