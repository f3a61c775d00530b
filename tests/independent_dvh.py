"""An independent DVH of an RTDOSE and an RTSTRUCT, as a planning system or dicompyler computes it: each ROI
contour rasterized on each RTDOSE plane (matplotlib's point-in-polygon at the pixel centres, even-odd across a
ROI's contours on a plane), the dose read with pydicom alone. Test helper: no flaxdose code is used."""

from __future__ import annotations

import csv

import dicom_factory as F
import numpy as np
import pydicom
from matplotlib.path import Path as PolygonPath

ROI_NAME = {canonical: name for _, name, canonical, _ in F.ROIS if canonical}


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
