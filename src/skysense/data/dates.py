"""Acquisition dates from GeoTIFF tags, file and folder names or ``dates.txt`` sidecars.

Recognised in names, first match wins:

1. a Sentinel product or tile date ``YYYYMMDDThhmmss`` (``S2A_MSIL2A_20170613T101031_...``,
   ``S1A_IW_GRDH_1SDV_20170613T165043_...``, ``T32TPP_20180211T102141_B05``; the first such date
   of a product name is the sensing start; short times as in ``20170924T93020`` are accepted);
2. an ISO date ``YYYY-MM-DD``;
3. a plain ``YYYYMMDD`` not part of a longer number.

Caveat: old-format (pre-2017) ``S2A_OPER_...`` tile names carry the *processing* time, not the
sensing date; datasets built from them (OSCD) ship a ``dates.txt`` that must be used instead.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

_PATTERNS = (
    re.compile(r"(?<!\d)(\d{4})(\d{2})(\d{2})T\d{4,6}"),
    re.compile(r"(?<!\d)(\d{4})-(\d{2})-(\d{2})(?!\d)"),
    re.compile(r"(?<!\d)(\d{4})(\d{2})(\d{2})(?!\d)"),
)


def parse_date(text: str) -> dt.date | None:
    """The first acquisition date found in ``text`` (a name), or None."""
    for pattern in _PATTERNS:
        for match in pattern.finditer(text):
            year, month, day = (int(g) for g in match.groups())
            if not 1950 <= year <= 2100:
                continue
            try:
                return dt.date(year, month, day)
            except ValueError:
                continue
    return None


def date_from_name(path: str | Path, search_parents: int = 0) -> dt.date:
    """Acquisition date from a file or folder name (optionally its ``search_parents`` parents).

    Raises:
        ValueError: no date in the name(s), naming the path.
    """
    path = Path(path)
    candidates = [path, *list(path.parents)[:search_parents]]
    for candidate in candidates:
        found = parse_date(candidate.name)
        if found is not None:
            return found
    raise ValueError(
        f"no acquisition date in the name of {path}: expected a Sentinel product date "
        "(YYYYMMDDThhmmss), YYYY-MM-DD or YYYYMMDD"
    )


ACQUISITION_TAGS = (
    "ACQUISITION_DATE", "ACQUISITION_TIME", "DATE_ACQUIRED", "SENSING_TIME", "SENSING_DATE",
    "DATATAKE_SENSING_START", "PRODUCT_START_TIME", "START_TIME", "DATE",
)
"""GeoTIFF metadata keys (any case) read as the acquisition date, in this order of preference.

``TIFFTAG_DATETIME`` is deliberately absent: the TIFF standard defines it as the time the file
was written, not when the scene was acquired."""


def date_from_tags(path: str | Path) -> dt.date | None:
    """Acquisition date from the dataset-level GeoTIFF tags of ``path``, or None if no known tag.

    Raises:
        ValueError: a known tag is present but holds no date (names the file, tag and value).
    """
    import rasterio

    path = Path(path)
    try:
        with rasterio.open(path) as src:
            tags = {key.upper(): value for key, value in src.tags().items()}
    except rasterio.errors.RasterioIOError as error:
        raise ValueError(f"{path}: cannot be read for date tags: {error}") from None
    for key in ACQUISITION_TAGS:
        if key in tags:
            # EXIF-style "YYYY:MM:DD hh:mm:ss" -> "YYYY-MM-DD hh:mm:ss"
            found = parse_date(re.sub(r"^(\d{4}):(\d{2}):(\d{2})", r"\1-\2-\3", tags[key]))
            if found is None:
                raise ValueError(f"{path}: tag {key}={tags[key]!r} holds no date (expected e.g. 2019-09-17)")
            return found
    return None


def acquisition_date(path: str | Path, search_parents: int = 0) -> dt.date:
    """The date of one raster: its GeoTIFF tags first (:data:`ACQUISITION_TAGS`), else its name."""
    return date_from_tags(path) or date_from_name(path, search_parents)


def read_dates_txt(path: str | Path) -> list[dt.date]:
    """Dates of a ``dates.txt`` sidecar, in file order.

    Accepts ``key: date`` lines (OSCD: ``date_1: 20150704``) or one date per line; blank lines
    and ``#`` comments are skipped.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a line without a date, or no date at all (names the file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dates file {path} does not exist")
    dates: list[dt.date] = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        value = text.split(":", 1)[1] if ":" in text and not re.match(r"\d{4}-", text) else text
        found = parse_date(value.strip())
        if found is None:
            raise ValueError(f"{path}: line {number}: no date in {line.strip()!r}; expected YYYYMMDD or YYYY-MM-DD")
        dates.append(found)
    if not dates:
        raise ValueError(f"{path}: no dates found; expected lines such as 'date_1: 20150704'")
    return dates


def day_of_year(date: dt.date | dt.datetime) -> int:
    """Day of year, 1..366."""
    return int(date.timetuple().tm_yday)
