"""The ROC of the plan-QA check (flaxdose.planqa.roc) by hand: the curve and its area, the flag score that puts
every band level on one axis (it reproduces check_plan's flags), and the ROC figure."""

import math

import numpy as np
import pytest
from planqa_cases import fixed_prediction, uniform_plan
from scipy import stats

from flaxdose import planqa, plots
from flaxdose.errors import FlaxdoseError
from flaxdose.synthetic.phantom import phantom_case

SHAPE = (16, 16, 8)


# ---------------------------------------------------------------- ROC by hand
def test_roc_curve_and_auc_of_sklearns_documentation_example():
    fpr, tpr, thresholds = planqa.roc_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    np.testing.assert_array_equal(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_array_equal(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_array_equal(thresholds, [np.inf, 0.8, 0.4, 0.35, 0.1])
    assert planqa.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75  # pairs: 0.35 > 0.1, 0.8 > both: 3 of 4


def test_roc_ties_count_half_and_the_auc_is_mann_whitneys():
    assert planqa.roc_auc([0.5, 0.5], [0, 1]) == 0.5
    fpr, tpr, _ = planqa.roc_curve([-math.inf, -math.inf, 2.0], [0, 1, 1])  # a never-flagged plan scores -inf
    np.testing.assert_array_equal(fpr, [0, 0, 1])
    np.testing.assert_array_equal(tpr, [0, 0.5, 1])
    rng = np.random.default_rng(0)
    scores, labels = rng.integers(0, 6, 40).astype(float), np.r_[np.zeros(17), np.ones(23)]  # many ties
    u = stats.mannwhitneyu(scores[labels == 1], scores[labels == 0]).statistic
    assert planqa.roc_auc(scores, labels) == pytest.approx(u / (17 * 23), abs=1e-12)


def test_roc_refuses_what_it_cannot_score():
    for scores, labels, words in (([0.1, 0.2], [0, 1, 1], "labels"), ([0.1, math.nan], [0, 1], "NaN"),
                                  ([0.1, 0.2], [0, 2], "labels must be 0"), ([0.1, 0.2], [1, 1], "both")):
        with pytest.raises(FlaxdoseError, match=words):
            planqa.roc_curve(scores, labels)


def test_level_and_threshold_are_inverse():
    assert planqa.level_threshold(0.99) == pytest.approx(2.0)
    assert planqa.threshold_level(planqa.level_threshold(0.95)) == pytest.approx(0.95)
    with pytest.raises(FlaxdoseError, match="between 0 and 1"):
        planqa.level_threshold(1.0)


# ---------------------------------------------------------------- the flag score is the check's threshold
@pytest.fixture(scope="module")
def hand():
    """Residuals 1, 2, 3, 6 Gy (n=4: bias 3, s^2 = 14/3), members 19 and 21 (mean 20, variance 2): centre 23 Gy,
    lambda = 1, e^2 = 14/3 - 2, sigma^2 = 2 + 8/3 + 14/12 for every metric (flaxdose.planqa's formula)."""
    anatomy = phantom_case(3, 0, shape=SHAPE)
    refs = [uniform_plan(anatomy, d, f"cal{d}") for d in (21.0, 22.0, 23.0, 26.0)]
    calibration = planqa.calibrate_predictions([fixed_prediction(anatomy, [19.0, 21.0]) for _ in refs], refs, ("a", "b"))
    return anatomy, calibration, fixed_prediction(anatomy, [19.0, 21.0])


def test_flag_score_by_hand(hand):
    """A uniform 30 Gy plan: OAR metrics 7 Gy above the centre 23, 6 beyond the 1 Gy tolerance: z = 6 / sigma = 2.48,
    above t_3 at 0.95 (2.353, two-sided 90 %) but below 3.182 (95 %): flagged at 90 %, not at 95 %."""
    anatomy, calibration, prediction = hand
    plan = uniform_plan(anatomy, 30.0, "p30")
    sigma = math.sqrt(2 + 8 / 3 + 14 / 12)
    score = planqa.flag_scores(planqa.check_plan(plan, prediction, calibration, 0.95), calibration)["p30"]
    assert score == pytest.approx(-math.log10(2 * stats.t.sf(6 / sigma, 3)), rel=1e-12)
    assert planqa.level_threshold(0.9) < score < planqa.level_threshold(0.95)
    assert any(r["flagged"] for r in planqa.check_plan(plan, prediction, calibration, 0.9))
    assert not any(r["flagged"] for r in planqa.check_plan(plan, prediction, calibration, 0.95))


def test_flag_score_reproduces_the_check_at_every_level(hand):
    """Flagged at level L by check_plan exactly when the score exceeds -log10(1 - L): OAR overdose (plans above
    the centre) and target under-coverage (below) alike; a plan inside every band is never flagged."""
    anatomy, calibration, prediction = hand
    plans = [uniform_plan(anatomy, d, f"p{d:g}") for d in np.arange(8.0, 38.0, 0.75)]
    scores = planqa.flag_scores([r for p in plans for r in planqa.check_plan(p, prediction, calibration, 0.5)],
                                calibration)
    for level in (0.5, 0.8, 0.9, 0.95, 0.99, 0.999):
        ranked = planqa.rank_plans([r for p in plans for r in planqa.check_plan(p, prediction, calibration, level)])
        by_check = {p["case_id"]: p["flagged"] for p in ranked}
        assert by_check == {k: s > planqa.level_threshold(level) for k, s in scores.items()}, level
    assert scores["p23"] == -math.inf or scores["p23"] < 0  # at the centre: inside every band at every level


def test_operating_point_is_the_fraction_flagged_at_the_level():
    scores, labels = [0.5, 1.2, 1.4, 3.0, 0.2, 1.31], [0, 0, 0, 1, 1, 1]
    assert planqa.operating_point(scores, labels, 0.95) == (pytest.approx(1 / 3), pytest.approx(2 / 3))  # > 1.301



def test_roc_figure(tmp_path):
    fpr, tpr, _ = planqa.roc_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    curve = {"fpr": fpr, "tpr": tpr, "auc": 0.75, "point": (0.5, 1.0)}
    png = plots.roc_curves({"Rectum": {"a": curve, "b": {**curve, "point": None}}, "PTV": {"c": curve}},
                           tmp_path / "roc.png", "title", "default level 95 %")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
