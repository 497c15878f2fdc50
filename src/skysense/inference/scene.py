"""A scene to embed: the files of each modality, read window by window onto one pixel grid.

Inputs (what ``skysense embed`` accepts):

* ``hr``: one GeoTIFF holding the model's HR bands (``config.inputs["hr"].bands``: R, G, B, or
  e.g. R, G, B, NIR for a model made with :meth:`SkySense.with_hr_bands`) as its first bands, in
  that order (further bands, e.g. alpha, are ignored), or in any order that ``hr_file_bands``
  names; 8- or 16-bit (``hr_bit_depth`` for 11/12-bit data stored in 16 bits).
* ``s2`` / ``s1``: one path per acquisition, each either

  - a **folder with one file per band**: GeoTIFFs with the band at the end of the file name
    (BigEarthNet, OSCD ``imgs_1``; :func:`skysense.data.rasters.find_band_files`), or a Sentinel-2
    **SAFE** product (or any folder above its ``IMG_DATA``), whose JPEG 2000 band files are found
    under ``IMG_DATA`` (L1C ``*_B02.jp2``; L2A ``R10m/*_B02_10m.jp2`` ..., the finest resolution
    of each band is taken), or
  - one **stacked** multi-band GeoTIFF, whose band order is taken from its band descriptions when
    they name bands, else from ``file_bands``, else from its band count (:data:`STACKED_ORDERS`);

  or a folder holding such acquisitions (sub-folders or stacked files, one per date, sorted by
  name): a time series in one argument.

Dates (``s2``/``s1``), first found wins: the ``dates`` given by the caller (one per frame, in
order); a ``dates.txt`` sidecar in the folder holding the acquisitions, one line per acquisition
in name order (OSCD: ``<city>/dates.txt`` for ``imgs_1``, ``imgs_2``, whose file names carry the
processing date, not the sensing date); the GeoTIFF tags, then the file or folder name
(:func:`skysense.data.dates.acquisition_date`).

**Common grid.** Everything is read onto one grid: the *fusion grid*, on which one pixel is one
fused feature. It is the grid of the first Sentinel-2 acquisition's finest band (10 m), else of
the first Sentinel-1 acquisition, else the HR grid coarsened 32 times. The HR image is read on
the fusion grid refined 32 times (the model fuses HR of ``32 n`` pixels with S2/S1 of ``n``).
Every file not already on that grid (20/60 m bands, a second date a few pixels smaller, another
CRS, HR at 0.3 m instead of 10 / 32 = 0.3125 m) is **reprojected** onto it on the fly
(``rasterio.vrt.WarpedVRT``, bilinear), window by window; pixels it does not cover are nodata.
A file whose footprint does not overlap the fusion grid at all is **rejected** with an error
naming it. Nothing is ever read whole: each read is one window.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import rasterio.warp
import rasterio.windows
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from skysense.config import S1_BANDS, S2_BANDS, SkySenseConfig
from skysense.data.dates import acquisition_date, day_of_year, read_dates_txt
from skysense.data.rasters import RASTER_SUFFIXES, RasterReadError, canonical_band, find_band_files, open_raster
from skysense.data.units import (
    hr_to_8bit,
    processing_baseline_from_name,
    s1_linear_to_db,
    s2_offset,
    s2_to_model_units,
)
from skysense.downstream.data import normalize_sample

HR_SCALE = 32
"""HR pixels per fusion-grid pixel along each axis (the stride of the HR encoder's last level)."""

STACKED_ORDERS: dict[str, dict[int, tuple[str, ...]]] = {
    "s2": {
        10: S2_BANDS,
        12: ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12"),
        13: ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"),
    },
    "s1": {2: S1_BANDS},
}
"""Band order of a stacked file without band descriptions, by band count: the model's own order
(10 S2 bands), ESA's L2A order without B10 (12) and the full L1C order (13, as EuroSAT-MS and
Sen1Floods11 store them); VV, VH for Sentinel-1."""


@dataclass(frozen=True)
class Grid:
    """A pixel grid: CRS, affine pixel -> CRS transform and size."""

    crs: CRS | None
    transform: Affine
    width: int
    height: int

    def coarsened(self, factor: int) -> "Grid":
        """The grid with pixels ``factor`` times larger over the same origin (sizes rounded up)."""
        return Grid(self.crs, self.transform @ Affine.scale(factor),
                    -(-self.width // factor), -(-self.height // factor))

    def refined(self, factor: int) -> "Grid":
        """The grid with pixels ``factor`` times smaller over the same footprint."""
        return Grid(self.crs, self.transform @ Affine.scale(1.0 / factor), self.width * factor, self.height * factor)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return rasterio.windows.bounds(Window(0, 0, self.width, self.height), self.transform)


@dataclass(frozen=True)
class Frame:
    """One acquisition of one modality.

    Attributes:
        files: the file holding each model band, in the model's band order (the same file
            repeated for a stacked file).
        indexes: 1-based index of each model band in its file.
        date: acquisition date, or None when unknown.
        source: the folder or file the frame was found in (for messages).
    """

    files: tuple[Path, ...]
    indexes: tuple[int, ...]
    date: dt.date | None
    source: Path


def _stacked_indexes(path: Path, modality: str, bands: Sequence[str], file_bands: Sequence[str] | None) -> tuple[int, ...]:
    """1-based index of each model band in a stacked file (see the module docstring for the order)."""
    with open_raster(path) as src:
        count = src.count
        described = [canonical_band(d) for d in src.descriptions if d]
    if len(described) == count and set(map(canonical_band, bands)) <= set(described):
        order = described
    elif file_bands is not None:
        order = [canonical_band(b) for b in file_bands]
        if len(order) != count:
            raise RasterReadError(
                f"{modality}: {path} has {count} bands, but the band order given lists {len(order)}: {list(order)}"
            )
    elif count in STACKED_ORDERS[modality]:
        order = list(STACKED_ORDERS[modality][count])
    else:
        known = ", ".join(f"{n} ({'/'.join(o)})" for n, o in STACKED_ORDERS[modality].items())
        raise RasterReadError(
            f"{modality}: {path} has {count} bands without band descriptions; expected one of {known}, "
            f"or give the file's band order (--{modality}-bands)"
        )
    missing = [b for b in bands if canonical_band(b) not in order]
    if missing:
        raise RasterReadError(f"{modality}: {path} lacks bands {missing}; its bands are {order}")
    return tuple(order.index(canonical_band(b)) + 1 for b in bands)


_SAFE_BAND = re.compile(r"_(B\d{1,2}A?)(?:_(\d{2})m)?$", re.IGNORECASE)
"""Band (and L2A resolution) at the end of a SAFE file name: ``..._B02`` (L1C), ``..._B8A_20m`` (L2A)."""


def band_files(folder: Path, bands: Sequence[str]) -> dict[str, Path]:
    """Map each band to its file in a one-file-per-band folder or a SAFE product.

    GeoTIFF folders are read by :func:`skysense.data.rasters.find_band_files`. Otherwise the
    ``.jp2`` files under the folder's ``IMG_DATA`` (quality masks ``MSK_*`` left out) are matched
    by the band at the end of their name; of an L2A band present at 10, 20 and 60 m the finest
    file is taken.

    Raises:
        FileNotFoundError: a band without a file (names the folder, the band, the bands found).
        RasterReadError: two files of one band at the same resolution.
    """
    try:
        return find_band_files(folder, bands)
    except FileNotFoundError:
        candidates = sorted(p for p in folder.rglob("*.jp2") if not p.name.upper().startswith("MSK_"))
        if not candidates:
            raise
    in_img_data = [p for p in candidates if "IMG_DATA" in p.parts]
    found: dict[str, tuple[int, Path]] = {}
    for path in in_img_data or candidates:
        match = _SAFE_BAND.search(path.stem)
        if match is None:
            continue
        band, resolution = canonical_band(match.group(1)), int(match.group(2) or 0)
        if band in found and found[band][0] == resolution:
            raise RasterReadError(f"band {band}: two files in {folder}: {found[band][1]} and {path}")
        if band not in found or resolution < found[band][0]:
            found[band] = (resolution, path)
    missing = [b for b in bands if canonical_band(b) not in found]
    if missing:
        raise FileNotFoundError(
            f"bands {missing}: no JPEG 2000 file ending in _<band>.jp2 or _<band>_<res>m.jp2 under {folder}; "
            f"bands found: {sorted(found) or 'none'}"
        )
    return {canonical_band(b): found[canonical_band(b)][1] for b in bands}


def _is_band_folder(folder: Path, bands: Sequence[str]) -> bool:
    try:
        band_files(folder, bands)
    except (FileNotFoundError, RasterReadError):
        return False
    return True


def _date_entries(folder: Path) -> list[Path]:
    """Acquisitions in a folder, in name order: sub-folders, then raster files."""
    folders = sorted(p for p in folder.iterdir() if p.is_dir())
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in RASTER_SUFFIXES)
    return folders + files


def _sidecar_date(entry: Path) -> dt.date | None:
    """Date of ``entry`` from a ``dates.txt`` in its folder (one line per acquisition, name order)."""
    sidecar = entry.parent / "dates.txt"
    if not sidecar.is_file():
        return None
    dates = read_dates_txt(sidecar)
    entries = _date_entries(entry.parent)
    if len(dates) != len(entries):
        raise ValueError(
            f"{sidecar}: {len(dates)} dates for {len(entries)} acquisitions in {entry.parent} "
            f"({', '.join(p.name for p in entries)}); give the dates explicitly (--s2-dates / --s1-dates)"
        )
    return dates[entries.index(entry)]


def _frame_date(entry: Path, first_file: Path) -> dt.date | None:
    date = _sidecar_date(entry)
    if date is not None:
        return date
    try:
        return acquisition_date(first_file, search_parents=1 if entry.is_dir() else 0)
    except ValueError:
        return None


def resolve_frames(
    modality: str,
    paths: Sequence[str | Path],
    bands: Sequence[str],
    file_bands: Sequence[str] | None = None,
    dates: Sequence[dt.date] | None = None,
) -> list[Frame]:
    """The acquisitions named by ``paths`` (see the module docstring), in the order given.

    Raises:
        FileNotFoundError: a path does not exist, or a folder holds neither the bands nor acquisitions.
        RasterReadError: a stacked file's bands cannot be matched to ``bands``.
        ValueError: ``dates`` has the wrong length, or a ``dates.txt`` does not match its folder.
    """
    entries: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"{modality}: {path} does not exist")
        if path.is_file() or _is_band_folder(path, bands):
            entries.append(path)
            continue
        inner = _date_entries(path)
        if not inner:
            raise FileNotFoundError(
                f"{modality}: {path} holds neither band files ({', '.join(bands)}) nor acquisitions "
                "(sub-folders or GeoTIFFs)"
            )
        entries.extend(inner)
    if dates is not None and len(dates) != len(entries):
        raise ValueError(f"{modality} dates: expected one per acquisition ({len(entries)}), got {len(dates)}")
    frames = []
    for i, entry in enumerate(entries):
        if entry.is_dir():
            found = band_files(entry, bands)
            files = tuple(found[canonical_band(b)] for b in bands)
            indexes = (1,) * len(bands)
        else:
            files = (entry,) * len(bands)
            indexes = _stacked_indexes(entry, modality, bands, file_bands)
        date = dates[i] if dates is not None else _frame_date(entry, files[0])
        frames.append(Frame(files, indexes, date, entry))
    return frames


class _GridView:
    """One file seen on a target grid: the file itself when it is on the grid, else a warped view."""

    def __init__(self, path: Path, grid: Grid, resampling: Resampling) -> None:
        self.path = path
        self.dataset = src = open_raster(path)
        self.view: rasterio.io.DatasetReaderBase = src
        try:
            if grid.crs is not None and src.crs is None:
                raise RasterReadError(f"{path}: no CRS; cannot place it on the grid of the scene ({grid.crs})")
            precision = 1e-9 * abs(grid.transform.a)
            if not (src.crs == grid.crs and src.transform.almost_equals(grid.transform, precision=precision)):
                self._check_overlap(grid)
                self.view = WarpedVRT(
                    src, crs=grid.crs, transform=grid.transform, width=grid.width, height=grid.height,
                    resampling=resampling, dtype="float32", add_alpha=src.nodata is None,
                )
        except BaseException:
            src.close()
            raise

    def _check_overlap(self, grid: Grid) -> None:
        src = self.dataset
        left, bottom, right, top = rasterio.warp.transform_bounds(src.crs, grid.crs, *src.bounds)
        g_left, g_bottom, g_right, g_top = grid.bounds
        g_left, g_right = min(g_left, g_right), max(g_left, g_right)
        g_bottom, g_top = min(g_bottom, g_top), max(g_bottom, g_top)
        if right <= g_left or left >= g_right or top <= g_bottom or bottom >= g_top:
            footprint = tuple(round(v, 6) for v in (left, bottom, right, top))
            scene = tuple(round(v, 6) for v in (g_left, g_bottom, g_right, g_top))
            raise RasterReadError(
                f"{self.path} does not overlap the scene: its footprint {footprint} (left, bottom, right, top) "
                f"lies outside the fusion grid {scene} (in {grid.crs})"
            )

    def read(self, indexes: list[int], window: Window) -> tuple[np.ndarray, np.ndarray]:
        """(len(indexes), h, w) float32 values and validity of a window, nodata outside the file."""
        view = self.view
        h, w = int(window.height), int(window.width)
        data = np.zeros((len(indexes), h, w), dtype=np.float32)
        valid = np.zeros((h, w), dtype=bool)
        r0, c0 = int(window.row_off), int(window.col_off)
        rr0, cc0 = max(r0, 0), max(c0, 0)
        rr1, cc1 = min(r0 + h, view.height), min(c0 + w, view.width)
        if rr1 <= rr0 or cc1 <= cc0:
            return data, valid
        inner = Window(cc0, rr0, cc1 - cc0, rr1 - rr0)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                values = view.read(indexes, window=inner, out_dtype="float32")
                masks = view.read_masks(indexes, window=inner)
        except RasterioError as error:
            raise RasterReadError(
                f"cannot read rows {rr0}..{rr1}, cols {cc0}..{cc1} of {self.path}: truncated or corrupt ({error})"
            ) from None
        ys, xs = slice(rr0 - r0, rr1 - r0), slice(cc0 - c0, cc1 - c0)
        data[:, ys, xs] = values
        valid[ys, xs] = np.all(masks > 0, axis=0) & np.all(np.isfinite(values), axis=0)
        return data, valid

    def close(self) -> None:
        if self.view is not self.dataset:
            self.view.close()
        self.dataset.close()


class _FrameReader:
    """The bands of one frame on a target grid."""

    def __init__(self, frame: Frame, grid: Grid, resampling: Resampling) -> None:
        self.frame = frame
        self.views: dict[Path, _GridView] = {}
        try:
            for path in dict.fromkeys(frame.files):
                self.views[path] = _GridView(path, grid, resampling)
        except BaseException:
            self.close()
            raise

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """(C, h, w) float32 in the file's units and (h, w) validity (every band valid)."""
        frame = self.frame
        data = np.empty((len(frame.files), int(window.height), int(window.width)), dtype=np.float32)
        valid = np.ones(data.shape[1:], dtype=bool)
        for path, view in self.views.items():
            slots = [i for i, f in enumerate(frame.files) if f == path]
            values, ok = view.read([frame.indexes[i] for i in slots], window)
            data[slots] = values
            valid &= ok
        return data, valid

    def close(self) -> None:
        for view in self.views.values():
            view.close()


def _finest_file(files: Sequence[Path]) -> Path:
    best, best_area = files[0], None
    for path in dict.fromkeys(files):
        with open_raster(path) as src:
            area = abs(src.res[0] * src.res[1])
        if best_area is None or area < best_area:
            best, best_area = path, area
    return best


def _grid_of(path: Path) -> Grid:
    with open_raster(path) as src:
        return Grid(src.crs, src.transform, src.width, src.height)


@dataclass(frozen=True)
class WindowData:
    """One window of every modality read, in model units, normalised, nodata set to 0.

    ``inputs`` holds ``hr`` (C, 32h, 32w), ``s2`` (T, 10, h, w), ``s2_dates`` (T,), ``s2_mask``
    (T,) (frames with at least one valid pixel), the same for ``s1``; ``valid`` is (h, w) on the
    fusion grid: True where any frame of any modality read holds data.
    """

    inputs: dict[str, np.ndarray]
    valid: np.ndarray


class Scene:
    """The inputs of one embedding run, opened once and read window by window.

    Args:
        config: the model's configuration (bands and normalisation).
        hr: the HR GeoTIFF, or None.
        s2, s1: the frames of each time series (:func:`resolve_frames`), possibly empty.
        hr_bit_depth: bits of the HR data (default: 8 for uint8 files, 16 for uint16).
        hr_post: the HR image after a change (``skysense predict`` with a change model): read
            like ``hr`` onto the same grid, as ``hr_post``; HR pixels are valid where both are.
        hr_file_bands: the names of the HR file's bands, in file order (e.g. ``("NIR", "R",
            "G", "B")``); the model's HR bands are read by name. None: the file's first bands
            are the model's, in its order.
        s2_offsets: the DN offset of each S2 frame (:func:`skysense.data.units.s2_offset`).
        s2_level: ``"L2A"`` or ``"L1C"``.
        s1_units: ``"db"`` or ``"linear"``.

    Raises:
        ValueError: no modality, a date missing for a date-encoded modality, a wrong offset count.
        RasterReadError: a file that cannot be opened or does not overlap the fusion grid.
    """

    def __init__(
        self,
        config: SkySenseConfig,
        hr: str | Path | None = None,
        s2: Sequence[Frame] = (),
        s1: Sequence[Frame] = (),
        hr_bit_depth: int | None = None,
        s2_offsets: Sequence[float] | None = None,
        s2_level: str = "L2A",
        s1_units: str = "db",
        hr_file_bands: Sequence[str] | None = None,
        hr_post: str | Path | None = None,
    ) -> None:
        if hr is None and not s2 and not s1:
            raise ValueError("embed: nothing to read; give at least one of hr, s2, s1")
        if hr_post is not None and hr is None:
            raise ValueError("hr_post: the HR image after a change needs the one before (hr)")
        if s1_units not in ("db", "linear"):
            raise ValueError(f"s1 units: expected 'db' or 'linear', got {s1_units!r}")
        self.config = config
        self.hr_path = None if hr is None else Path(hr)
        self.hr_post_path = None if hr_post is None else Path(hr_post)
        self.frames: dict[str, list[Frame]] = {"s2": list(s2), "s1": list(s1)}
        for modality, frames in self.frames.items():
            if modality in config.fusion.date_encoded:
                for frame in frames:
                    if frame.date is None:
                        raise ValueError(
                            f"{modality}: no acquisition date for {frame.source} (none in a dates.txt, the "
                            f"GeoTIFF tags or the name); the model encodes the day of year of every {modality} "
                            f"frame: give --{modality}-dates"
                        )
        if s2_offsets is not None and len(s2_offsets) != len(self.frames["s2"]):
            raise ValueError(f"s2 offsets: expected one per frame ({len(self.frames['s2'])}), got {len(s2_offsets)}")
        self.s2_offsets = tuple(s2_offsets or (0.0,) * len(self.frames["s2"]))
        self.s2_level = s2_level
        self.s1_units = s1_units
        # The HR image's own grid when it sets the fusion grid (no S2 / S1): maps on the HR grid end
        # where it does, not at the fusion grid's next multiple of HR_SCALE pixels.
        self.hr_grid: Grid | None = None
        if self.frames["s2"]:
            self.grid = _grid_of(_finest_file(self.frames["s2"][0].files))
        elif self.frames["s1"]:
            self.grid = _grid_of(_finest_file(self.frames["s1"][0].files))
        else:
            self.hr_grid = _grid_of(self.hr_path)
            self.grid = self.hr_grid.coarsened(HR_SCALE)
        self.hr_bit_depth = hr_bit_depth
        self.hr_file_bands = None if hr_file_bands is None else tuple(hr_file_bands)
        self.hr_band_indexes: tuple[int, ...] = ()
        self._readers: dict[str, list[_FrameReader]] = {}
        try:
            if self.hr_path is not None:
                self._open_hr()
            for modality, frames in self.frames.items():
                self._readers[modality] = [_FrameReader(f, self.grid, Resampling.bilinear) for f in frames]
        except BaseException:
            self.close()
            raise

    def _open_hr(self) -> None:
        path = self.hr_path
        indexes = self._hr_indexes(path)
        frame = Frame((path,) * len(indexes), indexes, None, path)
        self._readers["hr"] = [_FrameReader(frame, self.grid.refined(HR_SCALE), Resampling.bilinear)]
        if self.hr_post_path is not None:
            post = self.hr_post_path
            if self._hr_indexes(post) != indexes:
                raise RasterReadError(f"hr_post: {post} holds its bands in another order than {path}")
            self._readers["hr"].append(_FrameReader(Frame((post,) * len(indexes), indexes, None, post),
                                                    self.grid.refined(HR_SCALE), Resampling.bilinear))

    def _hr_indexes(self, path: Path) -> tuple[int, ...]:
        """The file band of each of the model's HR bands in ``path``; infers the bit depth once."""
        with open_raster(path) as src:
            count, dtype = src.count, src.dtypes[0]
        bands = self.config.inputs["hr"].bands
        if self.hr_file_bands is None:
            if count < len(bands):
                raise RasterReadError(f"hr: {path} has {count} bands, expected at least {len(bands)} (the model's "
                                      f"{', '.join(bands)} as bands 1-{len(bands)}; name the file's bands with "
                                      f"--hr-bands when they are in another order)")
            indexes = tuple(range(1, len(bands) + 1))
        else:
            if len(self.hr_file_bands) != count:
                raise RasterReadError(f"hr: {path} has {count} bands; the HR file bands name "
                                      f"{len(self.hr_file_bands)}: {list(self.hr_file_bands)}")
            missing = [b for b in bands if b not in self.hr_file_bands]
            if missing:
                raise RasterReadError(f"hr: {path} holds {list(self.hr_file_bands)}; the model takes "
                                      f"{list(bands)}: {missing} missing")
            indexes = tuple(self.hr_file_bands.index(b) + 1 for b in bands)
        self.hr_band_indexes = indexes
        if self.hr_bit_depth is None:
            inferred = {"uint8": 8, "uint16": 16, "int16": 16}.get(dtype)
            if inferred is None:
                raise ValueError(f"hr: {path} holds {dtype} values; give the bit depth of the data (--hr-bit-depth)")
            self.hr_bit_depth = inferred
        return indexes

    @property
    def hr_size(self) -> tuple[int, int]:
        """(height, width) of the HR grid the scene reads: the HR image's own when it sets the fusion
        grid, else the fusion grid refined ``HR_SCALE`` times."""
        grid = self.hr_grid or self.grid.refined(HR_SCALE)
        return grid.height, grid.width

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities present, in fusion order."""
        return tuple(m for m in ("hr", "s2", "s1") if self._readers.get(m))

    def day_of_year(self, modality: str) -> np.ndarray | None:
        frames = self.frames[modality]
        if any(f.date is None for f in frames):
            return None
        return np.array([day_of_year(f.date) for f in frames], dtype=np.int64)

    def read(self, window: Window, modalities: Sequence[str]) -> WindowData:
        """Read ``window`` (fusion-grid pixels, may pass the grid edge) of the given modalities.

        Raises:
            RasterReadError: a file cannot be read there (names the file and its pixel window).
        """
        h, w = int(window.height), int(window.width)
        inputs: dict[str, np.ndarray] = {}
        valid = np.zeros((h, w), dtype=bool)
        for modality in modalities:
            if modality == "hr":
                hr_window = Window(window.col_off * HR_SCALE, window.row_off * HR_SCALE, w * HR_SCALE, h * HR_SCALE)
                data, ok = self._readers["hr"][0].read(hr_window)
                inputs["hr"] = hr_to_8bit(data, bit_depth=self.hr_bit_depth)
                if len(self._readers["hr"]) > 1:  # the image after a change: valid where both are
                    post, post_ok = self._readers["hr"][1].read(hr_window)
                    inputs["hr_post"] = hr_to_8bit(post, bit_depth=self.hr_bit_depth)
                    ok = ok & post_ok
                inputs["hr_valid"] = ok
                valid |= ok.reshape(h, HR_SCALE, w, HR_SCALE).any(axis=(1, 3))
                continue
            frames = [reader.read(window) for reader in self._readers[modality]]
            data = np.stack([f[0] for f in frames])
            ok = np.stack([f[1] for f in frames])
            if modality == "s2":
                for t, offset in enumerate(self.s2_offsets):
                    data[t] = s2_to_model_units(data[t], level=self.s2_level, offset=offset)
            elif self.s1_units == "linear":
                data = s1_linear_to_db(data)
            inputs[modality] = data
            inputs[f"{modality}_valid"] = ok
            inputs[f"{modality}_mask"] = ok.any(axis=(1, 2))
            dates = self.day_of_year(modality)
            if dates is not None:
                inputs[f"{modality}_dates"] = dates
            valid |= ok.any(axis=0)
        return WindowData(inputs, valid)

    def files(self) -> list[Path]:
        """Every file read, once each."""
        paths = [p for p in (self.hr_path, self.hr_post_path) if p is not None]
        for frames in self.frames.values():
            for frame in frames:
                paths.extend(frame.files)
        return list(dict.fromkeys(paths))

    def signature(self) -> dict:
        """What identifies the inputs of a run (for resuming): files with their sizes, units, dates."""
        return {
            "files": [[str(p.resolve()), os.path.getsize(p)] for p in self.files()],
            "hr_bit_depth": self.hr_bit_depth,
            "hr_band_indexes": list(self.hr_band_indexes),
            "s2_offsets": list(self.s2_offsets),
            "s2_level": self.s2_level,
            "s1_units": self.s1_units,
            "dates": {m: [None if f.date is None else f.date.isoformat() for f in fr] for m, fr in self.frames.items()},
            "grid": [self.grid.crs.to_wkt() if self.grid.crs else None, list(self.grid.transform)[:6],
                     self.grid.width, self.grid.height],
        }

    def close(self) -> None:
        for readers in self._readers.values():
            for reader in readers:
                reader.close()
        self._readers = {}

    def __enter__(self) -> "Scene":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def s2_frame_offsets(frames: Sequence[Frame], processing_baseline: str | None = None,
                     offset: float | None = None) -> list[float]:
    """The DN offset of each S2 frame: ``offset`` or ``processing_baseline`` for all frames, else
    the baseline in each frame's product name (``_N0400_``, in the name of the frame's folder or
    file or of a folder above its first band file, e.g. the ``.SAFE`` product).

    Raises:
        ValueError: a frame whose name carries no processing baseline when neither is given.
    """
    if offset is not None or processing_baseline is not None:
        value = s2_offset(processing_baseline, offset)
        return [value] * len(frames)
    offsets = []
    for frame in frames:
        names = [frame.source.name, frame.files[0].name, *(p.name for p in frame.files[0].parents)]
        baseline = next((b for b in map(processing_baseline_from_name, names) if b is not None), None)
        if baseline is None:
            raise ValueError(
                f"s2: the DN offset of {frame.source} is unknown: its name carries no processing baseline "
                "(_N0400_); give --s2-offset (0 for baselines before 04.00, -1000 from 04.00 on) or --s2-baseline"
            )
        offsets.append(s2_offset(baseline))
    return offsets


def normalized_batch(windows: Sequence[WindowData], config: SkySenseConfig, modalities: Sequence[str]) -> dict:
    """Stack windows into a model batch: normalised tensors, nodata pixels set to 0 (the mean).

    Returns ``hr`` (B, 3, H, W), ``s2`` (B, T, 10, h, w), ``s2_dates`` (B, T), ``s2_mask`` (B, T),
    the same for ``s1``; a modality is left out when no window of the batch holds data for it.
    """
    import torch

    batch: dict = {}
    for modality in modalities:
        if not any(w.inputs[f"{modality}_valid"].any() for w in windows):
            continue
        batch[modality] = torch.from_numpy(np.stack([w.inputs[modality] for w in windows]))
        batch[f"{modality}_valid"] = torch.from_numpy(np.stack([w.inputs[f"{modality}_valid"] for w in windows]))
        if modality == "hr" and "hr_post" in windows[0].inputs:
            batch["hr_post"] = torch.from_numpy(np.stack([w.inputs["hr_post"] for w in windows]))
        if modality != "hr":
            batch[f"{modality}_mask"] = torch.from_numpy(np.stack([w.inputs[f"{modality}_mask"] for w in windows]))
            if f"{modality}_dates" in windows[0].inputs:
                batch[f"{modality}_dates"] = torch.from_numpy(np.stack([w.inputs[f"{modality}_dates"] for w in windows]))
    batch = normalize_sample(batch, config)  # hr_post with the HR statistics too
    for modality in modalities:
        if modality in batch:
            valid = batch.pop(f"{modality}_valid")
            x = batch[modality]
            keep = valid[:, None] if modality == "hr" else valid[:, :, None]
            batch[modality] = torch.where(keep, x, torch.zeros((), dtype=x.dtype))
            if modality == "hr" and "hr_post" in batch:
                batch["hr_post"] = torch.where(keep, batch["hr_post"], torch.zeros((), dtype=x.dtype))
    batch.pop("normalized", None)
    return batch
