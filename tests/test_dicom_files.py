"""Finding a plan's files: every transfer syntax pydicom reads, files without File Meta, the DICOMDIR of a
CD export, copies of an instance and differing files that share a UID, references between files
followed rather than guessed."""

import os
import shutil

import dicom_factory as F
import numpy as np
import pydicom
import pytest
from dicom_factory import copy_export, stored_hu, true_dose_on
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from flaxdose.data import Dataset
from flaxdose.dicom import import_dicom, read_rt, scan
from flaxdose.errors import FlaxdoseError


# ------------------------------------------------------------ encodings
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


# ------------------------------------------------------------ media directories, copies, shared UIDs
def test_dicomdir_of_a_cd_export_is_not_a_patient(rt_export, tmp_path):
    F.write_dicomdir(rt_export["folder"], tmp_path / "cd")
    summary = import_dicom(tmp_path / "cd", tmp_path / "ds", F.STRUCTURES, "dose", progress=False)
    assert summary.num_patients == 1 and len(summary.case_ids) == 1 and not summary.failures
    assert [os.path.basename(p) for p, _ in summary.set_aside] == ["DICOMDIR"]


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


# ------------------------------------------------------------ references between files
def test_a_plan_whose_structure_set_is_missing_is_never_paired_with_another(rt_export, tmp_path):
    export = copy_export(rt_export, tmp_path / "p")
    ds = pydicom.dcmread(export["struct"])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()  # another structure set
    ds.save_as(export["struct"])
    plan_ref = pydicom.dcmread(export["plan"]).ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID
    with pytest.raises(FlaxdoseError, match=rf"references structure set {plan_ref}, which is not in the export"):
        read_rt(export["folder"], structures=F.STRUCTURES)


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
