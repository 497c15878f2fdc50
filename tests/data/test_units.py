from __future__ import annotations

import numpy as np
import pytest
import torch

from skysense.config import preset_config
from skysense.data.units import (
    hr_to_8bit,
    is_normalized,
    normalize,
    processing_baseline_from_name,
    s1_db_to_linear,
    s1_linear_to_db,
    s2_offset,
    s2_to_model_units,
)


def test_processing_baseline_from_product_name():
    assert processing_baseline_from_name("S2B_MSIL2A_20220613T101031_N0400_R022_T33UUP_20220613T1") == "04.00"
    assert processing_baseline_from_name("S2A_MSIL1C_20170613T101031_N0205_R022_T33UUP_20170613") == "02.05"
    assert processing_baseline_from_name("S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP") is None
    assert processing_baseline_from_name("S2A_MSIL2A_20170613T101031_87_48") is None


def test_s2_offset_from_baseline():
    assert s2_offset("02.14") == 0.0
    assert s2_offset("04.00") == -1000.0
    assert s2_offset("05.09") == -1000.0
    assert s2_offset("04.00", offset=-500) == -500.0
    with pytest.raises(ValueError, match="processing_baseline"):
        s2_offset()
    with pytest.raises(ValueError, match="'4'"):
        s2_offset("4")


def test_s2_dn_to_model_units_removes_offset():
    dn = np.array([1000, 1500, 11000], dtype=np.uint16)
    np.testing.assert_allclose(s2_to_model_units(dn, "L2A", "04.00"), [0, 500, 10000])
    np.testing.assert_allclose(s2_to_model_units(dn, "L2A", "03.01"), [1000, 1500, 11000])
    out = s2_to_model_units(torch.tensor([1200]), "L1C", offset=-1000)
    assert out.dtype == torch.float32 and out.item() == 200
    with pytest.raises(ValueError, match="L2B"):
        s2_to_model_units(dn, "L2B", "02.00")


def test_s1_db_linear_round_trip():
    db = np.array([-25.0, -10.0, 0.0, 3.0], dtype=np.float32)
    np.testing.assert_allclose(s1_linear_to_db(s1_db_to_linear(db)), db, atol=1e-4)
    np.testing.assert_allclose(s1_db_to_linear(np.array([-10.0, 0.0])), [0.1, 1.0], rtol=1e-6)
    assert s1_linear_to_db(torch.tensor([0.0])).item() == pytest.approx(-100.0)


def test_hr_bit_depths():
    np.testing.assert_allclose(hr_to_8bit(np.array([0, 255], np.uint8)), [0, 255])
    np.testing.assert_allclose(hr_to_8bit(np.array([0, 65535], np.uint16)), [0, 255])
    np.testing.assert_allclose(hr_to_8bit(np.array([2047], np.uint16), bit_depth=11), [255])
    with pytest.raises(ValueError, match="float32"):
        hr_to_8bit(np.array([0.5], np.float32))


def _sample():
    return {"s2": torch.full((2, 10, 4, 4), 1000.0), "s1": torch.full((1, 2, 4, 4), -12.0),
            "hr": torch.full((3, 8, 8), 128.0)}


def test_normalize_applies_config_statistics():
    cfg = preset_config("tiny")
    out = normalize(_sample(), cfg)
    spec = cfg.inputs["s2"]
    expected = (1000.0 - spec.mean[0]) / spec.std[0]
    assert out["s2"][0, 0, 0, 0].item() == pytest.approx(expected, rel=1e-5)
    spec = cfg.inputs["s1"]
    assert out["s1"][0, 1, 0, 0].item() == pytest.approx((-12.0 - spec.mean[1]) / spec.std[1], rel=1e-5)
    assert out["normalized"] is True and is_normalized(out)


def test_normalizing_twice_raises():
    cfg = preset_config("tiny")
    sample = _sample()
    once = normalize(sample, cfg)
    with pytest.raises(ValueError, match="already normalised"):
        normalize(once, cfg)
    with pytest.raises(ValueError, match="already normalised"):
        normalize(sample, cfg)  # the input object records it too


def test_normalize_checks_band_count_before_changing_anything():
    sample = _sample()
    sample["s1"] = torch.zeros(1, 3, 4, 4)
    before = sample["s2"].clone()
    with pytest.raises(ValueError, match="s1: band count: expected 2"):
        normalize(sample, preset_config("tiny"))
    assert torch.equal(sample["s2"], before) and not is_normalized(sample)
