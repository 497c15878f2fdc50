"""Loaders added after the first set: real samples under $SKYSENSE_DATA where present, else author-layout fixtures."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import rasterio
import torch

from skysense.data.datasets import (
    DATASETS, DIOR, DIORR, DOTA, DSIFN, FAIR1M, ISAID, RESISC45, SSL4EOS12, BigEarthNetMM, DynamicEarthNet,
    FMoWSentinel, LoveDA, ManifestDataset, Potsdam, Sen1Floods11, Vaihingen,
)
from skysense.data.datasets.detection import rotated_box_corners
from skysense.data.sample import collate

from data_helpers import real_dataset_dir, write_s2_folder, write_tif

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")

NEW = ("sen1floods11", "ssl4eo_s12", "loveda", "potsdam", "vaihingen", "isaid", "dota", "dior", "dior_r", "fair1m",
       "dsifn", "resisc45", "bigearthnet_mm", "fmow_sentinel", "dynamic_earthnet", "manifest")


def write_image(path, data: np.ndarray, driver: str = "PNG"):
    """(C, H, W) or (H, W) uint8 as an ungeoreferenced PNG / JPEG."""
    data = data[None] if data.ndim == 2 else data
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver=driver, width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=data.dtype) as dst:
        dst.write(data)
    return path


def rgb(size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 255, size=(3, size, size)).astype(np.uint8)


def test_new_loaders_registered_and_documented():
    for name in NEW:
        cls = DATASETS[name]
        assert cls.name == name and "Licence" in cls.__doc__ and "Layout" in cls.__doc__


# -- real samples -------------------------------------------------------------------------------

@pytest.mark.real_data
def test_sen1floods11_real(real_root):
    ds = Sen1Floods11(real_dataset_dir(real_root, "samples/sen1floods11"))
    assert [it.id for it in ds.items] == ["Spain_7370579"] and ds.items[0].split == "unlisted"
    s = ds[0]
    assert s["s2"].shape == (1, 10, 512, 512) and s["s1"].shape == (1, 2, 512, 512)
    assert s["s1_dates"].tolist() == [260] and s["s2_dates"].tolist() == [261]  # 2019-09-17 / 18
    assert set(s["mask"].unique().tolist()) == {-1, 0, 1} and 0.1 < (s["mask"] == 1).float().mean() < 0.4
    assert -30 < s["s1"].mean() < 0 and 500 < s["s2"].mean() < 4000
    assert s["lat"].item() == pytest.approx(38.1, abs=0.1) and s["lon"].item() == pytest.approx(-0.76, abs=0.1)


@pytest.mark.real_data
def test_ssl4eo_real_l2a_and_l1c(real_root):
    root = real_dataset_dir(real_root, "samples/ssl4eo_s12")
    s = SSL4EOS12(root)[0]
    assert s["s2"].shape == (2, 10, 264, 264) and s["s1"].shape == (2, 2, 264, 264)
    assert s["s2_dates"].tolist() == [156, 226]  # 2020-06-04, 2020-08-13 (metadata time_start)
    assert s["s1_dates"].tolist() == [159, 247]
    assert s["lat"].item() == pytest.approx(30.48, abs=0.05) and s["lon"].item() == pytest.approx(73.29, abs=0.05)
    l1c = SSL4EOS12(root, s2_level="L1C", modalities=("s2",))[0]
    assert l1c["s2_dates"].tolist() == [156, 236] and "s1" not in l1c
    assert l1c["s2"].mean() > s["s2"].mean()  # top of atmosphere is brighter than surface here


@pytest.mark.real_data
@pytest.mark.parametrize("cls, sub, size, classes", [
    (LoveDA, "samples/loveda", 1024, 7), (Potsdam, "samples/potsdam", 512, 6), (Vaihingen, "samples/vaihingen", 512, 6),
])
def test_mmseg_layout_real(real_root, cls, sub, size, classes):
    ds = cls(real_dataset_dir(real_root, sub))
    assert set(ds.split_counts()) == {"all"}
    s = ds[0]
    assert s["hr"].shape == (3, size, size) and s["mask"].shape == (size, size) and s["mask"].dtype == torch.int64
    assert -1 <= s["mask"].min() and s["mask"].max() < classes


@pytest.mark.real_data
def test_dota_real_and_split_patch(real_root):
    ds = DOTA(real_dataset_dir(real_root, "samples/dota"))
    assert [it.id for it in ds.items] == ["P0706", "P1888"]  # label files without an image are not items
    s = ds[1]
    assert s["hr"].shape == (3, 557, 712) and s["boxes"].shape == (64, 8) and s["boxes"].dtype == torch.float32
    assert s["labels"].shape == (64,) and DOTA_NAME(s["labels"][0]) == "small-vehicle"
    assert s["gsd"].item() == pytest.approx(0.266, abs=1e-3)
    assert ds[0]["difficult"].sum() > 0
    patch = DOTA(real_dataset_dir(real_root, "samples/dota_split"))[0]  # RGBA PNG with opaque alpha, no header
    assert patch["hr"].shape == (3, 294, 285) and patch["boxes"].shape == (4, 8) and math.isnan(patch["gsd"])
    batch = collate([patch, patch])
    assert isinstance(batch["boxes"], list) and batch["boxes"][1].shape == (4, 8) and batch["hr"].shape[0] == 2


def DOTA_NAME(index):  # noqa: N802
    from skysense.data.datasets.detection import DOTA_CLASSES
    return DOTA_CLASSES["1.0"][int(index)]


@pytest.mark.real_data
def test_dsifn_real(real_root):
    ds = DSIFN(real_dataset_dir(real_root, "samples/dsifn"))
    assert ds.split_counts() == {"unlisted": 10}
    s = ds[0]
    assert s["hr"].shape == s["hr_post"].shape == (3, 256, 256) and set(s["mask"].unique().tolist()) == {0, 1}


# -- fixtures in the authors' layouts -----------------------------------------------------------

def test_sen1floods11_fixture_splits_and_errors(tmp_path):
    hand = tmp_path / "v1.1"
    for event, chip in (("Ghana", "Ghana_1"), ("Atlantis", "Atlantis_2")):
        write_tif(hand / "S1Hand" / f"{chip}_S1Hand.tif", np.full((2, 8, 8), -10, np.float32), crs="EPSG:4326", res=1e-4)
        write_tif(hand / "S2Hand" / f"{chip}_S2Hand.tif", np.full((13, 8, 8), 1000, np.int16), crs="EPSG:4326", res=1e-4)
        write_tif(hand / "LabelHand" / f"{chip}_LabelHand.tif", np.zeros((8, 8), np.int16), crs="EPSG:4326", res=1e-4)
    (hand / "splits" / "flood_handlabeled").mkdir(parents=True)
    (hand / "splits" / "flood_handlabeled" / "flood_test_data.csv").write_text("Ghana_1_S1Hand.tif,Ghana_1_LabelHand.tif\n")
    ds = Sen1Floods11(hand)
    assert ds.split_counts() == {"test": 1, "unlisted": 1}
    s = ds[1]
    assert s["s1_dates"].tolist() == [261] and s["s2_dates"].tolist() == [262]  # 2018-09-18 / 19
    with pytest.raises(ValueError, match=r"Atlantis_2_S1Hand.tif.*unknown flood event"):
        ds.load(0)
    write_tif(hand / "LabelHand" / "Ghana_1_LabelHand.tif", np.full((8, 8), 3, np.int16), crs="EPSG:4326", res=1e-4)
    with pytest.raises(ValueError, match="Ghana_1_LabelHand.tif"):
        ds.load(1)


def test_ssl4eo_fixture_offset_from_baseline(tmp_path):
    for product, baseline in (("20220613T101031_20220613T101031_T32TPP", "04.00"),
                              ("20210613T101031_20210613T101031_T32TPP", "03.00")):
        folder = tmp_path / "s2a" / "0000001" / product
        write_s2_folder(folder, prefix="x", size=8)
        for path in folder.glob("x_*.tif"):  # SSL4EO names files by band only: B2.tif
            path.rename(folder / f"{path.stem.split('_')[1]}.tif")
        (folder / "metadata.json").write_text(json.dumps({"PROCESSING_BASELINE": baseline}))
    s = SSL4EOS12(tmp_path, modalities=("s2",))[0]
    raw = SSL4EOS12(tmp_path, modalities=("s2",))
    assert s["s2_dates"].tolist() == [164, 164]  # folder-name dates (no time_start), sorted 2021 first
    assert torch.allclose(s["s2"][1] + 1000, s["s2"][0])  # same DNs, the 2022 product loses the offset
    (tmp_path / "s2a" / "0000001" / "20210613T101031_20210613T101031_T32TPP" / "metadata.json").write_text("{}")
    with pytest.raises(ValueError, match="PROCESSING_BASELINE"):
        raw.load(0)


def test_isaid_fixture(tmp_path):
    write_image(tmp_path / "img_dir" / "train" / "P0001_0_896_0_896.png", rgb())
    ann = np.zeros((16, 16), np.uint8)
    ann[:4] = 14
    ann[-1] = 255
    write_image(tmp_path / "ann_dir" / "train" / "P0001_0_896_0_896_instance_color_RGB.png", ann)
    write_image(tmp_path / "img_dir" / "test" / "P0002_0_896_0_896.png", rgb())
    ds = ISAID(tmp_path)
    assert ds.split_counts() == {"test": 1, "train": 1}
    s = ISAID(tmp_path, split="train")[0]
    assert (s["mask"] == 14).sum() == 64 and (s["mask"] == -1).sum() == 16 and (s["mask"] == 0).sum() == 176
    assert "mask" not in ISAID(tmp_path, split="test")[0]
    ann[0, 0] = 40
    write_image(tmp_path / "ann_dir" / "train" / "P0001_0_896_0_896_instance_color_RGB.png", ann)
    with pytest.raises(ValueError, match=r"instance_color_RGB.png.*\[40\]"):
        ds.load(0)


def test_loveda_missing_annotation_names_image(tmp_path):
    write_image(tmp_path / "img_dir" / "val" / "3.png", rgb())
    with pytest.raises(FileNotFoundError, match=r"3.png"):
        LoveDA(tmp_path)[0]


def test_resisc45_fixture_ratio_split(tmp_path):
    for cls in ("airplane", "beach"):
        for n in (1, 2, 3, 4, 5, 10, 11, 12, 13, 14):
            write_image(tmp_path / "NWPU-RESISC45" / cls / f"{cls}_{n:03d}.jpg", rgb(8, n), driver="JPEG")
    ds = RESISC45(tmp_path, train_ratio=0.2)
    assert ds.split_counts() == {"test": 16, "train": 4} and ds.classes == ["airplane", "beach"]
    train = RESISC45(tmp_path, split="train", train_ratio=0.2)
    assert [it.id for it in train.items] == ["airplane/airplane_001", "airplane/airplane_002", "beach/beach_001",
                                             "beach/beach_002"]
    s = train[3]
    assert s["hr"].shape == (3, 8, 8) and s["label"].item() == 1
    with pytest.raises(ValueError, match="train_ratio"):
        RESISC45(tmp_path, train_ratio=1.0)


def test_bigearthnet_mm_alias_reads_both(tmp_path):
    s2 = tmp_path / "BigEarthNet-v1.0" / "S2A_MSIL2A_20170613T101031_1_1"
    write_s2_folder(s2, prefix=s2.name, size=12)
    (s2 / f"{s2.name}_labels_metadata.json").write_text(json.dumps({"labels": ["Pastures"]}))
    s1 = tmp_path / "BigEarthNet-S1-v1.0" / "S1A_IW_GRDH_1SDV_20170614T165043_33UUP_1_1"
    for pol in ("VV", "VH"):
        write_tif(s1 / f"{s1.name}_{pol}.tif", np.full((12, 12), -12.0, np.float32))
    (s1 / f"{s1.name}_labels_metadata.json").write_text(json.dumps(
        {"labels": ["Pastures"], "corresponding_s2_patch": s2.name, "acquisition_time": "2017-06-14T16:50:43"}))
    s = BigEarthNetMM(tmp_path)[0]
    assert s["s2"].shape == (1, 10, 12, 12) and s["s1"].shape == (1, 2, 12, 12) and s["label"].sum() == 1


def _fmow(root, rows, sizes=None):
    lines = ["category,location_id,image_id,timestamp,polygon"]
    for i, (cat, loc, img, ts) in enumerate(rows):
        lines.append(f'{cat},{loc},{img},{ts},"POLYGON ((10.0 50.0, 10.2 50.0, 10.2 50.2, 10.0 50.2, 10.0 50.0))"')
        size = (sizes or {}).get(img, 8)
        data = np.full((13, size, size), 100 * (i + 1), np.uint16)
        write_tif(root / "train" / cat / f"{cat}_{loc}" / f"{cat}_{loc}_{img}.tif", data, crs="EPSG:4326", res=1e-4)
    (root / "train.csv").write_text("\n".join(lines) + "\n")


def test_fmow_sentinel_groups_frames_by_location(tmp_path):
    _fmow(tmp_path, [("airport", 0, 6, "2017-06-01T00:00:00Z"), ("airport", 0, 2, "2016-01-10T00:00:00Z"),
                     ("zoo", 3, 100, "2018-03-01T00:00:00Z")], sizes={2: 9, 100: 9})
    ds = FMoWSentinel(tmp_path)
    assert [it.id for it in ds.items] == ["train/airport_0", "train/zoo_3"]
    s = ds[0]
    assert s["s2"].shape == (2, 10, 9, 9)  # second frame resampled onto the first (earliest) one
    assert s["s2_dates"].tolist() == [10, 152] and s["s2"][0].mean().item() == pytest.approx(200)
    assert s["label"].item() == 0 and ds[1]["label"].item() == 61
    assert s["lat"].item() == pytest.approx(50.1) and s["lon"].item() == pytest.approx(10.1)
    batch = collate([ds[0], ds[1]])  # padding across locations with different series lengths
    assert batch["s2_mask"].tolist() == [[True, True], [True, False]]
    (tmp_path / "train" / "zoo" / "zoo_3" / "zoo_3_100.tif").unlink()
    with pytest.raises(FileNotFoundError, match="zoo_3_100.tif"):
        ds.load(1)


def _voc(objects: str) -> str:
    return f"<annotation><filename>00001.jpg</filename>{objects}</annotation>"


def test_dior_and_dior_r_fixture(tmp_path):
    write_image(tmp_path / "JPEGImages-trainval" / "00001.jpg", rgb(32), driver="JPEG")
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "val.txt").write_text("00001\n")
    hbb = tmp_path / "Annotations" / "Horizontal Bounding Boxes"
    hbb.mkdir(parents=True)
    (hbb / "00001.xml").write_text(_voc(
        "<object><name>Expressway-Service-area</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>10</xmax>"
        "<ymax>12</ymax></bndbox></object><object><name>vehicle</name><difficult>1</difficult><bndbox><xmin>3</xmin>"
        "<ymin>3</ymin><xmax>5</xmax><ymax>6</ymax></bndbox></object>"))
    obb = tmp_path / "Annotations" / "Oriented Bounding Boxes"
    obb.mkdir(parents=True)
    (obb / "00001.xml").write_text(_voc(
        "<object><name>ship</name><robndbox><x_left_top>1</x_left_top><y_left_top>1</y_left_top><x_right_top>9"
        "</x_right_top><y_right_top>2</y_right_top><x_right_bottom>8</x_right_bottom><y_right_bottom>6"
        "</y_right_bottom><x_left_bottom>0</x_left_bottom><y_left_bottom>5</y_left_bottom></robndbox></object>"
        "<object><name>windmill</name><robndbox><cx>10</cx><cy>10</cy><w>4</w><h>2</h><angle>0</angle></robndbox>"
        "</object>"))
    s = DIOR(tmp_path, split="val")[0]
    assert s["boxes"].tolist() == [[1, 2, 10, 12], [3, 3, 5, 6]] and s["labels"].tolist() == [7, 18]
    assert s["difficult"].tolist() == [False, True]
    batch = collate([s, DIOR(tmp_path)[0]])  # per-object targets stay lists (N differs per image)
    assert isinstance(batch["boxes"], list) and batch["labels"][1].tolist() == [7, 18] and batch["hr"].shape[0] == 2
    r = DIORR(tmp_path)[0]
    assert r["boxes"].shape == (2, 8) and r["boxes"][0].tolist() == [1, 1, 9, 2, 8, 6, 0, 5]
    assert r["boxes"][1].tolist() == [8, 9, 12, 9, 12, 11, 8, 11] and r["labels"].tolist() == [13, 19]
    corners = rotated_box_corners(0, 0, 2, 2, math.pi / 2)
    assert corners == pytest.approx([1, -1, 1, 1, -1, 1, -1, -1])
    (hbb / "00001.xml").write_text(_voc("<object><name>spaceship</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
                                        "<xmax>2</xmax><ymax>2</ymax></bndbox></object>"))
    with pytest.raises(ValueError, match=r"00001.xml.*spaceship"):
        DIOR(tmp_path)[0]


def test_fair1m_fixture(tmp_path):
    part = tmp_path / "train" / "part1"
    write_tif(part / "images" / "0.tif", rgb(32), crs=None)
    (part / "labelXml").mkdir(parents=True)
    points = "".join(f"<point>{x:.6f},{y:.6f}</point>" for x, y in ((1, 1), (9, 1), (9, 5), (1, 5), (1, 1)))
    (part / "labelXml" / "0.xml").write_text(
        "<annotation><source><filename>0.tif</filename></source><objects>"
        f"<object><possibleresult><name>Passenger Ship</name></possibleresult><points>{points}</points></object>"
        f"<object><possibleresult><name>Small Car</name></possibleresult><points>{points}</points></object>"
        "</objects></annotation>")
    ds = FAIR1M(tmp_path)
    assert ds.split_counts() == {"train": 1}
    s = ds[0]
    assert s["boxes"].tolist() == [[1, 1, 9, 1, 9, 5, 1, 5]] * 2 and s["labels"].tolist() == [11, 20]
    (part / "labelXml" / "0.xml").write_text(
        "<annotation><objects><object><possibleresult><name>Bus</name></possibleresult><points>"
        "<point>1,1</point><point>2,2</point><point>3,3</point></points></object></objects></annotation>")
    with pytest.raises(ValueError, match=r"0.xml: object 1: expected 4 corner points"):
        ds.load(0)


def _dynamic_earthnet(root, months=("2018-01", "2018-02")):
    rows = ["split,year_month,planet_path,label_path,s2_path,s1_path,missing_label,missing_s2,missing_s1"]
    for k, month in enumerate(months):
        for day in (1, 5, 10, 15, 20, 25):
            bgrn = np.stack([np.full((8, 8), v, np.uint16) for v in (500, 1000, 1500 + 100 * k, 3000)])
            write_tif(root / "planet" / "10N" / "cube1" / "PF-SR" / f"{month}-{day:02d}.tif", bgrn, res=3.0)
        label = np.zeros((7, 8, 8), np.uint8)
        label[1, :4] = 255
        label[5 if k else 1, 4:6] = 255  # rows 6-7 unlabelled
        write_tif(root / "labels" / "cube1" / f"cube1-{month.replace('-', '_')}_01.tif", label, res=3.0)
        write_tif(root / "sentinel2" / "cube1" / f"{month}.tif", np.full((12, 3, 3), 800, np.uint16))
        rows.append(f"train,{month},planet/10N/cube1/PF-SR,labels/cube1/cube1-{month.replace('-', '_')}_01.tif,"
                    f"sentinel2/cube1/{month}.tif,,False,False,True")
    (root / "splits.csv").write_text("\n".join(rows) + "\n")


def test_dynamic_earthnet_segmentation_and_change(tmp_path):
    _dynamic_earthnet(tmp_path)
    ds = DynamicEarthNet(tmp_path, days="weekly")
    assert len(ds) == 2
    s = ds[0]
    assert s["planet"].shape == (6, 4, 8, 8) and s["planet"][0, :, 0, 0].tolist() == [1500, 1000, 500, 3000]
    assert s["planet_dates"].tolist() == [1, 5, 10, 15, 20, 25] and s["s2_dates"].tolist() == [15]
    assert s["hr"][0, 0, 0].item() == pytest.approx(127.5) and s["s2"].shape == (1, 10, 3, 3)
    assert (s["mask"] == 1).sum() == 48 and (s["mask"] == -1).sum() == 16
    change = DynamicEarthNet(tmp_path, task="change")
    assert len(change) == 1
    c = change[0]
    assert c["s2"].shape[0] == 2 and (c["change"] == 1).sum() == 16 and (c["change"] == -1).sum() == 16
    assert (c["mask_post"] == 5).sum() == 16
    with pytest.raises(ValueError, match="s1_band_indexes"):
        DynamicEarthNet(tmp_path, modalities=("s2", "s1"))
    (tmp_path / "planet" / "10N" / "cube1" / "PF-SR" / "2018-02-01.tif").unlink()
    with pytest.raises(FileNotFoundError, match="2018-02-01.tif"):
        ds.load(1)


def _manifest_place(root, pid, frames=2, size=4):
    s2 = [{"path": str(write_tif(root / "s2" / f"{pid}_{t}.tif", np.full((10, size, size), 1000 + t, np.uint16))
                       .relative_to(root)), "date": f"2020-0{t + 1}-01"} for t in range(frames)]
    s1 = [{"path": f"s1/{pid}_0.tif", "date": "2020-01-03"}]
    write_tif(root / "s1" / f"{pid}_0.tif", np.full((2, size, size), -12.0, np.float32))
    write_image(root / "hr" / f"{pid}.png", rgb(8 * size))
    return {"id": pid, "lat": 48.0, "lon": 11.0, "hr": f"hr/{pid}.png", "s2": s2, "s1": s1}


def test_manifest_dataset(tmp_path):
    records = [_manifest_place(tmp_path, "a", frames=2), _manifest_place(tmp_path, "b", frames=1) | {"split": "val"}]
    (tmp_path / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    ds = ManifestDataset(tmp_path)
    assert ds.split_counts() == {"train": 1, "val": 1}
    s = ds[0]
    assert s["hr"].shape == (3, 32, 32) and s["s2"].shape == (2, 10, 4, 4) and s["s1"].shape == (1, 2, 4, 4)
    assert s["s2_dates"].tolist() == [1, 32] and s["s2"][1, 0, 0, 0].item() == 1001 and s["lat"].item() == 48.0
    batch = collate([ds[0], ds[1]])
    assert batch["s2"].shape == (2, 2, 10, 4, 4) and batch["s2_mask"].tolist() == [[True, True], [True, False]]
    assert "hr" not in ManifestDataset(tmp_path, modalities=("s2",))[0]
    write_tif(tmp_path / "s2" / "a_1.tif", np.zeros((10, 5, 5), np.uint16))
    with pytest.raises(ValueError, match="a_1.tif"):
        ds.load(0)
    (tmp_path / "manifest.jsonl").write_text(json.dumps(records[0]) + "\n" + json.dumps({"id": "c", "s2": records[0]["s2"]}))
    with pytest.raises(ValueError, match="line 2.*same ones"):
        ManifestDataset(tmp_path)


def test_loveda_authors_layout(tmp_path):
    """The release layout Train/{Urban,Rural}/images_png + masks_png, and Test without masks."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, domain, name in (("Train", "Urban", "1"), ("Train", "Rural", "2"), ("Test", "Rural", "3")):
        images = tmp_path / split / domain / "images_png"
        images.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(images / f"{name}.png")
        if split != "Test":
            (images.parent / "masks_png").mkdir()
            Image.fromarray(np.full((8, 8), 3, dtype=np.uint8)).save(images.parent / "masks_png" / f"{name}.png")
    train = LoveDA(tmp_path, split="train")
    assert len(train) == 2
    sample = train[0]
    assert sample["hr"].shape == (3, 8, 8) and bool((sample["mask"] == 2).all())
    test = LoveDA(tmp_path, split="test")
    assert len(test) == 1 and "mask" not in test[0]
