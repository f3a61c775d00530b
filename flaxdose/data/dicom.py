"""DICOM-RT import: CT + RTSTRUCT + RTDOSE (+ RTPLAN) -> `Case`, and the dataset import CLI.

    python -m flaxdose.data.dicom import SRC --out DATASET [--aliases FILE] [--grid model|dose]

Conventions (see docs/dicom.md):
- Volumes come out on an axis-aligned grid in the DICOM patient system (LPS), indexed
  [x, y, z] as everywhere in flaxdose. HFS, FFS, HFP, FFP (and decubitus) series are
  flipped/transposed into that order; oblique orientations are rejected.
- Contours (CLOSED_PLANAR) are rasterized at voxel centres: a voxel belongs to an ROI when
  its centre lies inside the polygon or on its boundary; several contours of one ROI on one
  plane combine by XOR (inner contours are holes). A contour plane is a slab one slice thick:
  a voxel centre at height z takes the plane within half a slice spacing of z.
- Dose = stored value x DoseGridScaling, on the RTDOSE's own planes (GridFrameOffsetVector,
  relative or absolute form); resampling to another grid is trilinear.
- ROIs are found by ReferencedROINumber, never by list position; names map onto the
  model's structures through `flaxdose.data.structures`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import secrets
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from flaxdose.data.case import PROSTATE_STRUCTURES, Case, write_dataset
from flaxdose.data.structures import AliasTable, Roi
from flaxdose.errors import FlaxdoseError

# The model grid: the synthetic data's grid (flaxdose.synthetic.anatomy), centred on the PTV.
MODEL_SHAPE = (120, 120, 64)
MODEL_SPACING_MM = (4.0, 4.0, 3.0)

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RTDOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
RTPLAN_STORAGES = ("1.2.840.10008.5.1.4.1.1.481.5", "1.2.840.10008.5.1.4.1.1.481.8")  # RT Plan, RT Ion Plan

_MAX_VOXELS = 600_000_000  # refuse pixel data larger than this (a damaged header)
_AXIS_TOL = 1e-3  # direction cosines closer than this to an axis count as axis-aligned
_EDGE_EPS = 1e-3  # voxel units: a centre this close to a contour edge lies on it


# ---------------------------------------------------------------------------- geometry
@dataclasses.dataclass(frozen=True)
class Grid:
    """An axis-aligned LPS grid: `origin_mm` is the centre of voxel [0, 0, 0]."""

    origin_mm: tuple[float, float, float]
    spacing_mm: tuple[float, float, float]
    shape: tuple[int, int, int]

    def coords(self, axis: int) -> np.ndarray:
        return self.origin_mm[axis] + self.spacing_mm[axis] * np.arange(self.shape[axis], dtype=np.float64)

    def as_dict(self) -> dict:
        return {
            "origin_mm": [round(float(v), 4) for v in self.origin_mm],
            "spacing_mm": [round(float(v), 6) for v in self.spacing_mm],
            "shape": [int(v) for v in self.shape],
        }


def _direction(iop: Sequence[float], what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row, column and normal unit vectors of an axial ImageOrientationPatient; else an error."""
    v = np.asarray(iop, np.float64)
    r, c = v[:3], v[3:]
    nr, nc = np.linalg.norm(r), np.linalg.norm(c)
    if not (nr > 0.5 and nc > 0.5):
        raise FlaxdoseError(f"{what}: ImageOrientationPatient {list(v)} is not two direction cosines")
    r, c = r / nr, c / nc
    snap = lambda u: np.where(np.abs(u) > 1 - _AXIS_TOL, np.sign(u), np.where(np.abs(u) < _AXIS_TOL, 0.0, np.nan))
    rs, cs = snap(r), snap(c)
    if (
        np.isnan(rs).any() or np.isnan(cs).any() or abs(rs).sum() != 1 or abs(cs).sum() != 1
        or rs[2] != 0 or cs[2] != 0 or np.dot(rs, cs) != 0
    ):
        raise FlaxdoseError(
            f"{what}: ImageOrientationPatient {[round(float(x), 4) for x in v]} is oblique or not axial; "
            "flaxdose reads axial series only (HFS, FFS, HFP, FFP, decubitus): re-export the series "
            "reconstructed axially, without gantry tilt"
        )
    return rs, cs, np.cross(rs, cs)


def _lps_layout(shape_fji, ipp0, r, c, n, d_col, d_row, d_frame):
    """How a volume indexed [frame, row, column] maps onto an [x, y, z] LPS grid.

    Voxel (f, j, i) lies at ipp0 + i d_col r + j d_row c + f d_frame n. Returns the axis
    permutation, the axes to flip, and the resulting `Grid`.
    """
    steps = {0: n * d_frame, 1: c * d_row, 2: r * d_col}
    perm, flips, origin, spacing = [], [], [], []
    for k in range(3):
        a = next(a for a, s in steps.items() if s[k] != 0)
        step, count = steps[a][k], shape_fji[a]
        perm.append(a)
        if step < 0:
            flips.append(a)
            origin.append(float(ipp0[k] + (count - 1) * step))
        else:
            origin.append(float(ipp0[k]))
        spacing.append(float(abs(step)))
    grid = Grid(tuple(origin), tuple(spacing), tuple(int(shape_fji[a]) for a in perm))
    return perm, flips, grid


def _to_lps(vol_fji: np.ndarray, perm, flips) -> np.ndarray:
    if flips:
        vol_fji = np.flip(vol_fji, axis=tuple(flips))
    return np.ascontiguousarray(np.transpose(vol_fji, perm))


def _axis_weights(src_coords_idx: np.ndarray, n: int, order: int):
    """Indices and weights of 1-D interpolation at fractional indices; invalid points -> mask."""
    c = np.asarray(src_coords_idx, np.float64)
    if order == 0 or n == 1:
        i = np.rint(c).astype(np.int64)
        valid = (c >= -0.5) & (c <= n - 0.5) if n > 1 or order == 0 else np.abs(c) <= 0.5
        return np.clip(i, 0, n - 1), None, valid
    valid = (c >= -1e-6) & (c <= n - 1 + 1e-6)
    cc = np.clip(c, 0, n - 1)
    i0 = np.clip(np.floor(cc).astype(np.int64), 0, n - 2)
    return i0, cc - i0, valid


