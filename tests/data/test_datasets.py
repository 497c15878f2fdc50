from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from skysense.data.datasets import AID, DATASETS, LEVIRCD, OSCD, BigEarthNetV1, BigEarthNetV2, EuroSATMS
from skysense.data.sample import collate

from data_helpers import real_dataset_dir, write_s2_folder, write_tif

S2_FILE_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")


def test_registry_names_match_classes():
    assert set(DATASETS) >= {"aid", "oscd", "bigearthnet_v1", "bigearthnet_v2", "eurosat_ms", "levir_cd"}
    for name, cls in DATASETS.items():
        assert cls.name == name and cls.__doc__ and "Licence" in cls.__doc__


# -- real data ------------------------------------------------------------------------------------

@pytest.mark.real_data
def test_aid_real(real_root):
    ds = AID(real_dataset_dir(real_root, "aid"))
    assert ds.split_counts() == {"test": 1500, "train": 1500}
    train = AID(real_root / "aid", split="train")
    numbers = [int(it.id.rsplit("_", 1)[1]) for it in train.items if it.id.startswith("Airport/")]
    test_numbers = [int(it.id.rsplit("_", 1)[1]) for it in ds.items if it.id.startswith("Airport/") and it.split == "test"]
    assert len(numbers) == 50 and max(numbers) < min(test_numbers)
    s = train[0]
    assert s["hr"].shape == (3, 150, 150) and s["hr"].max() <= 255 and s["label"].dtype == torch.int64
    assert len(ds.classes) == 30


@pytest.mark.real_data
def test_oscd_real(real_root):
    ds = OSCD(real_dataset_dir(real_root, "oscd"), split="test")
    assert [it.id for it in ds.items] == ["paris", "pisa", "rennes", "saclay_e"]
    s = ds[1]  # pisa
    assert s["s2"].shape == (2, 10, 776, 718)
    assert s["s2_dates"].tolist() == [185, 42]  # 2015-07-04, 2018-02-11 from dates.txt
    assert s["mask"].shape == (776, 718) and set(s["mask"].unique().tolist()) == {0, 1}
    assert 0.005 < s["mask"].float().mean() < 0.05
    assert s["lat"].item() == pytest.approx(43.7, abs=0.1) and s["lon"].item() == pytest.approx(10.4, abs=0.1)
    assert 300 < s["s2"].mean() < 5000


@pytest.mark.real_data
def test_oscd_date2_resampled_to_date1_grid(real_root):
    ds = OSCD(real_dataset_dir(real_root, "oscd"), split="test")
    s = ds[3]  # saclay_e: date-2 rasters are smaller than date 1
    assert s["s2"].shape[-2:] == s["mask"].shape == (639, 688)


@pytest.mark.real_data
def test_bigearthnet_v2_real(real_root):
    root = real_dataset_dir(real_root, "samples/bigearthnet_v2")
    s = BigEarthNetV2(root)[0]
    assert s["s2"].shape == (1, 10, 120, 120) and s["s2_dates"].tolist() == [164]
    assert s["lat"].item() == pytest.approx(48.27, abs=0.05)
    s1 = BigEarthNetV2(root, modalities=("s1",))[0]
    assert s1["s1"].shape == (1, 2, 120, 120) and -30 < s1["s1"].mean() < 0
    with pytest.raises(FileNotFoundError, match="reference_map.tif"):
        BigEarthNetV2(root, reference_maps=True)[0]  # the sample's reference map is of another patch
    with pytest.raises(FileNotFoundError, match="metadata.parquet"):
        BigEarthNetV2(root, modalities=("s2", "s1"))


@pytest.mark.real_data
def test_eurosat_real(real_root):
    ds = EuroSATMS(real_dataset_dir(real_root, "samples/eurosat_ms"), day_of_year=182)
    assert len(ds) == 3
    s = ds[0]
    assert s["s2"].shape == (1, 10, 64, 64) and s["s2_dates"].tolist() == [182]
    # B8A (file band 13) is selected, not B9 (water vapour) nor B10 (cirrus)
    assert abs(s["s2"][0, 7].mean() - s["s2"][0, 6].mean()) < 0.3 * s["s2"][0, 6].mean()
    batch = collate([ds[i] for i in range(3)])
    assert batch["label"].tolist() == [0, 5, 9]


