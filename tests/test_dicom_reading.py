"""A plan read into a Case (`read_rt`, `read_plan`) against the phantom's analytic truth: every patient
orientation, each grid (dose, model, CT), the CT numbers and a DVH computed contour by contour
(tests/dicom_factory.py; expected values computed here, never read back from flaxdose)."""

import shutil

import dicom_factory as F
import numpy as np
import pydicom
import pytest
from dicom_factory import copy_export

from flaxdose.dicom import read_dose, read_rt
from flaxdose.errors import FlaxdoseError
from flaxdose.metrics import dice, dvh_metrics


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return F.Exports(tmp_path_factory.mktemp("exports"))


@pytest.fixture(scope="module")
def hfs_case(exports):
    return read_rt(exports["HFS"]["folder"], structures=F.STRUCTURES, grid="dose", include_ct=True)


def _true_dose_on(case):
    X, Y, Z = np.meshgrid(*F.coords(case.origin_mm, case.spacing_mm, case.shape), indexing="ij")
    return F.true_dose(X, Y, Z), (X, Y, Z)


# ------------------------------------------------------------ orientations and grids
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


# ------------------------------------------------------------ the DVH, plane by plane
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


# ------------------------------------------------------------ optional attributes
def test_absent_optional_attributes_never_fail_a_valid_export(rt_export_ct, tmp_path):
    export = copy_export(rt_export_ct, tmp_path / "p")
    rs = pydicom.dcmread(export["struct"])
    del rs.ReferencedFrameOfReferenceSequence  # Type 3: the ROIs name the frame of reference
    rs.save_as(export["struct"])
    plan = pydicom.dcmread(export["plan"])
    del plan.FrameOfReferenceUID  # the Frame of Reference module is optional in an RT Plan
    plan.save_as(export["plan"])
    case = read_rt(export["folder"], structures=F.STRUCTURES)
    truth = F.truth_masks(case.origin_mm, case.spacing_mm, case.shape)
    assert dice(case.mask("Bladder"), truth["Bladder"]) >= 0.97 and case.prescription_gy == F.PRESCRIPTION
