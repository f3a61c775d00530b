"""The clinical path as a physicist walks it (issue 30): an export root in, a folder out, DVH numbers that an
independent per-plane calculation on the written RTDOSE agrees with, RTDOSE files dciodvfy accepts; and the
prediction written onto the CT series the case was read from when an export holds two (issue 25, item 5).

Every expected value is computed here: DVH metrics by rasterizing each RTSTRUCT contour on each RTDOSE plane
(matplotlib's point-in-polygon, even-odd across a ROI's contours) with the dose read by pydicom alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import dicom_factory as F
import numpy as np
import pydicom
import pytest
from independent_dvh import ROI_NAME, dvh, per_plane_doses, read_csv, rtdose_planes
from pydicom.uid import generate_uid

from flaxdose import inference, planqa, predict
from flaxdose.data.case import Case, Dataset
from flaxdose.dicom import AliasTable
from flaxdose.errors import FlaxdoseError
from flaxdose.evaluate import evaluate_workdirs
from flaxdose.inference import dicom_plans
from flaxdose.inference.dicom_plans import find_dicom_plans, predict_dicom_folder, predict_dicom_patient
from flaxdose.inference.predictor import Model


@pytest.fixture(scope="module")
def workdir(phantom_run):
    """conftest's tiny phantom model (4 x 4 x 5 mm): numbers need not be good, only traceable."""
    return phantom_run


# ------------------------------------------------------------------ export helpers
def add_second_ct_series(folder, shift_z=1.25, hu_offset=400):
    """A second CT series on the same frame of reference (other slices, +400 HU): the structure set still
    references the first. Returns the first series' slice positions (z, mm)."""
    first = sorted(folder.glob("CT_*.dcm"))
    series = generate_uid()
    zs = []
    for path in first:
        ds = pydicom.dcmread(path)
        zs.append(float(ds.ImagePositionPatient[2]))
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + shift_z]
        ds.PixelData = (ds.pixel_array.astype(np.int32) + hu_offset).clip(0, 65535).astype("<u2").tobytes()
        ds.save_as(folder / f"CT2_{path.name}", enforce_file_format=True)
    return sorted(zs)


def dciodvfy_errors(path):
    """dciodvfy's Error lines for one file (its report must name the RT Dose IOD); [] without dciodvfy, unless
    FLAXDOSE_REQUIRE_DCIODVFY is set (.ci/run): then its absence fails."""
    if shutil.which("dciodvfy") is None:
        assert not os.environ.get("FLAXDOSE_REQUIRE_DCIODVFY"), "dciodvfy required (FLAXDOSE_REQUIRE_DCIODVFY)"
        return []
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    report = result.stdout + result.stderr
    assert "RTDose" in report, report
    return [line for line in report.splitlines() if "Error" in line]


