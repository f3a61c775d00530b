"""The CT series of a plan: one uniform axial stack (positions rounded by their writer accepted) or a
refusal that says why; Enhanced (multi-frame) CT read like its slices; the series the plan references."""

import shutil

import dicom_factory as F
import numpy as np
import pydicom
import pytest
from dicom_factory import copy_export, stored_hu, true_dose_on

from flaxdose.dicom import import_dicom, read_rt
from flaxdose.errors import FlaxdoseError
from flaxdose.metrics import dice


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return F.Exports(tmp_path_factory.mktemp("exports"))


# ------------------------------------------------------------ gaps, duplicates, tilt
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


# ------------------------------------------------------------ slice positions written to 0.01 mm
FINE_Z = -38.125 + 1.25 * np.arange(62)  # 1.25 mm slices whose positions need three decimals


def test_ct_slice_positions_rounded_to_a_hundredth_are_one_uniform_series(tmp_path):
    written = np.round(FINE_Z, 2)  # -38.12, -36.88, ...: steps of 1.24 and 1.26 mm
    assert set(np.round(np.diff(written), 2)) == {1.24, 1.26}
    export = F.write_export(tmp_path / "p", slice_positions=written)
    case = read_rt(export["folder"], structures=F.STRUCTURES, grid="ct", include_ct=True)
    assert abs(case.spacing_mm[2] - 1.25) < 1e-3 and abs(case.origin_mm[2] - FINE_Z[0]) < 0.01
    assert case.shape == (*F.CT_SHAPE_XYZ[:2], 62)
    np.testing.assert_array_equal(case.ct, stored_hu(case))  # HU vary in x only: any slice matches
    truth = F.truth_masks(case.origin_mm, case.spacing_mm, case.shape, ["PTV", "Bladder"], planes=written)
    assert dice(case.mask("PTV"), truth["PTV"]) >= 0.97 and dice(case.mask("Bladder"), truth["Bladder"]) >= 0.97
    true = true_dose_on(case)
    X, Y, _ = np.meshgrid(*F.coords(case.origin_mm, case.spacing_mm, case.shape), indexing="ij")
    lo = np.array(F.DOSE_ORIGIN)
    hi = lo + (np.array(F.DOSE_SHAPE_XYZ) - 1) * F.DOSE_SPACING
    inside = (X >= lo[0]) & (X <= hi[0]) & (Y >= lo[1]) & (Y <= hi[1])
    assert np.abs(case.dose - true)[inside].max() <= 0.005 * true.max()


@pytest.mark.parametrize("positions,match", [
    (np.round(np.delete(FINE_Z, 30), 2), r"1 missing slice\(s\) between -1\.8\d and 0\.6\d mm"),  # -0.625 mm missing
    (np.round(np.concatenate([FINE_Z[:31], FINE_Z[30] + 1.5 * np.arange(1, 31)]), 2), "non-uniform slice spacing"),
], ids=["gap", "mixed spacing"])
def test_real_gaps_and_mixed_spacings_are_still_refused(tmp_path, positions, match):
    export = F.write_export(tmp_path / "p", slice_positions=positions, with_dose=False, with_plan=False)
    with pytest.raises(FlaxdoseError, match=match):
        read_rt(export["folder"], structures=F.STRUCTURES, grid="ct")


