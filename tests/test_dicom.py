"""DICOM-RT import: synthetic exports whose true masks and dose are known (tests/dicom_factory.py)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dicom_factory as F
import numpy as np
import pydicom
import pytest

from flaxdose.data import Case, Dataset
from flaxdose.dicom import (
    AliasTable,
    Roi,
    fill_polygon,
    import_dicom,
    read_dose,
    read_prescription,
    read_rt,
    scan,
)
from flaxdose.errors import FlaxdoseError
from flaxdose.metrics import dice, dvh_metrics

PYDICOM_TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for orientation in ("HFS", "FFS", "HFP", "FFP"):
        # HFS uses the absolute GridFrameOffsetVector form, the others the relative form
        out[orientation] = F.write_export(root / orientation, orientation, absolute_offsets=orientation == "HFS")
    return out


@pytest.fixture(scope="module")
def hfs_case(exports):
    return read_rt(exports["HFS"]["folder"], structures=F.STRUCTURES, grid="dose", include_ct=True)


def _true_dose_on(case):
    X, Y, Z = np.meshgrid(*F.coords(case.origin_mm, case.spacing_mm, case.shape), indexing="ij")
    return F.true_dose(X, Y, Z), (X, Y, Z)


@pytest.mark.parametrize("orientation", ["HFS", "FFS", "HFP", "FFP"])
def test_import_matches_truth_on_dose_grid(exports, orientation):
    case = read_rt(exports[orientation]["folder"], structures=F.STRUCTURES, grid="dose")
    assert case.shape == F.DOSE_SHAPE_XYZ
    np.testing.assert_allclose(case.spacing_mm, F.DOSE_SPACING)
    np.testing.assert_allclose(case.origin_mm, F.DOSE_ORIGIN)
    truth = F.truth_masks(case.origin_mm, case.spacing_mm, case.shape)
    for name in F.STRUCTURES:
        mask, true = case.mask(name), truth[name]
        assert true.sum() > 100
        assert abs(int(mask.sum()) - int(true.sum())) <= 0.02 * true.sum(), name
        assert dice(mask, true) >= 0.97, name
    # a rectangle traced exactly through voxel centres: those boundary voxels belong to it
    assert np.array_equal(case.mask("Box"), truth["Box"])
    # the rectum's inner contour is a hole
    xs, ys, zs = F.coords(case.origin_mm, case.spacing_mm, case.shape)
    i, j, k = np.argmin(abs(xs)), np.argmin(abs(ys - 28)), np.argmin(abs(zs))
    assert not case.mask("Rectum")[i, j, k] and case.mask("Rectum")[i, j + 3, k]
    true, _ = _true_dose_on(case)
    assert np.abs(case.dose - true).max() <= 0.005 * true.max()
    assert case.prescription_gy == F.PRESCRIPTION  # the largest TargetPrescriptionDose
    assert case.meta["structure_rois"]["Body"] == "Patient Outline 1"  # found by RTROIInterpretedType


def test_orientations_give_identical_cases(exports, hfs_case):
    for orientation in ("FFS", "HFP", "FFP"):
        other = read_rt(exports[orientation]["folder"], structures=F.STRUCTURES, grid="dose", include_ct=True)
        assert np.array_equal(other.masks, hfs_case.masks), orientation
        np.testing.assert_allclose(other.dose, hfs_case.dose, atol=1e-5)
        np.testing.assert_allclose(other.ct, hfs_case.ct, atol=1e-3)
        assert other.meta["patient_position"] == orientation
    # the CT's HU ramp along +x survives (a flipped axis would reverse it)
    assert hfs_case.ct[30, 20, 10] > hfs_case.ct[10, 20, 10]


def test_model_grid_resampling_and_centring(exports):
    case = read_rt(
        exports["FFS"]["folder"], structures=F.STRUCTURES, grid="model",
        model_shape=(40, 40, 24), model_spacing_mm=(3.5, 3.5, 3.0),
    )
    assert case.shape == (40, 40, 24) and case.spacing_mm == (3.5, 3.5, 3.0)
    centre = np.array(case.origin_mm) + (np.array(case.shape) - 1) / 2 * np.array(case.spacing_mm)
    assert np.abs(centre).max() < 1.0  # the PTV is centred at the origin of the phantom
    truth = F.truth_masks(case.origin_mm, case.spacing_mm, case.shape)
    for name in F.STRUCTURES:
        assert dice(case.mask(name), truth[name]) >= 0.97, name
        assert abs(int(case.mask(name).sum()) - int(truth[name].sum())) <= 0.02 * truth[name].sum(), name
    true, (X, Y, Z) = _true_dose_on(case)
    lo, hi = np.array(F.DOSE_ORIGIN), np.array(F.DOSE_ORIGIN) + (np.array(F.DOSE_SHAPE_XYZ) - 1) * F.DOSE_SPACING
    inside = (X >= lo[0]) & (X <= hi[0]) & (Y >= lo[1]) & (Y <= hi[1]) & (Z >= lo[2]) & (Z <= hi[2])
    assert inside.mean() > 0.5
    assert np.abs(case.dose - true)[inside].max() <= 0.005 * true.max()
    assert (case.dose[~inside] == 0).all()  # no dose invented outside the RTDOSE grid


def test_ct_grid_without_dose(exports, tmp_path):
    src = exports["HFS"]["folder"]
    for f in src.iterdir():
        if f.name != "RD.dcm":
            shutil.copy(f, tmp_path / f.name)
    case = read_rt(tmp_path, structures=F.STRUCTURES, grid="ct")
    assert case.dose is None and case.shape == F.CT_SHAPE_XYZ
    truth = F.truth_masks(case.origin_mm, case.spacing_mm, case.shape)
    assert dice(case.mask("Bladder"), truth["Bladder"]) >= 0.97
    with pytest.raises(FlaxdoseError, match="no RTDOSE"):
        read_rt(tmp_path, structures=F.STRUCTURES, grid="dose")


def _point_in_polygon(px, py, poly):
    """Independent crossing-number test (as matplotlib's Path.contains_points) for many points."""
    x1, y1 = poly[:, 0], poly[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    P, Q = px[:, None], py[:, None]
    crosses = ((y1 <= Q) != (y2 <= Q)) & (P < x1 + (Q - y1) * (x2 - x1) / np.where(y2 == y1, 1, y2 - y1))
    return crosses.sum(1) % 2 == 1


def test_dvh_agrees_with_contour_plane_calculation(exports, hfs_case):
    """The DVH calculators' convention (dicompyler-core): per contour plane, take the dose plane at
    that height, include dose voxels whose centre is inside the contour (XOR for holes)."""
    rs = pydicom.dcmread(exports["HFS"]["struct"])
    dose, grid = read_dose(exports["HFS"]["dose"])
    xs, ys, zs = (grid.coords(a) for a in range(3))
    PX, PY = (a.ravel() for a in np.meshgrid(xs, ys, indexing="ij"))
    names = {int(r.ROINumber): r.ROIName for r in rs.StructureSetROISequence}
    checked = 0
    for rc in rs.ROIContourSequence:
        canonical = next(c for n, roi_name, c, _ in F.ROIS if n == int(rc.ReferencedROINumber))
        if canonical not in ("PTV", "Bladder", "Rectum", "Femur_Head_L", "Femur_Head_R"):
            continue
        planes = {}
        for contour in rc.ContourSequence:
            pts = np.array(contour.ContourData, float).reshape(-1, 3)
            k = int(np.argmin(abs(zs - pts[0, 2])))
            assert abs(zs[k] - pts[0, 2]) < 0.01  # the dose plane at the contour's height
            inside = _point_in_polygon(PX, PY, pts)
            planes[k] = planes.get(k, np.zeros_like(inside)) ^ inside
        voxel_doses = np.concatenate([dose[:, :, k].ravel()[m] for k, m in planes.items()])
        assert voxel_doses.size >= 100
        ref = dvh_metrics(voxel_doses, np.ones(voxel_doses.size, bool), grid.spacing_mm)
        ours = dvh_metrics(hfs_case.dose, hfs_case.mask(canonical), hfs_case.spacing_mm)
        for metric in ("Dmean", "D2", "D95", "D98", "Dmax", "Dmin"):
            assert abs(ours[metric] - ref[metric]) <= 0.01, (names[int(rc.ReferencedROINumber)], metric)
        assert abs(ours["volume_cc"] - ref["volume_cc"]) <= 0.02 * ref["volume_cc"]
        checked += 1
    assert checked == 5


def test_missing_slice_is_rejected(tmp_path):
    F.write_export(tmp_path / "gap", "HFS", drop_slice=12)
    with pytest.raises(FlaxdoseError, match="missing slice") as info:
        read_rt(tmp_path / "gap", structures=F.STRUCTURES)
    assert "re-export" in str(info.value)


def test_duplicate_and_mixed_series_are_rejected(exports, tmp_path):
    src = exports["HFS"]["folder"]
    shutil.copytree(src, tmp_path / "dup")
    ct = sorted((tmp_path / "dup").glob("CT_*.dcm"))[3]
    ds = pydicom.dcmread(ct)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    pydicom.dcmwrite(tmp_path / "dup" / "CT_copy.dcm", ds)
    with pytest.raises(FlaxdoseError, match="same position"):
        read_rt(tmp_path / "dup", structures=F.STRUCTURES)


def test_oblique_series_is_rejected(exports, tmp_path):
    shutil.copytree(exports["HFS"]["folder"], tmp_path / "obl")
    path = tmp_path / "obl" / "RD.dcm"
    ds = pydicom.dcmread(path)
    ds.ImageOrientationPatient = [0.9659258, 0.258819, 0, -0.258819, 0.9659258, 0]
    pydicom.dcmwrite(path, ds)
    with pytest.raises(FlaxdoseError, match="oblique"):
        read_rt(tmp_path / "obl", structures=F.STRUCTURES)


def test_structure_aliases(tmp_path):
    rois = [Roi(1, "PTV_7920"), Roi(2, "PTV_5400"), Roi(3, "Blase"), Roi(4, "Rectum"), Roi(5, "Femur_L"),
            Roi(6, "femoral head rt"), Roi(7, "Skin", "EXTERNAL"), Roi(8, "PTV_ring")]
    with pytest.raises(FlaxdoseError) as info:
        AliasTable().match(["PTV", "Bladder"], rois[:2] + [Roi(3, "Harnblase")])
    message = str(info.value)
    assert "PTV_7920" in message and "PTV_5400" in message and "Harnblase" in message and "--aliases" in message
    path = tmp_path / "aliases.json"
    path.write_text(json.dumps({"PTV": ["ptv 7920"], "Bladder": ["HARNBLASE"]}))
    table = AliasTable.from_file(path)
    found = table.match(["PTV", "Bladder", "Rectum", "Femur_Head_L", "Femur_Head_R", "Body"],
                        rois + [Roi(9, "Harnblase")])
    assert {k: v.number for k, v in found.items()} == {
        "PTV": 1, "Bladder": 9, "Rectum": 4, "Femur_Head_L": 5, "Femur_Head_R": 6, "Body": 7}
    assert AliasTable().match(["Bladder"], rois)["Bladder"].number == 3  # built-in alias "Blase"
    # one PTV-like name besides helper structures: the prefix rule finds it
    assert AliasTable().match(["PTV"], [Roi(1, "PTV_prostate_78"), Roi(2, "PTV_ring")])["PTV"].number == 1
    path.write_text("[1, 2]")
    with pytest.raises(FlaxdoseError, match="alias file"):
        AliasTable.from_file(path)


def test_missing_roi_lists_names(exports, tmp_path):
    with pytest.raises(FlaxdoseError, match="Patient Outline 1") as info:
        read_rt(exports["HFS"]["folder"], structures=("PTV", "Prostate"))
    assert "Prostate: no ROI matches" in str(info.value)


def test_prescription_sources(exports, tmp_path):
    assert read_prescription(exports["HFS"]["plan"]) == (60.0, "RTPLAN TargetPrescriptionDose")
    ds = pydicom.dcmread(exports["HFS"]["plan"])
    del ds.DoseReferenceSequence
    beam = pydicom.Dataset()
    beam.ReferencedBeamNumber = 1
    beam.BeamDose = 1.25
    beam2 = pydicom.Dataset()
    beam2.ReferencedBeamNumber = 2
    beam2.BeamDose = 1.25
    ds.FractionGroupSequence[0].ReferencedBeamSequence = [beam, beam2]
    pydicom.dcmwrite(tmp_path / "RP.dcm", ds)
    value, source = read_prescription(tmp_path / "RP.dcm")
    assert value == pytest.approx(75.0) and "fractions" in source
    case = read_rt(exports["HFS"]["folder"], structures=F.STRUCTURES, prescription_gy=70.0)
    assert case.prescription_gy == 70.0 and case.meta["prescription_source"] == "argument"


def test_fill_polygon_edges_and_holes():
    square = np.array([[1, 1], [4, 1], [4, 3], [1, 3]], float)
    m = fill_polygon(square[:, 0], square[:, 1], 6, 5)
    assert m.sum() == 4 * 3 and m[1:5, 1:4].all()  # closed: boundary centres included
    shifted = fill_polygon(square[:, 0] + 0.5, square[:, 1] + 0.5, 6, 5)
    assert shifted.sum() == 3 * 2  # interior centres only
    ring = fill_polygon(*np.array([[0, 0], [5, 0], [5, 4], [0, 4]], float).T, 6, 5) ^ fill_polygon(
        *np.array([[1.5, 1.5], [3.5, 1.5], [3.5, 2.5], [1.5, 2.5]], float).T, 6, 5)
    assert not ring[2, 2] and not ring[3, 2] and ring[1, 2] and ring[0, 0]


def test_import_cli_deidentifies_and_reports_bad_patients(tmp_path, capsys):
    src = tmp_path / "src"
    F.write_export(src / "p1", "HFS", patient_id="PAT001")
    F.write_export(src / "p2", "FFS", patient_id="PAT002")
    F.write_export(src / "p3", "HFS", patient_id="PAT003", drop_slice=5)  # bad patient
    (src / "README.txt").write_text("not dicom")
    summary = import_dicom(src, tmp_path / "ds", F.STRUCTURES, "model", model_shape=(24, 24, 16),
                           model_spacing_mm=(5.0, 5.0, 4.0), salt="s3cret", progress=False)
    assert len(summary.case_ids) == 2 and len(summary.failures) == 1
    assert "p3" in summary.failures[0][0] and "missing slice" in summary.failures[0][1]
    assert "FAILED" in summary.report()
    ds = Dataset.open(tmp_path / "ds")
    assert sorted(ds.split("train")) == summary.case_ids and ds.manifest["import"]["num_failed"] == 1
    text = (tmp_path / "ds" / "manifest.json").read_text()
    for case_id in ds.split("train"):
        case = ds.load(case_id)
        assert case_id.startswith("case_") and case.structures == F.STRUCTURES
        text += case_id + json.dumps(case.meta) + case.style
    for secret in ("PAT00", "Doe", "Jane", "19500101", "20240102", str(src)):
        assert secret not in text
    # same salt, same ids; keep_ids keeps PatientID
    again = import_dicom(src / "p1", tmp_path / "ds2", F.STRUCTURES, "dose", salt="s3cret", progress=False)
    assert again.case_ids[0] in summary.case_ids
    kept = import_dicom(src / "p1", tmp_path / "ds3", F.STRUCTURES, "dose", keep_ids=True, progress=False)
    assert kept.case_ids == ["PAT001"]


def test_import_cli_entry_point(exports, tmp_path):
    aliases = tmp_path / "a.json"
    aliases.write_text(json.dumps({"Box": ["Box"]}))
    cmd = [sys.executable, "-m", "flaxdose.import_dicom", str(exports["HFS"]["folder"]),
           "--out", str(tmp_path / "ds"), "--grid", "dose", "--aliases", str(aliases),
           "--structures", ",".join(F.STRUCTURES)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "imported 1 plan(s) from 1 patient(s)" in result.stdout
    assert Dataset.open(tmp_path / "ds").manifest["num_cases"] == 1
    bad = subprocess.run(cmd[:3] + [str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "flaxdose: error:" in bad.stderr and "Traceback" not in bad.stderr


# ------------------------------------------------------------------- robustness
def _rt_test_files():
    files, _ = scan(PYDICOM_TEST_FILES)
    return sorted(str(f.path) for f in files if f.modality.startswith("RT"))


def test_pydicom_rt_test_files_import_or_clear_error():
    paths = _rt_test_files()
    assert len(paths) >= 8
    for path in paths:
        try:
            case = read_rt([path])
            assert isinstance(case, Case)
        except FlaxdoseError as e:
            assert str(e)
    doses = [p for p in paths if "rtdose" in Path(p).name]
    for path in doses:
        try:
            dose, grid = read_dose(path, require_gy=False)
            assert dose.ndim == 3 and np.isfinite(dose).all() and min(grid.spacing_mm) > 0
        except FlaxdoseError:
            pass
    with pytest.raises(FlaxdoseError, match="RELATIVE"):
        read_dose(PYDICOM_TEST_FILES / "rtdose.dcm")
    dose, grid = read_dose(PYDICOM_TEST_FILES / "rtdose.dcm", require_gy=False)
    assert dose.shape == (10, 10, 15) and grid.spacing_mm == (10.0, 10.0, 5.0)
    # a structure set and a dose of two different patients are never combined
    with pytest.raises(FlaxdoseError):
        read_rt([PYDICOM_TEST_FILES / "rtstruct.dcm", PYDICOM_TEST_FILES / "rtdose.dcm"])


def _mutations(data: bytes, rng, n):
    for _ in range(n):
        kind = rng.integers(3)
        if kind == 0:
            yield data[: int(rng.integers(0, len(data)))]
        else:
            b = bytearray(data)
            for pos in rng.integers(128, len(b), size=int(rng.integers(1, 40))):
                b[pos] = int(rng.integers(256)) if kind == 1 else b[pos] ^ 0xFF
            yield bytes(b)


def test_fuzz_truncated_and_mutated_files_raise_only_flaxdose_errors(exports, tmp_path):
    rng = np.random.default_rng(1234)
    src = exports["HFS"]
    small = tmp_path / "small"  # RTSTRUCT + RTDOSE without CT: fast to read
    small.mkdir()
    shutil.copy(src["struct"], small / "RS.dcm")
    shutil.copy(src["dose"], small / "RD.dcm")
    outcomes = {"ok": 0, "error": 0}
    for target, n in (("RD.dcm", 25), ("RS.dcm", 25)):
        original = (small / target).read_bytes()
        for data in _mutations(original, rng, n):
            (small / target).write_bytes(data)
            try:
                read_rt(small, structures=F.STRUCTURES)
                outcomes["ok"] += 1
            except FlaxdoseError:
                outcomes["error"] += 1
        (small / target).write_bytes(original)
    ct_dir = tmp_path / "ct"
    shutil.copytree(src["folder"], ct_dir)
    victim = sorted(ct_dir.glob("CT_*.dcm"))[7]
    original = victim.read_bytes()
    for data in _mutations(original, rng, 6):
        victim.write_bytes(data)
        try:
            read_rt(ct_dir, structures=F.STRUCTURES, include_ct=True)
            outcomes["ok"] += 1
        except FlaxdoseError:
            outcomes["error"] += 1
    assert outcomes["error"] > 10  # the mutations do break files; none escaped as another exception
