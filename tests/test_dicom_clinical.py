"""Clinical import you can trust (issue 11): exports shaped like those people bring from planning
systems and PACS/CD exports (tests/dicom_factory.py), each checked against values computed here
from the phantom's analytic truth, never read back from flaxdose."""

import csv
import logging
import os
import shutil
import subprocess
import sys

import dicom_factory as F
import numpy as np
import pydicom
import pytest

from flaxdose.data import Dataset
from flaxdose.dicom import REPORT_CSV, import_dicom, read_rt
from flaxdose.dicom.importer import patient_splits
from flaxdose.errors import FlaxdoseError
from flaxdose.metrics import dice

VOXEL_CC = float(np.prod(F.DOSE_SPACING)) / 1000.0




def copy_export(export, dest, skip=()):
    shutil.copytree(export["folder"], dest, ignore=shutil.ignore_patterns(*skip))
    return {**export, "folder": dest, "struct": dest / "RS.dcm", "plan": dest / "RP.dcm", "dose": dest / "RD.dcm"}


def full_dose_truth(names=F.STRUCTURES):
    """True masks on the whole (uncropped) dose grid of the factory, and its z and x coordinates."""
    xs, _, zs = F.coords(F.DOSE_ORIGIN, F.DOSE_SPACING, F.DOSE_SHAPE_XYZ)
    return F.truth_masks(F.DOSE_ORIGIN, F.DOSE_SPACING, F.DOSE_SHAPE_XYZ, names), xs, zs


def true_dose_on(case):
    return F.true_dose(*np.meshgrid(*F.coords(case.origin_mm, case.spacing_mm, case.shape), indexing="ij"))


def retype(kind):
    def edit(items):
        for item in items:
            item.ContourGeometricType = kind
        return items
    return edit


# ------------------------------------------------------------ 1. ROIs without contours
@pytest.mark.parametrize("edit", [lambda items: None, lambda items: [],
                                  lambda items: [F.contour_item([[0.0, -22.0, 11.25]], "POINT")]],
                         ids=["no ContourSequence", "empty ContourSequence", "only a POINT"])
def test_required_roi_without_contours_stops_the_plan(rt_export, tmp_path, edit):
    export = copy_export(rt_export, tmp_path / "p")
    F.edit_roi(export["struct"], "BLADDER", edit)
    with pytest.raises(FlaxdoseError, match=r"ROI 'BLADDER' \(Bladder\) has no contours"):
        read_rt(export["folder"], structures=F.STRUCTURES)
    # an ROI the model does not need may be empty
    F.edit_roi(export["struct"], "BLADDER", lambda items: [F.contour_item([[0, -22, 11.25], [1, -22, 11.25],
                                                                           [1, -21, 11.25]])])
    F.edit_roi(export["struct"], "PTV_ring", lambda items: None)
    assert read_rt(export["folder"], structures=("PTV", "Rectum")).mask("Rectum").any()


def test_batch_imports_the_rest_and_leaves_nothing_half_written(rt_export, tmp_path):
    src = tmp_path / "src"
    copy_export(rt_export, src / "good")
    bad = F.write_export(src / "bad", with_ct=False, patient_id="PAT002")
    F.edit_roi(bad["struct"], "BLADDER", lambda items: [])
    summary = import_dicom(src, tmp_path / "ds", F.STRUCTURES, "dose", progress=False)
    assert len(summary.case_ids) == 1 and len(summary.failures) == 1
    assert "bad" in summary.failures[0][0] and "BLADDER" in summary.failures[0][1] and "FAILED" in summary.report()
    assert Dataset.open(tmp_path / "ds").manifest["num_cases"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "src"]  # no staging folder left
    with pytest.raises(FlaxdoseError, match="no plan could be imported"):
        import_dicom(src / "bad", tmp_path / "none", F.STRUCTURES, "dose", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "src"]


