"""Clinical import you can trust, second round (issue 25): exports shaped like those in public bug
reports of RT tools, each checked against values computed here (the factory's analytic phantom,
hand arithmetic), never read back from flaxdose."""

import gzip
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

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

from flaxdose.data import Dataset
from flaxdose.dicom import AliasTable, import_dicom, read_dose, read_rt, scan, write_rtdose
from flaxdose.dicom.dose import NotExternalPhotonPlan
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
    expected = (rf"RD.dcm: {wrapped.size} dose voxels are negative \(min {wrapped.min() * scaling:.2f} Gy\)"
                r".*PixelRepresentation 1.*never negative")
    with pytest.raises(FlaxdoseError, match=expected):
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


# ------------------------------------------------------------ 1. a dose that is not the whole plan's
def test_a_fraction_dose_of_one_fraction_group_is_not_the_plan_dose(rt_export, tmp_path):
    """25 x 1.8 Gy then a 14 x 2.0 Gy boost (73 Gy) with only group 1's FRACTION dose: refused; with
    both groups' FRACTION doses: their sum, dose x fractions per group."""
    export = copy_export(rt_export, tmp_path / "p", skip=("RD.dcm",))
    F.two_fraction_groups(export["plan"])
    whole = 73.0 / F.PRESCRIPTION  # the plan dose: the phantom's dose shape, peaking near 73 Gy
    F.write_dose(export, "RD_fg1.dcm", "FRACTION", scale=whole * (25 * 1.8 / 73) / 25, fraction_group=1)
    xs, ys, zs = F.coords(F.DOSE_ORIGIN, F.DOSE_SPACING, F.DOSE_SHAPE_XYZ)
    group1_max = whole * (25 * 1.8 / 73) * F.true_dose(*np.meshgrid(xs, ys, zs, indexing="ij")).max()
    assert 0.5 < group1_max / 73.0 < 2.0  # the plausibility window alone would take it for the plan dose
    for rx in (None, 45.0):
        with pytest.raises(FlaxdoseError, match=r"fraction group\(s\) \[1\] are not the plan dose.*also delivers "
                                                r"group 2 \(14 fractions, beams \[3, 4\]\)"):
            read_rt(export["folder"], structures=F.STRUCTURES, prescription_gy=rx)
    F.write_dose(export, "RD_fg2.dcm", "FRACTION", scale=whole * (14 * 2.0 / 73) / 14, fraction_group=2)
    case = read_rt(export["folder"], structures=F.STRUCTURES)
    true = true_dose_on(case, whole)
    assert np.abs(case.dose - true).max() <= 1e-3 * true.max()  # 1e-5 Gy per stored unit x 25 fractions
    assert case.meta["dose_source"] == "FRACTION x 25 + FRACTION x 14" and case.prescription_gy == 73.0


def test_two_fraction_doses_of_one_group_are_refused(rt_export, tmp_path):
    export = copy_export(rt_export, tmp_path / "p", skip=("RD.dcm",))
    F.write_dose(export, "RD_a.dcm", "FRACTION", scale=1 / F.FRACTIONS, fraction_group=1)
    F.write_dose(export, "RD_b.dcm", "FRACTION", scale=1 / F.FRACTIONS, fraction_group=1)
    with pytest.raises(FlaxdoseError, match=r"RD_a.dcm and RD_b.dcm are FRACTION doses of one fraction group \(1\)"):
        read_rt(export["folder"], structures=F.STRUCTURES)


# ------------------------------------------------------------ 2. brachytherapy and ion plans
def test_brachytherapy_and_ion_plans_are_left_out_by_name_whatever_the_prescription(rt_export, tmp_path):
    src = tmp_path / "src"
    vmat = copy_export(rt_export, src / "vmat")
    hdr = F.write_export(src / "hdr", with_ct=False, with_dose=False)  # the same patient: own CT frame, structures
    F.make_brachy(hdr["plan"])
    F.write_dose(hdr, "RD.dcm", scale=15.0 / F.PRESCRIPTION)  # a 15 Gy HDR boost
    ion = F.write_export(src / "ion", with_ct=False, with_dose=False, patient_id="PAT002")
    F.make_ion(ion["plan"])
    F.write_dose(ion, "RD_physical.dcm")
    F.write_dose(ion, "RD_rbe.dcm", scale=1.1, dose_type="EFFECTIVE")
    for rx in (None, 15.0):  # the advice of the first round, followed: still left out
        with pytest.raises(NotExternalPhotonPlan, match=r"is a brachytherapy plan \(BrachyTreatmentType HDR\)"):
            read_rt(src / "hdr", structures=F.STRUCTURES, prescription_gy=rx)
    with pytest.raises(NotExternalPhotonPlan, match="is an RT Ion Plan"):
        read_rt(src / "ion", structures=F.STRUCTURES)
    case = read_rt([src / "vmat", src / "hdr"], structures=F.STRUCTURES)  # the boost beside it is left out
    assert np.abs(case.dose - true_dose_on(case)).max() <= 1e-3 * F.PRESCRIPTION
    summary = import_dicom(src, tmp_path / "ds", F.STRUCTURES, "dose", progress=False)
    assert len(summary.case_ids) == 1 and not summary.failures and summary.num_patients == 2
    left = {w.split("/")[-1]: why for w, why in summary.left_out}
    assert set(left) == {"hdr", "ion"} and "brachytherapy" in left["hdr"] and "RT Ion Plan" in left["ion"]
    assert "2 plan(s) left out" in summary.report()
    assert vmat["folder"].name == "vmat"


