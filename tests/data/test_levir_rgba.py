"""LEVIR-CD copies with RGBA images and unlabelled pairs: opaque alpha dropped, unusable pairs left out."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.errors import NotGeoreferencedWarning

from skysense.data.datasets import LEVIRCD
from skysense.data.rasters import RasterReadError, read_rgb

from data_helpers import real_dataset_dir

SIZE = 16


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)


def _rgba(rgb: np.ndarray, alpha: int = 255) -> np.ndarray:
    return np.dstack([rgb, np.full((SIZE, SIZE), alpha, np.uint8)])


def _label(changed_rows: int = 4) -> np.ndarray:
    label = np.zeros((SIZE, SIZE), np.uint8)
    label[:changed_rows] = 255
    return label


@pytest.fixture
def levir_like(tmp_path: Path) -> Path:
    """Six pairs: two usable (one with an opaque RGBA before image), two unusable, two corrupt."""
    root = tmp_path / "levir"
    before = _rgb(0)
    _png(root / "A" / "train_1.png", _rgba(before))  # opaque alpha: read as RGB
    _png(root / "B" / "train_1.png", _rgb(1))
    _png(root / "label" / "train_1.png", _label())

    transparent = _rgba(_rgb(2))
    transparent[:3, :5, 3] = 0  # 15 pixels without image data
    _png(root / "A" / "train_2.png", _rgb(3))
    _png(root / "B" / "train_2.png", transparent)
    _png(root / "label" / "train_2.png", _label())

    _png(root / "A" / "test_3.png", _rgba(_rgb(4)))  # no label: an unlabelled pair
    _png(root / "B" / "test_3.png", _rgba(_rgb(5)))

    _png(root / "A" / "val_4.png", _rgb(6))
    _png(root / "B" / "val_4.png", _rgb(7))
    _png(root / "label" / "val_4.png", _label(0))

    bad_label = _label()
    bad_label[5, 5] = 7
    _png(root / "A" / "val_5.png", _rgb(8))
    _png(root / "B" / "val_5.png", _rgb(9))
    _png(root / "label" / "val_5.png", bad_label)

    grey_alpha = np.dstack([_rgb(10)[..., 0], np.full((SIZE, SIZE), 255, np.uint8)])
    _png(root / "A" / "test_6.png", grey_alpha)  # 2 bands (LA): neither RGB nor RGBA
    _png(root / "B" / "test_6.png", _rgb(11))
    _png(root / "label" / "test_6.png", _label())
    return root


def test_opaque_rgba_is_read_as_rgb_and_unusable_pairs_are_left_out(levir_like):
    with pytest.warns(UserWarning) as caught:
        ds = LEVIRCD(levir_like)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2
    assert "pair test_3 left out" in messages[0] and str(levir_like / "label" / "test_3.png") in messages[0]
    assert "unlabelled" in messages[0]
    assert "pair train_2 left out" in messages[1] and str(levir_like / "B" / "train_2.png") in messages[1]
    assert "15 of 256 pixels" in messages[1]
    assert sorted(ds.excluded) == ["test_3", "train_2"]
    assert len(ds) == 4 and [it.id for it in ds.items] == ["test_6", "train_1", "val_4", "val_5"]
    assert ds.split_counts() == {"test": 1, "train": 1, "val": 2}

    s = ds[1]  # train_1: RGBA before image with an opaque alpha
    assert s["hr"].shape == s["hr_post"].shape == (3, SIZE, SIZE)
    np.testing.assert_array_equal(s["hr"].numpy(), _rgb(0).transpose(2, 0, 1).astype(np.float32))
    assert s["mask"].sum() == 4 * SIZE and set(s["mask"].unique().tolist()) == {0, 1}


def test_corrupt_pairs_still_raise_naming_the_file(levir_like):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ds = LEVIRCD(levir_like)
        lenient = LEVIRCD(levir_like, skip_corrupt=True)
    ids = [it.id for it in ds.items]
    with pytest.raises(ValueError, match=r"val_5\.png: change mask values \[0, 7, 255\]"):
        ds[ids.index("val_5")]
    with pytest.raises(RasterReadError, match=r"test_6\.png has 2 bands, expected 3 \(RGB\) or 4"):
        ds[ids.index("test_6")]
    assert [lenient[i]["hr"].shape[0] for i in range(len(lenient))] == [3, 3, 3, 3]
    assert sorted(lenient.skipped) == ["test_6", "val_5"]


def test_only_the_selected_split_is_checked_and_layout_errors_raise(levir_like, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        val = LEVIRCD(levir_like, split="val")  # train_2 and test_3 are not looked at: no warning
    assert len(val) == 2 and val.excluded == {}
    with pytest.warns(UserWarning, match="test_3"):
        assert len(LEVIRCD(levir_like, split="test")) == 1

    (levir_like / "A" / "other_7.png").write_bytes((levir_like / "A" / "val_4.png").read_bytes())
    with pytest.raises(ValueError, match="other_7.png: name does not start with train_"):
        LEVIRCD(levir_like, split="val")
    (tmp_path / "no_labels" / "A").mkdir(parents=True)
    (tmp_path / "no_labels" / "B").mkdir()
    with pytest.raises(FileNotFoundError, match="label does not exist"):
        LEVIRCD(tmp_path / "no_labels")


def test_read_rgb_refuses_a_transparent_alpha(tmp_path):
    rgba = _rgba(_rgb(0))
    rgba[0, 0, 3] = 254
    path = _png(tmp_path / "x.png", rgba)
    with pytest.raises(RasterReadError, match=r"x\.png: RGBA image whose alpha is below full opacity on 1 of 256"):
        read_rgb(path)


@pytest.mark.real_data
def test_real_sample_with_rgba_images_and_no_label(real_root):
    root = real_dataset_dir(real_root, "samples/levir_cd")
    with pytest.warns(UserWarning, match=r"pair test_113_0256 left out: change mask .*test_113_0256\.png does "
                                         r"not exist"):
        ds = LEVIRCD(root)
    assert ds.split_counts() == {"test": 7, "train": 3, "val": 1}
    assert list(ds.excluded) == ["test_113_0256"]
    # Its images are RGBA with an opaque alpha: read as their RGB bands.
    for folder in ("A", "B"):
        path = root / folder / "test_113_0256.png"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                raw = src.read()
        assert raw.shape[0] == 4 and (raw[3] == 255).all()
        np.testing.assert_array_equal(read_rgb(path)[0], raw[:3])
    samples = [ds[i] for i in range(len(ds))]
    assert all(s["hr"].shape == s["hr_post"].shape == (3, 256, 256) for s in samples)
    assert all(set(s["mask"].unique().tolist()) <= {0, 1} for s in samples)


def test_a_truncated_image_is_reported_even_in_an_unlabelled_pair(levir_like):
    broken = levir_like / "A" / "test_8.png"
    broken.write_bytes(b"\x89PNG truncated")  # no B/test_8.png, no label either
    with pytest.warns(UserWarning, match="test_3"):
        ds = LEVIRCD(levir_like, split="test")
    assert "test_8" not in ds.excluded and [it.id for it in ds.items] == ["test_6", "test_8"]
    with pytest.raises(RasterReadError, match="test_8.png"):
        ds[1]


def test_dsifn_changeformer_layout_leaves_out_unusable_pairs_as_levir_does(levir_like):
    """DSIFN in ChangeFormer's layout (A/, B/, label/, list/*.txt) follows LEVIR-CD's rule."""
    from skysense.data.datasets import DSIFN

    (levir_like / "list").mkdir()
    (levir_like / "list" / "train.txt").write_text("train_1.png\ntrain_2.png\nval_4.png\n")
    (levir_like / "list" / "test.txt").write_text("test_3.png\n")
    with pytest.warns(UserWarning) as caught:
        ds = DSIFN(levir_like)
    assert ds.layout == "ChangeFormer"
    assert sorted(ds.excluded) == ["test_3", "train_2"]
    assert all("dsifn: pair" in str(w.message) for w in caught) and len(caught) == 2
    assert [it.id for it in ds.items] == ["test_6", "train_1", "val_4", "val_5"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_only = DSIFN(levir_like, split="unlisted")  # train_2 and test_3 are not looked at
    assert train_only.excluded == {} and [it.id for it in train_only.items] == ["test_6", "val_5"]
