"""OpenKBP: the four sample patients, the converter, the CSV export and the challenge scores."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flaxdose.data import Case, Dataset
from flaxdose.data.openkbp import (
    OPENKBP_OARS,
    OPENKBP_SHAPE,
    OPENKBP_STRUCTURES,
    OPENKBP_TARGETS,
    convert_openkbp,
    find_patients,
    from_openkbp,
    read_openkbp_patient,
    read_sparse_csv,
    to_openkbp,
    write_openkbp_dose,
)
from flaxdose.errors import FlaxdoseError
from flaxdose.metrics import openkbp_dose_score, openkbp_dvh_metrics, openkbp_scores

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "openkbp-sample"
if not SAMPLE.is_dir():
    SAMPLE = Path("/work/shared/openkbp-sample")
needs_sample = pytest.mark.skipif(not SAMPLE.is_dir(), reason="OpenKBP sample data not available")


@pytest.fixture(scope="module")
def cases():
    return [read_openkbp_patient(folder) for _, folder in find_patients(SAMPLE)]


@needs_sample
def test_four_sample_patients_load(cases):
    assert [c.case_id for c in cases] == ["pt_1", "pt_2", "pt_3", "pt_201"]
    for case in cases:
        assert case.structures == OPENKBP_STRUCTURES and case.shape == OPENKBP_SHAPE
        assert case.prescription_gy == 70.0 and case.mask("PTV70").any()
        assert case.possible_dose_mask.sum() > 10_000 and case.dose.max() > 60
        assert (case.dose[~case.possible_dose_mask] == 0).all()  # reference dose lives in the mask
        assert case.ct.min() == -1000.0 and case.ct.max() > 1000  # HU (file holds HU + 1000)
        # LPS axes: left parotid at larger x, brainstem above the cord, mandible anterior of it
        com = lambda s: np.array(np.nonzero(case.mask(s))).mean(axis=1)
        assert com("LeftParotid")[0] > com("RightParotid")[0] + 10
        assert com("Brainstem")[2] > com("SpinalCord")[2] + 10
        if case.mask("Mandible").any():
            assert com("Mandible")[1] < com("SpinalCord")[1] - 10
    assert not cases[2].mask("Mandible").any() and not cases[0].mask("Esophagus").any()  # absent ROIs: empty
    assert cases[1].spacing_mm == (4.625, 4.625, 3.0)
    # the raw file order maps onto the case exactly
    idx, _ = read_sparse_csv(SAMPLE / "train-pats" / "pt_1" / "PTV70.csv")
    raw = np.zeros(int(np.prod(OPENKBP_SHAPE)), bool)
    raw[idx] = True
    assert np.array_equal(from_openkbp(raw.reshape(OPENKBP_SHAPE)), cases[0].mask("PTV70"))
    assert np.array_equal(to_openkbp(cases[0].mask("PTV70")), raw.reshape(OPENKBP_SHAPE))


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


@needs_sample
def test_converter_and_submission_csv(cases, tmp_path):
    ds = convert_openkbp(SAMPLE, tmp_path / "okbp", progress=False)
    assert ds.splits == {"train": ["pt_1", "pt_2", "pt_3"], "validation": ["pt_201"]}
    assert ds.structures == OPENKBP_STRUCTURES and ds.manifest["targets"] == list(OPENKBP_TARGETS)
    loaded = Dataset.open(tmp_path / "okbp").load("pt_2")
    assert isinstance(loaded, Case) and np.array_equal(loaded.masks, cases[1].masks)
    assert np.array_equal(loaded.possible_dose_mask, cases[1].possible_dose_mask)
    np.testing.assert_array_equal(loaded.dose, cases[1].dose)
    # a prediction written in the challenge's format reads back onto the original indices
    path = write_openkbp_dose(cases[0], tmp_path / "pt_1.csv")
    idx, values = read_sparse_csv(path)
    ref_idx, ref_values = read_sparse_csv(SAMPLE / "train-pats" / "pt_1" / "dose.csv")
    order = np.argsort(ref_idx)
    assert np.array_equal(idx, ref_idx[order])
    np.testing.assert_allclose(values, ref_values[order], rtol=1e-5)


@needs_sample
def test_converter_cli(tmp_path):
    cmd = [sys.executable, "-m", "flaxdose.data.openkbp", "convert", str(SAMPLE / "validation-pats"),
           "--out", str(tmp_path / "v"), "--noinclude_ct"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "validation 1" in result.stdout
    assert Dataset.open(tmp_path / "v").load("pt_201").ct is None


def test_bad_inputs(tmp_path):
    bad = tmp_path / "pt_9"
    bad.mkdir()
    with pytest.raises(FlaxdoseError, match="voxel_dimensions"):
        read_openkbp_patient(bad)
    (bad / "voxel_dimensions.csv").write_text("3.9\n3.9\n2.5\n")
    (bad / "possible_dose_mask.csv").write_text(",data\n5,\n2097152,\n")
    with pytest.raises(FlaxdoseError, match="flat indices"):
        read_openkbp_patient(bad)
    (bad / "possible_dose_mask.csv").write_text("index;value\n5;\n")
    with pytest.raises(FlaxdoseError, match="not an OpenKBP sparse CSV"):
        read_openkbp_patient(bad)
    (bad / "possible_dose_mask.csv").write_text(",data\n5,\n6,\n")
    (bad / "dose.csv").write_text(",data\n5,1.5\n6,abc\n")
    with pytest.raises(FlaxdoseError, match="malformed"):
        read_openkbp_patient(bad)
    (bad / "dose.csv").write_text(",data\n5,1.5\n6,2.5\n")
    case = read_openkbp_patient(bad)
    assert case.dose.sum() == pytest.approx(4.0) and case.ct is None and not case.masks.any()
    with pytest.raises(FlaxdoseError, match="possible-dose mask is empty"):
        openkbp_dose_score(case.dose, case.dose, np.zeros(case.shape, bool))
    with pytest.raises(FlaxdoseError, match="no OpenKBP patient"):
        find_patients((tmp_path / "empty").mkdir() or tmp_path / "empty")
