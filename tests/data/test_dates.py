from __future__ import annotations

import datetime as dt

import pytest

from skysense.data.dates import date_from_name, day_of_year, parse_date, read_dates_txt


@pytest.mark.parametrize(
    "name, expected",
    [
        ("S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_75_43", dt.date(2017, 6, 13)),
        ("S2B_MSIL2A_20170924T93020_69_24", dt.date(2017, 9, 24)),
        ("S1A_IW_GRDH_1SDV_20170613T165043_33UUP_70_48_VV.tif", dt.date(2017, 6, 13)),
        ("T32TPP_20180211T102141_B05.tif", dt.date(2018, 2, 11)),
        ("m_4709963_se_14_1_20120731.tif", dt.date(2012, 7, 31)),
        ("scene_2019-09-17.tif", dt.date(2019, 9, 17)),
        ("2017-06-13T16:50:43", dt.date(2017, 6, 13)),
        ("20200813T054639_20200813T054952_T43RCP", dt.date(2020, 8, 13)),
    ],
)
def test_parse_date(name, expected):
    assert parse_date(name) == expected


def test_invalid_calendar_dates_are_skipped():
    assert parse_date("tile_20171340.tif") is None
    assert parse_date("patch_12345678901.tif") is None


def test_unparsable_name_names_the_file(tmp_path):
    path = tmp_path / "patch_without_date.tif"
    with pytest.raises(ValueError, match="patch_without_date.tif"):
        date_from_name(path)


def test_date_from_parent_folder(tmp_path):
    path = tmp_path / "S2A_MSIL2A_20170613T101031_1_1" / "B02.tif"
    assert date_from_name(path, search_parents=1) == dt.date(2017, 6, 13)


def test_day_of_year():
    assert day_of_year(dt.date(2017, 1, 1)) == 1
    assert day_of_year(dt.date(2016, 12, 31)) == 366
    assert day_of_year(dt.date(2017, 6, 13)) == 164


def test_dates_txt_oscd_format(tmp_path):
    path = tmp_path / "dates.txt"
    path.write_text("date_1: 20150704\ndate_2: 20180211\n")
    assert read_dates_txt(path) == [dt.date(2015, 7, 4), dt.date(2018, 2, 11)]


def test_dates_txt_one_per_line(tmp_path):
    path = tmp_path / "dates.txt"
    path.write_text("# header\n2018-01-15\n\n20180215\n")
    assert read_dates_txt(path) == [dt.date(2018, 1, 15), dt.date(2018, 2, 15)]


def test_dates_txt_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "dates.txt"
    path.write_text("date_1: 20150704\ndate_2: soon\n")
    with pytest.raises(ValueError, match=r"dates.txt: line 2"):
        read_dates_txt(path)
    empty = tmp_path / "empty" / "dates.txt"
    empty.parent.mkdir()
    empty.write_text("\n")
    with pytest.raises(ValueError, match=str(empty)):
        read_dates_txt(empty)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_dates_txt(tmp_path / "missing.txt")


def test_date_from_geotiff_tags(tmp_path) -> None:
    import numpy as np
    import rasterio

    from data_helpers import write_tif
    from skysense.data.dates import acquisition_date, date_from_tags

    tagged = write_tif(tmp_path / "scene.tif", np.zeros((1, 4, 4), dtype=np.uint16))
    with rasterio.open(tagged, "r+") as dst:
        dst.update_tags(ACQUISITION_DATE="2019-09-17T10:20:31Z", TIFFTAG_DATETIME="2024:01:01 00:00:00")
    assert date_from_tags(tagged) == dt.date(2019, 9, 17)
    # Tags win over the name; without tags the name is used.
    renamed = tagged.rename(tmp_path / "scene_20200101.tif")
    assert acquisition_date(renamed) == dt.date(2019, 9, 17)
    plain = write_tif(tmp_path / "S2A_MSIL2A_20170613T101031_B02.tif", np.zeros((1, 4, 4), dtype=np.uint16))
    assert date_from_tags(plain) is None
    assert acquisition_date(plain) == dt.date(2017, 6, 13)
    bad = write_tif(tmp_path / "bad.tif", np.zeros((1, 4, 4), dtype=np.uint16))
    with rasterio.open(bad, "r+") as dst:
        dst.update_tags(SENSING_TIME="yesterday")
    with pytest.raises(ValueError, match=r"bad.tif: tag SENSING_TIME='yesterday' holds no date"):
        date_from_tags(bad)