@pytest.mark.real_data
def test_levir_real_with_skip_corrupt(real_root):
    root = real_dataset_dir(real_root, "samples/levir_cd")
    with pytest.warns(UserWarning, match="test_113_0256.png"):  # RGBA pair without a label: left out
        ds = LEVIRCD(root, skip_corrupt=True)
    assert ds.split_counts() == {"test": 7, "train": 3, "val": 1}
    samples = [ds[i] for i in range(len(ds))]
    assert ds.skipped_count == 0
    s = samples[0]
    assert s["hr"].shape == s["hr_post"].shape == (3, 256, 256) and set(s["mask"].unique().tolist()) <= {0, 1}


# -- fixtures written by the tests ---------------------------------------------------------------

def _oscd_city(root, city="pisa", dates="date_1: 20150704\ndate_2: 20180211\n", size=12):
    for folder in ("imgs_1", "imgs_2"):
        write_s2_folder(root / "images" / city / folder, prefix="T32TPP_20180211T102141", size=size,
                        bands=S2_FILE_BANDS, crs="EPSG:32632")
    (root / "images" / city / "dates.txt").write_text(dates)
    label = np.ones((size, size), np.uint8)
    label[:2] = 2
    write_tif(root / "labels" / city / "cm" / f"{city}-cm.tif", label, crs=None)
    return root / "images" / city


def test_oscd_fixture_reads(tmp_path):
    _oscd_city(tmp_path)
    s = OSCD(tmp_path)[0]
    assert s["s2"].shape == (2, 10, 12, 12) and s["mask"].sum() == 24 and s["s2_dates"].tolist() == [185, 42]


def test_oscd_unparsable_date_names_file(tmp_path):
    city = _oscd_city(tmp_path, dates="date_1: 20150704\ndate_2: someday\n")
    with pytest.raises(ValueError, match=str(city / "dates.txt")):
        OSCD(tmp_path)[0]


def test_oscd_missing_band_names_folder_and_band(tmp_path):
    city = _oscd_city(tmp_path)
    next((city / "imgs_2").glob("*_B8A.tif")).unlink()
    with pytest.raises(FileNotFoundError, match=r"B8A.*imgs_2"):
        OSCD(tmp_path)[0]


def test_oscd_wrong_label_size_names_file(tmp_path):
    _oscd_city(tmp_path)
    label = write_tif(tmp_path / "labels" / "pisa" / "cm" / "pisa-cm.tif", np.ones((5, 5), np.uint8), crs=None)
    with pytest.raises(ValueError, match=str(label)):
        OSCD(tmp_path)[0]


def test_skip_corrupt_logs_and_counts(tmp_path, caplog):
    _oscd_city(tmp_path, city="aaa")
    city = _oscd_city(tmp_path, city="bbb")
    band = next((city / "imgs_1").glob("*_B02.tif"))
    band.write_bytes(b"garbage")
    ds = OSCD(tmp_path, skip_corrupt=True)
    with caplog.at_level(logging.WARNING, logger="skysense.data"):
        s = ds[1]
    assert s["id"] == "aaa" and ds.skipped_count == 1 and str(band) in ds.skipped["bbb"]
    assert str(band) in caplog.text
    with pytest.raises(ValueError, match=str(band)):
        OSCD(tmp_path)[1]


def test_bigearthnet_v1_fixture_pairs_s1_by_json(tmp_path):
    import json

    s2 = tmp_path / "BigEarthNet-S2-Example" / "S2A_MSIL2A_20170613T101031_1_1"
    write_s2_folder(s2, prefix=s2.name, size=12)
    (s2 / f"{s2.name}_labels_metadata.json").write_text(json.dumps({"labels": ["Pastures", "Port areas"]}))
    s1 = tmp_path / "BigEarthNet-S1-Example" / "S1A_IW_GRDH_1SDV_20170614T165043_33UUP_1_1"
    for pol in ("VV", "VH"):
        write_tif(s1 / f"{s1.name}_{pol}.tif", np.full((12, 12), -12.0, np.float32))
    meta = {"labels": ["Pastures"], "corresponding_s2_patch": s2.name, "acquisition_time": "2017-06-14T16:50:43"}
    (s1 / f"{s1.name}_labels_metadata.json").write_text(json.dumps(meta))
    s = BigEarthNetV1(tmp_path)[0]
    assert s["s1_dates"].tolist() == [165] and s["s2_dates"].tolist() == [164]
    assert s["label"].sum() == 1  # "Port areas" is not one of the 19 classes
    assert BigEarthNetV1(tmp_path, label_set="43")[0]["label"].sum() == 2
    write_tif(s1 / f"{s1.name}_VV.tif", np.zeros((12, 12), np.float32), crs="EPSG:32632")
    with pytest.raises(ValueError, match="inconsistent CRS"):
        BigEarthNetV1(tmp_path)[0]