# ------------------------------------------------------------ 2. geometric types, planes, points
def test_interpolated_untyped_point_and_open_contours(rt_export, tmp_path, caplog):
    export = copy_export(rt_export, tmp_path / "p")
    F.edit_roi(export["struct"], "Box", retype("INTERPOLATED_PLANAR"))
    F.edit_roi(export["struct"], "BLADDER", retype(""))

    def marks(items):  # a POINT in the rectum's hole and an OPEN_PLANAR line across it: they enclose nothing
        z = [float(item.ContourData[2]) for item in items[::2]]
        return items + [F.contour_item([[0.0, 28.0, v]], "POINT") for v in z] + [
            F.contour_item([[-10.0, 28.0, v], [10.0, 28.0, v]], "OPEN_PLANAR") for v in z]

    F.edit_roi(export["struct"], "rectum", marks)
    with caplog.at_level(logging.INFO, logger="flaxdose"):
        case = read_rt(export["folder"], structures=F.STRUCTURES)
    truth = F.truth_masks(case.origin_mm, case.spacing_mm, case.shape)
    assert np.array_equal(case.mask("Box"), truth["Box"])  # traced through voxel centres: exact
    for name in ("Bladder", "Rectum"):
        assert dice(case.mask(name), truth[name]) >= 0.97, name
        assert abs(int(case.mask(name).sum()) - int(truth[name].sum())) <= 0.02 * truth[name].sum(), name
    assert not case.mask("Rectum")[20, 28, 15]  # x 0, y 27, z -1.25 mm: the hole stays empty
    notes = " ".join(case.meta["notes"])
    assert "POINT contour(s) set aside" in notes and "OPEN_PLANAR contour(s) set aside" in notes
    assert "without ContourGeometricType read as CLOSED_PLANAR" in notes
    assert "POINT contour(s) set aside" in caplog.text
    F.edit_roi(export["struct"], "BLADDER", retype("CURVED"))
    with pytest.raises(FlaxdoseError, match="ContourGeometricType 'CURVED'"):
        read_rt(export["folder"], structures=F.STRUCTURES)


@pytest.mark.parametrize("has_ct", [False, True])
def test_rois_contoured_on_every_other_slice_fill_the_slices_between(rt_export, rt_export_ct, tmp_path, has_ct):
    export = copy_export(rt_export_ct if has_ct else rt_export, tmp_path / "p")
    F.edit_roi(export["struct"], "Patient Outline 1", lambda items: items[::2])  # the other ROIs: every slice
    F.edit_roi(export["struct"], "Box", lambda items: items[1::2])
    case = read_rt(export["folder"], structures=F.STRUCTURES)
    truth = F.truth_masks(case.origin_mm, case.spacing_mm, case.shape)
    zs = F.coords(case.origin_mm, case.spacing_mm, case.shape)[2]
    # the body has the same cross-section on every slice: every slice holds it, none is a hole
    per_slice, true_per_slice = case.mask("Body").sum(axis=(0, 1)), truth["Body"].sum(axis=(0, 1))
    assert (per_slice > 0).all() and (np.abs(per_slice - true_per_slice) <= 0.02 * true_per_slice).all()
    # the box, contoured on every other slice in z -18.75..18.75: each plane is a 5 mm slab
    box_planes = F.ct_z()[(F.ct_z() >= F.BOX_Z[0]) & (F.ct_z() <= F.BOX_Z[1])][1::2]
    slab = np.abs(zs[:, None] - box_planes[None, :]).min(axis=1) <= 2.5 + 1e-6
    expected = truth["Box"][:, :, [12]] & slab[None, None, :]  # z -8.75 mm: the box's cross-section
    assert np.array_equal(case.mask("Box"), expected)
    assert case.meta["structures"]["Box"]["slab_mm"] == 5.0


def test_one_point_contour_keeps_its_voxel_and_a_subvoxel_structure_is_refused(rt_export, tmp_path):
    export = copy_export(rt_export, tmp_path / "p")
    F.edit_roi(export["struct"], "Box", lambda items: items + [F.contour_item([[0.0, 0.0, 31.25]])])
    case = read_rt(export["folder"], structures=F.STRUCTURES)
    expected = F.truth_masks(case.origin_mm, case.spacing_mm, case.shape)["Box"]
    expected[20, 19, 28] = True  # x = -60 + 3 * 20, y = -57 + 3 * 19, z = -38.75 + 2.5 * 28: that voxel centre
    assert np.array_equal(case.mask("Box"), expected)
    # a PTV of 1 mm square between the dose grid's voxel centres (0 and 3 mm): no voxel holds it
    square = [[1.0, 1.0, 1.25], [2.0, 1.0, 1.25], [2.0, 2.0, 1.25], [1.0, 2.0, 1.25]]
    F.edit_roi(export["struct"], "PTV_6000", lambda items: [F.contour_item(square)])
    with pytest.raises(FlaxdoseError, match="smaller than a voxel"):
        read_rt(export["folder"], structures=F.STRUCTURES)