# ------------------------------------------------------------ Enhanced (multi-frame) CT
@pytest.mark.parametrize("legacy", [False, True], ids=["Enhanced CT", "Legacy Converted Enhanced CT"])
def test_an_enhanced_multiframe_ct_is_read_like_its_slices(rt_export_ct, tmp_path, legacy):
    export = copy_export(rt_export_ct, tmp_path / "p")
    path = F.to_enhanced_ct(export["folder"], legacy)
    assert sorted(p.name for p in export["folder"].iterdir()) == ["CT_enhanced.dcm", "RD.dcm", "RP.dcm", "RS.dcm"]
    assert int(pydicom.dcmread(path).NumberOfFrames) == F.CT_SHAPE_XYZ[2]
    case = read_rt(export["folder"], structures=F.STRUCTURES, grid="ct", include_ct=True)
    assert case.shape == F.CT_SHAPE_XYZ and case.spacing_mm == F.CT_SPACING
    assert np.allclose(case.origin_mm, F.CT_ORIGIN)
    np.testing.assert_array_equal(case.ct, stored_hu(case))  # frames stored top-down: sorted by position
    truth = F.truth_masks(case.origin_mm, case.spacing_mm, case.shape)
    assert min(dice(case.mask(s), truth[s]) for s in ("PTV", "Bladder", "Rectum")) >= 0.95
    summary = import_dicom(export["folder"], tmp_path / "ds", F.STRUCTURES, "ct", include_ct=True, progress=False)
    assert len(summary.case_ids) == 1 and not summary.failures


def test_an_enhanced_ct_frame_without_its_position_is_refused_naming_the_file(rt_export_ct, tmp_path):
    export = copy_export(rt_export_ct, tmp_path / "p")
    path = F.to_enhanced_ct(export["folder"])
    ds = pydicom.dcmread(path)
    del ds.PerFrameFunctionalGroupsSequence[3].PlanePositionSequence
    ds.save_as(path)
    with pytest.raises(FlaxdoseError, match=r"CT_enhanced.dcm: required attribute ImagePositionPatient is missing"):
        read_rt(export["folder"], structures=F.STRUCTURES, grid="ct")


# ------------------------------------------------------------ the series the plan references
def test_the_referenced_ct_series_is_used_and_its_absence_is_named(rt_export_ct, tmp_path):
    export = copy_export(rt_export_ct, tmp_path / "p")
    other = tmp_path / "p" / "other_series"
    other.mkdir()
    for path in export["folder"].glob("CT_*.dcm"):
        shutil.copy(path, other / path.name)
    other_uid = F.replace_ct_series(other)  # the same frame of reference, 400 HU instead of 40
    case = read_rt(export["folder"], structures=F.STRUCTURES, grid="ct", include_ct=True)
    np.testing.assert_array_equal(case.ct, stored_hu(case))  # the structure set's series, not the other
    for path in export["folder"].glob("CT_*.dcm"):
        path.unlink()  # only the other series is left
    with pytest.raises(FlaxdoseError, match=rf"references CT series {export['ct_series']}, which is not in the "
                                            rf"export; CT series \['{other_uid}'\].*another scan.*--include_ct"):
        read_rt(export["folder"], structures=F.STRUCTURES, grid="ct", include_ct=True)
    case = read_rt(export["folder"], structures=F.STRUCTURES)  # the CT only placed the grid: noted
    assert case.ct is None and np.abs(case.dose - true_dose_on(case)).max() <= 1e-3 * F.PRESCRIPTION
    assert any("CT series is not in the export" in n for n in case.meta["notes"])
    assert other_uid not in str(case.meta)  # no UIDs in the dataset


def test_the_ct_series_the_contours_name_is_used_when_the_structure_set_names_no_series(rt_export_ct, tmp_path):
    export = copy_export(rt_export_ct, tmp_path / "p")
    F.name_contour_images(export["struct"], export["folder"])
    other = tmp_path / "p" / "other_series"
    other.mkdir()
    for path in export["folder"].glob("CT_*.dcm"):
        shutil.copy(path, other / path.name)
    F.replace_ct_series(other)  # 400 HU
    case = read_rt(export["folder"], structures=F.STRUCTURES, grid="ct", include_ct=True)
    np.testing.assert_array_equal(case.ct, stored_hu(case))  # the series of the contours' images
    for path in export["folder"].glob("CT_*.dcm"):
        path.unlink()
    with pytest.raises(FlaxdoseError, match="which is not in the export.*another scan"):
        read_rt(export["folder"], structures=F.STRUCTURES, grid="ct", include_ct=True)
