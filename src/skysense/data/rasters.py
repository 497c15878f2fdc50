"""Reading GeoTIFF bands by name onto one pixel grid, with validity mask, CRS and transform.

Two layouts are supported:

* **one file per band** in a folder, the band named at the end of the file name:
  ``..._B02.tif``, ``..._B8A.tif``, ``..._VV.tif`` or just ``B2.tif`` (SSL4EO). Band names are
  compared after :func:`canonical_band` (``B02`` == ``B2``, case-insensitive);
* **one stacked file** whose bands are listed by the caller (``read_stacked``).

Bands of different resolution (Sentinel-2 20 m and 60 m) are resampled onto the grid of the
finest band (or a chosen reference band) with bilinear interpolation, using rasterio's
``out_shape`` reads; the footprints must agree to within one pixel of the coarser band.

Every error names the file (or folder and band) and the expected versus actual value.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
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
from rasterio.windows import Window

RASTER_SUFFIXES = (".tif", ".tiff", ".TIF", ".TIFF")

__all__ = [
    "RasterReadError",
    "RasterStack",
    "canonical_band",
    "find_band_files",
    "read_band_files",
    "read_band_folder",
    "read_stacked",
    "read_image",
    "center_latlon",
]


class RasterReadError(ValueError):
    """A raster could not be opened or read, or does not match what was expected."""


@dataclass
class RasterStack:
    """Bands on one pixel grid.

    Attributes:
        data: (C, H, W) float32 values in the file's units (no scaling applied).
        valid: (H, W) bool, True where every band holds data (not nodata, not NaN, not masked).
        bands: canonical band names, in the order of ``data``.
        crs: coordinate reference system of the grid, or None for ungeoreferenced files.
        transform: affine pixel -> CRS transform of ``data`` (window offset included).
        paths: file of each band (the same file repeated for stacked files).
    """

    data: np.ndarray
    valid: np.ndarray
    bands: tuple[str, ...]
    crs: CRS | None
    transform: Affine
    paths: tuple[Path, ...]

    @property
    def height(self) -> int:
        return int(self.data.shape[-2])

    @property
    def width(self) -> int:
        return int(self.data.shape[-1])

    def center_latlon(self) -> tuple[float, float]:
        """(lat, lon) in degrees WGS84 of the centre of the footprint."""
        return center_latlon(self.crs, self.transform, self.height, self.width, where=str(self.paths[0]))


def canonical_band(name: str) -> str:
    """Canonical spelling of a band name: ``B02``/``b2`` -> ``B2``, ``B08A``/``b8a`` -> ``B8A``, ``vv`` -> ``VV``."""
    upper = name.strip().upper()
    match = re.fullmatch(r"B0*(\d{1,2})(A?)", upper)
    if match:
        return f"B{int(match.group(1))}{match.group(2)}"
    return upper


def _band_of_file(path: Path) -> str:
    """The band named at the end of a file name (``x_B02.tif`` -> ``B2``, ``VV.tif`` -> ``VV``)."""
    return canonical_band(path.stem.rsplit("_", 1)[-1])


def find_band_files(folder: str | Path, bands: Sequence[str]) -> dict[str, Path]:
    """Map each requested band to its file in a one-file-per-band folder.

    Raises:
        FileNotFoundError: the folder does not exist, or a band has no file (names the folder, the
            band and the bands that were found).
        RasterReadError: two files claim the same band.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"band folder {folder} does not exist")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix not in RASTER_SUFFIXES or not path.is_file():
            continue
        band = _band_of_file(path)
        if band in found:
            raise RasterReadError(f"band {band}: two files in {folder}: {found[band].name} and {path.name}")
        found[band] = path
    result: dict[str, Path] = {}
    for band in bands:
        key = canonical_band(band)
        if key not in found:
            raise FileNotFoundError(
                f"band {band}: no file ending in _{band}.tif in {folder}; bands found: {sorted(found) or 'none'}"
            )
        result[key] = found[key]
    return result


