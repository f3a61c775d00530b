"""The clinical path as a physicist walks it (issue 30): an export root in, a folder out, DVH numbers that an
independent per-plane calculation on the written RTDOSE agrees with, RTDOSE files dciodvfy accepts; and the
prediction written onto the CT series the case was read from when an export holds two (issue 25, item 5).

Every expected value is computed here: DVH metrics by rasterizing each RTSTRUCT contour on each RTDOSE plane
(matplotlib's point-in-polygon, even-odd across a ROI's contours) with the dose read by pydicom alone."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import dicom_factory as F
import numpy as np
import pydicom
import pytest
from matplotlib.path import Path as PolygonPath
from pydicom.uid import generate_uid

from flaxdose import trainer

ROI_NAME = {canonical: name for _, name, canonical, _ in F.ROIS if canonical}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny model on the phantom plans (4 x 4 x 5 mm): numbers need not be good, only traceable."""
    from conftest import tiny_config

    workdir = tmp_path_factory.mktemp("clinical_run")
    trainer.train_and_evaluate(tiny_config(**{"train.steps": 6, "data.phantom_shape": (24, 24, 16)}), workdir)
    return workdir


# ------------------------------------------------------------------ independent readers
def rtdose_planes(path):
    """(dose (frames, rows, cols) Gy, x (rows, cols) mm, y (rows, cols) mm, z (frames,) mm) by pydicom alone."""
    ds = pydicom.dcmread(path)
    dose = ds.pixel_array.astype(np.float64) * float(ds.DoseGridScaling)
    if dose.ndim == 2:
        dose = dose[None]
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    r, c = iop[:3], iop[3:]
    n = np.cross(r, c)
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    row_mm, col_mm = (float(v) for v in ds.PixelSpacing)
    jj, ii = np.meshgrid(np.arange(ds.Columns), np.arange(ds.Rows))  # (rows, cols): column j, row i
    points = ipp[None, None, :] + jj[..., None] * col_mm * r + ii[..., None] * row_mm * c
    offsets = np.array([float(v) for v in ds.GridFrameOffsetVector])
    z = ipp[2] + offsets * n[2]
    return dose, points[..., 0], points[..., 1], z


def roi_contours(rtstruct, roi_name):
    """{plane z (rounded to 0.01 mm): [(N, 2) x, y polygons]} of one ROI."""
    ds = pydicom.dcmread(rtstruct)
    number = next(int(r.ROINumber) for r in ds.StructureSetROISequence if r.ROIName == roi_name)
    item = next(rc for rc in ds.ROIContourSequence if int(rc.ReferencedROINumber) == number)
    planes = {}
    for contour in item.ContourSequence:
        pts = np.array([float(v) for v in contour.ContourData]).reshape(-1, 3)
        planes.setdefault(round(float(pts[0, 2]), 2), []).append(pts[:, :2])
    return planes


def per_plane_doses(rtdose, rtstruct, roi_name):
    """The dose of every RTDOSE voxel whose centre lies inside the ROI on its plane (even-odd rule)."""
    dose, x, y, z = rtdose_planes(rtdose)
    contours = roi_contours(rtstruct, roi_name)
    centres = np.stack([x.ravel(), y.ravel()], 1)
    values = []
    for k, zk in enumerate(z):
        polygons = contours.get(round(float(zk), 2), [])
        inside = np.zeros(len(centres), bool)
        for polygon in polygons:
            inside ^= PolygonPath(polygon).contains_points(centres)
        values.append(dose[k].ravel()[inside])
    return np.concatenate(values)


def dvh(values):
    """Dmean, D2, D95, D98 (Gy): Dx = the dose of the ceil(n x / 100)-th hottest voxel."""
    hot = np.sort(values)[::-1]
    d = lambda x: float(hot[max(int(np.ceil(len(hot) * x / 100 - 1e-9)), 1) - 1])
    return {"Dmean": float(values.mean()), "D2": d(2), "D95": d(95), "D98": d(98)}


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


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
