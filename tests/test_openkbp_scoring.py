"""Scoring like the OpenKBP challenge: the dose and DVH scores by hand and on the sample patients,
scores after the coarse grid and back, non-finite doses refused, mirror-averaged predictions."""

import jax
import numpy as np
import pytest
from test_openkbp import SAMPLE, needs_sample

from flaxdose.errors import FlaxdoseError
from flaxdose.evaluation.openkbp import Scores, score_predictions, subset_scores, write_score_tables
from flaxdose.inference.predictor import Model
from flaxdose.metrics import openkbp_dose_score, openkbp_dvh_metrics, openkbp_scores
from flaxdose.model import UNetSpec, init_params
from flaxdose.openkbp import (
    OPENKBP_OARS,
    OPENKBP_TARGETS,
    downsample_case,
    find_patients,
    read_openkbp_patient,
    read_sparse_csv,
    to_openkbp,
    upsample_dose,
    write_submission,
)


@pytest.fixture(scope="module")
def cases():
    return [read_openkbp_patient(folder) for _, folder in find_patients(SAMPLE)]


# ------------------------------------------------------------ the scores
@needs_sample
def test_dose_score_and_dvh_score_on_samples(cases):
    assert openkbp_scores([c.dose for c in cases], cases) == {"dose_score": 0.0, "dvh_score": 0.0, "num_cases": 4}
    case = cases[0]
    pred = case.dose.astype(np.float64).copy()
    inside = np.flatnonzero(case.possible_dose_mask)
    pred.flat[inside[:1000]] += 3.0
    pred[~case.possible_dose_mask] = 50.0  # outside the mask: ignored (the prediction is masked)
    expected = 3.0 * 1000 / inside.size
    assert openkbp_dose_score(pred, case.dose, case.possible_dose_mask) == pytest.approx(expected, rel=1e-12)
    scores = openkbp_scores([pred, cases[1].dose], cases[:2])
    assert scores["dose_score"] == pytest.approx(expected / 2, rel=1e-9)


def test_dvh_score_by_hand():
    """A tiny case whose OpenKBP metrics are computed by hand (voxel 5x5x4 mm = 0.1 cc)."""
    shape = (10, 10, 2)
    dose = np.zeros(shape)
    oar, target = np.zeros(shape, bool), np.zeros(shape, bool)
    oar[0, :, 0] = True  # 10 voxels, doses 0..9
    dose[0, :, 0] = np.arange(10)
    target[:, :, 1] = True  # 100 voxels, doses 0..99
    dose[:, :, 1] = np.arange(100).reshape(10, 10)
    masks = np.stack([oar, target])
    structures = ("SpinalCord", "PTV70")
    metrics = openkbp_dvh_metrics(dose, masks, structures, (5, 5, 4), OPENKBP_OARS, OPENKBP_TARGETS)
    # D_0.1cc: 1 voxel of 10 -> 90th percentile of 0..9 = 8.1; targets: percentiles 1, 5, 99 of 0..99
    assert metrics == pytest.approx({"SpinalCord D_0.1_cc": 8.1, "SpinalCord mean": 4.5,
                                     "PTV70 D_99": 0.99, "PTV70 D_95": 4.95, "PTV70 D_1": 98.01})

    class Ref:
        def __init__(self, d, m=masks):
            self.dose, self.masks, self.structures, self.spacing_mm = d, m, structures, (5.0, 5.0, 4.0)
            self.possible_dose_mask = np.ones(shape, bool)
            self.case_id = "hand"

    scores = openkbp_scores([2 * dose], [Ref(dose)])
    assert scores["dvh_score"] == pytest.approx((8.1 + 4.5 + 0.99 + 4.95 + 98.01) / 5)
    assert scores["dose_score"] == pytest.approx(dose.sum() / dose.size)
    # pooled over every (patient, ROI, metric), not a mean of per-patient means: patient A has
    # 5 metrics off by 1 Gy, patient B (OAR only) 2 metrics off by 3 Gy -> 11/7, not 2
    oar_only = np.stack([oar, np.zeros(shape, bool)])
    scores = openkbp_scores([dose + 1, dose + 3], [Ref(dose), Ref(dose, oar_only)])
    assert scores["dvh_score"] == pytest.approx(11 / 7)


