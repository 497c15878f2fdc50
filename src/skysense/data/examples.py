"""The six real BigEarthNet v1 S1+S2 patch pairs shipped inside the ``bigearthnet-common`` package.

``bigearthnet-common`` (CDLA-Permissive-1.0) carries ``BigEarthNet-S1-Example.tar.bz2`` and
``BigEarthNet-S2-Example.tar.bz2`` in its package folder. We locate that folder with
``importlib.util.find_spec`` **without importing the package** (importing it creates a user data
folder and pulls pydantic), extract both archives once into a cache, and read them with
:class:`~skysense.data.datasets.bigearthnet.BigEarthNetV1`.

Cache: ``$SKYSENSE_CACHE/bigearthnet_example`` if ``SKYSENSE_CACHE`` is set, else
``~/.cache/skysense/bigearthnet_example``. Extraction goes to a temporary folder next to it and
is renamed into place, so a crash or a concurrent run never leaves a half-extracted cache.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from skysense.config import SkySenseConfig
from skysense.data.datasets.bigearthnet import BigEarthNetV1

PACKAGE = "bigearthnet_common"
ARCHIVES = {"BigEarthNet-S2-Example": "BigEarthNet-S2-Example.tar.bz2",
            "BigEarthNet-S1-Example": "BigEarthNet-S1-Example.tar.bz2"}
CACHE_ENV = "SKYSENSE_CACHE"


def cache_dir() -> Path:
    """``$SKYSENSE_CACHE`` or ``~/.cache/skysense``."""
    value = os.environ.get(CACHE_ENV)
    return Path(value) if value else Path.home() / ".cache" / "skysense"


def package_folder(package: str = PACKAGE) -> Path:
    """Folder of an installed package, found without importing it.

    Raises:
        FileNotFoundError: the package is not installed (says how to install it).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; install it with: pip install bigearthnet-common"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _complete(folder: Path) -> bool:
    return all((folder / name).is_dir() and any((folder / name).iterdir()) for name in ARCHIVES)


def _extract(archive: Path, target: Path) -> None:
    try:
        with tarfile.open(archive, "r:bz2") as tar:
            try:
                tar.extractall(target, filter="data")
            except TypeError:  # Python without extraction filters
                tar.extractall(target)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ValueError(f"cannot extract {archive}: corrupt or truncated archive ({error})") from None


def bigearthnet_example_root(cache: str | Path | None = None) -> Path:
    """Folder holding ``BigEarthNet-S2-Example`` and ``BigEarthNet-S1-Example``, extracted once.

    Args:
        cache: parent cache folder (default :func:`cache_dir`); the examples go in its
            ``bigearthnet_example`` sub-folder.

    Raises:
        FileNotFoundError: ``bigearthnet-common`` is not installed or lacks an archive.
        ValueError: an archive is corrupt, or does not contain the expected folder.
    """
    root = Path(cache) if cache is not None else cache_dir()
    target = root / "bigearthnet_example"
    if _complete(target):
        return target
    source = package_folder()
    archives = {name: source / file for name, file in ARCHIVES.items()}
    for archive in archives.values():
        if not archive.is_file():
            raise FileNotFoundError(f"{archive} is missing from the installed bigearthnet-common package")
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".bigearthnet_example.", dir=root))
    try:
        for name, archive in archives.items():
            _extract(archive, staging)
            if not (staging / name).is_dir():
                raise ValueError(f"{archive}: expected a top-level folder {name!r} in the archive")
        if target.exists() and not _complete(target):
            shutil.rmtree(target)  # a broken earlier cache (not made by this atomic path)
        try:
            staging.rename(target)
        except OSError:
            if not _complete(target):  # lost a race only if the winner left a complete cache
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def bigearthnet_example_samples(
    config: SkySenseConfig | None = None,
    normalize: bool = False,
    cache: str | Path | None = None,
) -> list[dict[str, Any]]:
    """The six example S2+S1 pairs as model-input samples (see :class:`BigEarthNetV1`).

    Each sample: ``s2`` (1, 10, 120, 120) L2A x10000 (10 bands, 20 m ones resampled to 10 m),
    ``s2_dates``/``s2_mask``, ``s1`` (1, 2, 120, 120) VV/VH in dB (as stored in BigEarthNet-S1),
    ``s1_dates``/``s1_mask``, ``lat``/``lon`` of the S2 footprint centre, ``label`` (19-class
    multi-hot), ``crs``, ``transform``, ``id``. Pass them to
    :func:`skysense.data.sample.collate` for a batch.

    Args:
        config: used for ``normalize``; default the ``huge`` normalisation statistics.
        normalize: apply :func:`skysense.data.units.normalize` with ``config``.
    """
    from skysense.data.units import normalize as apply_normalization

    dataset = BigEarthNetV1(bigearthnet_example_root(cache), modalities=("s2", "s1"))
    samples = [dataset[i] for i in range(len(dataset))]
    if normalize:
        config = config or SkySenseConfig()
        samples = [apply_normalization(s, config) for s in samples]
    return samples