# ------------------------------------------------------------------ the folder path
@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Three patients under one root (HFS, FFS with a second CT series, HFP); the HFP one is broken (its
    rectum has no contours). Every CT has non-square pixels (2.0 x 2.5 mm)."""
    root = tmp_path_factory.mktemp("clinic") / "exports"
    out = {}
    for name, orientation in (("p1_hfs", "HFS"), ("p2_ffs", "FFS"), ("p3_broken", "HFP")):
        out[name] = F.write_export(root / name, orientation, patient_id=f"ID_{name}")
    out["ct_z_p2"] = add_second_ct_series(root / "p2_ffs")
    F.edit_roi(out["p3_broken"]["struct"], "rectum", lambda items: None)
    return root, out


def test_folder_in_folder_out(workdir, exports, tmp_path):
    """predict --dicom ROOT --out OUT: two plans written, the broken one named (exit 1); each RTDOSE on its plan's
    referenced CT series, referencing its RTPLAN, dciodvfy-clean (16 bit); metrics.csv equal to an independent
    per-plane DVH of the written RTDOSE within 0.05 Gy; one summary; nothing of the patients' names or IDs."""
    root, made = exports
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "flaxdose.predict", f"--workdir={workdir}", f"--dicom={root}",
                           f"--out={out}", "--full_volume", "--bits=16"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed["plans"] == 3 and printed["rtdose_written"] == 2
    assert list(printed["failed"]) == ["plan_03"] and "p3_broken" in printed["failed"]["plan_03"]
    assert "Rectum" in printed["failed"]["plan_03"] and "no contours" in printed["failed"]["plan_03"]
    console = proc.stdout
    for name in ("plan_01", "plan_02"):
        assert f"{name} (" in console and "PTV D95" in console  # each plan's key metrics on the console
    summary = read_csv(out / "summary.csv")
    assert [r["plan"] for r in summary] == ["plan_01", "plan_02", "plan_03"]
    assert [r["status"] for r in summary] == ["ok", "ok", "failed"]
    # an implausible prediction (this tiny model's peaks are ~1.6 x Rx) is said in the summary and on the console,
    # not only logged: each warning the log gives is in its plan's row, and the console line says IMPLAUSIBLE
    logged = [line.split("x the prescription")[0].split("predicted maximum")[1] for line in proc.stderr.splitlines()
              if "predicted maximum" in line]
    warned = [row for row in summary[:2] if row["warning"]]
    assert len(warned) == len(logged) >= 1
    for row, text in zip(warned, logged):
        assert text in row["warning"] and "IMPLAUSIBLE" in console.split(f"{row['plan']} (")[1].splitlines()[0]
    for name, patient in (("plan_01", "p1_hfs"), ("plan_02", "p2_ffs")):
        rd = out / name / "RD_flaxdose.dcm"
        ds = pydicom.dcmread(rd)
        plan = pydicom.dcmread(made[patient]["plan"])
        assert ds.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == plan.SOPInstanceUID
        assert ds.FrameOfReferenceUID == made[patient]["for"] and ds.Manufacturer == "flaxdose"
        assert ds.BitsAllocated == 16
        assert dciodvfy_errors(rd) == []
        assert (out / name / "dose.png").read_bytes()[:4] == b"\x89PNG"
        rows = read_csv(out / name / "metrics.csv")
        assert {r["grid"] for r in rows} == {"RTDOSE grid 2x2.5x2.5 mm, 64x48x32 voxels"}
        got = {(r["structure"], r["metric"]): float(r["value"]) for r in rows if r["value"]}
        for structure in ("PTV", "Rectum", "Bladder"):
            expected = dvh(per_plane_doses(rd, made[patient]["struct"], ROI_NAME[structure]))
            for metric in ("Dmean", "D95", "D2") if structure == "PTV" else ("Dmean", "D2"):
                assert got[structure, metric] == pytest.approx(expected[metric], abs=0.05), (name, structure, metric)
        assert ("Rectum", "V50Gy[%]") in got and ("PTV", "Dmax[0.03cc]") in got
        assert float(summary[int(name[-1]) - 1]["PTV D95"]) == pytest.approx(got["PTV", "D95"], abs=1e-3)
    # plan_02 (two CT series): written on the series the structure set references, not the shifted one
    _, _, _, z = rtdose_planes(out / "plan_02" / "RD_flaxdose.dcm")
    assert np.allclose(sorted(z), made["ct_z_p2"])
    written = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix in (".csv", ".png"))
    assert b"ID_p" not in written and b"Doe" not in written and b"p1_hfs" not in written and b"p3_broken" not in written
    assert "<plan_03 folder>" in summary[2]["error"]

    with pytest.raises(FlaxdoseError, match="--overwrite"):  # a rerun neither piles files up nor mixes runs
        predict_dicom_folder(Model.load(workdir), root, out)
    with pytest.raises(FlaxdoseError, match="inside the export root"):
        predict_dicom_folder(Model.load(workdir), root, root / "p1_hfs" / "out")


def rename_roi(rtstruct, old, new):
    ds = pydicom.dcmread(rtstruct)
    next(r for r in ds.StructureSetROISequence if r.ROIName == old).ROIName = new
    ds.save_as(rtstruct)


