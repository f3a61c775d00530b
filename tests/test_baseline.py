"""The distance-to-target reference model, on line-shaped cases whose distances are known by hand."""

import numpy as np
import pytest

from flaxdose.data import Case
from flaxdose.errors import FlaxdoseError
from flaxdose.inference.baseline import DistanceBaseline

SPACING = (2.0, 2.0, 2.0)  # voxels along x are 2 mm apart
G = lambda d: np.where(np.asarray(d) < 0, 1.0, 1.0 - 0.04 * np.asarray(d))  # the true relative dose


def line_case(case_id, dose, targets, possible=None, prescription=70.0):
    """A (12, 1, 1) case: `targets` maps a PTV name to the x indices it covers."""
    names = tuple(targets)
    masks = np.zeros((len(names), 12, 1, 1), bool)
    for i, xs in enumerate(targets.values()):
        masks[i, list(xs)] = True
    return Case(case_id, names, masks, np.asarray(dose, np.float32).reshape(12, 1, 1), SPACING,
                prescription_gy=prescription, possible_dose_mask=possible)


def one_target_case(case_id="a"):
    # PTV at x = 0, 1: signed distances -4, -2 inside, then 2, 4, ..., 20 mm at x = 2..11
    distance = np.array([-4.0, -2.0] + [2.0 * (x - 1) for x in range(2, 12)])
    return line_case(case_id, 70.0 * G(distance), {"PTV": [0, 1]}), distance


def test_fit_recovers_the_dose_of_a_distance_function():
    case, _ = one_target_case()
    model = DistanceBaseline.fit([case], bin_mm=2.0, min_mm=-5.0, max_mm=31.0)  # one distance per bin
    np.testing.assert_allclose(model.predict([case])[0].dose, case.dose, rtol=1e-6)
    # bins beyond the training distances take the nearest filled bin: x = 11 (20 mm) for 30 mm
    assert model.relative_dose[-1] == pytest.approx(G(20.0))


def test_median_per_bin():
    base, _ = one_target_case()
    cases = []
    for k, dose_at_x5 in enumerate((10.0, 20.0, 60.0)):  # x = 5 is 8 mm from the target
        dose = base.dose.ravel().copy()
        dose[5] = dose_at_x5
        cases.append(base.replace(case_id=f"c{k}", dose=dose.reshape(12, 1, 1)))
    model = DistanceBaseline.fit(cases, bin_mm=2.0, min_mm=-5.0, max_mm=31.0)
    assert model.predict([base])[0].dose[5, 0, 0] == pytest.approx(20.0)  # median, not the mean 30


def test_nearest_target_and_dose_levels():
    model = DistanceBaseline.fit([one_target_case()[0]], {"PTV56": 56.0, "PTV70": 70.0}, bin_mm=2.0,
                                 min_mm=-5.0, max_mm=31.0)
    possible = np.ones((12, 1, 1), bool)
    possible[7] = False
    # PTV56 at x = 0, PTV70 at x = 10 and 11
    case = line_case("two", np.zeros(12), {"PTV56": [0], "PTV70": [10, 11]}, possible)
    dose = model.predict([case])[0].dose.ravel()
    assert dose[3] == pytest.approx(56.0 * G(6.0))  # 6 mm from PTV56, 14 mm from PTV70
    assert dose[5] == pytest.approx(70.0 * G(10.0))  # 10 mm from both: the higher level
    assert dose[8] == pytest.approx(70.0 * G(4.0))
    assert dose[7] == 0.0  # outside the possible-dose mask
    # nested: x = 0 lies in both targets, x = 1 only in PTV56
    nested = model.predict([line_case("nested", np.zeros(12), {"PTV56": [0, 1], "PTV70": [0]})])[0].dose.ravel()
    assert nested[0] == pytest.approx(70.0) and nested[1] == pytest.approx(56.0)
    # only x < 5 is scored: distances come from a box around it (and the targets), the same values
    scored = np.arange(12)[:, None, None] < 5
    near = model.predict([line_case("near", np.zeros(12), {"PTV70": [0, 1]}, scored)])[0].dose.ravel()
    np.testing.assert_allclose(near, [70.0, 70.0, *(70.0 * G([2.0, 4.0, 6.0])), *[0.0] * 7], rtol=1e-6)


def test_save_load_and_errors(tmp_path):
    model = DistanceBaseline.fit([one_target_case()[0]])
    loaded = DistanceBaseline.load(model.save(tmp_path / "ref.json"))
    np.testing.assert_array_equal(loaded.relative_dose, model.relative_dose)
    np.testing.assert_array_equal(loaded.edges_mm, model.edges_mm)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(FlaxdoseError, match="cannot read"):
        DistanceBaseline.load(tmp_path / "bad.json")
    with pytest.raises(FlaxdoseError, match="no non-empty target"):
        model.predict([line_case("none", np.zeros(12), {"PTV": []})])
    with pytest.raises(FlaxdoseError, match="training cases"):
        DistanceBaseline.fit([])
