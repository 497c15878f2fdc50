"""ISPRS 2D semantic labelling (Potsdam, Vaihingen): the original tiles read in windows, or mmsegmentation's patches."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import rasterio
import torch
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from skysense.data.datasets.base import Item, hr_band_indexes
from skysense.data.datasets.segmentation import MMSEG_SPLITS, MMSegDataset
from skysense.data.rasters import RasterReadError
from skysense.data.sample import IGNORE_INDEX
from skysense.data.units import hr_to_8bit

ISPRS_CLASSES = ("impervious_surface", "building", "low_vegetation", "tree", "car", "clutter")
ISPRS_COLOURS: dict[tuple[int, int, int], int] = {
    (255, 255, 255): 0,  # impervious surfaces
    (0, 0, 255): 1,  # building
    (0, 255, 255): 2,  # low vegetation
    (0, 255, 0): 3,  # tree
    (255, 255, 0): 4,  # car
    (255, 0, 0): 5,  # clutter / background
}
"""RGB colour of each class in the ISPRS label images -> index in ``ISPRS_CLASSES``."""
BOUNDARY_COLOUR = (0, 0, 0)
"""Black: the eroded class boundaries of the ``*_noBoundary`` labels, read as -1 (no label)."""
LABEL_VARIANTS = ("eroded", "full")

TILES = "ISPRS tiles"
MMSEG = "mmsegmentation"


def decode_colour_label(rgb: np.ndarray, path: Path | str, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """(3, H, W) RGB label colours -> (H, W) int64 class indices of ``ISPRS_CLASSES``, -1 for black.

    Raises:
        ValueError: a colour outside ``ISPRS_COLOURS`` and black; names the file, the colours,
            how many pixels have them and the first one's (row, column) in the file (``offset``
            = (row, column) of the array's top-left pixel in the file).
    """
    code = (rgb[0].astype(np.int32) << 16) | (rgb[1].astype(np.int32) << 8) | rgb[2].astype(np.int32)
    mask = np.full(code.shape, -2, dtype=np.int64)
    for (r, g, b), index in ISPRS_COLOURS.items():
        mask[code == (r << 16 | g << 8 | b)] = index
    mask[code == 0] = IGNORE_INDEX
    unknown = mask == -2
    if unknown.any():
        codes, counts = np.unique(code[unknown], return_counts=True)
        colours = ", ".join(f"({c >> 16}, {(c >> 8) & 255}, {c & 255}) x{n}"
                            for c, n in zip(codes[:5].tolist(), counts[:5].tolist()))
        row, col = (int(v) for v in np.argwhere(unknown)[0])
        expected = ", ".join(f"{colour} {ISPRS_CLASSES[i]}" for colour, i in ISPRS_COLOURS.items())
        raise ValueError(f"{path}: unknown label colour(s) (R, G, B) {colours}"
                         f"{' and more' if len(codes) > 5 else ''}, first at row {row + offset[0]}, "
                         f"column {col + offset[1]}; expected {expected} or {BOUNDARY_COLOUR} boundary")
    return mask


def crop_windows(width: int, height: int, size: int | None, stride: int | None) -> list[tuple[int, int, int, int]]:
    """(x0, y0, w, h) of ``size`` x ``size`` crops every ``stride`` px; the last row and column end at the edge.

    ``size=None`` (or a tile smaller than ``size``) gives the whole extent along that axis.
    """

    def starts(extent: int) -> list[int]:
        if size is None or extent <= size:
            return [0]
        values = list(range(0, extent - size + 1, stride or size))
        if values[-1] != extent - size:
            values.append(extent - size)
        return values

    cw = width if size is None else min(size, width)
    ch = height if size is None else min(size, height)
    return [(x, y, cw, ch) for y in starts(height) for x in starts(width)]


def _read_window(path: Path, window: tuple[int, int, int, int], bands: int, what: str,
                 ) -> tuple[np.ndarray, str, tuple[int, int]]:
    """Bands of ``window`` (x0, y0, w, h) of ``path``; returns (data, dtype, (height, width) of the file)."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                if src.count != bands:
                    raise RasterReadError(f"wrong band count: {path} ({what}) has {src.count} bands, expected {bands}")
                x, y, w, h = window
                if x + w > src.width or y + h > src.height:
                    raise RasterReadError(f"{path} ({what}): window x {x}..{x + w}, y {y}..{y + h} outside its "
                                          f"{src.width} x {src.height} px")
                return src.read(window=Window(x, y, w, h)), src.dtypes[0], (src.height, src.width)
    except RasterioError as error:
        raise RasterReadError(f"cannot read raster {path} ({what}): unreadable or corrupt ({error})") from None


