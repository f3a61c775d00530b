"""Clinical import you can trust, second round (issue 25): exports shaped like those in public bug
reports of RT tools, each checked against values computed here (the factory's analytic phantom,
hand arithmetic), never read back from flaxdose."""

import shutil

import dicom_factory as F
import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from flaxdose.dicom import AliasTable, import_dicom, read_rt, scan
from flaxdose.errors import FlaxdoseError
from flaxdose.metrics import dice


def copy_export(export, dest, skip=()):
    shutil.copytree(export["folder"], dest, ignore=shutil.ignore_patterns(*skip))
    return {**export, "folder": dest, "struct": dest / "RS.dcm", "plan": dest / "RP.dcm", "dose": dest / "RD.dcm"}


def true_dose_on(case, scale=1.0):
    return scale * F.true_dose(*np.meshgrid(*F.coords(case.origin_mm, case.spacing_mm, case.shape), indexing="ij"))


def stored_hu(case):
    """The CT numbers the factory stores at the case's voxel centres (HU + 1024 as uint16, minus 1024)."""
    X, _, _ = np.meshgrid(*F.coords(case.origin_mm, case.spacing_mm, case.shape), indexing="ij")
    body = F.truth_masks(case.origin_mm, case.spacing_mm, case.shape, ["Body"])["Body"]
    return (np.where(body, 40.0, -1000.0) + 0.5 * X + 1024).astype("<u2").astype(np.float32) - 1024


# ------------------------------------------------------------ 11. every transfer syntax pydicom reads
@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian,
                                    DeflatedExplicitVRLittleEndian, RLELossless], ids=lambda s: s.name)
def test_every_transfer_syntax_pydicom_reads_imports_the_same_case(rt_export_ct, tmp_path, syntax):
    export = copy_export(rt_export_ct, tmp_path / "p")
    for path in export["folder"].iterdir():
        F.reencode(path, syntax)
    assert pydicom.dcmread(export["dose"]).file_meta.TransferSyntaxUID in (syntax, ExplicitVRLittleEndian)
    files, damaged = scan(export["folder"])
    assert damaged == [] and len(files) == F.CT_SHAPE_XYZ[2] + 3
    case = read_rt(export["folder"], structures=F.STRUCTURES, grid="ct", include_ct=True)
    np.testing.assert_array_equal(case.ct, stored_hu(case))
    X, Y, _ = np.meshgrid(*F.coords(case.origin_mm, case.spacing_mm, case.shape), indexing="ij")
    lo = np.array(F.DOSE_ORIGIN)
    hi = lo + (np.array(F.DOSE_SHAPE_XYZ) - 1) * F.DOSE_SPACING
    inside = (X >= lo[0]) & (X <= hi[0]) & (Y >= lo[1]) & (Y <= hi[1])
    true = true_dose_on(case)
    assert np.abs(case.dose - true)[inside].max() <= 0.005 * true.max()


def test_a_deflated_file_cut_short_is_still_damaged(rt_export, tmp_path):
    export = copy_export(rt_export, tmp_path / "p")
    F.reencode(export["struct"], DeflatedExplicitVRLittleEndian)
    data = export["struct"].read_bytes()
    export["struct"].write_bytes(data[: len(data) - 200])  # the compressed stream loses its end
    _, damaged = scan(export["folder"])
    assert [p.split("/")[-1] for p, _ in damaged] == ["RS.dcm"]
    with pytest.raises(FlaxdoseError, match="RS.dcm"):
        read_rt(export["folder"], structures=F.STRUCTURES)


# ------------------------------------------------------------ 8. ROI names in another Unicode form
NFC_NAME, NFD_NAME = "Harnblase \u00fcberf\u00fcllt", "Harnblase u\u0308berfu\u0308llt"  # as macOS writes it


@pytest.mark.parametrize("roi_name,charset,alias", [(NFC_NAME, "ISO_IR 100", NFD_NAME),
                                                    (NFD_NAME, "ISO_IR 192", NFC_NAME)], ids=["alias NFD", "ROI NFD"])