def test_a_physical_dose_is_chosen_over_an_effective_one_and_an_effective_dose_alone_is_refused(rt_export, tmp_path):
    export = copy_export(rt_export, tmp_path / "p")
    F.write_dose(export, "RD_effective.dcm", scale=1.1, dose_type="EFFECTIVE")
    case = read_rt(export["folder"], structures=F.STRUCTURES)
    assert np.abs(case.dose - true_dose_on(case)).max() <= 1e-3 * F.PRESCRIPTION  # not 1.1 x
    assert any("DoseType EFFECTIVE" in n for n in case.meta["notes"]) and case.meta["dose_type"] == "PHYSICAL"
    export["dose"].unlink()
    with pytest.raises(FlaxdoseError, match="DoseType EFFECTIVE is a biologically weighted"):
        read_rt(export["folder"], structures=F.STRUCTURES)


# ------------------------------------------------------------ flaxdose's own predictions
def test_flaxdose_predictions_beside_the_plan_are_never_its_dose(rt_export_ct, tmp_path):
    src = tmp_path / "src"
    export = copy_export(rt_export_ct, src / "p")
    case = read_rt(export["folder"], structures=F.STRUCTURES)
    half = case.replace(dose=case.dose * 0.5)  # a prediction unlike the plan dose
    write_rtdose(half, export["folder"], export["folder"] / "RD_predicted.dcm", plan_path=export["plan"])
    write_rtdose(half, export["folder"], export["folder"] / "RD_predicted_no_plan.dcm")
    again = read_rt(export["folder"], structures=F.STRUCTURES)
    assert again.meta["dose_source"] == "PLAN"
    assert np.abs(again.dose - true_dose_on(again)).max() <= 1e-3 * F.PRESCRIPTION
    summary = import_dicom(src, tmp_path / "ds", F.STRUCTURES, "dose", progress=False)
    assert len(summary.case_ids) == 1 and not summary.failures
    skipped = {p.split("/")[-1]: why for p, why in summary.set_aside}
    assert skipped == {"RD_predicted.dcm": "flaxdose prediction (not a calculated dose)",
                       "RD_predicted_no_plan.dcm": "flaxdose prediction (not a calculated dose)"}
    assert "2 file(s) set aside: flaxdose prediction" in summary.report()
    export["dose"].unlink()  # only predictions left: no plan dose
    with pytest.raises(FlaxdoseError, match="no RTDOSE"):
        import_dicom(src, tmp_path / "ds2", F.STRUCTURES, "dose", progress=False)


# ------------------------------------------------------------ 4. references are followed, not guessed
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


def test_a_plan_whose_structure_set_is_missing_is_never_paired_with_another(rt_export, tmp_path):
    export = copy_export(rt_export, tmp_path / "p")
    ds = pydicom.dcmread(export["struct"])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()  # another structure set
    ds.save_as(export["struct"])
    plan_ref = pydicom.dcmread(export["plan"]).ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID
    with pytest.raises(FlaxdoseError, match=rf"references structure set {plan_ref}, which is not in the export"):
        read_rt(export["folder"], structures=F.STRUCTURES)


# ------------------------------------------------------------ 9. patients delivered as archives
def _zip(folder, path, inner=""):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(folder.rglob("*")):
            z.write(f, f"{inner}{f.relative_to(folder)}")
    return path


