"""OpenKBP as data: the four sample patients, the challenge's CSV format (read, written, damaged), the
converter and its command, coarser grids and back, crop boxes."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flaxdose.data import Case, Dataset
from flaxdose.errors import FlaxdoseError
from flaxdose.metrics import openkbp_dose_score
from flaxdose.openkbp import (
    OPENKBP_SHAPE,
    OPENKBP_STRUCTURES,
    OPENKBP_TARGETS,
    convert_openkbp,
    crop_box,
    downsample_case,
    find_patients,
    from_openkbp,
    read_openkbp_patient,
    read_sparse_csv,
    to_openkbp,
    upsample_dose,
    write_openkbp_dose,
    write_submission,
)

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "openkbp-sample"
if not SAMPLE.is_dir():
    SAMPLE = Path("/work/shared/openkbp-sample")
needs_sample = pytest.mark.skipif(not SAMPLE.is_dir(), reason="OpenKBP sample data not available")


@pytest.fixture(scope="module")
def cases():
    return [read_openkbp_patient(folder) for _, folder in find_patients(SAMPLE)]


# ------------------------------------------------------------ the format
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


def test_a_cut_or_partial_dose_file_is_refused(tmp_path):
    """A new-user pass: dose.csv cut at 5000 bytes converted with exit 0 into 363 voxels of at most
    28 Gy (the real file: 116,045 voxels, 72 Gy). A cut file, or a dose that leaves target voxels
    unirradiated, is refused."""
    patient = next(p for p in sorted((SAMPLE / "train-pats").iterdir()) if (p / "PTV70.csv").exists())
    cut = tmp_path / patient.name
    shutil.copytree(patient, cut)
    full = (patient / "dose.csv").read_bytes()
    (cut / "dose.csv").write_bytes(full[:5000])
    with pytest.raises(FlaxdoseError, match="truncated"):
        read_openkbp_patient(cut)
    rows = full.decode().splitlines(keepends=True)
    (cut / "dose.csv").write_text("".join(rows[:400]))  # whole rows, but only the first 399 voxels
    with pytest.raises(FlaxdoseError, match="damaged or not the plan dose"):
        read_openkbp_patient(cut)
    (cut / "dose.csv").write_bytes(full)
    assert read_openkbp_patient(cut).dose.max() > 0.5 * 70


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_prediction_is_never_written(tmp_path, bad):
    dose = np.zeros(OPENKBP_SHAPE, np.float32)
    dose[60:62, 60:62, 60:62] = 70.0  # 8 voxels
    path = write_openkbp_dose(dose, tmp_path / "ok.csv")
    rows = path.read_text().splitlines()
    assert rows[0] == ",data" and len(rows) == 1 + 8 and all(r.endswith(",70") for r in rows[1:])
    dose[61, 61, 61] = bad
    with pytest.raises(FlaxdoseError, match=r"1 NaN or infinite voxel\(s\); nothing was written"):
        write_openkbp_dose(dose, tmp_path / "bad.csv")
    assert not (tmp_path / "bad.csv").exists()
    with pytest.raises(FlaxdoseError, match="NaN or infinite"):
        write_submission([Case("pt_9", ("PTV70",), np.zeros((1, *OPENKBP_SHAPE), bool), dose, (1.0, 1.0, 1.0),
                               (0.0, 0.0, 0.0), 70.0)], tmp_path / "submission")
    assert not (tmp_path / "submission").exists()  # a refused submission leaves nothing


# ------------------------------------------------------------ conversion
@needs_sample
def test_converter_and_submission_csv(cases, tmp_path):
    ds = convert_openkbp(SAMPLE, tmp_path / "okbp", progress=False)
    assert ds.splits == {"train": ["pt_1", "pt_2", "pt_3"], "val": ["pt_201"]}
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
    cmd = [sys.executable, "-m", "flaxdose.convert_openkbp", str(SAMPLE / "validation-pats"),
           "--out", str(tmp_path / "v"), "--noinclude_ct", "--downsample", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "val 1" in result.stdout
    ds = Dataset.open(tmp_path / "v")
    assert ds.manifest["grid"] == {"shape": [64, 64, 64], "downsample": 2}
    case = ds.load("pt_201")
    assert case.ct is None and case.shape == (64, 64, 64) and case.spacing_mm == pytest.approx((10.844, 10.844, 6.0))
    bad = subprocess.run([*cmd[:-1], "3", "--overwrite"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "whole divisor of 128" in bad.stderr


# ------------------------------------------------------------ grids
def test_downsample_case_by_hand():
    masks = np.zeros((2, 4, 4, 4), bool)
    masks[0, 0, 0, 0] = True  # one fine voxel -> its whole coarse voxel
    masks[1, 2:, 2:, 2:] = True
    possible = np.zeros((4, 4, 4), bool)
    possible[:2, :2, :2] = True
    possible[2, 2, 2] = True
    dose = np.zeros((4, 4, 4), np.float32)
    dose[:2, :2, :2] = np.arange(8).reshape(2, 2, 2)
    dose[2, 2, 2] = 30.0
    case = Case("pt_x", ("SpinalCord", "PTV70"), masks, dose, (2.0, 3.0, 4.0), origin_mm=(10.0, 20.0, 30.0),
                prescription_gy=70.0, possible_dose_mask=possible)
    coarse = downsample_case(case, 2)
    assert coarse.shape == (2, 2, 2) and coarse.spacing_mm == (4.0, 6.0, 8.0)
    assert coarse.origin_mm == (11.0, 21.5, 32.0)  # the centre of the first 2x2x2 block
    assert coarse.masks[0].sum() == 1 and coarse.masks[0, 0, 0, 0] and coarse.masks[1].sum() == 1
    assert coarse.possible_dose_mask.sum() == 2 and coarse.possible_dose_mask[1, 1, 1]
    # mean over the block's possible-dose voxels: (0 + ... + 7) / 8 and 30 / 1 (not 30 / 8)
    assert coarse.dose[0, 0, 0] == pytest.approx(3.5) and coarse.dose[1, 1, 1] == pytest.approx(30.0)
    assert downsample_case(case, 1) is case
    with pytest.raises(FlaxdoseError, match="not divisible"):
        downsample_case(case, 3)


def test_upsample_dose_by_hand():
    possible = np.ones((4, 2, 2), bool)
    coarse = np.zeros((2, 1, 1))
    coarse[:, 0, 0] = [0.0, 2.0]
    # linear, coarse centres at fine x = 0.5 and 2.5: fine x = 0..3 -> 0, 0.5, 1.5, 2 (clamped at the ends)
    fine = upsample_dose(coarse, 2, possible, order=1)
    np.testing.assert_allclose(fine[:, 0, 0], [0.0, 0.5, 1.5, 2.0])
    np.testing.assert_allclose(fine[:, 1, 1], [0.0, 0.5, 1.5, 2.0])
    # a constant dose stays constant up to the edge of the possible-dose mask, zero outside it
    edge = np.zeros((8, 8, 8), bool)
    edge[:3] = True
    up = upsample_dose(np.full((4, 4, 4), 5.0), 2, edge)
    np.testing.assert_allclose(up[:3], 5.0, rtol=1e-6)
    assert (up[3:] == 0).all()


def test_crop_box_covers_every_structure_and_the_window():
    masks = np.zeros((1, 10, 10, 10), bool)
    masks[0, 2:4, 5, 9] = True
    possible = np.zeros((10, 10, 10), bool)
    possible[3, 1, 8] = True
    case = Case("pt_c", ("PTV70",), masks, None, (1.0, 1.0, 1.0), possible_dose_mask=possible)
    assert crop_box(case) == (slice(2, 4), slice(1, 6), slice(8, 10))
    # grown to a 4 x 4 x 4 window: centred where possible, shifted to stay inside the grid
    assert crop_box(case, (4, 4, 4)) == (slice(1, 5), slice(1, 6), slice(6, 10))
    assert crop_box(case, (16, 16, 16)) == (slice(0, 10),) * 3