def open_raster(path: Path) -> rasterio.io.DatasetReader:
    """``rasterio.open`` with clear errors: missing file, or unreadable/corrupt (:class:`RasterReadError`)."""
    if not path.exists():
        raise FileNotFoundError(f"raster file {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioError as error:
        raise RasterReadError(f"cannot open raster {path}: unreadable or corrupt ({error})") from None


def _read(src: rasterio.io.DatasetReader, path: Path, indexes: list[int], window: Window | None,
          out_shape: tuple[int, int] | None, resampling: Resampling) -> tuple[np.ndarray, np.ndarray]:
    """Read bands and their GDAL masks (nodata-aware); errors name the file."""
    shape = None if out_shape is None else (len(indexes),) + tuple(out_shape)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            data = src.read(indexes, window=window, out_shape=shape, resampling=resampling, out_dtype="float32")
            masks = src.read_masks(indexes, window=window, out_shape=shape, resampling=Resampling.nearest)
    except RasterioError as error:
        raise RasterReadError(f"cannot read raster {path}: truncated or corrupt ({error})") from None
    return data, masks


def read_band_files(
    files: Mapping[str, str | Path],
    window: Window | None = None,
    reference: str | None = None,
    out_shape: tuple[int, int] | None = None,
    resampling: Resampling = Resampling.bilinear,
) -> RasterStack:
    """Read single-band files onto the grid of the reference band.

    Args:
        files: band name -> file, in the output band order.
        window: pixel window on the reference grid (``rasterio.windows.Window``); None reads all.
        reference: band whose grid is the output grid; default the finest-resolution band.
        out_shape: (H, W) of the output, overriding the reference grid size (the footprint stays
            that of the reference; used to put a second date on the first date's grid).
        resampling: resampling of the coarser bands (bilinear by default).

    Raises:
        RasterReadError: unreadable file, a file with more than one band, CRSs that differ
            between bands, footprints that differ by more than one coarse pixel.
        FileNotFoundError: a file does not exist.
    """
    if not files:
        raise ValueError("read_band_files: no band files given")
    names = [canonical_band(b) for b in files]
    paths = [Path(p) for p in files.values()]
    sources = [open_raster(p) for p in paths]
    try:
        for src, path, band in zip(sources, paths, names):
            if src.count != 1:
                raise RasterReadError(f"band {band}: file {path} has {src.count} bands, expected 1")
        if reference is None:
            ref_i = min(range(len(sources)), key=lambda i: abs(sources[i].res[0] * sources[i].res[1]))
        else:
            key = canonical_band(reference)
            if key not in names:
                raise ValueError(f"reference band {reference} is not among the bands read {names}")
            ref_i = names.index(key)
        ref, ref_path = sources[ref_i], paths[ref_i]
        for src, path in zip(sources, paths):
            if src.crs != ref.crs:
                raise RasterReadError(
                    f"inconsistent CRS: {path} has {src.crs}, expected {ref.crs} (as {ref_path})"
                )
            tol = max(abs(src.res[0]), abs(src.res[1])) * 1.01
            if any(abs(a - b) > tol for a, b in zip(src.bounds, ref.bounds)):
                raise RasterReadError(
                    f"footprint of {path} {tuple(src.bounds)} differs from {ref_path} {tuple(ref.bounds)}"
                    " by more than one pixel"
                )
        full = Window(0, 0, ref.width, ref.height)
        win = full if window is None else window
        if window is not None:
            win_i = win.round_offsets().round_lengths()
            if (win_i.col_off < 0 or win_i.row_off < 0 or win_i.col_off + win_i.width > ref.width
                    or win_i.row_off + win_i.height > ref.height):
                raise RasterReadError(
                    f"window {win} outside the grid of {ref_path} ({ref.width}x{ref.height} px)"
                )
        shape = (int(round(win.height)), int(round(win.width))) if out_shape is None else tuple(out_shape)
        ref_bounds = rasterio.windows.bounds(win, ref.transform)
        data = np.empty((len(sources),) + shape, dtype=np.float32)
        valid = np.ones(shape, dtype=bool)
        for i, (src, path) in enumerate(zip(sources, paths)):
            if (src.transform == ref.transform and src.shape == ref.shape) and out_shape is None:
                src_win = win
            else:
                src_win = rasterio.windows.from_bounds(*ref_bounds, transform=src.transform)
            band_data, band_mask = _read(src, path, [1], src_win, shape, resampling)
            data[i] = band_data[0]
            valid &= (band_mask[0] > 0) & np.isfinite(band_data[0])
        transform = rasterio.windows.transform(win, ref.transform)
        if out_shape is not None:
            transform = transform @ Affine.scale(win.width / shape[1], win.height / shape[0])
        return RasterStack(data, valid, tuple(names), ref.crs, transform, tuple(paths))
    finally:
        for src in sources:
            src.close()


def read_band_folder(
    folder: str | Path,
    bands: Sequence[str],
    window: Window | None = None,
    reference: str | None = None,
    out_shape: tuple[int, int] | None = None,
) -> RasterStack:
    """Read the named bands from a one-file-per-band folder (see :func:`read_band_files`)."""
    return read_band_files(find_band_files(folder, bands), window=window, reference=reference, out_shape=out_shape)


def read_stacked(
    path: str | Path,
    file_bands: Sequence[str],
    select: Sequence[str] | None = None,
    window: Window | None = None,
    out_shape: tuple[int, int] | None = None,
) -> RasterStack:
    """Read bands by name from one multi-band file whose band order is ``file_bands``.

    ``out_shape`` (H, W) resamples the (windowed) footprint bilinearly onto that many pixels
    (used to put frames of a time series that differ by a pixel onto one grid).

    Raises:
        RasterReadError: the file's band count differs from ``len(file_bands)``, or it is unreadable.
        ValueError: a selected band is not in ``file_bands``.
    """
    path = Path(path)
    names = [canonical_band(b) for b in file_bands]
    wanted = names if select is None else [canonical_band(b) for b in select]
    missing = [b for b in wanted if b not in names]
    if missing:
        raise ValueError(f"bands {missing} not in the band list of {path}: {names}")
    with open_raster(path) as src:
        if src.count != len(names):
            raise RasterReadError(
                f"wrong band count: {path} has {src.count} bands, expected {len(names)} ({', '.join(names)})"
            )
        indexes = [names.index(b) + 1 for b in wanted]
        resampling = Resampling.nearest if out_shape is None else Resampling.bilinear
        data, masks = _read(src, path, indexes, window, out_shape, resampling)
        valid = np.all(masks > 0, axis=0) & np.all(np.isfinite(data), axis=0)
        transform = src.transform if window is None else rasterio.windows.transform(window, src.transform)
        if out_shape is not None:
            win = window if window is not None else Window(0, 0, src.width, src.height)
            transform = transform @ Affine.scale(win.width / out_shape[1], win.height / out_shape[0])
        return RasterStack(data, valid, tuple(wanted), src.crs, transform, (path,) * len(wanted))


def read_image(path: str | Path, expected_bands: int | None = None,
               window: Window | None = None) -> tuple[np.ndarray, str]:
    """Read an image (JPEG, PNG, TIFF), whole or a ``window`` of it, as (C, H, W) in its own dtype;
    returns (array, dtype).

    Raises:
        RasterReadError: unreadable file, band count different from ``expected_bands``, or a
            ``window`` that is not inside the image.
    """
    path = Path(path)
    with open_raster(path) as src:
        if expected_bands is not None and src.count != expected_bands:
            raise RasterReadError(f"wrong band count: {path} has {src.count} bands, expected {expected_bands}")
        if window is not None and (window.col_off < 0 or window.row_off < 0 or window.col_off + window.width > src.width
                                   or window.row_off + window.height > src.height):
            raise RasterReadError(f"{path}: window {window} outside the {src.width} x {src.height} px image")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                data = src.read(window=window)
        except RasterioError as error:
            raise RasterReadError(f"cannot read raster {path}: truncated or corrupt ({error})") from None
        return data, src.dtypes[0]


def center_latlon(crs: CRS | None, transform: Affine, height: int, width: int, where: str = "raster") -> tuple[float, float]:
    """(lat, lon) in degrees WGS84 of the centre of a ``height`` x ``width`` grid.

    Raises:
        RasterReadError: the grid has no CRS (names ``where``).
    """
    if crs is None:
        raise RasterReadError(f"{where}: no CRS, cannot compute the latitude/longitude of its footprint")
    x, y = transform @ (width / 2.0, height / 2.0)
    lons, lats = rasterio.warp.transform(crs, "EPSG:4326", [x], [y])
    return float(lats[0]), float(lons[0])


def transparent_pixels(alpha: np.ndarray) -> int:
    """Pixels of an integer alpha band below full opacity (the dtype's maximum)."""
    if not np.issubdtype(alpha.dtype, np.integer):
        raise RasterReadError(f"alpha band of dtype {alpha.dtype}: expected an integer type")
    return int(np.count_nonzero(alpha != np.iinfo(alpha.dtype).max))


def read_rgb(path: str | Path) -> tuple[np.ndarray, str]:
    """(3, H, W) pixels of an RGB image, or of an RGBA one whose alpha is fully opaque (dropped),
    and their dtype.

    Raises:
        RasterReadError: unreadable file, a band count other than 3 or 4, or an alpha band below
            full opacity anywhere (names the file and the number of such pixels).
    """
    image, dtype = read_image(path)
    if image.shape[0] == 4:
        transparent = transparent_pixels(image[3])
        if transparent:
            raise RasterReadError(f"{path}: RGBA image whose alpha is below full opacity on {transparent} of "
                                  f"{image[3].size} pixels; expected RGB or RGBA with an opaque alpha")
        image = image[:3]
    if image.shape[0] != 3:
        raise RasterReadError(f"wrong band count: {path} has {image.shape[0]} bands, expected 3 (RGB) or 4 "
                              "(RGBA with an opaque alpha)")
    return image, dtype