def test_aliases_and_a_prediction_kept_when_its_export_is_refused(workdir, tmp_path, monkeypatch):
    """--aliases maps a clinic's ROI name (predict had no such flag); when a plan's RTDOSE cannot be written the
    prediction is kept (prediction.npz), its metrics on the model grid, the plan listed as not exported (issue
    25, item 5: never discard a computed prediction because the export step refused)."""
    root = tmp_path / "exports"
    renamed = F.write_export(root / "a_rektum")
    rename_roi(renamed["struct"], "rectum", "Rektum_wall")
    F.write_export(root / "b_refused", patient_id="P2")
    model = inference.Model.load(workdir, full_volume=True)
    real = inference.export_plan_rtdose

    def refuse_b(predicted, plan, out, **kwargs):
        if "b_refused" in str(plan.label):
            raise FlaxdoseError("refused for the test")
        return real(predicted, plan, out, **kwargs)

    monkeypatch.setattr(dicom_plans, "export_plan_rtdose", refuse_b)
    lines = []
    results = inference.predict_dicom_folder(model, root, tmp_path / "out", figures=False, echo=lines.append,
                                             aliases=AliasTable({"Rectum": ["Rektum_wall"]}))
    first, second = results
    assert not first.error and first.rtdose.is_file() and first.metrics["Rectum Dmean"] > 0
    assert second.rtdose is None and "refused for the test" in second.error and "prediction.npz" in second.error
    kept = Case.load(second.saved)
    assert kept.dose is not None and kept.spacing_mm == (4.0, 4.0, 5.0) and kept.dose.max() > 0
    assert second.grid.startswith("model grid 4x4x5 mm") and "NOT EXPORTED" in lines[2] and lines[0].startswith("2 plan(s) under")
    monkeypatch.setattr(dicom_plans, "export_plan_rtdose", real)
    without = inference.predict_dicom_folder(model, root, tmp_path / "out2", figures=False)
    assert "Rektum_wall" in without[0].error and "--aliases FILE" in without[0].error


def test_true_reasons(workdir, tmp_path):
    """An RTDOSE on another frame of reference is named as such (not "no RTDOSE"); a missing workdir is
    missing (not "checkpoint path ... does not exist")."""
    export = F.write_export(tmp_path / "p")
    ds = pydicom.dcmread(export["dose"])
    ds.FrameOfReferenceUID = generate_uid()
    ds.save_as(export["dose"])
    with pytest.raises(FlaxdoseError, match="RTDOSE in .* is on frame of reference .* another plan or another CT"):
        planqa.read_dicom_plans(export["folder"], planqa.Ensemble([Model.load(workdir)]))
    with pytest.raises(FlaxdoseError, match="--workdir .*nonesuch does not exist; give a training workdir"):
        predict.check_run_exists(str(tmp_path / "nonesuch"), "--workdir")


