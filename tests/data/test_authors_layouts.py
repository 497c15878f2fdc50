"""DynamicEarthNet, DSIFN, ISPRS Potsdam / Vaihingen in their authors' release layouts: small fixtures in tmp_path."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch

from skysense.data.datasets import DSIFN, DynamicEarthNet, Potsdam, Vaihingen
from skysense.data.datasets.isprs import ISPRS_COLOURS, crop_windows, decode_colour_label
from skysense.data.rasters import RasterReadError
from skysense.data.sample import collate

from data_helpers import write_tif

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")

CUBE_A, CUBE_B = "1311_3077_13", "2235_3403_13"
SCENE = "10N-122W-40N-L3H-SR"


def write_image(path, data: np.ndarray, driver: str = "PNG"):
    """(C, H, W) or (H, W) uint8 as an ungeoreferenced image file."""
    data = data[None] if data.ndim == 2 else data
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver=driver, width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=data.dtype) as dst:
        dst.write(data)
    return path


# -- DynamicEarthNet, mediaTUM release ----------------------------------------------------------

def _one_hot(classes: np.ndarray) -> np.ndarray:
    """(H, W) class indices (-1 = none) -> (7, H, W) uint8 0/255."""
    hot = np.zeros((7,) + classes.shape, np.uint8)
    for c in range(7):
        hot[c][classes == c] = 255
    return hot


def _planet_month(folder, month: str, days, k: int = 0):
    for day in days:
        bgrn = np.stack([np.full((8, 8), v, np.uint16) for v in (500, 1000, 1500 + 100 * k, 3000 + day)])
        write_tif(folder / f"{month}-{day:02d}.tif", bgrn, res=3.0)


def _dynamic_earthnet(root):
    """Area A (train, 2 months) in planet.10N/planet/..., area B (test, 1 month) in planet/...; S2 and S1."""
    planet_a = root / "planet.10N" / "planet" / "10N" / "24E-187N" / CUBE_A / "PF-SR"
    planet_b = root / "planet" / "17N" / "9E-42N" / CUBE_B / "PF-SR"
    january = np.zeros((8, 8), np.int64)
    january[:4] = 1
    january[6:] = -1
    february = january.copy()
    february[4:6] = 5
    february[0, 0] = 6  # snow and ice
    labels_a = root / "labels" / f"{CUBE_A}_10N" / "Labels" / "Raster" / SCENE
    write_tif(labels_a / f"{SCENE}-2018_01_01.tif", _one_hot(january), res=3.0)
    write_tif(labels_a / f"{SCENE}-2018-02-01.tif", _one_hot(february), res=3.0)  # hyphenated date, as some areas
    write_tif(root / "labels" / "labels" / f"{CUBE_B}-17N" / "Raster" / "s" / "s-2018_01_01.tif", _one_hot(january),
              res=3.0)
    for k, month in enumerate(("2018-01", "2018-02")):
        _planet_month(planet_a, month, (1, 5, 10, 15, 20, 25, 31), k)
    _planet_month(planet_b, "2018-01", (1,))
    s2 = np.stack([np.full((3, 3), 100 * (i + 1), np.uint16) for i in range(12)])
    s1 = np.stack([np.full((3, 3), 10.0 ** -(i + 1), np.float32) for i in range(8)])
    for cube, month in ((CUBE_A, "2018_01"), (CUBE_A, "2018_02"), (CUBE_B, "2018_01")):
        write_tif(root / "sentinel2" / cube / f"{cube}_{month}.tif", s2)
        write_tif(root / "sentinel1" / cube / f"{cube}_{month}.tif", s1)
    splits = root / "dynnet_training_splits"
    splits.mkdir()
    line = "/reprocess-cropped/UTM-24000/10N/24E-187N/{cube}/PF-SR /labels/{cube}_10N/Labels/Raster/x/x.tif {month}\n"
    (splits / "train.txt").write_text(line.format(cube=CUBE_A, month="2018-01") + line.format(cube=CUBE_A,
                                                                                             month="2018-02"))
    (splits / "test.txt").write_text(line.format(cube=CUBE_B, month="2018-01")
                                     + line.format(cube=CUBE_B, month="2018-03"))  # no label file for March
    return january, february


def test_dynamic_earthnet_mediatum_segmentation(tmp_path):
    january, february = _dynamic_earthnet(tmp_path)
    ds = DynamicEarthNet(tmp_path, days="weekly")
    assert ds.layout == "mediaTUM" and ds.split_counts() == {"test": 1, "train": 2}
    assert [it.id for it in ds.items] == [f"{CUBE_A}@2018-01", f"{CUBE_A}@2018-02", f"{CUBE_B}@2018-01"]
    assert ds.missing == {f"{CUBE_B}@2018-03": "listed in a split file, no label file found"}
    s = ds[1]
    assert s["planet"].shape == (6, 4, 8, 8) and s["planet"].dtype == torch.float32
    assert s["planet"][:, :, 0, 0].tolist()[0] == [1600, 1000, 500, 3001]  # B, G, R, NIR -> R, G, B, NIR
    assert s["planet_dates"].tolist() == [32, 36, 41, 46, 51, 56]  # February 1, 5, 10, 15, 20, 25
    assert s["s2_dates"].tolist() == [46]
    # S2 file order B2, B3, B4, B8, B5, B6, B7, B8A, B11, B12, B1, B9 -> model order B2..B8, B8A, B11, B12
    assert s["s2"][0, :, 0, 0].tolist() == [100, 200, 300, 500, 600, 700, 400, 800, 900, 1000]
    assert torch.equal(s["mask"], torch.from_numpy(february)) and s["mask"].dtype == torch.int64
    assert -90 <= s["lat"].item() <= 90 and s["crs"] is not None
    daily = DynamicEarthNet(tmp_path, split="train", days="daily")[0]
    assert daily["planet_dates"].tolist() == [1, 5, 10, 15, 20, 25, 31] and daily["planet"].shape[0] == 7
    assert DynamicEarthNet(tmp_path, split="test").items[0].split == "test"
    snow = DynamicEarthNet(tmp_path, split="train", ignore_snow_and_ice=True)[1]["mask"]
    assert snow[0, 0].item() == -1 and (snow == 6).sum() == 0
    # hr: the day-1 R, G, B (default) or any of R, G, B, NIR, scaled to 0-255 by planet_hr_max
    assert s["hr"].shape == (3, 8, 8)
    assert s["hr"][:, 0, 0].tolist() == pytest.approx([v * 255 / 3000 for v in (1600, 1000, 500)])
    rgbnir = DynamicEarthNet(tmp_path, days="weekly", hr_bands=("R", "G", "B", "NIR"))
    assert rgbnir.bands["hr"] == ("R", "G", "B", "NIR")
    four = rgbnir[1]["hr"]
    assert four.shape == (4, 8, 8) and torch.equal(four[:3], s["hr"])
    assert four[3, 0, 0].item() == 255.0  # NIR 3001 clipped at planet_hr_max 3000
    with pytest.raises(ValueError, match=r"dynamic_earthnet: hr_bands: Planet Fusion holds \['R', 'G', 'B', 'NIR'\]; "
                                         r"got \['R', 'R'\]: a band listed twice"):
        DynamicEarthNet(tmp_path, hr_bands=("R", "R"))


def test_dynamic_earthnet_mediatum_change_s1_and_errors(tmp_path):
    january, february = _dynamic_earthnet(tmp_path)
    change = DynamicEarthNet(tmp_path, task="change", modalities=("s2", "s1"), s1_band_indexes=(0, 1),
                             s1_in_db=False)
    assert [it.id for it in change.items] == [f"{CUBE_A}@2018-01"]
    c = change[0]
    expected = (january != february).astype(np.int64)
    expected[(january == -1) | (february == -1)] = -1
    assert torch.equal(c["change"], torch.from_numpy(expected)) and (c["change"] == 1).sum() == 17
    assert c["s2"].shape == (2, 10, 3, 3) and c["s1"].shape == (2, 2, 3, 3)
    assert c["s1"][0, :, 0, 0].tolist() == pytest.approx([-10.0, -20.0])
    assert c["s1_dates"].tolist() == [15, 46] and torch.equal(c["mask_post"], torch.from_numpy(february))
    assert collate([c, c])["change"].shape == (2, 8, 8)

    (tmp_path / "sentinel2" / CUBE_A / f"{CUBE_A}_2018_02.tif").unlink()
    ds = DynamicEarthNet(tmp_path)
    assert len(ds) == 2 and ds.missing[f"{CUBE_A}@2018-02"] == f"no sentinel2/{CUBE_A}/*2018_02.tif"
    assert len(DynamicEarthNet(tmp_path, modalities=())) == 3
    (tmp_path / "planet.10N" / "planet" / "10N" / "24E-187N" / CUBE_A / "PF-SR" / "2018-01-10.tif").unlink()
    with pytest.raises(FileNotFoundError, match="2018-01-10.tif"):
        DynamicEarthNet(tmp_path, days="weekly").load(0)
    label = tmp_path / "labels" / "labels" / f"{CUBE_B}-17N" / "Raster" / "s" / "s-2018_01_01.tif"
    write_tif(label, np.zeros((6, 8, 8), np.uint8), res=3.0)
    with pytest.raises(RasterReadError, match=r"wrong band count: .*s-2018_01_01.tif has 6 bands, expected 7"):
        DynamicEarthNet(tmp_path, split="test").load(0)
    write_tif(label, np.full((7, 8, 8), 7, np.uint8), res=3.0)
    with pytest.raises(ValueError, match=r"s-2018_01_01.tif: one-hot label values \[7\]"):
        DynamicEarthNet(tmp_path, split="test").load(0)
    with pytest.raises(ValueError, match="s2_file_bands"):
        DynamicEarthNet(tmp_path, s2_file_bands=("B2", "B3"))
    (tmp_path / "dynnet_training_splits" / "val.txt").write_text("only-two fields\n")
    with pytest.raises(ValueError, match=r"val.txt: line 1: expected"):
        DynamicEarthNet(tmp_path)
    (tmp_path / "dynnet_training_splits" / "val.txt").unlink()
    for folder in ("sentinel2",):
        for path in sorted((tmp_path / folder).rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        (tmp_path / folder).rmdir()
    with pytest.raises(FileNotFoundError, match=r"mediaTUM layout\): folder .*sentinel2 does not exist"):
        DynamicEarthNet(tmp_path)


def test_dynamic_earthnet_no_layout(tmp_path):
    (tmp_path / "labels").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no known layout: expected splits.csv \(TorchGeo\) or planet/"):
        DynamicEarthNet(tmp_path)


# -- DSIFN, authors' release --------------------------------------------------------------------

def _dsifn(root, size=16):
    rng = np.random.default_rng(0)
    for split, names in (("train", ("0", "1", "10")), ("val", ("0",)), ("test", ("0", "1"))):
        for name in names:
            write_image(root / split / "t1" / f"{name}.jpg", rng.integers(0, 255, (3, size, size), dtype=np.uint8),
                        driver="JPEG")
            write_image(root / split / "t2" / f"{name}.jpg", rng.integers(0, 255, (3, size, size), dtype=np.uint8),
                        driver="JPEG")
            mask = np.zeros((size, size), np.uint8)
            mask[: int(name) + 1] = 255
            if split == "test":
                write_tif(root / split / "mask" / f"{name}.tif", mask, crs=None)
            else:
                write_image(root / split / "mask" / f"{name}.png", mask)


def test_dsifn_authors_layout(tmp_path):
    _dsifn(tmp_path)
    ds = DSIFN(tmp_path)
    assert ds.layout == "authors' release" and ds.split_counts() == {"test": 2, "train": 3, "val": 1}
    assert [it.id for it in ds.items][:3] == ["train/0", "train/1", "train/10"]
    s = ds.load(ds.items.index(next(it for it in ds.items if it.id == "test/1")))
    assert s["hr"].shape == s["hr_post"].shape == (3, 16, 16) and s["hr"].dtype == torch.float32
    assert s["mask"].dtype == torch.int64 and s["mask"].sum() == 2 * 16 and set(s["mask"].unique().tolist()) == {0, 1}
    assert DSIFN(tmp_path, split="train")[2]["mask"].sum() == 11 * 16


def test_dsifn_errors_name_the_layout(tmp_path):
    _dsifn(tmp_path)
    (tmp_path / "val" / "mask" / "0.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"dsifn \(authors' release layout\): change mask .*val/mask/0"):
        DSIFN(tmp_path, split="val").load(0)
    write_image(tmp_path / "val" / "mask" / "0.png", np.full((16, 16), 128, np.uint8))
    with pytest.raises(ValueError, match=r"authors' release layout.*0.png: change mask values \[128\]"):
        DSIFN(tmp_path, split="val").load(0)
    write_image(tmp_path / "train" / "t1" / "1.jpg", np.zeros((16, 16), np.uint8), driver="JPEG")
    with pytest.raises(RasterReadError, match=r"wrong band count: .*train/t1/1.jpg has 1 bands, expected 3"):
        DSIFN(tmp_path, split="train").load(1)
    changeformer = tmp_path / "cf"
    for folder in ("A", "B"):
        write_image(changeformer / folder / "0_2.png", np.zeros((3, 8, 8), np.uint8))
    # A pair without its mask is left out, as in LEVIR-CD (an error is for the authors' layout).
    with pytest.warns(UserWarning, match=r"dsifn: pair 0_2 left out: change mask .*label/0_2.png does not exist"):
        assert len(DSIFN(changeformer)) == 0
    with pytest.raises(FileNotFoundError, match=r"no known layout: expected <split>/t1.*or A/, B/, label/"):
        DSIFN(tmp_path / "train" / "mask")


# -- ISPRS Potsdam and Vaihingen, original tiles ------------------------------------------------

COLOURS = list(ISPRS_COLOURS)


def _colour_label(height: int, width: int, boundary: bool) -> tuple[np.ndarray, np.ndarray]:
    """(3, H, W) colour label whose class is (column // 4) % 6 (black boundary on row 0), and its indices."""
    classes = np.tile((np.arange(width) // 4) % 6, (height, 1)).astype(np.int64)
    if boundary:
        classes[0] = -1
    rgb = np.zeros((3, height, width), np.uint8)
    for index, colour in enumerate(COLOURS):
        rgb[:, classes == index] = np.array(colour, np.uint8)[:, None]
    return rgb, classes


def _potsdam(root, width=40, height=30):
    rng = np.random.default_rng(1)
    truth = {}
    for tile in ("2_10", "2_13"):  # train, val
        image = rng.integers(0, 255, (3, height, width), dtype=np.uint8)
        write_tif(root / "2_Ortho_RGB" / "2_Ortho_RGB" / f"top_potsdam_{tile}_RGB.tif", image, res=0.05)
        eroded, eroded_classes = _colour_label(height, width, boundary=True)
        full, full_classes = _colour_label(height, width, boundary=False)
        write_tif(root / "5_Labels_all_noBoundary" / f"top_potsdam_{tile}_label_noBoundary.tif", eroded, res=0.05)
        write_tif(root / "5_Labels_all" / f"top_potsdam_{tile}_label.tif", full, res=0.05)
        truth[tile] = (image, eroded_classes, full_classes)
    return truth


def test_crop_windows_cover_the_tile_and_end_at_the_edge():
    assert crop_windows(40, 30, 16, 8) == [(x, y, 16, 16) for y in (0, 8, 14) for x in (0, 8, 16, 24)]
    assert crop_windows(40, 30, None, None) == [(0, 0, 40, 30)]
    assert crop_windows(10, 30, 16, 16) == [(0, 0, 10, 16), (0, 14, 10, 16)]


def test_decode_colour_label_exact_and_unknown_colour():
    rgb, classes = _colour_label(4, 24, boundary=True)
    assert np.array_equal(decode_colour_label(rgb, "x.tif"), classes)
    rgb[:, 2, 5] = (1, 2, 3)
    with pytest.raises(ValueError, match=r"x.tif: unknown label colour\(s\) \(R, G, B\) \(1, 2, 3\) x1, first at "
                                         r"row 12, column 15"):
        decode_colour_label(rgb, "x.tif", offset=(10, 10))


def test_potsdam_tiles_crops_splits_and_classes(tmp_path, monkeypatch):
    truth = _potsdam(tmp_path)
    reads = []
    original = rasterio.io.DatasetReader.read

    def recording_read(self, *args, **kwargs):
        reads.append(kwargs.get("window"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(rasterio.io.DatasetReader, "read", recording_read)
    ds = Potsdam(tmp_path, tile_size=16, stride=8)
    assert ds.layout == "ISPRS tiles" and ds.split_counts() == {"train": 12, "val": 12}
    assert ds.items[0].id == "2_10_0_0_16_16" and ds.items[-1].id == "2_13_24_14_40_30"
    index = [it.id for it in ds.items].index("2_10_8_14_24_30")
    s = ds[index]
    image, eroded, full = truth["2_10"]
    assert s["hr"].shape == (3, 16, 16) and s["mask"].shape == (16, 16) and s["mask"].dtype == torch.int64
    assert torch.equal(s["hr"], torch.from_numpy(image[:, 14:30, 8:24].astype(np.float32)))
    assert torch.equal(s["mask"], torch.from_numpy(eroded[14:30, 8:24]))
    assert reads and all(w is not None and (w.width, w.height) == (16, 16) for w in reads)  # windows, never whole
    full_sample = Potsdam(tmp_path, split="val", tile_size=16, stride=8, labels="full")[0]
    assert torch.equal(full_sample["mask"], torch.from_numpy(truth["2_13"][2][:16, :16]))
    whole = Potsdam(tmp_path, split="train", tile_size=None)
    assert len(whole) == 1 and whole[0]["mask"].shape == (30, 40) and whole.items[0].id == "2_10"
    assert set(torch.unique(whole[0]["mask"]).tolist()) == {-1, 0, 1, 2, 3, 4, 5}
    assert collate([ds[0], ds[1]])["mask"].shape == (2, 16, 16)


def test_potsdam_tiles_errors(tmp_path):
    _potsdam(tmp_path)
    label = tmp_path / "5_Labels_all_noBoundary" / "top_potsdam_2_10_label_noBoundary.tif"
    rgb, _ = _colour_label(30, 40, boundary=True)
    rgb[:, 20, 33] = (250, 250, 250)
    write_tif(label, rgb, res=0.05)
    ds = Potsdam(tmp_path, split="train", tile_size=16, stride=16)
    with pytest.raises(ValueError, match=r"label_noBoundary.tif: unknown label colour\(s\) \(R, G, B\) "
                                         r"\(250, 250, 250\) x1, first at row 20, column 33"):
        ds.load([it.id for it in ds.items].index("2_10_24_14_40_30"))
    assert ds.load(0)["mask"].shape == (16, 16)  # other crops of the tile still read
    write_tif(label, rgb[:1], res=0.05)
    with pytest.raises(RasterReadError, match=r"wrong band count: .*label_noBoundary.tif \(colour label\) has 1 "
                                              r"bands, expected 3"):
        ds.load(0)
    write_tif(label, _colour_label(30, 40, boundary=True)[0], res=0.05)
    image = tmp_path / "2_Ortho_RGB" / "2_Ortho_RGB" / "top_potsdam_3_10_RGB.tif"
    write_tif(image, np.zeros((3, 30, 40), np.uint8), res=0.05)  # another train tile, without labels
    with pytest.raises(FileNotFoundError, match=r"label top_potsdam_3_10_label_noBoundary.tif of tile 3_10 not "
                                                r"found"):
        Potsdam(tmp_path, split="train", tile_size=None).load(1)
    with pytest.raises(FileNotFoundError, match=r"no known layout: expected 2_Ortho_RGB/ \(ISPRS tiles\) or "
                                                r"img_dir/"):
        Potsdam(tmp_path / "5_Labels_all")
    with pytest.raises(ValueError, match="labels: expected one of"):
        Potsdam(tmp_path, labels="noBoundary")


def test_vaihingen_tiles_full_and_eroded_labels(tmp_path):
    rng = np.random.default_rng(2)
    truth = {}
    for area in ("area1", "area6"):  # train, val
        irrg = rng.integers(0, 255, (3, 20, 24), dtype=np.uint8)
        write_tif(tmp_path / "top" / f"top_mosaic_09cm_{area}.tif", irrg, res=0.09)
        eroded, eroded_classes = _colour_label(20, 24, boundary=True)
        write_tif(tmp_path / "ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE"
                  / f"top_mosaic_09cm_{area}_noBoundary.tif", eroded, res=0.09)
        truth[area] = (irrg, eroded_classes)
    full, full_classes = _colour_label(20, 24, boundary=False)
    write_tif(tmp_path / "gts_for_participants" / "top_mosaic_09cm_area1.tif", full, res=0.09)
    ds = Vaihingen(tmp_path, tile_size=16, stride=16)
    assert ds.split_counts() == {"train": 4, "val": 4} and ds.items[0].id == "area1_0_0_16_16"
    s = ds[3]
    assert torch.equal(s["mask"], torch.from_numpy(truth["area1"][1][4:20, 8:24]))
    assert torch.equal(s["hr"], torch.from_numpy(truth["area1"][0][:, 4:20, 8:24].astype(np.float32)))
    full_ds = Vaihingen(tmp_path, labels="full", tile_size=16, stride=16)
    assert torch.equal(full_ds[0]["mask"], torch.from_numpy(full_classes[:16, :16]))
    assert "mask" not in full_ds[4] and full_ds.items[4].split == "val"  # no full labels for the test areas


def test_potsdam_four_band_tiles_for_hr_bands_with_nir(tmp_path):
    truth = _potsdam(tmp_path)
    rng = np.random.default_rng(2)
    nir = {}
    for tile, (image, _, _) in truth.items():
        nir[tile] = rng.integers(0, 255, (1, 30, 40), dtype=np.uint8)
        write_tif(tmp_path / "4_Ortho_RGBIR" / f"top_potsdam_{tile}_RGBIR.tif", np.concatenate([image, nir[tile]]),
                  res=0.05)
    ds = Potsdam(tmp_path, split="train", tile_size=16, stride=8, hr_bands=("R", "G", "B", "NIR"))
    assert ds.bands == {"hr": ("R", "G", "B", "NIR")} and Potsdam.bands["hr"] == ("R", "G", "B")
    index = [it.id for it in ds.items].index("2_10_8_14_24_30")
    s = ds[index]
    image, eroded, _ = truth["2_10"]
    expected = np.concatenate([image, nir["2_10"]])[:, 14:30, 8:24].astype(np.float32)
    assert torch.equal(s["hr"], torch.from_numpy(expected))
    assert torch.equal(s["mask"], torch.from_numpy(eroded[14:30, 8:24]))  # the same labels
    assert collate([ds[0], ds[1]])["hr"].shape == (2, 4, 16, 16)
    reordered = Potsdam(tmp_path, split="train", tile_size=16, stride=8, hr_bands=("NIR", "R"))[index]
    assert torch.equal(reordered["hr"], s["hr"][[3, 0]])
    rgb_only = Potsdam(tmp_path, split="train", tile_size=16, stride=8, hr_bands=("B", "G", "R"))
    assert rgb_only.tile_folder == "2_Ortho_RGB" and torch.equal(rgb_only[index]["hr"], s["hr"][[2, 1, 0]])
    with pytest.raises(ValueError, match=r"potsdam: hr_bands: 4_Ortho_RGBIR/ holds \['R', 'G', 'B', 'NIR'\]; got "
                                         r"\['R', 'SWIR'\]: \['SWIR'\] not among them"):
        Potsdam(tmp_path, hr_bands=("R", "SWIR"))
    (tmp_path / "4_Ortho_RGBIR" / "top_potsdam_2_10_RGBIR.tif").unlink()
    write_tif(tmp_path / "4_Ortho_RGBIR" / "top_potsdam_2_10_RGBIR.tif", image, res=0.05)
    with pytest.raises(RasterReadError, match=r"wrong band count: .*top_potsdam_2_10_RGBIR.tif \(image tile\) has 3 "
                                              r"bands, expected 4"):
        ds.load(0)


def test_potsdam_patches_hold_rgb_only(tmp_path):
    for split in ("train", "val"):
        for folder in ("img_dir", "ann_dir"):
            (tmp_path / folder / split).mkdir(parents=True)
    from PIL import Image
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "img_dir" / "train" / "a.png")
    Image.fromarray(np.ones((8, 8), np.uint8)).save(tmp_path / "ann_dir" / "train" / "a.png")
    assert Potsdam(tmp_path, hr_bands=("G",))[0]["hr"].shape == (1, 8, 8)
    with pytest.raises(ValueError, match=r"hr_bands \['R', 'G', 'B', 'NIR'\]: mmsegmentation's patches under .* hold "
                                         r"\['R', 'G', 'B'\]; the other bands need the release's 4_Ortho_RGBIR/ tiles"):
        Potsdam(tmp_path, hr_bands=("R", "G", "B", "NIR"))