# ------------------------------------------------------------ 3. dose summation types
def test_fraction_dose_is_scaled_by_the_planned_fractions(rt_export, tmp_path):
    export = copy_export(rt_export, tmp_path / "p", skip=("RD.dcm",))
    F.write_dose(export, "RD_fraction.dcm", "FRACTION", scale=1 / F.FRACTIONS, fraction_group=1)
    case = read_rt(export["folder"], structures=F.STRUCTURES)
    true = true_dose_on(case)
    assert np.abs(case.dose - true).max() <= 1e-3 * true.max()  # stored per fraction to 1e-5 Gy
    assert case.meta["dose_source"] == "FRACTION x 30" and case.meta["dose_summation_type"] == "FRACTION"
    (export["folder"] / "RP.dcm").unlink()  # without its plan the number of fractions is unknown
    with pytest.raises(FlaxdoseError, match="FRACTION dose needs its RTPLAN"):
        read_rt(export["folder"], structures=F.STRUCTURES)


def test_beam_doses_of_one_plan_are_summed_once_all_are_there(rt_export, tmp_path):
    src = tmp_path / "src"
    export = copy_export(rt_export, src / "p", skip=("RD.dcm",))
    F.write_dose(export, "RD_beam1.dcm", "BEAM", scale=0.3, beams=[1], x_range=(-54.0, 54.0))
    F.write_dose(export, "RD_beam2.dcm", "BEAM", scale=0.7, beams=[2])  # a larger grid: summed on beam 1's
    summary = import_dicom(src, tmp_path / "ds", F.STRUCTURES, "dose", progress=False)
    assert len(summary.case_ids) == 1 and not summary.failures  # one case, not two of part of the dose
    case = Dataset.open(tmp_path / "ds").load(summary.case_ids[0])
    assert case.shape == (37, 39, 32) and case.origin_mm[0] == -54.0
    true = true_dose_on(case)
    assert np.abs(case.dose - true).max() <= 1e-3 * true.max()
    assert case.meta["dose_source"] == "sum of 2 BEAM doses"
    assert case.meta["structures"]["Body"]["coverage"] < 1.0  # the body is wider than the dose: recorded only
    (export["folder"] / "RD_beam2.dcm").unlink()
    with pytest.raises(FlaxdoseError, match=r"missing \[\(1, 2\)\].*partial set"):
        read_rt(export["folder"], structures=F.STRUCTURES)


def test_the_plan_dose_is_preferred(rt_export, tmp_path):
    export = copy_export(rt_export, tmp_path / "p")
    F.write_dose(export, "RD_beam1.dcm", "BEAM", scale=0.5, beams=[1])
    F.write_dose(export, "RD_fraction.dcm", "FRACTION", scale=1 / F.FRACTIONS)
    case = read_rt(export["folder"], structures=F.STRUCTURES)
    assert case.meta["dose_source"] == "PLAN"
    assert np.abs(case.dose - true_dose_on(case)).max() <= 1e-3 * F.PRESCRIPTION
    assert "set aside 1 BEAM dose(s)" in " ".join(case.meta["notes"])


@pytest.mark.parametrize("summation", ["MULTI_PLAN", "BRACHY", "RECORD", "CONTROL_POINT", "PLAN_SUM"])
def test_doses_that_are_not_one_plans_dose_are_refused(rt_export, tmp_path, summation):
    export = copy_export(rt_export, tmp_path / "p", skip=("RD.dcm",))
    F.write_dose(export, "RD.dcm", summation)
    with pytest.raises(FlaxdoseError, match=f"DoseSummationType {summation}"):
        read_rt(export["folder"], structures=F.STRUCTURES)


def test_a_fraction_dose_labelled_plan_and_an_error_dose_are_refused(rt_export, tmp_path):
    export = copy_export(rt_export, tmp_path / "p", skip=("RD.dcm",))
    F.write_dose(export, "RD.dcm", "PLAN", scale=1 / F.FRACTIONS)  # peaks near 2.2 Gy beside 60 Gy
    with pytest.raises(FlaxdoseError, match=r"peaks at 2\.\d\d Gy, 4 % of the prescription 60\.00 Gy"):
        read_rt(export["folder"], structures=F.STRUCTURES)
    F.write_dose(export, "RD.dcm", "PLAN", dose_type="ERROR")
    with pytest.raises(FlaxdoseError, match="DoseType ERROR"):
        read_rt(export["folder"], structures=F.STRUCTURES)


