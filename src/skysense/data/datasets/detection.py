"""Aerial object detection: DOTA (oriented), DIOR (horizontal), DIOR-R (oriented), FAIR1M (oriented).

Every sample holds ``hr`` (3, H, W) and per-object ``boxes`` (N, 4) x0, y0, x1, y1 or (N, 8)
x1, y1, ..., x4, y4 (corners in annotation order) in pixels of ``hr``, ``labels`` (N,) int64 and
``difficult`` (N,) bool; :func:`skysense.data.sample.collate` keeps them as lists.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import torch

from skysense.config import HR_BANDS
from skysense.data.datasets.base import Item, SampleDataset
from skysense.data.rasters import RasterReadError, read_image
from skysense.data.units import hr_to_8bit

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _rgb(path: Path) -> torch.Tensor:
    """An image as ``hr``: RGB kept, grey repeated to 3 bands, an opaque alpha band dropped."""
    image, dtype = read_image(path)
    if image.shape[0] == 1:
        image = np.repeat(image, 3, axis=0)
    elif image.shape[0] == 4:
        if not np.all(image[3] == np.iinfo(image.dtype).max):
            raise RasterReadError(f"{path}: 4 bands with a non-opaque alpha channel, expected RGB")
        image = image[:3]
    elif image.shape[0] != 3:
        raise RasterReadError(f"wrong band count: {path} has {image.shape[0]} bands, expected 1, 3 or 4")
    return torch.from_numpy(hr_to_8bit(image, 8 if dtype == "uint8" else None))


def _targets(boxes: list[list[float]], labels: list[int], difficult: list[bool], width: int) -> dict[str, Any]:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, width),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "difficult": torch.tensor(difficult, dtype=torch.bool),
    }


def _find_image(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def _xml(path: Path) -> ET.Element:
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    try:
        return ET.parse(path).getroot()
    except ET.ParseError as error:
        raise ValueError(f"{path}: not valid XML ({error})") from None


def _norm(name: str) -> str:
    """Class-name key insensitive to case, spaces, hyphens and underscores."""
    return re.sub(r"[\s_\-]+", "", name.strip().lower())


# -- DOTA ---------------------------------------------------------------------------------------

DOTA_CLASSES = {
    "1.0": ("plane", "baseball-diamond", "bridge", "ground-track-field", "small-vehicle", "large-vehicle", "ship",
            "tennis-court", "basketball-court", "storage-tank", "soccer-ball-field", "roundabout", "harbor",
            "swimming-pool", "helicopter"),
}
DOTA_CLASSES["1.5"] = DOTA_CLASSES["1.0"] + ("container-crane",)
DOTA_CLASSES["2.0"] = DOTA_CLASSES["1.5"] + ("airport", "helipad")


class DOTA(SampleDataset):
    """DOTA (Xia et al., CVPR 2018; Ding et al., TPAMI 2021): aerial images with oriented boxes.

    Source: https://captain-whu.github.io/DOTA/ (v1.0: 2,806 images, 15 classes; v1.5: +
    container-crane; v2.0: 11,268 images, + airport, helipad). Licence: academic use only.

    Layout (DOTA_devkit)::

        <root>/images/<P0000>.png
        <root>/labelTxt/<P0000>.txt   ("imagesource:..." and "gsd:..." header lines in the
                                       originals, none in split patches; then one object per line
                                       "x1 y1 x2 y2 x3 y3 x4 y4 <class> <difficult>")

    or ``<root>/{train,val,test}/images`` + ``labelTxt`` (split ``"all"`` without them).
    Split patches (``P0004__1__0___0.png`` from ``ImgSplit``) read the same way; their boxes
    may extend beyond the patch. A label file without its image is ignored (the test split has
    no labels: ``boxes`` is then (0, 8)).

    Bands: R, G, B 8-bit (grey images repeated to 3 bands, an opaque alpha dropped).
    Sample: ``hr``, ``boxes`` (N, 8) float corners in file order, ``labels`` index in
    ``DOTA_CLASSES[version]``, ``difficult``, ``gsd`` (m/pixel, NaN when not given).
    """

    name = "dota"
    splits = ("train", "val", "test", "all")
    bands = {"hr": HR_BANDS}

    def __init__(self, root: str | Path, split: str | None = None, version: str = "1.0",
                 skip_corrupt: bool = False) -> None:
        if version not in DOTA_CLASSES:
            raise ValueError(f"{self.name}: version: expected one of {sorted(DOTA_CLASSES)}, got {version!r}")
        self.version = version
        self.classes = DOTA_CLASSES[version]
        super().__init__(root, split, skip_corrupt)

    def _index(self) -> list[Item]:
        bases = [(self.root / s, s) for s in ("train", "val", "test") if (self.root / s / "images").is_dir()]
        bases = bases or [(self.root, "all")]
        items = []
        for base, split in bases:
            images = base / "images"
            if not images.is_dir():
                raise FileNotFoundError(f"{self.name}: folder {images} does not exist")
            for path in sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                items.append(Item(path.stem if split == "all" else f"{split}/{path.stem}", split, path,
                                  {"label": base / "labelTxt" / f"{path.stem}.txt"}))
        if not items:
            raise FileNotFoundError(f"{self.name}: no images under {self.root}")
        return items

    def _load(self, item: Item) -> dict[str, Any]:
        hr = _rgb(item.path)
        label_path: Path = item.extra["label"]
        boxes, labels, difficult = [], [], []
        gsd = math.nan
        if label_path.is_file():
            lookup = {_norm(c): i for i, c in enumerate(self.classes)}
            for number, line in enumerate(label_path.read_text(errors="replace").splitlines(), start=1):
                text = line.strip()
                if not text:
                    continue
                if text.startswith("gsd:"):
                    try:
                        gsd = float(text.split(":", 1)[1])
                    except ValueError:
                        pass  # "gsd:None" in some v1.5 files
                    continue
                if text.startswith("imagesource:"):
                    continue
                parts = text.split()
                if len(parts) not in (9, 10):
                    raise ValueError(f"{label_path}: line {number}: expected 8 coordinates, a class and a "
                                     f"difficulty, got {len(parts)} fields: {text!r}")
                try:
                    coords = [float(v) for v in parts[:8]]
                except ValueError:
                    raise ValueError(f"{label_path}: line {number}: non-numeric coordinates in {text!r}") from None
                cls = lookup.get(_norm(parts[8]))
                if cls is None:
                    raise ValueError(f"{label_path}: line {number}: class {parts[8]!r} is not a DOTA v{self.version} "
                                     f"class {self.classes}")
                boxes.append(coords)
                labels.append(cls)
                difficult.append(len(parts) == 10 and parts[9] == "1")
        elif item.split != "test":
            raise FileNotFoundError(f"{self.name}: label file {label_path} does not exist (image {item.path})")
        return {"hr": hr, **_targets(boxes, labels, difficult, 8),
                "gsd": torch.tensor(gsd, dtype=torch.float32)}


# -- DIOR / DIOR-R ------------------------------------------------------------------------------

DIOR_CLASSES = ("airplane", "airport", "baseballfield", "basketballcourt", "bridge", "chimney", "dam",
                "Expressway-Service-area", "Expressway-toll-station", "golffield", "groundtrackfield", "harbor",
                "overpass", "ship", "stadium", "storagetank", "tenniscourt", "trainstation", "vehicle", "windmill")
"""The 20 DIOR classes, in the order of the paper (as spelled in the XML files)."""


class DIOR(SampleDataset):
    """DIOR (Li et al., ISPRS J. 2020): 23,463 Google Earth images of 800 x 800 px, 20 classes, horizontal boxes.

    Source: https://gcheng-nwpu.github.io/#Datasets . Licence: academic use only.

    Layout (release)::

        <root>/JPEGImages-trainval/<nnnnn>.jpg, <root>/JPEGImages-test/<nnnnn>.jpg  (or JPEGImages/)
        <root>/Annotations/Horizontal Bounding Boxes/<nnnnn>.xml   (or Annotations/<nnnnn>.xml)
        <root>/ImageSets/Main/{train,val,test}.txt                 (image ids, one per line)

    XML: Pascal VOC, ``<object><name>`` and ``<bndbox><xmin> <ymin> <xmax> <ymax>``, optional
    ``<difficult>``. Bands: R, G, B 8-bit.

    Sample: ``hr``, ``boxes`` (N, 4) x0, y0, x1, y1, ``labels`` index in ``DIOR_CLASSES``
    (matched ignoring case, spaces, hyphens), ``difficult``.

    Splits: ``train`` (5,862), ``val`` (5,863), ``test`` (11,738) from ``ImageSets/Main``;
    images in no list are ``"unlisted"``.
    """

    name = "dior"
    splits = ("train", "val", "test", "unlisted")
    bands = {"hr": HR_BANDS}
    annotation_dirs = ("Annotations/Horizontal Bounding Boxes", "Annotations")
    box_width = 4

    def _index(self) -> list[Item]:
        split_of: dict[str, str] = {}
        for split in ("train", "val", "test"):
            path = self.root / "ImageSets" / "Main" / f"{split}.txt"
            if path.is_file():
                for line in path.read_text().split():
                    split_of[line.strip()] = split
        self.annotations = next((self.root / d for d in self.annotation_dirs if (self.root / d).is_dir()), None)
        if self.annotations is None:
            raise FileNotFoundError(f"{self.name}: none of {self.annotation_dirs} exists in {self.root}")
        folders = sorted(p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("JPEGImages"))
        if not folders:
            raise FileNotFoundError(f"{self.name}: no JPEGImages* folder in {self.root}")
        items = []
        for folder in folders:
            for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                items.append(Item(path.stem, split_of.get(path.stem, "unlisted"), path))
        return items

    def _objects(self, root: ET.Element, where: Path) -> tuple[list[list[float]], list[str], list[bool]]:
        boxes, names, difficult = [], [], []
        for number, obj in enumerate(root.iter("object"), start=1):
            box = obj.find("bndbox")
            try:
                boxes.append([float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
            except (AttributeError, TypeError, ValueError):
                raise ValueError(f"{where}: object {number}: no numeric <bndbox> xmin/ymin/xmax/ymax") from None
            names.append(obj.findtext("name", ""))
            difficult.append(obj.findtext("difficult", "0").strip() == "1")
        return boxes, names, difficult

    def _load(self, item: Item) -> dict[str, Any]:
        hr = _rgb(item.path)
        ann = self.annotations / f"{item.id}.xml"
        boxes, names, difficult = self._objects(_xml(ann), ann)
        lookup = {_norm(c): i for i, c in enumerate(DIOR_CLASSES)}
        labels = []
        for name in names:
            if _norm(name) not in lookup:
                raise ValueError(f"{ann}: class {name!r} is not one of the DIOR classes {DIOR_CLASSES}")
            labels.append(lookup[_norm(name)])
        return {"hr": hr, **_targets(boxes, labels, difficult, self.box_width)}


ROBNDBOX_CORNERS = ("x_left_top", "y_left_top", "x_right_top", "y_right_top",
                    "x_right_bottom", "y_right_bottom", "x_left_bottom", "y_left_bottom")


def rotated_box_corners(cx: float, cy: float, w: float, h: float, angle: float) -> list[float]:
    """Corners x1, y1, ..., x4, y4 of a box of centre (cx, cy), size (w, h), rotated by ``angle``
    radians (roLabelImg ``robndbox``: clockwise in image coordinates, y down), starting top-left."""
    c, s = math.cos(angle), math.sin(angle)
    corners = []
    for dx, dy in ((-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)):
        corners += [cx + dx * c - dy * s, cy + dx * s + dy * c]
    return corners


class DIORR(DIOR):
    """DIOR-R (Cheng et al., TGRS 2022): the DIOR images with oriented boxes, 20 classes.

    Source: https://gcheng-nwpu.github.io/#Datasets . Licence: academic use only.

    Layout: as :class:`DIOR`, annotations in ``<root>/Annotations/Oriented Bounding Boxes/<id>.xml``
    (or ``Annotations/``). Each ``<object>`` holds ``<robndbox>`` either with the eight corner
    fields ``x_left_top, y_left_top, x_right_top, ..., y_left_bottom`` (the DIOR-R release; an
    ``<angle>`` element is ignored) or roLabelImg's ``cx, cy, w, h, angle`` (radians), converted
    to corners by :func:`rotated_box_corners`. Which of the two the full release uses
    throughout was not checked on the real files here: both are accepted.

    Sample: ``hr``, ``boxes`` (N, 8) corners, ``labels`` (``DIOR_CLASSES``), ``difficult``.
    Splits: as DIOR.
    """

    name = "dior_r"
    annotation_dirs = ("Annotations/Oriented Bounding Boxes", "Annotations")
    box_width = 8

    def _objects(self, root: ET.Element, where: Path) -> tuple[list[list[float]], list[str], list[bool]]:
        boxes, names, difficult = [], [], []
        for number, obj in enumerate(root.iter("object"), start=1):
            box = obj.find("robndbox")
            if box is None:
                raise ValueError(f"{where}: object {number}: no <robndbox>")
            try:
                if box.find("x_left_top") is not None:
                    boxes.append([float(box.findtext(k)) for k in ROBNDBOX_CORNERS])
                else:
                    cx, cy, w, h, angle = (float(box.findtext(k)) for k in ("cx", "cy", "w", "h", "angle"))
                    boxes.append(rotated_box_corners(cx, cy, w, h, angle))
            except (TypeError, ValueError):
                raise ValueError(f"{where}: object {number}: <robndbox> needs numeric {ROBNDBOX_CORNERS} "
                                 "or cx, cy, w, h, angle") from None
            names.append(obj.findtext("name", ""))
            difficult.append(obj.findtext("difficult", "0").strip() == "1")
        return boxes, names, difficult


# -- FAIR1M -------------------------------------------------------------------------------------

FAIR1M_CLASSES = (
    "Boeing737", "Boeing747", "Boeing777", "Boeing787", "C919", "A220", "A321", "A330", "A350", "ARJ21",
    "other-airplane",
    "Passenger Ship", "Motorboat", "Fishing Boat", "Tugboat", "Engineering Ship", "Liquid Cargo Ship",
    "Dry Cargo Ship", "Warship", "other-ship",
    "Small Car", "Bus", "Cargo Truck", "Dump Truck", "Van", "Trailer", "Tractor", "Excavator", "Truck Tractor",
    "other-vehicle",
    "Basketball Court", "Tennis Court", "Football Field", "Baseball Field",
    "Intersection", "Roundabout", "Bridge",
)
"""The 37 fine-grained FAIR1M classes (airplanes, ships, vehicles, courts, road features);
matched ignoring case, spaces, hyphens and underscores."""


class FAIR1M(SampleDataset):
    """FAIR1M (Sun et al., ISPRS J. 2022): Gaofen / Google Earth images, 0.3-0.8 m, 37 classes, oriented boxes.

    Source: https://www.gaofen-challenge.com (v1.0 / v2.0). Licence: academic use only.

    Layout (release; the part folders vary between versions, so images are found recursively)::

        <root>/{train,validation,test}/[part<n>/]images/<n>.tif
        <root>/{train,validation,test}/[part<n>/]labelXml/<n>.xml

    XML: ``<annotation><objects><object><possibleresult><name>`` and ``<points>`` with 5
    ``<point>x,y</point>`` (4 corners, the first repeated to close the ring). The 5th point is
    dropped; a polygon with other than 4 distinct corners raises.

    Bands: R, G, B 8-bit TIFF (grey repeated). Sample: ``hr``, ``boxes`` (N, 8), ``labels``
    index in ``FAIR1M_CLASSES``, ``difficult`` (all False: FAIR1M flags none).

    Splits: from the top folder: ``train``, ``validation``, ``test`` (no public labels);
    without them ``"all"``.
    """

    name = "fair1m"
    splits = ("train", "validation", "test", "all")
    bands = {"hr": HR_BANDS}

    def _index(self) -> list[Item]:
        items = []
        for images in sorted(p for p in self.root.rglob("images") if p.is_dir()):
            rel = images.relative_to(self.root).parts
            split = rel[0] if rel and rel[0] in self.splits else "all"
            for path in sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                label = images.parent / "labelXml" / f"{path.stem}.xml"
                items.append(Item(str(path.relative_to(self.root).with_suffix("")), split, path, {"label": label}))
        if not items:
            raise FileNotFoundError(f"{self.name}: no images/ folders with images under {self.root}")
        return items

    def _load(self, item: Item) -> dict[str, Any]:
        hr = _rgb(item.path)
        label: Path = item.extra["label"]
        if not label.is_file() and item.split == "test":
            return {"hr": hr, **_targets([], [], [], 8)}
        root = _xml(label)
        lookup = {_norm(c): i for i, c in enumerate(FAIR1M_CLASSES)}
        boxes, labels = [], []
        for number, obj in enumerate(root.iter("object"), start=1):
            name = obj.findtext("possibleresult/name", "")
            if _norm(name) not in lookup:
                raise ValueError(f"{label}: object {number}: class {name!r} is not one of the 37 FAIR1M classes")
            try:
                points = [tuple(float(v) for v in p.text.split(",")) for p in obj.iter("point")]
            except (AttributeError, ValueError):
                raise ValueError(f"{label}: object {number}: <point> values must be 'x,y'") from None
            if len(points) == 5 and points[4] == points[0]:
                points = points[:4]
            if len(points) != 4 or any(len(p) != 2 for p in points):
                raise ValueError(f"{label}: object {number}: expected 4 corner points (5 with the closing one), "
                                 f"got {len(points)}")
            boxes.append([v for p in points for v in p])
            labels.append(lookup[_norm(name)])
        return {"hr": hr, **_targets(boxes, labels, [False] * len(labels), 8)}