def resample(volume: np.ndarray, src: Grid, dst: Grid, order: int = 1, cval: float = 0.0) -> np.ndarray:
    """Resample an [x, y, z] volume from grid `src` onto grid `dst` (both axis-aligned, LPS).

    order=1: trilinear (separable, exact); order=0: nearest. Points outside `src` get `cval`.
    """
    out = np.asarray(volume, np.float32)
    valid_all = []
    for axis in range(3):
        idx = (dst.coords(axis) - src.origin_mm[axis]) / src.spacing_mm[axis]
        i0, w, valid = _axis_weights(idx, out.shape[axis], order)
        if w is None:
            out = np.take(out, i0, axis=axis)
        else:
            shape = [1, 1, 1]
            shape[axis] = -1
            w = w.reshape(shape).astype(np.float32)
            out = np.take(out, i0, axis=axis) * (1 - w) + np.take(out, i0 + 1, axis=axis) * w
        valid_all.append(valid)
    inside = valid_all[0][:, None, None] & valid_all[1][None, :, None] & valid_all[2][None, None, :]
    return np.where(inside, out, np.float32(cval)).astype(np.float32)


# ----------------------------------------------------------------------- rasterizing
def fill_polygon(px: np.ndarray, py: np.ndarray, nx: int, ny: int) -> np.ndarray:
    """Voxel-centre rasterization of one closed polygon given in (fractional) voxel indices.

    Returns bool (nx, ny): True where the centre (i, j) lies inside the polygon (even-odd
    rule) or within `_EDGE_EPS` voxels of its boundary.
    """
    px, py = np.asarray(px, np.float64), np.asarray(py, np.float64)
    mask = np.zeros((nx, ny), bool)
    if px.size < 3 or not (np.isfinite(px).all() and np.isfinite(py).all()):
        return mask
    x1, y1, x2, y2 = px, py, np.roll(px, -1), np.roll(py, -1)
    j_lo, j_hi = max(0, int(np.ceil(py.min()))), min(ny - 1, int(np.floor(py.max())))
    if j_hi >= j_lo and px.max() >= 0 and px.min() <= nx - 1:
        rows = np.arange(j_lo, j_hi + 1, dtype=np.float64)
        ya, yb = y1[:, None], y2[:, None]
        cross = ((ya <= rows) & (yb > rows)) | ((yb <= rows) & (ya > rows))
        e, r = np.nonzero(cross)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = x1[e] + (rows[r] - y1[e]) * (x2[e] - x1[e]) / (y2[e] - y1[e])
        toggle = np.clip(np.floor(xint).astype(np.int64) + 1, 0, nx)
        acc = np.zeros((rows.size, nx + 1), np.int32)
        np.add.at(acc, (r, toggle), 1)
        inside = (np.cumsum(acc[:, :nx], axis=1) % 2).astype(bool)  # (rows, nx)
        mask[:, j_lo : j_hi + 1] = inside.T
    # boundary: lattice points on the edges (a contour traced through voxel centres)
    dx, dy = x2 - x1, y2 - y1
    for flat in (True, False):
        sel = (np.abs(dx) >= np.abs(dy)) if flat else (np.abs(dx) < np.abs(dy))
        a1, b1, da, db = (x1, y1, dx, dy) if flat else (y1, x1, dy, dx)
        a1, b1, da, db = a1[sel], b1[sel], da[sel], db[sel]
        keep = da != 0
        a1, b1, da, db = a1[keep], b1[keep], da[keep], db[keep]
        if a1.size == 0:
            continue
        lo = np.ceil(np.minimum(a1, a1 + da) - _EDGE_EPS).astype(np.int64)
        hi = np.floor(np.maximum(a1, a1 + da) + _EDGE_EPS).astype(np.int64)
        counts = np.clip(hi - lo + 1, 0, None)
        total = int(counts.sum())
        if total == 0 or total > 50_000_000:
            continue
        edge = np.repeat(np.arange(a1.size), counts)
        a = lo[edge] + (np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts))
        b = b1[edge] + (a - a1[edge]) * db[edge] / da[edge]
        bi = np.rint(b).astype(np.int64)
        ok = np.abs(b - bi) <= _EDGE_EPS
        i, j = (a[ok], bi[ok]) if flat else (bi[ok], a[ok])
        ok = (i >= 0) & (i < nx) & (j >= 0) & (j < ny)
        mask[i[ok], j[ok]] = True
    return mask


@dataclasses.dataclass
class _Contours:
    """One ROI's closed contours grouped by plane index; planes_z are the slab centres."""

    by_plane: dict[int, list[np.ndarray]]  # plane -> list of (K, 2) x/y mm


def rasterize(contours: _Contours, planes_z: np.ndarray, plane_spacing: float, grid: Grid) -> np.ndarray:
    """bool (X, Y, Z) mask of one ROI on `grid` (voxel-centre inclusion, XOR per plane)."""
    nx, ny, nz = grid.shape
    mask = np.zeros(grid.shape, bool)
    if not contours.by_plane:
        return mask
    zs = grid.coords(2)
    nearest = np.abs(zs[:, None] - planes_z[None, :]).argmin(axis=1)
    near_ok = np.abs(zs - planes_z[nearest]) <= plane_spacing / 2 + 1e-3
    cache: dict[int, np.ndarray] = {}
    for k in range(nz):
        p = int(nearest[k])
        if not near_ok[k] or p not in contours.by_plane:
            continue
        if p not in cache:
            plane = np.zeros((nx, ny), bool)
            for pts in contours.by_plane[p]:
                ix = (pts[:, 0] - grid.origin_mm[0]) / grid.spacing_mm[0]
                iy = (pts[:, 1] - grid.origin_mm[1]) / grid.spacing_mm[1]
                plane ^= fill_polygon(ix, iy, nx, ny)
            cache[p] = plane
        mask[:, :, k] = cache[p]
    return mask


# ---------------------------------------------------------------------- pydicom access
@contextlib.contextmanager
def _guard(path, what: str):
    """Turn anything pydicom or a damaged file raises into a FlaxdoseError naming the file."""
    try:
        yield
    except FlaxdoseError:
        raise
    except MemoryError:
        raise FlaxdoseError(f"{path}: {what}: the file asks for more memory than available; it is damaged") from None
    except Exception as e:  # noqa: BLE001 - a damaged file can raise anything inside pydicom
        raise FlaxdoseError(
            f"{path}: cannot read {what} ({type(e).__name__}: {str(e)[:200]}); the file is damaged or "
            "not a valid DICOM-RT object: re-export it from the planning system"
        ) from None