def test_roi_aliases_match_in_any_unicode_normalization_form(rt_export, tmp_path, roi_name, charset, alias):
    assert roi_name != alias and len(NFD_NAME) == len(NFC_NAME) + 2  # two combining diaereses
    export = copy_export(rt_export, tmp_path / "p")
    F.rename_roi(export["struct"], "BLADDER", roi_name, charset)
    assert pydicom.dcmread(export["struct"]).StructureSetROISequence[1].ROIName == roi_name  # stored as given
    with pytest.raises(FlaxdoseError, match="Bladder: no ROI matches"):
        read_rt(export["folder"], structures=F.STRUCTURES)
    aliases_file = tmp_path / "aliases.json"
    aliases_file.write_text('{"Bladder": ["%s"]}' % alias, encoding="utf-8")
    case = read_rt(export["folder"], structures=F.STRUCTURES, aliases=AliasTable.from_file(aliases_file))
    assert case.meta["structure_rois"]["Bladder"] == roi_name
    truth = F.truth_masks(case.origin_mm, case.spacing_mm, case.shape, ["Bladder"])["Bladder"]
    assert dice(case.mask("Bladder"), truth) >= 0.97


# ------------------------------------------------------------ 3. a signed RTDOSE whose data contradict it
def test_a_signed_dose_whose_data_read_negative_is_refused(rt_export, tmp_path):
    export = copy_export(rt_export, tmp_path / "p", skip=("RD.dcm",))
    path = F.write_dose(export, "RD.dcm", bits=16, signed=True)
    scaling = float(pydicom.dcmread(path).DoseGridScaling)
    xs, ys, zs = F.coords(F.DOSE_ORIGIN, F.DOSE_SPACING, F.DOSE_SHAPE_XYZ)
    stored = np.rint(F.true_dose(*np.meshgrid(xs, ys, zs, indexing="ij")) / scaling)  # as written, unsigned
    wrapped = stored[stored > 32767] - 65536  # read as two's complement, as PixelRepresentation 1 says
    assert wrapped.size > 1000
    with pytest.raises(FlaxdoseError, match=rf"RD.dcm: {wrapped.size} dose voxels are negative \(min "
                                            rf"{wrapped.min() * scaling:.2f} Gy\).*PixelRepresentation 1.*never negative"):
        read_rt(export["folder"], structures=F.STRUCTURES)
    with pytest.raises(FlaxdoseError, match="never negative"):  # whatever the prescription
        read_rt(export["folder"], structures=F.STRUCTURES, prescription_gy=30.0)
    F.write_dose(export, "RD.dcm", bits=16)  # the same data labelled unsigned: the plan dose
    case = read_rt(export["folder"], structures=F.STRUCTURES)
    assert np.abs(case.dose - true_dose_on(case)).max() <= scaling


# ------------------------------------------------------------ 7. slice positions written to 0.01 mm
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


def test_dose_planes_written_to_a_hundredth_are_one_uniform_grid(rt_export, tmp_path):
    export = copy_export(rt_export, tmp_path / "p", skip=("RD.dcm",))
    path = F.write_dose(export, "RD.dcm", z_spacing=1.875, round_mm=0.01)  # offsets 0, 1.88, 3.75, 5.62, ...
    offsets = np.array(pydicom.dcmread(path).GridFrameOffsetVector, float)
    assert set(np.round(np.diff(offsets), 2)) == {1.87, 1.88} and offsets.size == 42
    case = read_rt(export["folder"], structures=F.STRUCTURES)
    assert abs(case.spacing_mm[2] - 1.875) < 1e-3 and abs(case.origin_mm[2] - F.DOSE_ORIGIN[2]) < 0.01
    assert case.shape[2] == 42
    assert np.abs(case.dose - true_dose_on(case)).max() <= 2e-3 * F.PRESCRIPTION
    F.write_dose(export, "RD.dcm", edit=lambda ds: setattr(ds, "GridFrameOffsetVector",
                                                            [2.5 * k + 0.3 * (k > 15) for k in range(32)]))
    with pytest.raises(FlaxdoseError, match="not uniformly spaced"):
        read_rt(export["folder"], structures=F.STRUCTURES)