def test_import_like_a_run_then_evaluate_every_split(workdir, tmp_path):
    """import_dicom --like WORKDIR writes cases on the grid the run's model predicts on, so evaluate (--split all:
    an import without a test split) runs on them with no spacing given by hand."""
    F.write_export(tmp_path / "src" / "p1", "FFS")
    proc = subprocess.run([sys.executable, "-m", "flaxdose.import_dicom", str(tmp_path / "src"),
                           f"--out={tmp_path / 'ds'}", f"--like={workdir}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dataset = Dataset.open(tmp_path / "ds")
    assert "test" not in dataset.splits or not dataset.split("test")
    cases = [dataset.load(i) for ids in dataset.splits.values() for i in ids]
    assert len(cases) == 1 and all(c.spacing_mm == (4.0, 4.0, 5.0) and c.shape == (120, 120, 38) for c in cases)
    summary = evaluate_workdirs([workdir], tmp_path / "ds", "all", tmp_path / "report", batch_size=64)
    assert not summary.get("failed_cases"), summary.get("failed_cases")
    assert (tmp_path / "report" / "report.md").is_file()
    rows = {(r["structure"], r["metric"]): r for r in read_csv(tmp_path / "report" / "clinical_metrics.csv")}
    case = cases[0]
    rectum = case.dose[case.mask("Rectum")]
    assert float(rows["Rectum", "V50Gy[%]"]["reference"]) == pytest.approx(100 * np.mean(rectum >= 50), abs=1e-3)
    assert rows["Rectum", "V50Gy[%]"]["grid"] == "model grid 4x4x5 mm, 120x120x38 voxels"
    assert float(rows["PTV", "D95[%]"]["reference"]) == pytest.approx(
        100 * dvh(case.dose[case.mask("PTV")])["D95"] / case.prescription_gy, abs=1e-3)


def test_one_patient_rtdose_out(workdir, tmp_path):
    """--rtdose_out: a .dcm name is that file (not a folder); a folder gets one fixed name; a rerun replaces
    it only with --overwrite (refused before predicting), so files never pile up."""
    export = F.write_export(tmp_path / "patient")
    add_second_ct_series(export["folder"])  # the export of issue 25 item 5: two CT series, one referenced
    model = Model.load(workdir, full_volume=True)
    result = predict_dicom_patient(model, export["folder"], tmp_path / "out" / "pred.dcm", bits=16)
    assert result.rtdose == tmp_path / "out" / "pred.dcm" and result.rtdose.is_file()
    assert result.grid == "RTDOSE grid 2x2.5x2.5 mm, 64x48x32 voxels" and result.metrics["PTV D95"] > 0
    with pytest.raises(FlaxdoseError, match="exists; pass --overwrite"):
        predict_dicom_patient(model, export["folder"], tmp_path / "out" / "pred.dcm")
    again = predict_dicom_patient(model, export["folder"], tmp_path / "out" / "pred.dcm", overwrite=True, bits=16)
    folder = predict_dicom_patient(model, export["folder"], tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["RD_flaxdose.dcm", "pred.dcm"]
    assert folder.rtdose.name == "RD_flaxdose.dcm" and again.rtdose == result.rtdose
    ds = pydicom.dcmread(result.rtdose)
    assert ds.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == export["plan_uid"]
    assert dciodvfy_errors(result.rtdose) == []


def test_an_archived_patient_under_an_export_root_is_a_failure_not_skipped(tmp_path):
    """predict --dicom does not unpack archives: a zipped patient beside a folder is a failed entry naming the
    zip (so the command exits 1), never left out unseen."""
    root = tmp_path / "root"
    F.write_export(root / "p1", with_ct=False)
    F.write_export(tmp_path / "p2", with_ct=False, patient_id="PAT002")
    with zipfile.ZipFile(root / "p2.zip", "w") as z:
        for f in sorted((tmp_path / "p2").rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(tmp_path))
    plans = find_dicom_plans(root)
    assert len(plans) == 2  # the folder's plan and the zip
    failed = [p for p in plans if p.problem]
    assert len(failed) == 1 and "p2.zip" in failed[0].problem and "unpack" in failed[0].problem


def test_a_folder_without_dicom_is_one_error_not_a_failed_plan_per_file(tmp_path):
    """A training workdir given as --dicom by mistake (orbax's Zstandard files, JSON): one error naming what was found,
    never a 'plan' per compressed file; an export root of only zipped patients is told to unpack them."""
    work = tmp_path / "work"
    (work / "checkpoints" / "250" / "d").mkdir(parents=True)
    for i in range(5):
        (work / "checkpoints" / "250" / "d" / f"chunk{i}").write_bytes(b"\x28\xb5\x2f\xfd" + bytes(64))
    (work / "config.json").write_text("{}")
    with pytest.raises(FlaxdoseError, match=r"no DICOM files found under .*work, only 5 archive\(s\) .*chunk0, .*chunk1, "
                                            r".*chunk2 and 2 more\); if they are exports, unpack"):
        find_dicom_plans(work)
    zipped = tmp_path / "zipped"
    F.write_export(tmp_path / "p", with_ct=False)
    zipped.mkdir()
    with zipfile.ZipFile(zipped / "p.zip", "w") as z:
        for f in sorted((tmp_path / "p").rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(tmp_path))
    with pytest.raises(FlaxdoseError, match=r"only 1 archive\(s\) .*p\.zip\); if they are exports, unpack them"):
        find_dicom_plans(zipped)
