"""DICOM-RT objects to flaxdose: CT series, RTDOSE, RTPLAN prescription, RTSTRUCT, and whole plans.

Conventions (see docs/dicom.md):
- Volumes come out on an axis-aligned grid in the DICOM patient system (LPS), indexed
  [x, y, z] as everywhere in flaxdose. HFS, FFS, HFP, FFP (and decubitus) series are
  flipped/transposed into that order; oblique orientations are rejected.
- Contours are rasterized at voxel centres (`flaxdose.dicom.contours`).
- Dose = stored value x DoseGridScaling, on the RTDOSE's own planes (GridFrameOffsetVector,
  relative or absolute form); resampling to another grid is trilinear.
- ROIs are found by ReferencedROINumber, never by list position; names map onto the
  model's structures through `flaxdose.dicom.structures`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from flaxdose.data.case import PROSTATE_STRUCTURES, Case
from flaxdose.data.grid import MODEL_SHAPE, MODEL_SPACING_MM, Grid
from flaxdose.dicom.contours import contour_planes, rasterize
from flaxdose.dicom.files import (
    MAX_VOXELS,
    DicomFile,
    PlanFiles,
    floats,
    group_plans,
    integer,
    read_full,
    read_header,
    reading,
    scan,
    text,
)
from flaxdose.dicom.geometry import axial_directions, lps_layout, resample, to_lps
from flaxdose.dicom.structures import AliasTable, Roi
from flaxdose.errors import FlaxdoseError


def _pixels(ds, path, frames: int) -> np.ndarray:
    rows, cols = integer(ds, "Rows", path, 1, 16384), integer(ds, "Columns", path, 1, 16384)
    if rows * cols * frames > MAX_VOXELS:
        raise FlaxdoseError(f"{path}: {rows}x{cols}x{frames} voxels is implausibly large; the header is damaged")
    with reading(path, "the pixel data"):
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
    """One CT series on its LPS grid; `hu` is None when read without pixels."""

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
        ds = read_full(f) if load_pixels else None
        if ds is None:
            ds = read_header(f.path)
        with reading(f.path, "the CT slice geometry"):
            iop = floats(ds, "ImageOrientationPatient", f.path, 6)
            ipp = floats(ds, "ImagePositionPatient", f.path, 3)
            ps = floats(ds, "PixelSpacing", f.path, 2)
            rows, cols = integer(ds, "Rows", f.path, 1, 16384), integer(ds, "Columns", f.path, 1, 16384)
            if (ps <= 0).any():
                raise FlaxdoseError(f"{f.path}: PixelSpacing {list(ps)} must be positive")
            items.append((f, ds, iop, ipp, ps, rows, cols))
    f0, _, iop0, _, ps0, rows0, cols0 = items[0]
    r, c, n = axial_directions(iop0, f"CT {f0.path}")
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
        thickness = floats(items[0][1], "SliceThickness", f0.path, 1, required=False)
        spacing = float(thickness[0]) if thickness is not None and thickness[0] > 0 else float(ps0[0])
    ipp0 = items[0][3]
    perm, flips, grid = lps_layout((len(items), rows0, cols0), ipp0, r, c, n, ps0[1], ps0[0], spacing)
    hu = None
    if load_pixels:
        stack = np.empty((len(items), rows0, cols0), np.float32)
        for k, (f, ds, *_rest) in enumerate(items):
            with reading(f.path, "the CT rescale"):
                slope = float(ds.get("RescaleSlope", 1) or 1)
                intercept = float(ds.get("RescaleIntercept", 0) or 0)
            stack[k] = _pixels(ds, f.path, 1)[0].astype(np.float32) * slope + intercept
        hu = to_lps(stack, perm, flips)
    position = text(items[0][1], "PatientPosition") if items[0][1] is not None else ""
    return CtSeries(grid, np.sort(ipp0[2] + (s - s[0]) * n[2]), spacing, hu, position)


def read_dose(path: str | os.PathLike, require_gy: bool = True) -> tuple[np.ndarray, Grid]:
    """An RTDOSE file as (dose in Gy indexed [x, y, z], its LPS `Grid`).

    `require_gy=False` also accepts DoseUnits RELATIVE (values then are in the file's units).
    """
    path = Path(path)
    f = DicomFile(path, "RTDOSE", "", "", "", "", "", "")
    ds = read_full(f)
    with reading(path, "the RTDOSE"):
        units = text(ds, "DoseUnits").upper()
        if units != "GY" and (require_gy or units != "RELATIVE"):
            raise FlaxdoseError(
                f"{path}: DoseUnits is {units or 'missing'}; flaxdose needs absolute dose (GY): export the "
                "dose in Gy, not relative"
            )
        frames = integer(ds, "NumberOfFrames", path, 1, 10000, default=1)
        iop = floats(ds, "ImageOrientationPatient", path, 6)
        ipp = floats(ds, "ImagePositionPatient", path, 3)
        ps = floats(ds, "PixelSpacing", path, 2)
        if (ps <= 0).any():
            raise FlaxdoseError(f"{path}: PixelSpacing {list(ps)} must be positive")
        scaling = floats(ds, "DoseGridScaling", path, 1)[0]
        if not scaling > 0:
            raise FlaxdoseError(f"{path}: DoseGridScaling {scaling} must be positive")
        r, c, n = axial_directions(iop, f"RTDOSE {path}")
        offsets = floats(ds, "GridFrameOffsetVector", path, required=frames > 1)
        if offsets is None:
            offsets = np.zeros(1)
            thickness = floats(ds, "SliceThickness", path, 1, required=False)
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
        perm, flips, grid = lps_layout(dose.shape, ipp0, r, c, n, ps[1], ps[0], frame_spacing)
        dose = to_lps(dose.astype(np.float32), perm, flips)
    if not np.isfinite(dose).all():
        raise FlaxdoseError(f"{path}: dose holds non-finite values; the file is damaged")
    return dose, grid


def read_prescription(path: str | os.PathLike) -> tuple[float | None, str]:
    """Prescription (Gy) from an RTPLAN: the largest TargetPrescriptionDose, else the
    fraction dose (sum of BeamDose) x NumberOfFractionsPlanned. Returns (value or None, source)."""
    path = Path(path)
    ds = read_full(DicomFile(path, "RTPLAN", "", "", "", "", "", ""))
    with reading(path, "the RTPLAN prescription"):
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
    """An RTSTRUCT's ROIs (numbers, names, interpreted types) and its dataset, for reading contours."""

    rois: list[Roi]
    path: Path
    _ds: object

    def contours(self, roi: Roi) -> list[tuple[float, np.ndarray]]:
        """The closed planar contours of `roi` (found by ReferencedROINumber) as (z, (K, 2) x/y)."""
        out = []
        with reading(self.path, f"the contours of ROI {roi.name!r}"):
            items = [
                item for item in self._ds.get("ROIContourSequence") or []
                if item.get("ReferencedROINumber") is not None and int(item.ReferencedROINumber) == roi.number
            ]
            if len(items) > 1:
                raise FlaxdoseError(f"{self.path}: ROI number {roi.number} has {len(items)} contour items; the file is damaged")
            for contour in (items[0].get("ContourSequence") or []) if items else []:
                kind = text(contour, "ContourGeometricType").upper()
                if kind not in ("CLOSED_PLANAR", "CLOSEDPLANAR_XOR"):
                    continue
                data = floats(contour, "ContourData", self.path)
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
    """The ROI list of an RTSTRUCT; FlaxdoseError when it holds none or ROI numbers repeat."""
    if not isinstance(f, DicomFile):
        f = DicomFile(Path(f), "RTSTRUCT", "", "", "", "", "", "")
    ds = read_full(f)
    with reading(f.path, "the RTSTRUCT ROI list"):
        types = {}
        for obs in ds.get("RTROIObservationsSequence") or []:
            if obs.get("ReferencedROINumber") is not None:
                types[int(obs.ReferencedROINumber)] = text(obs, "RTROIInterpretedType")
        rois = []
        for item in ds.get("StructureSetROISequence") or []:
            number = integer(item, "ROINumber", f.path, -(1 << 31), 1 << 31)
            rois.append(Roi(number, text(item, "ROIName"), types.get(number, "")))
    if not rois:
        raise FlaxdoseError(f"{f.path}: the structure set holds no ROIs; export the contoured structure set")
    if len({r.number for r in rois}) != len(rois):
        raise FlaxdoseError(f"{f.path}: ROI numbers repeat in StructureSetROISequence; the file is damaged")
    return StructureSet(rois, f.path, ds)


def plan_case_id(plan: PlanFiles, keep_ids: bool, salt: str) -> str:
    """The case id of a plan: the PatientID made file-safe (`keep_ids`), else a salted hash of its UIDs."""
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
    planes, plane_spacing, by_plane = contour_planes(
        contours, ct.slices_z if ct is not None else None, ct.slice_spacing if ct is not None else 1.0, plan.struct.path
    )

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
        case_id=case_id or plan_case_id(plan, keep_ids, salt if salt is not None else secrets.token_hex(16)),
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
            "plan's files, or import them all with `python -m flaxdose.import_dicom`"
        )
    plan = plans[0]
    if problems:
        damaged_here = [m for p, m in problems]
        plan.problems = plan.problems + [f"damaged file(s) next to the plan: {damaged_here[0]}"]
    return read_plan(plan, structures, grid, **kwargs)