def _pack(kind, folder, dest):
    """The export in `folder` delivered as `kind` under `dest`; the number of files a reader must find."""
    files = sorted(f for f in folder.rglob("*") if f.is_file())
    dest.mkdir(parents=True)
    if kind == "zip":
        _zip(folder, dest / "patient.zip", inner="PAT/")
    elif kind == "tar.gz":
        with tarfile.open(dest / "patient.tar.gz", "w:gz") as t:
            t.add(folder, arcname="PAT")
    elif kind == "dcm.gz":  # every file compressed on its own, as some PACS exports write them
        for f in files:
            (dest / f"{f.name}.gz").write_bytes(gzip.compress(f.read_bytes()))
    elif kind == "zip in zip":
        _zip(folder, dest / "inner.zip")
        with zipfile.ZipFile(dest / "outer.zip", "w") as z:
            z.write(dest / "inner.zip", "inner.zip")
        (dest / "inner.zip").unlink()
    return len(files)


@pytest.mark.parametrize("kind", ["zip", "tar.gz", "dcm.gz", "zip in zip"])
def test_patients_delivered_as_archives_are_read(rt_export, tmp_path, kind):
    src = tmp_path / "src"
    copy_export(rt_export, src / "plain")
    second = F.write_export(tmp_path / "second", with_ct=False, patient_id="PAT002")
    count = _pack(kind, second["folder"], src / "packed")
    (src / "notes.txt").write_text("not DICOM")
    summary = import_dicom(src, tmp_path / "ds", F.STRUCTURES, "dose", progress=False)
    assert summary.num_patients == 2 and len(summary.case_ids) == 2 and not summary.failures
    assert sum(n for a, n in summary.unpacked if not a.endswith("outer.zip")) == count
    assert [p.split("/")[-1] for p, why in summary.not_read] == ["notes.txt"]
    assert "1 file(s) not read: not DICOM: notes.txt" in summary.report() and "unpacked and read" in summary.report()
    for cid in summary.case_ids:
        case = Dataset.open(tmp_path / "ds").load(cid)
        assert np.abs(case.dose - true_dose_on(case)).max() <= 1e-3 * F.PRESCRIPTION
    case = read_rt(src / "packed", structures=F.STRUCTURES)  # read_rt reads archives too
    assert np.abs(case.dose - true_dose_on(case)).max() <= 1e-3 * F.PRESCRIPTION


