"""The clinical path as a physicist walks it (issue 30): an export root in, a folder out, DVH numbers that an
independent per-plane calculation on the written RTDOSE agrees with, RTDOSE files dciodvfy accepts; and the
prediction written onto the CT series the case was read from when an export holds two (issue 25, item 5).

Every expected value is computed here: DVH metrics by rasterizing each RTSTRUCT contour on each RTDOSE plane
(matplotlib's point-in-polygon, even-odd across a ROI's contours) with the dose read by pydicom alone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import dicom_factory as F
import numpy as np
import pydicom
import pytest
from independent_dvh import ROI_NAME, dvh, per_plane_doses, read_csv, rtdose_planes
from pydicom.uid import generate_uid

from flaxdose import trainer


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny model on the phantom plans (4 x 4 x 5 mm): numbers need not be good, only traceable."""
    from conftest import tiny_config

    workdir = tmp_path_factory.mktemp("clinical_run")
    trainer.train_and_evaluate(tiny_config(**{"train.steps": 6, "data.phantom_shape": (24, 24, 16)}), workdir)
    return workdir


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
    """dciodvfy's Error lines for one file (its report must name the RT Dose IOD)."""
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
    for name, patient in (("plan_01", "p1_hfs"), ("plan_02", "p2_ffs")):
        rd = out / name / "RD_flaxdose.dcm"
        ds = pydicom.dcmread(rd)
        plan = pydicom.dcmread(made[patient]["plan"])
        assert ds.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == plan.SOPInstanceUID
        assert ds.FrameOfReferenceUID == made[patient]["for"] and ds.Manufacturer == "flaxdose"
        assert ds.BitsAllocated == 16
        if shutil.which("dciodvfy"):
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
    assert b"ID_p" not in written and b"Doe" not in written and b"p1_hfs" not in written

    again = subprocess.run([sys.executable, "-m", "flaxdose.predict", f"--workdir={workdir}", f"--dicom={root}",
                            f"--out={out}", "--full_volume"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--overwrite" in again.stderr  # a rerun does not pile files up silently
