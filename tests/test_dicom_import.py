"""Importing folders of exports into a dataset (`import_dicom` and ``python -m flaxdose.import_dicom``):
failed plans listed and skipped, nothing half written, de-identified case ids, splits that keep a
patient together, the import report, the dataset folder apart from its source, exit statuses."""

import csv
import json
import os
import shutil
import subprocess
import sys

import dicom_factory as F
import numpy as np
import pydicom
import pytest
from dicom_factory import copy_export, cut, full_dose_truth

from flaxdose.data import Dataset
from flaxdose.dicom import REPORT_CSV, import_dicom
from flaxdose.dicom.importer import patient_splits
from flaxdose.errors import FlaxdoseError


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return F.Exports(tmp_path_factory.mktemp("exports"))


VOXEL_CC = float(np.prod(F.DOSE_SPACING)) / 1000.0


def run_cli(src, out):
    cmd = [sys.executable, "-m", "flaxdose.import_dicom", str(src), "--out", str(out), "--grid", "dose",
           "--structures", ",".join(F.STRUCTURES)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "JAX_PLATFORMS": "cpu"})


# ------------------------------------------------------------ the library
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


def test_a_dataset_folder_inside_around_or_equal_to_the_source_is_refused(rt_export, tmp_path):
    src = tmp_path / "src"
    copy_export(rt_export, src / "p")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for out, says in ((src / "datasets" / "ds", "lies inside the source folder"), (src, "is the source folder"),
                      (tmp_path, "holds the source")):
        with pytest.raises(FlaxdoseError) as info:
            import_dicom(src, out, F.STRUCTURES, "dose", overwrite=True, progress=False)
        assert says in str(info.value) and str(out) in str(info.value) and str(src) in str(info.value)
        assert "choose a dataset folder outside" in str(info.value)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written, nothing replaced
    # a file given as source: a dataset beside it is not inside anything the import reads
    summary = import_dicom([src / "p" / "RS.dcm", src / "p" / "RD.dcm", src / "p" / "RP.dcm"], src / "p" / "ds",
                           F.STRUCTURES, "dose", progress=False)
    assert len(summary.case_ids) == 1


# ------------------------------------------------------------ splits
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


# ------------------------------------------------------------ the command
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


def test_cli_imports_the_others_and_exits_1_naming_the_cut_ct_slice(rt_export_ct, rt_export, tmp_path):
    src = tmp_path / "src"
    export = copy_export(rt_export_ct, src / "p")
    copy_export(rt_export, src / "q")  # PAT001 as well: another frame of reference, imported
    slice_ = sorted(export["folder"].glob("CT_*.dcm"))[0]
    cut(slice_, -100)
    result = run_cli(src, tmp_path / "ds")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "FAILED" in result.stdout and slice_.name in result.stdout
    assert Dataset.open(tmp_path / "ds").manifest["num_cases"] == 1


def test_cli_refuses_out_inside_src_with_exit_2(rt_export, tmp_path):
    src = tmp_path / "src"
    copy_export(rt_export, src / "p")
    result = run_cli(src, src / "ds")
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("flaxdose: error:") and str(src / "ds") in line and "outside" in line
    assert not (src / "ds").exists() and sorted(p.name for p in src.iterdir()) == ["p"]