def _get(ds, keyword: str, path, required: bool = True):
    value = ds.get(keyword) if hasattr(ds, "get") else None
    if value is None or (not isinstance(value, (str, bytes)) and hasattr(value, "__len__") and len(value) == 0):
        if required:
            raise FlaxdoseError(
                f"{path}: required attribute {keyword} is missing; re-export the file from the planning system"
            )
        return None
    return value


def _floats(ds, keyword: str, path, n: int | None = None, required: bool = True) -> np.ndarray | None:
    value = _get(ds, keyword, path, required)
    if value is None:
        return None
    try:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            value = [value]
        values = [float(v) for v in value]
    except (TypeError, ValueError):
        raise FlaxdoseError(f"{path}: {keyword} = {str(value)[:80]!r} is not numeric") from None
    out = np.asarray(values, np.float64)
    if (n is not None and out.size != n) or not np.isfinite(out).all():
        raise FlaxdoseError(f"{path}: {keyword} must be {n or 'some'} finite numbers, got {str(value)[:80]!r}")
    return out


def _int(ds, keyword: str, path, lo: int = 1, hi: int = 1 << 20, default=None) -> int:
    value = ds.get(keyword, default) if hasattr(ds, "get") else default
    if value is None:
        raise FlaxdoseError(f"{path}: required attribute {keyword} is missing; re-export the file")
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise FlaxdoseError(f"{path}: {keyword} = {value!r} is not an integer") from None
    if not lo <= out <= hi:
        raise FlaxdoseError(f"{path}: {keyword} = {out} is out of range [{lo}, {hi}]; the file is damaged")
    return out


def _str(ds, keyword: str) -> str:
    try:
        value = ds.get(keyword, "")
        return "" if value is None else str(value).strip()
    except Exception:  # noqa: BLE001
        return ""


@dataclasses.dataclass
class DicomFile:
    """Header facts of one DICOM file, enough to group files into plans."""

    path: Path
    modality: str
    sop_class: str
    sop_uid: str
    patient_id: str
    study_uid: str
    series_uid: str
    for_uid: str
    ref_plan_uid: str = ""
    ref_struct_uid: str = ""
    ref_series_uid: str = ""
    dose_summation: str = ""


def _read(path, stop_before_pixels: bool):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
        if "SOPClassUID" not in ds and "Modality" not in ds:
            raise
        return ds


def _header(path: Path) -> DicomFile | None:
    """Header facts, or None for a file that is not DICOM. Damaged DICOM -> FlaxdoseError."""
    import warnings

    from pydicom.errors import InvalidDicomError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = _read(path, stop_before_pixels=True)
        except InvalidDicomError:
            return None
        except FlaxdoseError:
            raise
        except Exception as e:  # noqa: BLE001
            raise FlaxdoseError(f"{path}: unreadable DICOM file ({type(e).__name__}: {str(e)[:120]})") from None
        with _guard(path, "the DICOM header"):
            sop_class = _str(ds, "SOPClassUID")
            modality = _str(ds, "Modality").upper()
            if not modality:
                modality = {CT_STORAGE: "CT", RTDOSE_STORAGE: "RTDOSE", RTSTRUCT_STORAGE: "RTSTRUCT"}.get(sop_class, "")
                modality = modality or ("RTPLAN" if sop_class in RTPLAN_STORAGES else "")
            f = DicomFile(
                path=Path(path), modality=modality, sop_class=sop_class, sop_uid=_str(ds, "SOPInstanceUID"),
                patient_id=_str(ds, "PatientID"), study_uid=_str(ds, "StudyInstanceUID"),
                series_uid=_str(ds, "SeriesInstanceUID"), for_uid=_str(ds, "FrameOfReferenceUID"),
            )
            if modality == "RTSTRUCT":
                refs = ds.get("ReferencedFrameOfReferenceSequence") or []
                if not f.for_uid and refs:
                    f.for_uid = _str(refs[0], "FrameOfReferenceUID")
                for ref in refs:
                    for study in ref.get("RTReferencedStudySequence") or []:
                        for series in study.get("RTReferencedSeriesSequence") or []:
                            f.ref_series_uid = f.ref_series_uid or _str(series, "SeriesInstanceUID")
            elif modality == "RTDOSE":
                plans = ds.get("ReferencedRTPlanSequence") or []
                f.ref_plan_uid = _str(plans[0], "ReferencedSOPInstanceUID") if plans else ""
                f.dose_summation = _str(ds, "DoseSummationType").upper()
            elif modality == "RTPLAN":
                sets = ds.get("ReferencedStructureSetSequence") or []
                f.ref_struct_uid = _str(sets[0], "ReferencedSOPInstanceUID") if sets else ""
        return f