def _raster_size(path: Path) -> tuple[int, int]:
    """(width, height) of a raster, reading its header only."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                return src.width, src.height
    except RasterioError as error:
        raise RasterReadError(f"cannot open raster {path}: unreadable or corrupt ({error})") from None


class ISPRSDataset(MMSegDataset):
    """Common part of ISPRS Potsdam and Vaihingen (not registered itself).

    Reads either the original ISPRS release (``layout = TILES``: large colour-coded tiles read
    crop by crop, never whole) or mmsegmentation's patches (``layout = MMSEG``, see
    :class:`MMSegDataset`); the layout is detected from the folders under ``root``.

    Args:
        root: the dataset folder.
        split: ``train``, ``val`` (mmsegmentation's names: ``val`` holds the tiles of the
            official test set), ``test``, ``all`` or ``unlisted``; None for every item.
        tile_size: side of the square crops cut from each tile (``TILES`` layout); None reads a
            whole tile per sample.
        stride: step between crops (default 256 with 512 crops, as mmsegmentation's converter);
            the last row and column of crops end at the tile edge.
        labels: ``"eroded"`` (the ``*_noBoundary`` labels, class boundaries black = -1, as
            mmsegmentation and the benchmark's evaluation use) or ``"full"``.
        hr_bands: the HR bands to read, in this order (Potsdam: any of R, G, B and, from the
            four-band ``4_Ortho_RGBIR`` tiles, NIR); None: the image tiles' three bands as they are.
        skip_corrupt: see :class:`SampleDataset`.
    """

    classes = ISPRS_CLASSES
    splits = MMSEG_SPLITS + ("all", "unlisted")
    tile_folder: ClassVar[str] = ""
    tile_pattern: ClassVar[re.Pattern[str]] = re.compile("")
    file_names: ClassVar[dict[str, str]] = {}
    split_tiles: ClassVar[dict[str, tuple[str, ...]]] = {}
    tile_bands: ClassVar[tuple[str, ...]] = ()
    """The bands of the image tiles (and of mmsegmentation's patches made from them)."""
    four_band_tiles: ClassVar[tuple[str, re.Pattern[str], str, tuple[str, ...]] | None] = None
    """Folder, name pattern, name and bands of the release's four-band tiles, read when
    ``hr_bands`` asks for a band that ``tile_bands`` lacks."""

    def __init__(self, root: str | Path, split: str | None = None, tile_size: int | None = 512,
                 stride: int | None = 256, labels: str = "eroded", hr_bands: Sequence[str] | None = None,
                 skip_corrupt: bool = False) -> None:
        if tile_size is not None and tile_size < 1:
            raise ValueError(f"{self.name}: tile_size: expected a positive number of pixels or None, got {tile_size}")
        if stride is not None and stride < 1:
            raise ValueError(f"{self.name}: stride: expected a positive number of pixels or None, got {stride}")
        if labels not in LABEL_VARIANTS:
            raise ValueError(f"{self.name}: labels: expected one of {LABEL_VARIANTS}, got {labels!r}")
        self.tile_size, self.stride, self.labels = tile_size, stride, labels
        self.layout = ""
        self.file_bands = self.tile_bands
        self.band_index: list[int] | None = None
        if hr_bands is not None:
            wanted = tuple(hr_bands)
            if self.four_band_tiles is not None and not set(wanted) <= set(self.tile_bands):
                folder, pattern, image_name, self.file_bands = self.four_band_tiles
                self.tile_folder, self.tile_pattern = folder, pattern
                self.file_names = {**self.file_names, "image": image_name}
            self.band_index = hr_band_indexes(self.name, wanted, self.file_bands, f"{self.tile_folder}/")
            self.bands = {"hr": wanted}
        super().__init__(root, split, skip_corrupt)
        if self.layout == MMSEG and self.file_bands != self.tile_bands:
            raise ValueError(f"{self.name}: hr_bands {list(wanted)}: mmsegmentation's patches under {self.root} "
                             f"hold {list(self.tile_bands)}; the other bands need the release's "
                             f"{self.four_band_tiles[0]}/ tiles")

    def _index(self) -> list[Item]:
        if (self.root / self.tile_folder).is_dir():
            self.layout = TILES
            return self._tile_items()
        if (self.root / "img_dir").is_dir():
            self.layout = MMSEG
            return super()._index()
        raise FileNotFoundError(f"{self.name}: {self.root} is in no known layout: expected {self.tile_folder}/ "
                                f"({TILES}) or img_dir/ and ann_dir/ ({MMSEG})")

    def _tile_images(self) -> dict[str, Path]:
        folder = self.root / self.tile_folder
        images: dict[str, Path] = {}
        for path in sorted([*folder.glob("*"), *folder.glob("*/*")]):
            match = self.tile_pattern.fullmatch(path.name)
            if match and path.is_file():
                if match.group(1) in images:
                    raise ValueError(f"{self.name} ({TILES}): tile {match.group(1)} twice: {images[match.group(1)]} "
                                     f"and {path}")
                images[match.group(1)] = path
        if not images:
            raise FileNotFoundError(f"{self.name} ({TILES}): no tiles in {folder} "
                                    f"(expected names like {self.file_names['image']})")
        return images

    def _label_files(self, tiles: list[str]) -> dict[str, Path]:
        """The label file of each tile, searched by name up to three folders deep (outside the image folder)."""
        wanted = {self.file_names[self.labels].format(tile=t): t for t in tiles}
        image_folder = self.root / self.tile_folder
        found: dict[str, Path] = {}
        for pattern in ("*", "*/*", "*/*/*"):
            for path in sorted(self.root.glob(pattern)):
                tile = wanted.get(path.name)
                if tile is not None and tile not in found and image_folder not in path.parents and path.is_file():
                    found[tile] = path
        return found

    def _tile_items(self) -> list[Item]:
        images = self._tile_images()
        labels = self._label_files(list(images))
        split_of = {t: s for s, tiles in self.split_tiles.items() for t in tiles}
        labelled_splits = {split_of.get(t, "unlisted") for t in labels}
        items = []
        for tile, path in images.items():
            split = split_of.get(tile, "unlisted")
            width, height = _raster_size(path)
            extra = {"label": labels.get(tile), "tile": tile, "label_required": split in labelled_splits}
            for window in crop_windows(width, height, self.tile_size, self.stride):
                x, y, w, h = window
                name = tile if self.tile_size is None else f"{tile}_{x}_{y}_{x + w}_{y + h}"
                items.append(Item(name, split, path, {**extra, "window": window}))
        return items

    def _load(self, item: Item) -> dict[str, Any]:
        if self.layout != TILES:
            sample = super()._load(item)
            if self.band_index is not None:
                sample["hr"] = sample["hr"][self.band_index]
            return sample
        window = item.extra["window"]
        image, dtype, size = _read_window(item.path, window, len(self.file_bands), "image tile")
        if self.band_index is not None:
            image = image[self.band_index]
        sample: dict[str, Any] = {"hr": torch.from_numpy(hr_to_8bit(image, 8 if dtype == "uint8" else None))}
        label_path = item.extra["label"]
        if label_path is None:
            if item.extra["label_required"]:
                expected = self.file_names[self.labels].format(tile=item.extra["tile"])
                raise FileNotFoundError(f"{self.name} ({TILES}): label {expected} of tile {item.extra['tile']} "
                                        f"not found under {self.root} ({self.labels} labels)")
            return sample
        rgb, _, label_size = _read_window(label_path, window, 3, "colour label")
        if label_size != size:
            raise RasterReadError(f"{label_path}: size {label_size} differs from its image {item.path} {size}")
        sample["mask"] = torch.from_numpy(decode_colour_label(rgb, label_path, offset=(window[1], window[0])))
        return sample


class Potsdam(ISPRSDataset):
    """ISPRS Potsdam 2D semantic labelling: 38 tiles of 6000 x 6000 px at 5 cm, 6 classes.

    Source: https://www.isprs.org/education/benchmarks/UrbanSemLab/ . Licence: ISPRS benchmark
    terms, research use.

    Layouts (detected):

    * **the ISPRS release** (``layout = TILES``)::

          <root>/2_Ortho_RGB/top_potsdam_<row>_<col>_RGB.tif          R, G, B 8-bit (also one
                                                                     folder deeper, as unzipped)
          <root>/4_Ortho_RGBIR/top_potsdam_<row>_<col>_RGBIR.tif      R, G, B, IR 8-bit (read
                                                                     for hr_bands with NIR)
          <root>/5_Labels_all/top_potsdam_<row>_<col>_label.tif       colour-coded labels
          <root>/5_Labels_all_noBoundary/top_potsdam_<row>_<col>_label_noBoundary.tif

      Label files are found by name up to three folders deep, so ``5_Labels_for_participants/``
      (24 tiles) and nested unzip folders work too. Colours (``ISPRS_COLOURS``): impervious
      surfaces (255, 255, 255), building (0, 0, 255), low vegetation (0, 255, 255), tree (0, 255,
      0), car (255, 255, 0), clutter (255, 0, 0); black (0, 0, 0) = eroded boundary -> -1; any
      other colour raises. Each tile is cut into ``tile_size`` crops every ``stride`` px, read as
      windows; item ids are ``<row>_<col>_<x0>_<y0>_<x1>_<y1>`` as mmsegmentation's patch names.
      mmsegmentation's converter steps its grid by the crop size and repeats the edge crop, so
      its patch count differs from ours for the same settings.
    * **mmsegmentation's patches**: ``img_dir/<split>``, ``ann_dir/<split>`` (see
      :class:`MMSegDataset`), made by its ``tools/dataset_converters/potsdam.py`` from
      ``2_Ortho_RGB.zip`` and ``5_Labels_all_noBoundary.zip``: 0 = boundary, 1..6 = ``classes``
      (``reduce_zero_label``). The converter reads the labels as BGR, so its colour list, read
      in RGB, is exactly ``ISPRS_COLOURS`` in ``classes`` order.

    Bands: R, G, B 8-bit (``hr``). Sample: ``hr`` (3, h, w), ``mask`` (h, w) int64 0..5, -1. With
    ``hr_bands=("R", "G", "B", "NIR")`` (a model made with :meth:`SkySense.with_hr_bands`) the
    tiles are read from ``<root>/4_Ortho_RGBIR/top_potsdam_<row>_<col>_RGBIR.tif`` (R, G, B, IR
    8-bit, the same grid as the RGB tiles): ``hr`` (4, h, w).

    Splits: mmsegmentation's tile lists ``train`` (24 tiles) and ``val`` (14 tiles: the
    benchmark's test tiles); other tiles are ``"unlisted"``; flat mmsegmentation folders are
    ``"all"``.
    """

    name = "potsdam"
    tile_folder = "2_Ortho_RGB"
    tile_pattern = re.compile(r"top_potsdam_(\d+_\d+)_RGB\.tif")
    tile_bands = ("R", "G", "B")
    four_band_tiles = ("4_Ortho_RGBIR", re.compile(r"top_potsdam_(\d+_\d+)_RGBIR\.tif"),
                       "top_potsdam_{tile}_RGBIR.tif", ("R", "G", "B", "NIR"))
    file_names = {"image": "top_potsdam_{tile}_RGB.tif", "full": "top_potsdam_{tile}_label.tif",
                   "eroded": "top_potsdam_{tile}_label_noBoundary.tif"}
    split_tiles = {
        "train": ("2_10", "2_11", "2_12", "3_10", "3_11", "3_12", "4_10", "4_11", "4_12", "5_10", "5_11", "5_12",
                  "6_10", "6_11", "6_12", "6_7", "6_8", "6_9", "7_10", "7_11", "7_12", "7_7", "7_8", "7_9"),
        "val": ("5_15", "6_15", "6_13", "3_13", "4_14", "6_14", "5_14", "2_13", "4_15", "2_14", "5_13", "4_13",
                "3_14", "7_13"),
    }


class Vaihingen(ISPRSDataset):
    """ISPRS Vaihingen 2D semantic labelling: 33 true orthophoto tiles (about 2000 x 2500 px) at 9 cm.

    Source: https://www.isprs.org/education/benchmarks/UrbanSemLab/ . Licence: ISPRS benchmark
    terms, research use.

    Layouts (detected):

    * **the ISPRS release** (``layout = TILES``)::

          <root>/top/top_mosaic_09cm_area<n>.tif                      NIR, R, G 8-bit
          <root>/gts_for_participants/top_mosaic_09cm_area<n>.tif     colour-coded labels (16
                                                                     training areas)
          <root>/<any folder>/top_mosaic_09cm_area<n>_noBoundary.tif  eroded labels (e.g. the
                                 ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE zip)

      Labels are found by name up to three folders deep, outside ``top/``. Colours, crops and
      item ids (``area<n>_<x0>_<y0>_<x1>_<y1>``) as :class:`Potsdam`.
    * **mmsegmentation's patches** (``img_dir``, ``ann_dir``) made by its
      ``tools/dataset_converters/vaihingen.py`` (``area<n>_<x0>_<y0>_<x1>_<y1>.png``).

    Bands: **near-infrared, red, green** (the Vaihingen orthophotos have no blue band), 8-bit,
    put in ``hr``'s R, G, B slots as distributed: a strong domain shift for an RGB model.
    Masks: as :class:`Potsdam` (6 classes, -1 = no label).

    Splits: mmsegmentation's area lists ``train`` (16 areas, the benchmark's training set) and
    ``val`` (17 areas, its test set); with ``labels="full"`` and only ``gts_for_participants``
    the ``val`` samples have no ``mask``.
    """

    name = "vaihingen"
    tile_folder = "top"
    tile_bands = ("NIR", "R", "G")
    tile_pattern = re.compile(r"top_mosaic_09cm_(area\d+)\.tif")
    file_names = {"image": "top_mosaic_09cm_{tile}.tif", "full": "top_mosaic_09cm_{tile}.tif",
                   "eroded": "top_mosaic_09cm_{tile}_noBoundary.tif"}
    split_tiles = {
        "train": ("area1", "area11", "area13", "area15", "area17", "area21", "area23", "area26", "area28", "area3",
                  "area30", "area32", "area34", "area37", "area5", "area7"),
        "val": ("area6", "area24", "area35", "area16", "area14", "area22", "area10", "area4", "area2", "area20",
                "area8", "area31", "area33", "area27", "area38", "area12", "area29"),
    }