def test_d01cc_of_an_oar_smaller_than_a_tenth_of_a_cc_is_its_maximum():
    """Voxels of 2 x 2 x 2.5 mm = 0.01 cc: 0.1 cc is 10 voxels."""
    shape = (8, 4, 2)
    dose = np.zeros(shape)
    small, larger = np.zeros(shape, bool), np.zeros(shape, bool)
    small[0, :, 0] = True  # 4 voxels = 0.04 cc, doses 3, 7, 1, 5
    dose[0, :, 0] = [3, 7, 1, 5]
    larger[4:8, :, 0] = True  # 20 voxels, doses 0..19
    larger[4, :, 1] = True
    dose[4:8, :, 0] = np.arange(16).reshape(4, 4)
    dose[4, :, 1] = np.arange(16, 20)
    structures = ("Larynx", "Mandible")
    metrics = openkbp_dvh_metrics(dose, np.stack([small, larger]), structures, (2, 2, 2.5), OPENKBP_OARS, ())
    assert metrics["Larynx D_0.1_cc"] == 7.0  # the maximum, not the minimum (1)
    assert metrics["Larynx mean"] == 4.0
    # 0..19: the 100 - 10/20*100 = 50th percentile = 9.5
    assert metrics["Mandible D_0.1_cc"] == pytest.approx(9.5)


@needs_sample
def test_round_trip_scores_and_submission(cases, tmp_path):
    case = cases[3]
    coarse = downsample_case(case, 2)
    back = case.replace(dose=upsample_dose(coarse.dose, 2, case.possible_dose_mask))
    scores = score_predictions([back], [case])
    assert 0 < scores.summary["dose_score"] < 1.5  # the 64^3 grid loses little of the dose
    assert scores.patients[0]["case_id"] == "pt_201" and scores.patients[0]["dose_score"] == scores.summary["dose_score"]
    assert scores.summary == pytest.approx({**openkbp_scores([back.dose], [case]), "num_cases": 1})
    row = next(r for r in scores.metrics if (r["roi"], r["metric"]) == ("PTV70", "D_95"))
    assert row["reference_gy"] == pytest.approx(np.percentile(case.dose[case.mask("PTV70")], 5))
    assert row["error_gy"] == pytest.approx(row["predicted_gy"] - row["reference_gy"])
    folder = write_submission([back], tmp_path / "sub")
    assert [p.name for p in folder.iterdir()] == ["pt_201.csv"]
    idx, values = read_sparse_csv(folder / "pt_201.csv")
    expected = to_openkbp(back.dose * case.possible_dose_mask).ravel()
    assert np.array_equal(idx, np.flatnonzero(expected > 0))
    np.testing.assert_allclose(values, expected[idx], rtol=1e-5)


class _HandRef:
    """A Case-like OpenKBP reference: one OAR and PTV70 on a 10 x 10 x 2 grid of 0.1 cc voxels."""

    def __init__(self):
        shape = (10, 10, 2)
        self.dose = np.zeros(shape)
        oar, target = np.zeros(shape, bool), np.zeros(shape, bool)
        oar[0, :, 0] = True
        self.dose[0, :, 0] = np.arange(10)
        target[:, :, 1] = True
        self.dose[:, :, 1] = np.arange(100).reshape(10, 10)
        self.masks, self.structures = np.stack([oar, target]), ("SpinalCord", "PTV70")
        self.spacing_mm, self.possible_dose_mask, self.case_id = (5.0, 5.0, 4.0), np.ones(shape, bool), "hand"