def scan(paths: str | os.PathLike | Iterable[str | os.PathLike], progress: bool = False):
    """Headers of every DICOM file under `paths` (files or folders, searched recursively).

    Returns (files, problems): `problems` lists (path, message) of damaged DICOM files;
    files that are not DICOM at all are ignored.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    candidates = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            candidates += sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
        elif p.is_file():
            candidates.append(p)
        else:
            raise FlaxdoseError(f"{p} does not exist; pass DICOM files or folders that hold them")
    files, problems = [], []
    iterator = candidates
    if progress:
        from tqdm import tqdm

        iterator = tqdm(candidates, desc="scanning", unit="file", file=sys.stderr)
    for path in iterator:
        try:
            f = _header(path)
        except FlaxdoseError as e:
            problems.append((str(path), str(e)))
            continue
        if f is not None:
            files.append(f)
    return files, problems


@dataclasses.dataclass
class PlanFiles:
    """The files of one plan: CT series, structure set, dose, plan (some may be absent)."""

    patient_id: str
    for_uid: str
    study_uid: str
    struct: DicomFile | None
    ct: list[DicomFile]
    dose: DicomFile | None
    plan: DicomFile | None
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def label(self) -> str:
        """Where the plan lives on disk (for console messages only, never stored)."""
        f = self.struct or self.dose or (self.ct[0] if self.ct else None)
        return str(f.path.parent) if f else "?"


def group_plans(files: Sequence[DicomFile]) -> dict[str, list[PlanFiles] | str]:
    """Group files by patient and frame of reference into plans.

    Returns {patient_id: [PlanFiles, ...]} or {patient_id: "why no plan was found"}.
    A frame of reference with several PLAN doses gives one plan per dose.
    """
    by_patient: dict[str, list[DicomFile]] = defaultdict(list)
    for f in files:
        by_patient[f.patient_id].append(f)
    out: dict[str, list[PlanFiles] | str] = {}
    for pid, pfiles in by_patient.items():
        plans_by_uid = {f.sop_uid: f for f in pfiles if f.modality == "RTPLAN"}
        structs_by_uid = {f.sop_uid: f for f in pfiles if f.modality == "RTSTRUCT"}
        by_for: dict[str, list[DicomFile]] = defaultdict(list)
        for f in pfiles:
            by_for[f.for_uid].append(f)
        plans: list[PlanFiles] = []
        reasons = []
        for for_uid, group in by_for.items():
            kinds = defaultdict(list)
            for f in group:
                kinds[f.modality].append(f)
            structs, doses = kinds["RTSTRUCT"], kinds["RTDOSE"]
            if not structs:
                if doses or kinds["CT"]:
                    reasons.append(
                        f"frame of reference with {len(kinds['CT'])} CT slices and {len(doses)} RTDOSE "
                        "but no RTSTRUCT; export the structure set too"
                    )
                continue
            plan_doses = [d for d in doses if d.dose_summation in ("PLAN", "")] or doses
            for dose in plan_doses or [None]:
                plan = plans_by_uid.get(dose.ref_plan_uid) if dose is not None and dose.ref_plan_uid else None
                if plan is None:
                    same_for = [p for p in kinds["RTPLAN"]] or [
                        p for p in plans_by_uid.values() if not p.for_uid
                    ]
                    plan = same_for[0] if len(same_for) == 1 else None
                problems = []
                struct = structs[0]
                if len(structs) > 1:
                    referenced = structs_by_uid.get(plan.ref_struct_uid) if plan is not None else None
                    if referenced is None:
                        problems.append(
                            f"{len(structs)} structure sets share one frame of reference "
                            f"({[s.path.name for s in structs]}) and no RTPLAN says which one belongs to the "
                            "dose; export one structure set per plan"
                        )
                    struct = referenced or struct
                cts = kinds["CT"]
                series = sorted({c.series_uid for c in cts})
                if len(series) > 1:
                    chosen = struct.ref_series_uid if struct.ref_series_uid in series else None
                    if chosen is None:
                        problems.append(
                            f"{len(series)} CT series share the frame of reference and the structure set "
                            "names none of them; export only the planning CT"
                        )
                    else:
                        cts = [c for c in cts if c.series_uid == chosen]
                plans.append(PlanFiles(pid, for_uid, struct.study_uid, struct, cts, dose, plan, problems))
        out[pid] = plans if plans else ("; ".join(reasons) or "no RTSTRUCT found")
    return out


# ------------------------------------------------------------------------ the readers
def _load_full(f: DicomFile):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _guard(f.path, f.modality or "the file"):
            return _read(f.path, stop_before_pixels=False)


def _pixels(ds, path, frames: int) -> np.ndarray:
    rows, cols = _int(ds, "Rows", path, 1, 16384), _int(ds, "Columns", path, 1, 16384)
    if rows * cols * frames > _MAX_VOXELS:
        raise FlaxdoseError(f"{path}: {rows}x{cols}x{frames} voxels is implausibly large; the header is damaged")
    with _guard(path, "the pixel data"):
        arr = np.asarray(ds.pixel_array)
    if frames == 1 and arr.ndim == 2:
        arr = arr[None]
    if arr.shape != (frames, rows, cols):
        raise FlaxdoseError(
            f"{path}: pixel data has shape {arr.shape}, expected {(frames, rows, cols)} from the header; "
            "the file is damaged"
        )
    return arr


@dataclasses.dataclass
class CtSeries:
    grid: Grid
    slices_z: np.ndarray  # sorted slice positions (patient z)
    slice_spacing: float
    hu: np.ndarray | None  # [x, y, z] HU when loaded
    patient_position: str


def read_ct(files: Sequence[DicomFile], load_pixels: bool = True) -> CtSeries:
    """One axial CT series on an LPS grid; rejects gaps, duplicates and non-uniform spacing."""
    if not files:
        raise FlaxdoseError("no CT slices found; export the planning CT with the plan")
    items = []
    for f in files:
        ds = _load_full(f) if load_pixels else None
        if ds is None:
            ds = _read_header_ds(f.path)
        with _guard(f.path, "the CT slice geometry"):
            iop = _floats(ds, "ImageOrientationPatient", f.path, 6)
            ipp = _floats(ds, "ImagePositionPatient", f.path, 3)
            ps = _floats(ds, "PixelSpacing", f.path, 2)
            rows, cols = _int(ds, "Rows", f.path, 1, 16384), _int(ds, "Columns", f.path, 1, 16384)
            if (ps <= 0).any():
                raise FlaxdoseError(f"{f.path}: PixelSpacing {list(ps)} must be positive")
            items.append((f, ds, iop, ipp, ps, rows, cols))
    f0, _, iop0, _, ps0, rows0, cols0 = items[0]
    r, c, n = _direction(iop0, f"CT {f0.path}")
    for f, _, iop, _, ps, rows, cols in items[1:]:
        if np.abs(iop - iop0).max() > 1e-4 or np.abs(ps - ps0).max() > 1e-4 or (rows, cols) != (rows0, cols0):
            raise FlaxdoseError(
                f"CT slice {f.path} differs from {f0.path} in orientation, pixel spacing or size; "
                "the folder mixes CT series: export only the planning CT"
            )
    s = np.array([np.dot(it[3], n) for it in items])
    order = np.argsort(s, kind="stable")
    items = [items[i] for i in order]
    s = s[order]
    inplane = np.array([it[3] - np.dot(it[3], n) * n for it in items])
    if np.abs(inplane - inplane[0]).max() > 0.01 * min(ps0) + 1e-3:
        raise FlaxdoseError(
            f"CT slices of {f0.path.parent} are not stacked along the slice normal (tilted gantry or mixed "
            "series); re-export the series reconstructed axially without tilt"
        )
    if len(items) > 1:
        diffs = np.diff(s)
        if diffs.min() < 1e-3:
            i = int(diffs.argmin())
            raise FlaxdoseError(
                f"CT slices {items[i][0].path.name} and {items[i + 1][0].path.name} lie at the same position "
                f"({s[i]:.2f} mm); the folder holds a duplicate slice or two series: export one series once"
            )
        spacing = float(np.median(diffs))
        bad = np.abs(diffs - spacing) > max(0.01, 0.01 * spacing)
        if bad.any():
            i = int(np.nonzero(bad)[0][0])
            gap = diffs[i] / spacing
            if abs(gap - round(gap)) < 0.05 and round(gap) >= 2:
                raise FlaxdoseError(
                    f"the CT series in {f0.path.parent} has {int(round(gap)) - 1} missing slice(s) between "
                    f"{s[i]:.2f} and {s[i + 1]:.2f} mm (slice spacing {spacing:.2f} mm); re-export the complete "
                    "series, flaxdose never imports a CT with shifted slices"
                )
            raise FlaxdoseError(
                f"the CT series in {f0.path.parent} has non-uniform slice spacing ({diffs.min():.2f}.."
                f"{diffs.max():.2f} mm); re-export it with uniform spacing"
            )
    else:
        thickness = _floats(items[0][1], "SliceThickness", f0.path, 1, required=False)
        spacing = float(thickness[0]) if thickness is not None and thickness[0] > 0 else float(ps0[0])
    ipp0 = items[0][3]
    perm, flips, grid = _lps_layout((len(items), rows0, cols0), ipp0, r, c, n, ps0[1], ps0[0], spacing)
    hu = None
    if load_pixels:
        stack = np.empty((len(items), rows0, cols0), np.float32)
        for k, (f, ds, *_rest) in enumerate(items):
            with _guard(f.path, "the CT rescale"):
                slope = float(ds.get("RescaleSlope", 1) or 1)
                intercept = float(ds.get("RescaleIntercept", 0) or 0)
            stack[k] = _pixels(ds, f.path, 1)[0].astype(np.float32) * slope + intercept
        hu = _to_lps(stack, perm, flips)
    position = _str(items[0][1], "PatientPosition") if items[0][1] is not None else ""
    return CtSeries(grid, np.sort(ipp0[2] + (s - s[0]) * n[2]), spacing, hu, position)


def _read_header_ds(path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _guard(path, "the header"):
            return _read(path, stop_before_pixels=True)


def read_dose(path: str | os.PathLike, require_gy: bool = True) -> tuple[np.ndarray, Grid]:
    """An RTDOSE file as (dose in Gy indexed [x, y, z], its LPS `Grid`).

    `require_gy=False` also accepts DoseUnits RELATIVE (values then are in the file's units).
    """
    path = Path(path)
    f = DicomFile(path, "RTDOSE", "", "", "", "", "", "")
    ds = _load_full(f)
    with _guard(path, "the RTDOSE"):
        units = _str(ds, "DoseUnits").upper()
        if units != "GY" and (require_gy or units != "RELATIVE"):
            raise FlaxdoseError(
                f"{path}: DoseUnits is {units or 'missing'}; flaxdose needs absolute dose (GY): export the "
                "dose in Gy, not relative"
            )
        frames = _int(ds, "NumberOfFrames", path, 1, 10000, default=1)
        iop = _floats(ds, "ImageOrientationPatient", path, 6)
        ipp = _floats(ds, "ImagePositionPatient", path, 3)
        ps = _floats(ds, "PixelSpacing", path, 2)
        if (ps <= 0).any():
            raise FlaxdoseError(f"{path}: PixelSpacing {list(ps)} must be positive")
        scaling = _floats(ds, "DoseGridScaling", path, 1)[0]
        if not scaling > 0:
            raise FlaxdoseError(f"{path}: DoseGridScaling {scaling} must be positive")
        r, c, n = _direction(iop, f"RTDOSE {path}")
        offsets = _floats(ds, "GridFrameOffsetVector", path, required=frames > 1)
        if offsets is None:
            offsets = np.zeros(1)
            thickness = _floats(ds, "SliceThickness", path, 1, required=False)
            frame_spacing = float(thickness[0]) if thickness is not None and thickness[0] > 0 else 1.0
        if offsets.size != frames:
            raise FlaxdoseError(
                f"{path}: GridFrameOffsetVector has {offsets.size} values for {frames} frames; the file is damaged"
            )
        if offsets[0] == 0:
            s = offsets.copy()  # relative form: offsets along the normal from ImagePositionPatient
        else:  # absolute form: the z coordinates of the planes (standard orientation only)
            if abs(offsets[0] - ipp[2]) > 1e-3 * max(1.0, abs(ipp[2])):
                raise FlaxdoseError(
                    f"{path}: GridFrameOffsetVector starts at {offsets[0]}, neither 0 (relative form) nor the "
                    f"z of ImagePositionPatient {ipp[2]} (absolute form); the file is damaged"
                )
            s = (offsets - ipp[2]) * n[2]
        pixels = _pixels(ds, path, frames)
        order = np.argsort(s, kind="stable")
        s = s[order]
        if frames > 1:
            diffs = np.diff(s)
            frame_spacing = float(np.median(diffs))
            if diffs.min() <= 1e-3 or np.abs(diffs - frame_spacing).max() > max(0.01, 0.01 * frame_spacing):
                raise FlaxdoseError(
                    f"{path}: dose planes are not uniformly spaced (GridFrameOffsetVector {list(offsets)[:6]}...); "
                    "export the dose on a regular grid"
                )
        ipp0 = ipp + s[0] * n
        dose = pixels[order].astype(np.float64) * scaling
        perm, flips, grid = _lps_layout(dose.shape, ipp0, r, c, n, ps[1], ps[0], frame_spacing)
        dose = _to_lps(dose.astype(np.float32), perm, flips)
    if not np.isfinite(dose).all():
        raise FlaxdoseError(f"{path}: dose holds non-finite values; the file is damaged")
    return dose, grid


def read_prescription(path: str | os.PathLike) -> tuple[float | None, str]:
    """Prescription (Gy) from an RTPLAN: the largest TargetPrescriptionDose, else the
    fraction dose (sum of BeamDose) x NumberOfFractionsPlanned. Returns (value or None, source)."""
    path = Path(path)
    ds = _load_full(DicomFile(path, "RTPLAN", "", "", "", "", "", ""))
    with _guard(path, "the RTPLAN prescription"):
        targets = []
        for item in ds.get("DoseReferenceSequence") or []:
            if item.get("TargetPrescriptionDose") is not None:
                targets.append(float(item.TargetPrescriptionDose))
        targets = [t for t in targets if np.isfinite(t) and t > 0]
        if targets:
            return max(targets), "RTPLAN TargetPrescriptionDose"
        total = 0.0
        for group in ds.get("FractionGroupSequence") or []:
            fractions = int(group.get("NumberOfFractionsPlanned") or 0)
            per_fraction = sum(
                float(b.BeamDose) for b in group.get("ReferencedBeamSequence") or [] if b.get("BeamDose") is not None
            )
            total += fractions * per_fraction
        if np.isfinite(total) and total > 0:
            return float(total), "RTPLAN beam dose x fractions"
    return None, "none"


@dataclasses.dataclass
class StructureSet:
    rois: list[Roi]
    path: Path
    _ds: object

    def contours(self, roi: Roi) -> list[tuple[float, np.ndarray]]:
        """The closed planar contours of `roi` (found by ReferencedROINumber) as (z, (K, 2) x/y)."""
        out = []
        with _guard(self.path, f"the contours of ROI {roi.name!r}"):
            items = [
                item for item in self._ds.get("ROIContourSequence") or []
                if item.get("ReferencedROINumber") is not None and int(item.ReferencedROINumber) == roi.number
            ]
            if len(items) > 1:
                raise FlaxdoseError(f"{self.path}: ROI number {roi.number} has {len(items)} contour items; the file is damaged")
            for contour in (items[0].get("ContourSequence") or []) if items else []:
                kind = _str(contour, "ContourGeometricType").upper()
                if kind not in ("CLOSED_PLANAR", "CLOSEDPLANAR_XOR"):
                    continue
                data = _floats(contour, "ContourData", self.path)
                if data.size % 3 or data.size < 9:
                    if data.size % 3:
                        raise FlaxdoseError(
                            f"{self.path}: a contour of ROI {roi.name!r} has {data.size} coordinates, not a multiple "
                            "of 3; the file is damaged"
                        )
                    continue
                pts = data.reshape(-1, 3)
                if np.ptp(pts[:, 2]) > 0.05:
                    raise FlaxdoseError(
                        f"{self.path}: a contour of ROI {roi.name!r} is not in an axial plane (z from "
                        f"{pts[:, 2].min():.2f} to {pts[:, 2].max():.2f} mm); flaxdose reads axial contours only"
                    )
                out.append((float(pts[:, 2].mean()), pts[:, :2]))
        return out


def read_structure_set(f: DicomFile | str | os.PathLike) -> StructureSet:
    if not isinstance(f, DicomFile):
        f = DicomFile(Path(f), "RTSTRUCT", "", "", "", "", "", "")
    ds = _load_full(f)
    with _guard(f.path, "the RTSTRUCT ROI list"):
        types = {}
        for obs in ds.get("RTROIObservationsSequence") or []:
            if obs.get("ReferencedROINumber") is not None:
                types[int(obs.ReferencedROINumber)] = _str(obs, "RTROIInterpretedType")
        rois = []
        for item in ds.get("StructureSetROISequence") or []:
            number = _int(item, "ROINumber", f.path, -(1 << 31), 1 << 31)
            rois.append(Roi(number, _str(item, "ROIName"), types.get(number, "")))
    if not rois:
        raise FlaxdoseError(f"{f.path}: the structure set holds no ROIs; export the contoured structure set")
    if len({r.number for r in rois}) != len(rois):
        raise FlaxdoseError(f"{f.path}: ROI numbers repeat in StructureSetROISequence; the file is damaged")
    return StructureSet(rois, f.path, ds)


def _planes(contours: dict[str, list[tuple[float, np.ndarray]]], ct: CtSeries | None, path):
    """Slab centres and thickness of the contour planes, and each ROI's contours by plane."""
    if ct is not None:
        planes, spacing = ct.slices_z, ct.slice_spacing
        tol = 0.25 * spacing
    else:
        zs = np.unique(np.round([z for cs in contours.values() for z, _ in cs], 3))
        if zs.size == 0:
            return np.zeros(0), 1.0, {k: _Contours({}) for k in contours}
        spacing = float(np.median(np.diff(zs))) if zs.size > 1 else 1.0
        planes, tol = zs, 0.01
    out = {}
    for name, cs in contours.items():
        by_plane: dict[int, list[np.ndarray]] = defaultdict(list)
        for z, pts in cs:
            p = int(np.abs(planes - z).argmin())
            if abs(planes[p] - z) > tol:
                raise FlaxdoseError(
                    f"{path}: a contour of {name} lies at z = {z:.2f} mm, {abs(planes[p] - z):.2f} mm from the "
                    f"nearest CT slice; contours must lie on CT slices: check that the structure set belongs "
                    "to this CT"
                )
            by_plane[p].append(pts)
        out[name] = _Contours(dict(by_plane))
    return planes, spacing, out


def _case_id(plan: PlanFiles, keep_ids: bool, salt: str) -> str:
    if keep_ids:
        cid = re.sub(r"[^A-Za-z0-9._-]+", "_", plan.patient_id).strip("._") or "patient"
        return cid
    key = "|".join([salt, plan.patient_id, plan.study_uid, plan.for_uid, plan.dose.sop_uid if plan.dose else ""])
    return "case_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def read_plan(
    plan: PlanFiles,
    structures: Sequence[str] = PROSTATE_STRUCTURES,
    grid: str = "dose",
    *,
    aliases: AliasTable | None = None,
    prescription_gy: float | None = None,
    include_ct: bool = False,
    model_shape: Sequence[int] = MODEL_SHAPE,
    model_spacing_mm: Sequence[float] = MODEL_SPACING_MM,
    centre_on: str | None = None,
    case_id: str | None = None,
    keep_ids: bool = False,
    salt: str | None = None,
    style: str = "",
) -> Case:
    """Build a `Case` from one plan's files (see `read_rt`)."""
    if grid not in ("dose", "model", "ct"):
        raise FlaxdoseError(f"grid must be 'dose', 'model' or 'ct', got {grid!r}")
    if plan.problems:
        raise FlaxdoseError(f"plan in {plan.label}: " + "; ".join(plan.problems))
    if plan.struct is None:
        raise FlaxdoseError(f"no RTSTRUCT for the plan in {plan.label}; export the structure set with the plan")
    aliases = aliases or AliasTable()
    sset = read_structure_set(plan.struct)
    matched = aliases.match(list(structures), sset.rois)
    contours = {name: sset.contours(roi) for name, roi in matched.items()}
    need_ct = include_ct or grid == "ct" or bool(plan.ct)
    ct = read_ct(plan.ct, load_pixels=include_ct) if (need_ct and plan.ct) else None
    if (include_ct or grid == "ct") and ct is None:
        raise FlaxdoseError(f"no CT series for the plan in {plan.label}; export the planning CT with the plan")
    dose = dose_grid = None
    if plan.dose is not None:
        dose, dose_grid = read_dose(plan.dose.path)
    elif grid == "dose":
        raise FlaxdoseError(f"no RTDOSE for the plan in {plan.label}; export the plan dose or use grid='model'")
    planes, plane_spacing, by_plane = _planes(contours, ct, plan.struct.path)

    if grid == "dose":
        target = dose_grid
    elif grid == "ct":
        target = ct.grid
    else:
        centre_name = centre_on or next((s for s in structures if s.upper().startswith("PTV")), structures[0])
        if centre_name not in by_plane:
            raise FlaxdoseError(f"cannot centre the model grid on {centre_name!r}: it is not among {list(structures)}")
        reference = ct.grid if ct is not None else dose_grid
        if reference is None:
            raise FlaxdoseError(f"the plan in {plan.label} has neither CT nor dose to place the model grid on")
        ref_mask = rasterize(by_plane[centre_name], planes, plane_spacing, reference)
        if not ref_mask.any():
            raise FlaxdoseError(f"{centre_name} is empty in the plan in {plan.label}; cannot centre the model grid on it")
        centre = [
            float(np.average(reference.coords(a), weights=ref_mask.sum(axis=tuple(b for b in range(3) if b != a))))
            for a in range(3)
        ]
        shape = tuple(int(v) for v in model_shape)
        spacing = tuple(float(v) for v in model_spacing_mm)
        target = Grid(tuple(c - (n - 1) / 2 * d for c, n, d in zip(centre, shape, spacing)), spacing, shape)

    masks = np.stack([rasterize(by_plane[s], planes, plane_spacing, target) for s in structures])
    dose_out = None
    if dose is not None:
        dose_out = dose if target == dose_grid else resample(dose, dose_grid, target, order=1, cval=0.0)
    ct_out = None
    if include_ct:
        ct_out = ct.hu if target == ct.grid else resample(ct.hu, ct.grid, target, order=1, cval=-1000.0)

    source = "argument"
    if prescription_gy is None:
        prescription_gy, source = (None, "none")
        if plan.plan is not None:
            prescription_gy, source = read_prescription(plan.plan.path)
        prescription_gy = prescription_gy or 0.0
    meta = {
        "source": "dicom",
        "grid": grid,
        "grid_geometry": target.as_dict(),
        "native_dose_grid": dose_grid.as_dict() if dose_grid is not None else None,
        "patient_position": ct.patient_position if ct is not None else "",
        "structure_rois": {s: matched[s].name for s in structures},
        "prescription_source": source,
        "dose_summation_type": plan.dose.dose_summation if plan.dose is not None else "",
        "deidentified": not keep_ids,
    }
    return Case(
        case_id=case_id or _case_id(plan, keep_ids, salt if salt is not None else secrets.token_hex(16)),
        structures=tuple(structures),
        masks=masks,
        dose=dose_out,
        spacing_mm=target.spacing_mm,
        origin_mm=target.origin_mm,
        prescription_gy=float(prescription_gy),
        style=style,
        ct=ct_out,
        meta=meta,
    )