# ------------------------------------------------------------ 4. files without File Meta
def test_files_without_file_meta_are_read(rt_export_ct, tmp_path):
    export = copy_export(rt_export_ct, tmp_path / "p")
    for path in export["folder"].iterdir():
        F.strip_file_meta(path)
    assert export["dose"].read_bytes()[128:132] != b"DICM"
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(export["dose"])  # truly bare
    case = read_rt(export["folder"], structures=F.STRUCTURES, grid="ct", include_ct=True)
    X, Y, _ = np.meshgrid(*F.coords(case.origin_mm, case.spacing_mm, case.shape), indexing="ij")
    body = F.truth_masks(case.origin_mm, case.spacing_mm, case.shape, ["Body"])["Body"]
    stored = (np.where(body, 40.0, -1000.0) + 0.5 * X + 1024).astype("<u2")  # as the factory stores HU
    np.testing.assert_array_equal(case.ct, stored.astype(np.float32) - 1024)
    true = true_dose_on(case)
    lo, hi = np.array(F.DOSE_ORIGIN), np.array(F.DOSE_ORIGIN) + (np.array(F.DOSE_SHAPE_XYZ) - 1) * F.DOSE_SPACING
    inside = (X >= lo[0]) & (X <= hi[0]) & (Y >= lo[1]) & (Y <= hi[1])
    assert np.abs(case.dose - true)[inside].max() <= 0.005 * true.max()


# ------------------------------------------------------------ 5. media directories
def test_dicomdir_of_a_cd_export_is_not_a_patient(rt_export, tmp_path):
    F.write_dicomdir(rt_export["folder"], tmp_path / "cd")
    summary = import_dicom(tmp_path / "cd", tmp_path / "ds", F.STRUCTURES, "dose", progress=False)
    assert summary.num_patients == 1 and len(summary.case_ids) == 1 and not summary.failures
    assert [os.path.basename(p) for p, _ in summary.set_aside] == ["DICOMDIR"]


def test_empty_and_cut_export_files_are_named_not_ignored(rt_export_ct, rt_export, tmp_path):
    """A CT slice cut after its first elements, or an empty RTPLAN, fails its patient naming the file;
    an empty .dcm elsewhere is listed as damaged and the healthy patient imports."""
    src = tmp_path / "src"
    cut = copy_export(rt_export_ct, src / "p")
    ct = sorted(cut["folder"].glob("CT_*.dcm"))[1]
    ct.write_bytes(ct.read_bytes()[:600])  # file meta and the first header elements only
    copy_export(rt_export, src / "q")
    (src / "q" / "notes.txt").write_text("not DICOM, not named like it: ignored")
    F.write_export(src / "r", with_ct=False, patient_id="PAT003")
    (src / "r" / "RP.dcm").write_bytes(b"")
    (src / "elsewhere").mkdir()
    (src / "elsewhere" / "RD_copy.dcm").write_bytes(b"")
    summary = import_dicom(src, tmp_path / "ds", F.STRUCTURES, "dose", progress=False)
    assert len(summary.case_ids) == 1  # q
    damaged = {os.path.basename(p): why for p, why in summary.damaged_files}
    assert set(damaged) == {ct.name, "RP.dcm", "RD_copy.dcm"}
    assert "0 bytes: empty" in damaged["RD_copy.dcm"] and "SeriesInstanceUID" in damaged[ct.name]
    failures = dict((os.path.basename(w), why) for w, why in summary.failures)
    assert ct.name in failures["p"] and "RP.dcm" in failures["r"]


def test_an_rtplan_without_a_prescription_is_refused_not_read_as_zero(rt_export, tmp_path):
    export = copy_export(rt_export, tmp_path / "p")
    ds = pydicom.dcmread(export["plan"])
    for item in ds.get("DoseReferenceSequence") or []:
        if "TargetPrescriptionDose" in item:
            del item.TargetPrescriptionDose
    ds.save_as(export["plan"])
    with pytest.raises(FlaxdoseError, match="gives no prescription"):
        read_rt(export["folder"], structures=F.STRUCTURES)
    case = read_rt(export["folder"], structures=F.STRUCTURES, prescription_gy=F.PRESCRIPTION)
    assert case.prescription_gy == F.PRESCRIPTION


