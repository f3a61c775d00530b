"""Metrics against expectations computed by hand (see the comments for the arithmetic)."""

import numpy as np
import pytest

from flaxdose.errors import FlaxdoseError
from flaxdose.metrics import (
    ISODOSE_LEVELS,
    cumulative_dvh,
    dice,
    dvh_errors,
    dvh_metrics,
    isodose_dice,
    plan_dvh_metrics,
)

# Prescription 10 Gy; doses sit between the thresholds (1, 2, ..., 10 Gy) so no voxel is on one.
RX = 10.0
REF = np.array([10.5, 10.5, 8.5, 6.5, 4.5, 2.5, 0.5, 0.0], np.float32).reshape(1, 1, 8)
PRED = np.array([10.5, 9.5, 9.5, 6.5, 3.5, 3.5, 1.5, 0.0], np.float32).reshape(1, 1, 8)
# Voxels at or above each level (indices), ref | pred -> Dice = 2|A&B| / (|A| + |B|):
EXPECTED_DICE = {
    "dice_100": 2 * 1 / (2 + 1),  # ref {0,1}, pred {0}
    "dice_90": 2 * 2 / (2 + 3),  # ref {0,1}, pred {0,1,2}
    "dice_80": 1.0,  # {0,1,2} both
    "dice_70": 1.0,
    "dice_60": 1.0,  # {0..3} both
    "dice_50": 1.0,
    "dice_40": 2 * 4 / (5 + 4),  # ref {0..4}, pred {0..3}
    "dice_30": 2 * 5 / (5 + 6),  # ref {0..4}, pred {0..5}
    "dice_20": 1.0,  # {0..5} both
    "dice_10": 2 * 6 / (6 + 7),  # ref {0..5}, pred {0..6}
}


def test_isodose_dice_by_hand():
    got = isodose_dice(PRED, REF, RX)
    assert set(got) == {f"dice_{p}" for p in range(10, 101, 10)} | {"mean"}
    for key, value in EXPECTED_DICE.items():
        assert got[key] == pytest.approx(value), key
    assert got["mean"] == pytest.approx(sum(EXPECTED_DICE.values()) / 10)


def test_isodose_dice_is_restricted_to_the_body():
    body = np.ones(REF.shape, bool)
    body[0, 0, 6] = False  # the only voxel where the 10 % volumes disagree
    got = isodose_dice(PRED, REF, RX, body=body)
    assert got["dice_10"] == 1.0
    assert got["dice_40"] == pytest.approx(EXPECTED_DICE["dice_40"])


def test_dice_of_two_empty_volumes_is_one():
    empty = np.zeros((2, 3, 4), bool)
    assert dice(empty, empty) == 1.0
    assert dice(empty, ~empty) == 0.0
    zero = np.zeros((2, 3, 4), np.float32)
    got = isodose_dice(zero, zero, 70.0)
    assert all(v == 1.0 for v in got.values())
    hot = zero.copy()
    hot[0, 0, 0] = 80.0  # only the prediction has a 100 % volume: Dice 0 at every level
    assert isodose_dice(hot, zero, 70.0)["dice_100"] == 0.0


def _ramp_volume():
    """100 voxels with doses 1..100 Gy (shuffled) inside a mask, 500 Gy outside it."""
    dose = np.full((4, 5, 10), 500.0, np.float32)
    mask = np.zeros(dose.shape, bool)
    mask[1:3] = True  # 2 x 5 x 10 = 100 voxels
    dose[mask] = np.random.default_rng(0).permutation(np.arange(1, 101))
    return dose, mask


def test_dvh_metrics_by_hand():
    # Sorted doses d(1..100) = 1..100 Gy; Dx = d(k), k = floor(100 (1 - x/100)) + 1:
    # D2: k = 99 -> 99 Gy (2 voxels, 2 %, get >= 99); D95: k = 6 -> 6 Gy (95 voxels get >= 6);
    # D98: k = 3 -> 3 Gy. Dmean = 50.5 Gy. Volume 100 voxels x 2 x 2 x 2.5 mm^3 = 1 cc.
    dose, mask = _ramp_volume()
    m = dvh_metrics(dose, mask, (2.0, 2.0, 2.5))
    assert m["D2"] == 99.0 and m["D95"] == 6.0 and m["D98"] == 3.0
    assert m["Dmean"] == pytest.approx(50.5)
    assert m["Dmax"] == 100.0 and m["Dmin"] == 1.0
    assert m["volume_cc"] == pytest.approx(1.0)