def read_rt(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    structures: Sequence[str] = PROSTATE_STRUCTURES,
    grid: str = "dose",
    **kwargs,
) -> Case:
    """Read one patient's DICOM-RT export (CT, RTSTRUCT, RTDOSE, RTPLAN) into a `Case`.

    `paths`: files and/or folders (searched recursively) holding exactly one plan.
    `grid`: "dose" keeps the RTDOSE grid; "model" resamples onto `model_shape` x
    `model_spacing_mm` centred on the PTV (dose trilinear, masks rasterized directly at the
    model voxel centres); "ct" uses the CT grid. A plan without RTDOSE gives `dose=None`
    (grids "model" and "ct" only). Keyword arguments: `aliases` (AliasTable),
    `prescription_gy` (overrides the RTPLAN), `include_ct`, `model_shape`, `model_spacing_mm`,
    `centre_on`, `case_id`, `keep_ids`, `salt`, `style` (see `read_plan`).
    """
    files, problems = scan(paths)
    found = group_plans(files)
    plans = [p for v in found.values() if isinstance(v, list) for p in v]
    note = f" ({len(problems)} damaged file(s): {problems[0][1]})" if problems else ""
    if not plans:
        reasons = [v for v in found.values() if isinstance(v, str)]
        raise FlaxdoseError(
            f"no complete DICOM-RT plan (CT + RTSTRUCT [+ RTDOSE]) found in {paths}"
            + (f": {reasons[0]}" if reasons else "") + note
        )
    if len(plans) > 1:
        raise FlaxdoseError(
            f"{len(plans)} plans found in {paths} ({len(found)} patient(s)); read_rt reads one plan: pass one "
            "plan's files, or import them all with `python -m flaxdose.data.dicom import`"
        )
    plan = plans[0]
    if problems:
        damaged_here = [m for p, m in problems]
        plan.problems = plan.problems + [f"damaged file(s) next to the plan: {damaged_here[0]}"]
    return read_plan(plan, structures, grid, **kwargs)