# ------------------------------------------------------------ 6. duplicates and splits
def test_copies_of_an_instance_count_once(rt_export, tmp_path):
    src = tmp_path / "src"
    export = copy_export(rt_export, src / "p")
    shutil.copytree(export["folder"], src / "p_again")  # the whole export twice
    (src / "p" / "backup").mkdir()
    F.strip_file_meta(export["dose"], src / "p" / "backup" / "RD_bare.dcm")  # the same instance, re-encoded
    F.write_export(src / "q", with_ct=False, patient_id="PAT002")
    summary = import_dicom(src, tmp_path / "ds", F.STRUCTURES, "dose", test_fraction=0.5, progress=False)
    assert len(summary.case_ids) == 2 and summary.copies == 4 and not summary.failures
    splits = Dataset.open(tmp_path / "ds").splits
    assert sorted(splits["train"] + splits["test"]) == summary.case_ids


def test_differing_files_that_share_a_uid_are_refused(rt_export, tmp_path):
    export = copy_export(rt_export, tmp_path / "p")
    ds = pydicom.dcmread(export["dose"])
    ds.DoseGridScaling = 2e-5  # twice the dose under the same SOPInstanceUID
    ds.save_as(export["folder"] / "RD_other.dcm")
    with pytest.raises(FlaxdoseError, match="share SOPInstanceUID"):
        read_rt(export["folder"], structures=F.STRUCTURES)


def test_plans_of_one_patient_share_a_split(rt_export, tmp_path):
    src = tmp_path / "src"
    a = copy_export(rt_export, src / "a")
    plan = pydicom.dcmread(a["plan"])  # a second plan on the same CT and structures, and its dose
    plan.SOPInstanceUID = plan.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    plan.save_as(a["folder"] / "RP2.dcm")
    F.write_dose({**a, "plan_uid": plan.SOPInstanceUID}, "RD2.dcm", scale=1.05)
    for i in range(2):
        F.write_export(src / f"b{i}", with_ct=False, patient_id=f"B{i}")
    for seed in range(2):
        summary = import_dicom(src, tmp_path / f"ds{seed}", F.STRUCTURES, "dose", test_fraction=0.5, seed=seed,
                               progress=False)
        assert len(summary.case_ids) == 4
        split_of = {c: s for s, ids in Dataset.open(tmp_path / f"ds{seed}").splits.items() for c in ids}
        pair = [c for c in summary.case_ids if c.endswith(("_1", "_2"))]
        assert len(pair) == 2 and split_of[pair[0]] == split_of[pair[1]]
        assert set(split_of.values()) == {"train", "test"}


def test_splits_keep_cases_that_share_a_patient_study_or_frame_together():
    keys = {"a1": ("patient:A", "study:1", ""), "a2": ("patient:A2", "study:1", ""),  # re-anonymized copy
            "b": ("patient:B", "", "frame:9"), "c": ("", "", "frame:9"), "d": ("", "", ""), "e": ("", "", "")}
    for seed in range(6):
        splits = patient_splits(keys, test_fraction=0.5, seed=seed)
        split_of = {c: s for s, ids in splits.items() for c in ids}
        assert sorted(split_of) == sorted(keys)
        assert split_of["a1"] == split_of["a2"] and split_of["b"] == split_of["c"]
        assert len(splits["test"]) in (3, 4)  # round(0.5 x 6) cases, whole groups: {a1, a2}, {b, c}, {d}, {e}


# ------------------------------------------------------------ coverage
def test_a_cropped_dose_grid_is_reported_and_refused_below_the_threshold(rt_export, tmp_path, caplog):
    export = copy_export(rt_export, tmp_path / "p", skip=("RD.dcm",))
    F.write_dose(export, "RD.dcm", z_max=21.5)  # the top of the bladder (z up to 26 mm) has no dose
    with pytest.raises(FlaxdoseError, match=r"Bladder \(ROI 'BLADDER'\): only 9\d\.\d % .* has dose"):
        read_rt(export["folder"], structures=F.STRUCTURES)
    with caplog.at_level(logging.WARNING, logger="flaxdose"):
        case = read_rt(export["folder"], structures=F.STRUCTURES, min_coverage=0.8)
    truth, _, zs = full_dose_truth(["Bladder", "PTV"])
    expected = truth["Bladder"][:, :, zs <= 21.5].sum() / truth["Bladder"].sum()
    facts = case.meta["structures"]
    assert 0.8 < expected < 0.99 and abs(facts["Bladder"]["coverage"] - expected) <= 0.01
    assert facts["PTV"]["coverage"] == 1.0 and abs(facts["PTV"]["voxels"] - truth["PTV"].sum()) <= 0.02 * truth[
        "PTV"].sum()
    assert "Bladder:" in caplog.text and any("Bladder" in w for w in case.meta["warnings"])