def test_dvh_metrics_small_structure_and_empty_mask():
    # n = 10, doses 1..10: D2 -> k = floor(9.8) + 1 = 10 -> 10 Gy (the maximum);
    # D95 -> k = floor(0.5) + 1 = 1 -> 1 Gy; D98 -> k = 1 -> 1 Gy (the minimum).
    dose = np.arange(1, 11, dtype=np.float32).reshape(1, 2, 5)
    m = dvh_metrics(dose, np.ones(dose.shape, bool), (1.0, 1.0, 1.0))
    assert (m["D2"], m["D95"], m["D98"], m["Dmean"]) == (10.0, 1.0, 1.0, 5.5)
    empty = dvh_metrics(dose, np.zeros(dose.shape, bool), (1.0, 1.0, 1.0))
    assert np.isnan(empty["Dmean"]) and np.isnan(empty["D2"]) and empty["volume_cc"] == 0.0


def test_plan_metrics_keys_and_errors_in_gy_and_percent():
    dose, mask = _ramp_volume()
    masks = np.stack([mask, ~mask, np.ones(dose.shape, bool)])
    got = plan_dvh_metrics(dose, masks, ("PTV", "Rectum", "Body"), (2.0, 2.0, 2.5))
    assert list(got) == ["PTV Dmean", "PTV D2", "PTV D95", "PTV D98", "Rectum Dmean", "Rectum D2"]
    assert got["PTV D95"] == 6.0 and got["Rectum D2"] == 500.0
    errors = dvh_errors({"PTV D95": 66.5, "Rectum D2": 50.0}, {"PTV D95": 70.0, "Rectum D2": 49.3}, 70.0)
    assert errors["PTV D95 err_gy"] == pytest.approx(-3.5) and errors["PTV D95 err_pct"] == pytest.approx(-5.0)
    assert errors["Rectum D2 err_gy"] == pytest.approx(0.7) and errors["Rectum D2 err_pct"] == pytest.approx(1.0)


def test_cumulative_dvh_by_hand_and_consistent_with_dx():
    dose, mask = _ramp_volume()
    # % of the 100 voxels (doses 1..100) with dose >= d:
    got = cumulative_dvh(dose, mask, [0.0, 1.0, 6.0, 50.5, 100.0, 100.5])
    np.testing.assert_allclose(got, [100.0, 100.0, 95.0, 50.0, 1.0, 0.0])
    m = dvh_metrics(dose, mask, (1.0, 1.0, 1.0))
    for x in (2, 95, 98):
        assert cumulative_dvh(dose, mask, [m[f"D{x}"]])[0] >= x
    assert np.isnan(cumulative_dvh(dose, np.zeros(dose.shape, bool), [1.0])).all()


def test_levels_are_10_to_100_percent():
    assert ISODOSE_LEVELS == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def test_grid_mismatch_is_a_clear_error():
    a, b = np.zeros((4, 4, 4), np.float32), np.zeros((4, 4, 5), np.float32)
    with pytest.raises(FlaxdoseError, match="same|one grid"):
        isodose_dice(a, b, 70.0)
    with pytest.raises(FlaxdoseError, match="one grid"):
        isodose_dice(a, a, 70.0, body=np.ones((4, 4, 5), bool))
    with pytest.raises(FlaxdoseError, match="one grid"):
        dvh_metrics(a, np.ones((4, 4, 5), bool), (1, 1, 1))
    with pytest.raises(FlaxdoseError, match="one grid"):
        cumulative_dvh(a, np.ones((4, 4, 5), bool), [1.0])
    with pytest.raises(FlaxdoseError, match="prescription"):
        isodose_dice(a, a, 0.0)