# ------------------------------------------------------------------------------- CLI
@dataclasses.dataclass
class ImportSummary:
    dataset: Path
    case_ids: list[str]
    failures: list[tuple[str, str]]  # (where, why): console only, never written to the dataset
    damaged_files: list[tuple[str, str]]
    num_patients: int

    def report(self) -> str:
        lines = [
            f"imported {len(self.case_ids)} plan(s) from {self.num_patients} patient(s) into {self.dataset}",
        ]
        if self.failures:
            lines.append(f"{len(self.failures)} patient(s)/plan(s) FAILED and were skipped:")
            lines += [f"  - {where}: {why}" for where, why in self.failures]
        if self.damaged_files:
            lines.append(f"{len(self.damaged_files)} damaged DICOM file(s) ignored:")
            lines += [f"  - {why}" for _, why in self.damaged_files[:20]]
        return "\n".join(lines)


def import_dicom(
    src: str | os.PathLike | Iterable[str | os.PathLike],
    out: str | os.PathLike,
    structures: Sequence[str] = PROSTATE_STRUCTURES,
    grid: str = "model",
    *,
    aliases: AliasTable | None = None,
    keep_ids: bool = False,
    salt: str | None = None,
    test_fraction: float = 0.0,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    require_dose: bool = True,
    **read_kwargs,
) -> ImportSummary:
    """Import every plan under `src` into a dataset at `out` (see module docstring).

    A patient whose files cannot be read is reported in the summary and skipped; so is a
    plan without RTDOSE unless `require_dose=False`. Case ids are salted hashes (the salt
    is random unless given) unless `keep_ids`. `read_kwargs` go to `read_plan`.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise FlaxdoseError(f"test_fraction must be in [0, 1), got {test_fraction}")
    files, damaged = scan(src, progress=progress)
    found = group_plans(files)
    salt = salt if salt is not None else secrets.token_hex(16)
    failures: list[tuple[str, str]] = []
    staged: list[tuple[str, Path]] = []
    todo = []
    for pid, plans in found.items():
        if isinstance(plans, str):
            where = next((str(f.path.parent) for f in files if f.patient_id == pid), "?")
            failures.append((where, plans))
            continue
        todo += [(i, len(plans), p) for i, p in enumerate(plans)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.staging.") as stage:
        iterator = todo
        if progress:
            from tqdm import tqdm

            iterator = tqdm(todo, desc="importing", unit="plan", file=sys.stderr)
        for index, count, plan in iterator:
            try:
                if require_dose and plan.dose is None:
                    raise FlaxdoseError("no RTDOSE found for this plan; export the plan dose with it")
                cid = _case_id(plan, keep_ids, salt)
                if count > 1:
                    cid = f"{cid}_{index + 1}"
                case = read_plan(plan, structures, grid, aliases=aliases, case_id=cid, keep_ids=keep_ids, **read_kwargs)
                if any(cid == c for c, _ in staged):
                    raise FlaxdoseError(f"case id {cid} repeats (two patients share an ID); import them separately")
                path = case.save(Path(stage) / f"{cid}.npz")
                staged.append((cid, path))
            except FlaxdoseError as e:
                failures.append((plan.label, str(e)))
            except Exception as e:  # noqa: BLE001 - one bad patient must not stop the import
                failures.append((plan.label, f"unexpected {type(e).__name__}: {e} (please report this)"))
        if not staged:
            raise FlaxdoseError(
                "no plan could be imported from "
                f"{src}: " + ("; ".join(f"{w}: {m}" for w, m in failures[:5]) or "no DICOM-RT files found")
            )
        ids = sorted(c for c, _ in staged)
        rng = np.random.default_rng(seed)
        shuffled = [ids[i] for i in rng.permutation(len(ids))]
        n_test = int(round(test_fraction * len(ids)))
        splits = {"train": sorted(shuffled[n_test:])}
        if n_test:
            splits["test"] = sorted(shuffled[:n_test])
        extra = {
            "source": "dicom",
            "grid": grid,
            "deidentified": not keep_ids,
            "import": {"num_patients": len(found), "num_plans": len(ids), "num_failed": len(failures)},
        }
        write_dataset(out, (Case.load(p) for _, p in sorted(staged)), splits, overwrite=overwrite, extra=extra)
    return ImportSummary(out, ids, failures, damaged, len(found))


def _define_flags():
    from absl import flags

    flags.DEFINE_string("out", None, "dataset folder to write")
    flags.DEFINE_string("aliases", None, "JSON file mapping structure names to extra ROI names")
    flags.DEFINE_list("structures", list(PROSTATE_STRUCTURES), "structures (model channels), in order")
    flags.DEFINE_enum("grid", "model", ["model", "dose", "ct"], "grid of the saved cases")
    flags.DEFINE_list("model_shape", [str(v) for v in MODEL_SHAPE], "model grid shape (x,y,z)")
    flags.DEFINE_list("model_spacing_mm", [str(v) for v in MODEL_SPACING_MM], "model grid spacing (x,y,z) mm")
    flags.DEFINE_bool("include_ct", False, "also store the CT (HU) on the case grid")
    flags.DEFINE_bool("keep_ids", False, "use PatientID as case id (NOT de-identified)")
    flags.DEFINE_string("salt", None, "salt for the hashed case ids (default: random, ids not reproducible)")
    flags.DEFINE_string("style", "", "planning style label stored in every case")
    flags.DEFINE_float("prescription_gy", None, "override the prescription read from the RTPLAN")
    flags.DEFINE_float("test_fraction", 0.0, "fraction of cases put in the 'test' split")
    flags.DEFINE_integer("seed", 0, "seed of the train/test split")
    flags.DEFINE_bool("overwrite", False, "replace an existing dataset folder")


def main(argv):
    from absl import flags

    FLAGS = flags.FLAGS
    args = argv[1:]
    if len(args) != 2 or args[0] != "import" or not FLAGS.out:
        raise FlaxdoseError("usage: python -m flaxdose.data.dicom import SRC --out DATASET [--aliases FILE]")
    summary = import_dicom(
        args[1], FLAGS.out, FLAGS.structures, FLAGS.grid,
        aliases=AliasTable.from_file(FLAGS.aliases),
        keep_ids=FLAGS.keep_ids, salt=FLAGS.salt, test_fraction=FLAGS.test_fraction, seed=FLAGS.seed,
        overwrite=FLAGS.overwrite, include_ct=FLAGS.include_ct, style=FLAGS.style,
        prescription_gy=FLAGS.prescription_gy,
        model_shape=[int(v) for v in FLAGS.model_shape],
        model_spacing_mm=[float(v) for v in FLAGS.model_spacing_mm],
    )
    print(summary.report())
    return 1 if summary.failures else 0  # some patients skipped: the report names them


if __name__ == "__main__":
    from flaxdose import cli

    _define_flags()
    cli.run(main)