def test_archives_that_cannot_be_read_are_named_and_exit_1(rt_export, tmp_path):
    src = tmp_path / "src"
    copy_export(rt_export, src / "plain")
    (src / "patient2.7z").write_bytes(b"7z\xbc\xaf\x27\x1c" + bytes(200))  # a 7-Zip archive's signature
    good = _zip(rt_export["folder"], tmp_path / "whole.zip")
    (src / "patient3.zip").write_bytes(good.read_bytes()[:300])  # cut short in the copy
    summary = import_dicom(src, tmp_path / "ds", F.STRUCTURES, "dose", progress=False)
    failures = {w.split("/")[-1]: why for w, why in summary.failures}
    assert len(summary.case_ids) == 1 and set(failures) == {"patient2.7z", "patient3.zip"}
    assert "7-Zip archive" in failures["patient2.7z"] and "a patient may be inside" in failures["patient3.zip"]
    with pytest.raises(FlaxdoseError, match="patient2.7z: a 7-Zip archive, which flaxdose cannot unpack"):
        read_rt(src, structures=F.STRUCTURES)
    cli = subprocess.run([sys.executable, "-m", "flaxdose.import_dicom", str(src), "--out", str(tmp_path / "ds2"),
                          "--grid", "dose", "--structures", ",".join(F.STRUCTURES)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert cli.returncode == 1 and "patient2.7z" in cli.stdout and "patient3.zip" in cli.stdout, cli.stderr[-2000:]
    assert "imported 1 plan(s) from 1 patient(s)" in cli.stdout


# ------------------------------------------------------------ 6. an Enhanced (multi-frame) CT
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


def test_a_plan_dose_of_one_fraction_group_is_refused(rt_export, tmp_path):
    export = copy_export(rt_export, tmp_path / "p", skip=("RD.dcm",))
    F.two_fraction_groups(export["plan"])
    F.write_dose(export, "RD.dcm", "PLAN", scale=(25 * 1.8) / F.PRESCRIPTION, fraction_group=1)  # group 1's 45 Gy
    for rx in (None, 45.0):
        with pytest.raises(FlaxdoseError, match=r"names fraction group 1 .* also delivers fraction group\(s\) \[2\]"):
            read_rt(export["folder"], structures=F.STRUCTURES, prescription_gy=rx)


@pytest.mark.parametrize("edit,match", [
    (lambda ds: setattr(ds, "PlanIntent", "VERIFICATION"), r"a verification plan \(PlanIntent VERIFICATION\)"),
    (lambda ds: setattr(ds, "RTPlanGeometry", "TREATMENT_DEVICE"), "RTPlanGeometry TREATMENT_DEVICE"),
    (lambda ds: [setattr(b, "RadiationType", "ELECTRON") for b in ds.BeamSequence],
     r"an electron beam plan \(RadiationType ELECTRON\)"),
], ids=["verification", "treatment device", "electrons"])
def test_plans_no_patient_receives_as_photons_are_left_out(rt_export, tmp_path, edit, match):
    export = copy_export(rt_export, tmp_path / "p")
    F._edit(export["plan"], edit)
    with pytest.raises(NotExternalPhotonPlan, match=match):
        read_rt(export["folder"], structures=F.STRUCTURES, prescription_gy=F.PRESCRIPTION)


def test_an_rtplan_without_dose_and_a_broken_link_are_listed_not_skipped_unseen(rt_export, tmp_path):
    src = tmp_path / "src"
    export = copy_export(rt_export, src / "p")
    plan = pydicom.dcmread(export["plan"])  # a second plan on the same structure set, without its dose
    plan.SOPInstanceUID = plan.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    plan.save_as(export["folder"] / "RP_boost.dcm")
    (export["folder"] / "RD_link.dcm").symlink_to(tmp_path / "gone.dcm")
    summary = import_dicom(src, tmp_path / "ds", F.STRUCTURES, "dose", progress=False)
    assert len(summary.case_ids) == 1 and not summary.failures
    assert [(w.split("/")[-1], "no RTDOSE" in why) for w, why in summary.left_out] == [("RP_boost.dcm", True)]
    assert [p.split("/")[-1] for p, _ in summary.not_read] == ["RD_link.dcm"]


def test_a_prediction_is_written_onto_an_enhanced_ct(rt_export_ct, tmp_path):
    export = copy_export(rt_export_ct, tmp_path / "p")
    F.to_enhanced_ct(export["folder"])
    case = read_rt(export["folder"], structures=F.STRUCTURES, grid="ct")
    out = write_rtdose(case, export["folder"], tmp_path / "RD_pred.dcm")
    dose, grid = read_dose(out)
    assert grid.spacing_mm == F.CT_SPACING and np.allclose(grid.origin_mm, F.CT_ORIGIN)
    true = F.true_dose(*np.meshgrid(*F.coords(grid.origin_mm, grid.spacing_mm, grid.shape), indexing="ij"))
    inside = dose > 0  # the CT grid beyond the dose grid gets no dose
    assert inside.sum() > 0.5 * dose.size and np.abs(dose - true)[inside].max() <= 0.005 * true.max()


# ------------------------------------------------------------ further inputs of the same kinds
def test_a_fraction_dose_of_some_of_the_groups_beams_is_refused(rt_export, tmp_path):
    export = copy_export(rt_export, tmp_path / "p", skip=("RD.dcm",))
    F.write_dose(export, "RD.dcm", "FRACTION", scale=0.5 / F.FRACTIONS, beams=[1], fraction_group=1)
    with pytest.raises(FlaxdoseError, match=r"names beams \[1\] of fraction group 1, which delivers beams \[1, 2\]"):
        read_rt(export["folder"], structures=F.STRUCTURES, prescription_gy=30.0)


def test_a_brachy_dose_and_a_dose_naming_a_missing_ion_plan_are_left_out(rt_export, tmp_path):
    export = copy_export(rt_export, tmp_path / "p", skip=("RD.dcm",))
    F.write_dose(export, "RD.dcm", "BRACHY")
    with pytest.raises(NotExternalPhotonPlan, match="DoseSummationType BRACHY .* a brachytherapy dose"):
        read_rt(export["folder"], structures=F.STRUCTURES, prescription_gy=F.PRESCRIPTION)
    export["plan"].unlink()
    F.write_dose(export, "RD.dcm", plan_uid=pydicom.uid.generate_uid(),
                 edit=lambda ds: setattr(ds.ReferencedRTPlanSequence[0], "ReferencedSOPClassUID",
                                         "1.2.840.10008.5.1.4.1.1.481.8"))
    with pytest.raises(NotExternalPhotonPlan, match="the RTDOSE names an RT Ion Plan"):
        read_rt(export["folder"], structures=F.STRUCTURES, prescription_gy=F.PRESCRIPTION)


def test_stored_dose_bits_above_bits_stored_are_refused_not_masked(rt_export, tmp_path):
    export = copy_export(rt_export, tmp_path / "p", skip=("RD.dcm",))

    def twelve_bits(ds):
        ds.BitsStored, ds.HighBit = 12, 11

    path = F.write_dose(export, "RD.dcm", bits=16, edit=twelve_bits)  # values up to 65000 labelled 12-bit
    raw = np.frombuffer(pydicom.dcmread(path).PixelData, "<u2")
    beyond = int(np.count_nonzero(raw > 4095))
    assert beyond > 1000 and pydicom.dcmread(path).pixel_array.max() <= 4095  # pydicom masks them silently
    with pytest.raises(FlaxdoseError, match=rf"RD.dcm: {beyond} stored dose values have bits set above the 12 bits"):
        read_rt(export["folder"], structures=F.STRUCTURES, prescription_gy=4.0)


@pytest.mark.parametrize("alias", ["\uff28\uff41\uff52\uff4e\uff42\uff4c\uff41\uff53\uff45",  # full-width letters
                                   "Harn\u200bblase"], ids=["full-width", "zero-width space"])
def test_roi_aliases_match_across_compatibility_forms_and_invisible_characters(rt_export, tmp_path, alias):
    export = copy_export(rt_export, tmp_path / "p")
    F.rename_roi(export["struct"], "BLADDER", "Harnblase")
    aliases_file = tmp_path / "aliases.json"
    aliases_file.write_text('{"Bladder": ["%s"]}' % alias, encoding="utf-8")
    case = read_rt(export["folder"], structures=F.STRUCTURES, aliases=AliasTable.from_file(aliases_file))
    assert case.meta["structure_rois"]["Bladder"] == "Harnblase"


@pytest.mark.parametrize("magic,what", [(b"\x28\xb5\x2f\xfd", "Zstandard"), (b"Rar!\x1a\x07\x00", "RAR")])
def test_compressed_files_python_cannot_read_are_failures_not_silence(rt_export, tmp_path, magic, what):
    src = tmp_path / "src"
    copy_export(rt_export, src / "plain")
    (src / "patient2.bin").write_bytes(magic + bytes(300))
    summary = import_dicom(src, tmp_path / "ds", F.STRUCTURES, "dose", progress=False)
    assert len(summary.case_ids) == 1
    assert [(w.split("/")[-1], what in why) for w, why in summary.failures] == [("patient2.bin", True)]


def test_a_ct_in_a_transfer_syntax_the_damage_walk_does_not_know_is_not_called_damaged(rt_export_ct, tmp_path):
    export = copy_export(rt_export_ct, tmp_path / "p")
    slice_path = sorted(export["folder"].glob("CT_*.dcm"))[3]
    ds = pydicom.dcmread(slice_path)
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.9.999.1"  # a private syntax: header readable only
    ds.save_as(slice_path)
    _, damaged = scan(export["folder"])
    assert damaged == []
    case = read_rt(export["folder"], structures=F.STRUCTURES)  # the CT only places the grid here
    assert np.abs(case.dose - true_dose_on(case)).max() <= 1e-3 * F.PRESCRIPTION
    with pytest.raises(FlaxdoseError, match=slice_path.name):  # its pixels cannot be decoded: named
        read_rt(export["folder"], structures=F.STRUCTURES, grid="ct", include_ct=True)


def test_fuzzed_deflated_enhanced_and_archived_files_raise_only_flaxdose_errors(rt_export_ct, rt_export, tmp_path):
    """The new readers (inflating, multi-frame, unpacking) on cut and mutated files: FlaxdoseError or a case."""
    rng = np.random.default_rng(25)
    deflated = copy_export(rt_export, tmp_path / "deflated")
    F.reencode(deflated["struct"], DeflatedExplicitVRLittleEndian)
    enhanced = copy_export(rt_export_ct, tmp_path / "enhanced")
    ct = F.to_enhanced_ct(enhanced["folder"])
    zipped = tmp_path / "zipped"
    zipped.mkdir()
    archive = _zip(rt_export["folder"], zipped / "patient.zip")
    errors = 0
    for folder, victim, kwargs in ((deflated["folder"], deflated["struct"], {}),
                                   (enhanced["folder"], ct, {"grid": "ct", "include_ct": True}),
                                   (zipped, archive, {})):
        original = victim.read_bytes()
        for _ in range(8):
            data = bytearray(original)
            if rng.integers(2):
                data = data[: int(rng.integers(0, len(data)))]
            else:
                for pos in rng.integers(128, len(data), size=20):
                    data[pos] ^= 0xFF
            victim.write_bytes(bytes(data))
            try:
                read_rt(folder, structures=F.STRUCTURES, **kwargs)
            except FlaxdoseError:
                errors += 1
        victim.write_bytes(original)
    assert errors > 5