def test_the_body_coverage_is_recorded_not_enforced(rt_export, tmp_path):
    export = copy_export(rt_export, tmp_path / "p", skip=("RD.dcm",))
    F.write_dose(export, "RD.dcm", x_range=(-45.0, 45.0))  # the body is 116 mm wide, the femoral heads reach 51
    with pytest.raises(FlaxdoseError, match="Femur_Head_L"):
        read_rt(export["folder"], structures=F.STRUCTURES)
    case = read_rt(export["folder"], structures=("PTV", "Bladder", "Rectum", "Body"))
    truth, xs, _ = full_dose_truth(["Body"])
    expected = truth["Body"][np.abs(xs) <= 45.0].sum() / truth["Body"].sum()
    assert abs(case.meta["structures"]["Body"]["coverage"] - expected) <= 0.01 and expected < 0.9
    assert not case.meta["warnings"]


# ------------------------------------------------------------ grouping by Type 1/2 attributes
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


# ------------------------------------------------------------ the report
def test_import_report_table_and_csv(rt_export, tmp_path):
    summary = import_dicom(rt_export["folder"], tmp_path / "ds", F.STRUCTURES, "dose", salt="s", progress=False)
    text = (tmp_path / "ds" / REPORT_CSV).read_text()
    rows = list(csv.DictReader(text.splitlines()))
    assert [r["structure"] for r in rows] == list(F.STRUCTURES)
    truth, _, _ = full_dose_truth()
    for row in rows:
        true_cc = truth[row["structure"]].sum() * VOXEL_CC
        assert abs(float(row["cc"]) - true_cc) <= 0.02 * true_cc, row["structure"]
        assert float(row["coverage"]) == 1.0 and row["dose_source"] == "PLAN" and row["dose_type"] == "PHYSICAL"
        assert float(row["prescription_gy"]) == F.PRESCRIPTION
        assert row["prescription_source"] == "RTPLAN TargetPrescriptionDose" and row["grid_shape"] == "41x39x32"
    for secret in ("PAT001", "Doe", "Jane", "19500101", str(rt_export["folder"])):
        assert secret not in text
    table = summary.report()
    assert "coverage" in table and "Patient Outline 1" in table and "prescription 60.00 Gy" in table
    kept = import_dicom(rt_export["folder"], tmp_path / "kept", F.STRUCTURES, "dose", keep_ids=True, progress=False)
    assert kept.case_ids == ["PAT001"] and "PAT001" in (tmp_path / "kept" / REPORT_CSV).read_text()


def test_cli_exit_status(rt_export, tmp_path):
    F.write_dicomdir(rt_export["folder"], tmp_path / "cd")
    bad = F.write_export(tmp_path / "cd" / "bad", with_ct=False, patient_id="PAT002")
    F.edit_roi(bad["struct"], "BLADDER", lambda items: [])

    def run(src, out):
        cmd = [sys.executable, "-m", "flaxdose.import_dicom", str(src), "--out", str(out), "--grid", "dose",
               "--structures", ",".join(F.STRUCTURES)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"})

    shutil.move(str(tmp_path / "cd" / "bad"), str(tmp_path / "bad"))
    ok = run(tmp_path / "cd", tmp_path / "ds")  # a CD export with its DICOMDIR: one patient, all imported
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "imported 1 plan(s) from 1 patient(s)" in ok.stdout and "coverage" in ok.stdout
    shutil.move(str(tmp_path / "bad"), str(tmp_path / "cd" / "bad"))
    mixed = run(tmp_path / "cd", tmp_path / "ds2")  # one plan refused: listed, the rest imported
    assert mixed.returncode == 1 and "FAILED" in mixed.stdout and "BLADDER" in mixed.stdout
    assert Dataset.open(tmp_path / "ds2").manifest["num_cases"] == 1