def test_subset_scores_are_the_hand_computation_from_the_csv_rows(tmp_path):
    """Dose score: the mean over the subset's patients; DVH score: the mean |error| of all their ROI metrics."""
    def scores(rows):  # rows: (case_id, dose score, [(roi, metric, error)])
        patients = [{"case_id": i, "dose_score": d, "dvh_score": float(np.mean(np.abs([e for *_, e in m]))),
                     "num_metrics": len(m)} for i, d, m in rows]
        metrics = [{"case_id": i, "roi": r, "metric": k, "reference_gy": 60.0, "predicted_gy": 60.0 + e, "error_gy": e}
                   for i, _, m in rows for r, k, e in m]
        return Scores({}, patients, metrics)

    write_score_tables({
        "network": scores([("pt_1", 2.0, [("PTV70", "D_99", -4.0), ("SpinalCord", "mean", 1.0)]),
                           ("pt_2", 3.5, [("PTV70", "D_99", -2.0)]),
                           ("pt_3", 9.0, [("PTV70", "D_99", 6.0), ("PTV70", "D_1", 0.5), ("SpinalCord", "mean", -3.0)])]),
        "distance-to-target": scores([("pt_1", 5.0, [("PTV70", "D_99", 1.0)]), ("pt_2", 4.0, [("PTV70", "D_99", 3.0)]),
                                      ("pt_3", 6.0, [("PTV70", "D_99", -1.0)])]),
    }, tmp_path)
    sub = subset_scores(tmp_path, ["pt_3", "pt_1"])
    assert list(sub) == ["network", "distance-to-target"]
    net = sub["network"]
    assert net["num_cases"] == 2 and net["dose_score"] == pytest.approx((2.0 + 9.0) / 2)
    assert net["dvh_score"] == pytest.approx((4.0 + 1.0 + 6.0 + 0.5 + 3.0) / 5)  # pooled, not a mean of patients
    assert net["metric_mean_error_gy"] == pytest.approx({"SpinalCord mean": -1.0, "PTV70 D_99": 1.0, "PTV70 D_1": 0.5})
    assert net["metric_mae_gy"] == pytest.approx({"SpinalCord mean": 2.0, "PTV70 D_99": 5.0, "PTV70 D_1": 0.5})
    assert list(net["metric_mae_gy"]) == ["SpinalCord mean", "PTV70 D_99", "PTV70 D_1"]  # the challenge's order
    assert sub["distance-to-target"] == ({"dose_score": 5.5, "dvh_score": 1.0, "num_cases": 2,
                                           "metric_mean_error_gy": {"PTV70 D_99": 0.0},
                                           "metric_mae_gy": {"PTV70 D_99": 1.0}})  # exact in binary
    every = subset_scores(tmp_path)["network"]
    assert every["num_cases"] == 3 and every["dose_score"] == pytest.approx(14.5 / 3)
    with pytest.raises(FlaxdoseError, match=r"scored 3 patients, not \['pt_9'\]"):
        subset_scores(tmp_path, ["pt_1", "pt_9"])
    with pytest.raises(FlaxdoseError, match="patients.csv is missing"):
        subset_scores(tmp_path / "nowhere")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_prediction_is_never_scored(bad):
    """Issue 25 item 10: one NaN voxel in PTV70 made nanmean drop the target, a better DVH score."""
    ref = _HandRef()
    pred = ref.dose + 1.0  # every metric 1 Gy off: DVH score 1.0, dose score 1.0 (by hand)
    assert openkbp_scores([pred], [ref]) == pytest.approx({"dose_score": 1.0, "dvh_score": 1.0, "num_cases": 1})
    pred[5, 5, 1] = bad  # inside PTV70
    for score in (lambda: openkbp_scores([pred], [ref]),
                  lambda: openkbp_dose_score(pred, ref.dose, ref.possible_dose_mask),
                  lambda: openkbp_dvh_metrics(pred, ref.masks, ref.structures, ref.spacing_mm, OPENKBP_OARS,
                                              OPENKBP_TARGETS),
                  lambda: openkbp_dose_score(ref.dose, pred, ref.possible_dose_mask)):  # nor a reference
        with pytest.raises(FlaxdoseError, match=r"1 NaN or infinite voxel\(s\) \(first at index \(5, 5, 1\)\)"):
            score()


def test_scores_without_any_roi_voxel_are_refused_not_nan():
    ref = _HandRef()
    ref.masks = np.zeros_like(ref.masks)
    with pytest.raises(FlaxdoseError, match="DVH score is undefined"):
        openkbp_scores([ref.dose], [ref])


# ------------------------------------------------------------ predictions
def test_mirror_averaged_prediction_is_left_right_symmetric():
    """Model(mirror=True) averages the prediction with that of the mirrored case (parotids swapped)."""
    spec = UNetSpec(features=(4, 8), convs_per_level=1, groups=2, in_channels=3)
    structures = ("LeftParotid", "RightParotid", "PTV70")
    params = init_params(spec, jax.random.key(3), (8, 8, 8))
    inputs = (np.random.default_rng(0).random((8, 8, 8, 3)) > 0.7).astype(np.uint8)
    mirrored = np.ascontiguousarray(inputs[::-1][..., [1, 0, 2]])
    plain = Model(spec, params, structures, window=(8, 8, 8))
    both = Model(spec, params, structures, window=(8, 8, 8), mirror=True)
    expected = (plain.predict_relative(inputs) + plain.predict_relative(mirrored)[::-1]) / 2
    np.testing.assert_allclose(both.predict_relative(inputs), expected, rtol=1e-6)
    np.testing.assert_allclose(both.predict_relative(mirrored), expected[::-1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(plain.predict_relative(mirrored), plain.predict_relative(inputs)[::-1])
