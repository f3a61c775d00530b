"""DICOM-RT objects to flaxdose: CT series, RTSTRUCT, and whole plans (`read_plan`, `read_rt`, read as
`ReadOptions` say).

Conventions (see docs/dicom.md):
- Volumes come out on an axis-aligned grid in the DICOM patient system (LPS), indexed
  [x, y, z] as everywhere in flaxdose. HFS, FFS, HFP, FFP (and decubitus) series are
  flipped/transposed into that order; oblique orientations are rejected.
- Contours are rasterized at voxel centres (`flaxdose.dicom.contours`); CLOSED_PLANAR,
  INTERPOLATED_PLANAR and untyped contours are closed polygons, POINT and OPEN_* contours
  enclose nothing and are set aside (noted); any other type is refused. A structure the
  model needs must have contours, and must not lose any to the grid: its contour, plane,
  voxel counts, volume and dose coverage go into the case metadata.
- The dose is the plan dose of `flaxdose.dicom.dose` (PLAN, FRACTION x fractions, or the
  sum of all BEAM doses), resampled trilinearly onto the case grid.
- ROIs are found by ReferencedROINumber, never by list position; names map onto the
  model's structures through `flaxdose.dicom.structures`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from flaxdose.data.case import PROSTATE_STRUCTURES, Case
from flaxdose.data.grid import MODEL_SHAPE, MODEL_SPACING_MM, Grid
from flaxdose.dicom.contours import PLANE_TOL_MM, RoiContours, contour_planes, rasterize, rasterize_roi, roi_window
from flaxdose.dicom.damage import plan_damage
from flaxdose.dicom.dose import (
    PlanDose,
    check_dose_fits_prescription,
    check_external_photon,
    plan_dose,
    read_rtplan,
)
from flaxdose.dicom.archives import Unpacker
from flaxdose.dicom.files import (
    RT_ION_PLAN_STORAGE,
    DicomFile,
    PlanFiles,
    ScanResult,
    floats,
    group_plans,
    integer,
    pixel_frames,
    read_full,
    read_header,
    reading,
    scan_tree,
    text,
)
from flaxdose.dicom.geometry import POSITION_ROUNDING_MM, axial_directions, fit_uniform, lps_layout, resample, to_lps
from flaxdose.dicom.structures import AliasTable, Roi, is_body
from flaxdose.errors import FlaxdoseError

log = logging.getLogger(__name__)

CLOSED_CONTOURS = ("CLOSED_PLANAR", "INTERPOLATED_PLANAR", "CLOSEDPLANAR_XOR", "")  # "": type left empty
SET_ASIDE_CONTOURS = ("POINT", "OPEN_PLANAR", "OPEN_NONPLANAR")  # they enclose no volume
# The share of a target's or OAR's contoured volume that must have dose (the body: recorded only).
MIN_COVERAGE = 0.99


@dataclasses.dataclass
class CtSeries:
    """One CT series on its LPS grid; `hu` is None when read without pixels."""

    grid: Grid
    slices_z: np.ndarray  # sorted slice positions (patient z)
    slice_spacing: float
    hu: np.ndarray | None  # [x, y, z] HU when loaded
    patient_position: str
    orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # ImageOrientationPatient of its images


@dataclasses.dataclass
class CtImage:
    """One CT image plane: a CT Image file, or one frame of an Enhanced (multi-frame) CT."""

    file: DicomFile
    ds: object
    frame: int | None  # None: a single-frame CT Image
    iop: np.ndarray
    ipp: np.ndarray
    ps: np.ndarray
    rows: int
    cols: int
    thickness: float | None
    rescale: tuple[float, float]  # slope, intercept


def _rescale(item, path) -> tuple[float, float]:
    slope = floats(item, "RescaleSlope", path, 1, required=False)
    intercept = floats(item, "RescaleIntercept", path, 1, required=False)
    return (1.0 if slope is None or slope[0] == 0 else float(slope[0]),
            0.0 if intercept is None else float(intercept[0]))


def ct_images(f: DicomFile, ds) -> list[CtImage]:
    """The image planes of one CT file. An Enhanced CT keeps each frame's position, and the
    orientation, pixel spacing and rescale shared or per frame, in functional groups (PS3.3 C.7.6.16)."""
    path = f.path
    rows, cols = integer(ds, "Rows", path, 1, 16384), integer(ds, "Columns", path, 1, 16384)
    frames = ds.get("PerFrameFunctionalGroupsSequence")
    if frames is None:
        thickness = floats(ds, "SliceThickness", path, 1, required=False)
        return [CtImage(f, ds, None, floats(ds, "ImageOrientationPatient", path, 6),
                        floats(ds, "ImagePositionPatient", path, 3), floats(ds, "PixelSpacing", path, 2), rows, cols,
                        None if thickness is None else float(thickness[0]), _rescale(ds, path))]
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    out = []
    for index, item in enumerate(frames):
        def group(name):  # a functional group of this frame, else the shared one
            found = item.get(name) or (shared.get(name) if shared is not None else None)
            return found[0] if found else None
        measures = group("PixelMeasuresSequence")
        thickness = floats(measures, "SliceThickness", path, 1, required=False)
        out.append(CtImage(f, ds, index, floats(group("PlaneOrientationSequence"), "ImageOrientationPatient", path, 6),
                           floats(group("PlanePositionSequence"), "ImagePositionPatient", path, 3),
                           floats(measures, "PixelSpacing", path, 2), rows, cols,
                           None if thickness is None else float(thickness[0]),
                           _rescale(group("PixelValueTransformationSequence"), path)))
    return out


def _check_one_stack(images: list[CtImage]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row, column, normal of a series whose images share orientation, pixel spacing and size (else refused)."""
    first = images[0]
    if (first.ps <= 0).any():
        raise FlaxdoseError(f"{first.file.path}: PixelSpacing {list(first.ps)} must be positive")
    for im in images[1:]:
        if (np.abs(im.iop - first.iop).max() > 1e-4 or np.abs(im.ps - first.ps).max() > 1e-4
                or (im.rows, im.cols) != (first.rows, first.cols)):
            raise FlaxdoseError(
                f"CT slice {im.file.path} differs from {first.file.path} in orientation, pixel spacing or size; "
                "the folder mixes CT series: export only the planning CT"
            )
    return axial_directions(first.iop, f"CT {first.file.path}")


def _slice_grid(images: list[CtImage], s: np.ndarray) -> tuple[np.ndarray, float]:
    """The uniform positions (mm along the normal) that sorted positions `s` stand for, and the spacing;
    refuses duplicates, missing slices and non-uniform spacing (beyond writers' rounding)."""
    where = images[0].file.path.parent
    if len(images) == 1:
        thickness = images[0].thickness
        return s, thickness if thickness is not None and thickness > 0 else float(images[0].ps[0])
    diffs = np.diff(s)
    if diffs.min() < 1e-3:
        i = int(diffs.argmin())
        raise FlaxdoseError(
            f"CT slices {_name(images[i])} and {_name(images[i + 1])} lie at the same position ({s[i]:.2f} mm); "
            "the folder holds a duplicate slice or two series: export one series once"
        )
    first, spacing, numbers, worst = fit_uniform(s)
    if worst > POSITION_ROUNDING_MM:
        raise FlaxdoseError(
            f"the CT series in {where} has non-uniform slice spacing ({diffs.min():.2f}..{diffs.max():.2f} mm; a "
            f"slice lies {worst:.2f} mm off the nearest uniform grid, more than the {POSITION_ROUNDING_MM} mm of "
            "rounded positions); re-export it with uniform spacing"
        )
    steps = np.diff(numbers)
    if steps.max() > 1:
        i = int(np.argmax(steps))
        raise FlaxdoseError(
            f"the CT series in {where} has {int(steps[i]) - 1} missing slice(s) between {s[i]:.2f} and "
            f"{s[i + 1]:.2f} mm (slice spacing {spacing:.2f} mm); re-export the complete series, flaxdose never "
            "imports a CT with shifted slices"
        )
    return first + spacing * numbers, spacing  # the grid the rounded positions stand for


def _name(image: CtImage) -> str:
    return image.file.path.name + ("" if image.frame is None else f" (frame {image.frame + 1})")


def _hu_stack(images: list[CtImage]) -> np.ndarray:
    """HU (stored value x RescaleSlope + RescaleIntercept) of the images as (slices, rows, columns)."""
    stack = np.empty((len(images), images[0].rows, images[0].cols), np.float32)
    frames: dict[Path, np.ndarray] = {}  # an Enhanced CT's frames, decoded once
    for k, im in enumerate(images):
        if im.frame is None:
            pixels = pixel_frames(im.ds, im.file.path, 1)[0]
        else:
            if im.file.path not in frames:
                count = integer(im.ds, "NumberOfFrames", im.file.path, 1, 100000)
                frames[im.file.path] = pixel_frames(im.ds, im.file.path, count)
            pixels = frames[im.file.path][im.frame]
        slope, intercept = im.rescale
        stack[k] = pixels.astype(np.float32) * slope + intercept
    return stack


def read_ct(files: Sequence[DicomFile], load_pixels: bool = True) -> CtSeries:
    """One axial CT series on an LPS grid; rejects gaps, duplicates and non-uniform spacing.

    `files`: CT Image files, or Enhanced (multi-frame) CT files. `hu` (float32 [x, y, z], stored
    value x RescaleSlope + RescaleIntercept) is read only with `load_pixels`. Slice positions
    rounded by their writer (within POSITION_ROUNDING_MM of a uniform grid) are read on that
    grid. Raises FlaxdoseError for no files, slices of mixed orientation / spacing / size, an
    oblique or tilted series, duplicate or missing slices, non-uniform spacing, and damaged files.
    """
    if not files:
        raise FlaxdoseError("no CT slices found; export the planning CT with the plan")
    images = []
    for f in files:
        ds = read_full(f) if load_pixels else read_header(f.path)
        with reading(f.path, "the CT slice geometry"):
            images += ct_images(f, ds)
    r, c, n = _check_one_stack(images)
    s = np.array([np.dot(im.ipp, n) for im in images])
    order = np.argsort(s, kind="stable")
    images, s = [images[i] for i in order], s[order]
    inplane = np.array([im.ipp - np.dot(im.ipp, n) * n for im in images])
    if np.abs(inplane - inplane[0]).max() > max(0.01 * min(images[0].ps), POSITION_ROUNDING_MM):  # rounding, no tilt
        raise FlaxdoseError(
            f"CT slices of {images[0].file.path.parent} are not stacked along the slice normal (tilted gantry or "
            "mixed series); re-export the series reconstructed axially without tilt"
        )
    s, spacing = _slice_grid(images, s)
    ipp0 = images[0].ipp + (s[0] - np.dot(images[0].ipp, n)) * n
    first = images[0]
    perm, flips, grid = lps_layout((len(images), first.rows, first.cols), ipp0, r, c, n, first.ps[1], first.ps[0],
                                   spacing)
    hu = to_lps(_hu_stack(images), perm, flips) if load_pixels else None
    return CtSeries(grid, np.sort(ipp0[2] + (s - s[0]) * n[2]), spacing, hu, text(first.ds, "PatientPosition"),
                    tuple(float(v) for v in first.iop))


@dataclasses.dataclass
class RoiContourList:
    """The contours an RTSTRUCT gives one ROI.

    polygons: the closed contours as (z mm, (K, 2) x/y mm); set_aside: POINT and OPEN_*
    contours by type (they enclose no volume); untyped: closed contours whose
    ContourGeometricType is empty; degenerate: closed contours of one or two points.
    """

    polygons: list[tuple[float, np.ndarray]]
    set_aside: dict[str, int]
    untyped: int = 0
    degenerate: int = 0

    def notes(self, roi: str) -> list[str]:
        """What a physicist should know about these contours (no patient data)."""
        out = [f"{roi}: {n} {kind} contour(s) set aside (they enclose no volume)" for kind, n in self.set_aside.items()]
        if self.untyped:
            out.append(f"{roi}: {self.untyped} contour(s) without ContourGeometricType read as CLOSED_PLANAR")
        if self.degenerate:
            out.append(f"{roi}: {self.degenerate} closed contour(s) of 1-2 points keep only the voxels they touch")
        return out


@dataclasses.dataclass
class StructureSet:
    """An RTSTRUCT's ROIs (numbers, names, interpreted types, frames of reference) and its dataset."""

    rois: list[Roi]
    path: Path
    _ds: object

    def contours(self, roi: Roi) -> RoiContourList:
        """The contours of `roi` (found by ReferencedROINumber), sorted by geometric type.

        Raises FlaxdoseError for damaged contour data, non-axial closed contours and
        geometric types that DICOM does not define.
        """
        out = RoiContourList([], {})
        with reading(self.path, f"the contours of ROI {roi.name!r}"):
            items = [
                item for item in self._ds.get("ROIContourSequence") or []
                if item.get("ReferencedROINumber") is not None and int(item.ReferencedROINumber) == roi.number
            ]
            if len(items) > 1:
                raise FlaxdoseError(f"{self.path}: ROI number {roi.number} has {len(items)} contour items; the file is damaged")
            for contour in (items[0].get("ContourSequence") or []) if items else []:
                kind = text(contour, "ContourGeometricType").upper()
                if kind in SET_ASIDE_CONTOURS:
                    out.set_aside[kind] = out.set_aside.get(kind, 0) + 1
                    continue
                if kind not in CLOSED_CONTOURS:
                    raise FlaxdoseError(
                        f"{self.path}: a contour of ROI {roi.name!r} has ContourGeometricType {kind!r}, which DICOM "
                        f"does not define ({', '.join(CLOSED_CONTOURS[:2] + SET_ASIDE_CONTOURS)}); re-export the "
                        "structure set"
                    )
                data = floats(contour, "ContourData", self.path)
                if data.size % 3:
                    raise FlaxdoseError(
                        f"{self.path}: a contour of ROI {roi.name!r} has {data.size} coordinates, not a multiple "
                        "of 3; the file is damaged"
                    )
                pts = data.reshape(-1, 3)
                if np.ptp(pts[:, 2]) > PLANE_TOL_MM:
                    raise FlaxdoseError(
                        f"{self.path}: a contour of ROI {roi.name!r} is not in an axial plane (z from "
                        f"{pts[:, 2].min():.2f} to {pts[:, 2].max():.2f} mm); flaxdose reads axial contours only"
                    )
                out.untyped += kind == ""
                out.degenerate += len(pts) < 3
                out.polygons.append((float(pts[:, 2].mean()), pts[:, :2]))
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
            rois.append(Roi(number, text(item, "ROIName"), types.get(number, ""),
                            text(item, "ReferencedFrameOfReferenceUID")))
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
    key = "|".join([salt, plan.patient_id, plan.study_uid, plan.for_uid, *(d.sop_uid for d in plan.doses)])
    return "case_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _structure_contours(plan: PlanFiles, structures: Sequence[str], aliases: AliasTable):
    """The matched ROI and contours of every structure; refuses ROIs without contours or on another frame."""
    sset = read_structure_set(plan.struct)
    matched = aliases.match(list(structures), sset.rois)
    listed = {}
    for name in structures:
        roi = matched[name]
        if roi.for_uid and plan.for_uid and roi.for_uid != plan.for_uid:
            raise FlaxdoseError(
                f"{plan.struct.path}: ROI {roi.name!r} ({name}) is contoured on another frame of reference than the "
                "plan's CT and dose; contour it on the planning CT, or map another ROI with --aliases"
            )
        listed[name] = sset.contours(roi)
        if not listed[name].polygons:
            aside = listed[name].set_aside
            why = f" (only {sum(aside.values())} {'/'.join(aside)} contour(s), which enclose no volume)" if aside else ""
            raise FlaxdoseError(
                f"{plan.struct.path}: ROI {roi.name!r} ({name}) has no contours{why}; contour it in the planning "
                f"system and re-export the structure set, or map {name} to another ROI with --aliases"
            )
    return matched, listed


def _model_grid(centre_roi: RoiContours, reference: Grid, shape, spacing) -> Grid:
    """`shape` x `spacing` centred on the centroid of the whole ROI (rasterized on `reference`'s lattice)."""
    lo, hi = roi_window(centre_roi, reference)
    whole = rasterize(centre_roi, reference, lo, hi)
    if not whole.any():
        raise FlaxdoseError("the structure to centre the model grid on holds no voxel; cannot centre the grid on it")
    coords = [reference.origin_mm[a] + reference.spacing_mm[a] * np.arange(lo[a], hi[a], dtype=np.float64)
              for a in range(3)]
    centre = [float(np.average(coords[a], weights=whole.sum(axis=tuple(b for b in range(3) if b != a))))
              for a in range(3)]
    return Grid.centred([int(v) for v in shape], [float(v) for v in spacing], centre)


def _extent(grid: Grid) -> str:
    ends = [(grid.coords(a)[0], grid.coords(a)[-1]) for a in range(3)]
    return ", ".join(f"{n} {lo:.1f}..{hi:.1f}" for n, (lo, hi) in zip("xyz", ends)) + " mm"


def _structure_facts(name: str, roi: Roi, rc: RoiContours, placed, grid: Grid, dose: PlanDose | None,
                     min_coverage: float, label: str) -> tuple[dict, list[str]]:
    """The metadata of one structure, and warnings; refuses one that the grid loses or the dose does not cover."""
    cc = float(np.prod(grid.spacing_mm)) / 1000.0
    if placed.whole_voxels == 0:
        raise FlaxdoseError(
            f"{name} (ROI {roi.name!r}) has {rc.contour_count} contour(s) on {rc.planes_z.size} plane(s) but they "
            f"hold no voxel centre of the case grid (spacing {grid.spacing_mm} mm): the structure is smaller than "
            "a voxel; use a finer grid (--grid dose or ct)"
        )
    facts = {
        "roi": roi.name, "contours": rc.contour_count, "planes": int(rc.planes_z.size),
        "planes_used": placed.planes_used, "slab_mm": None if rc.slab_mm is None else round(rc.slab_mm, 4),
        "voxels": int(placed.mask.sum()), "cc": round(int(placed.mask.sum()) * cc, 3),
        "contoured_cc": round(placed.whole_voxels * cc, 3), "in_grid": round(placed.in_grid, 4),
        "coverage": round(placed.coverage, 4),
    }
    warnings = []
    body = is_body(name, roi)
    where = "has dose" if dose is not None else "lies inside the case grid"
    if placed.coverage < 1.0 and not body:
        warnings.append(f"{name}: {100 * placed.coverage:.1f} % of its contoured volume {where}")
    if not body and placed.coverage < min_coverage:
        grids = f"case grid {_extent(grid)}" + (f", dose grid {_extent(dose.grid)}" if dose is not None else "")
        raise FlaxdoseError(
            f"{name} (ROI {roi.name!r}): only {100 * placed.coverage:.1f} % of its contoured volume {where} "
            f"({100 * placed.in_grid:.1f} % lies inside the case grid; {grids}) in the plan in {label}; the "
            f"minimum is {100 * min_coverage:.1f} %. Export the dose calculated over every structure (or a larger "
            "model grid), or lower --min_coverage"
        )
    if body and placed.mask.sum() == 0:
        raise FlaxdoseError(f"{name} (ROI {roi.name!r}) lies outside the case grid ({_extent(grid)}) in {label}")
    return facts, warnings


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """How a plan is read into a `Case` (`read_plan`): built once by its caller (a command, `import_dicom`,
    a prediction) and passed down unchanged.

    structures: the model's structures (the case's channels), in order; ROI names map onto them
        through `aliases` (an `AliasTable`; None: the built-in names).
    grid: "dose" keeps the RTDOSE grid; "model" resamples onto `model_shape` x `model_spacing_mm`
        centred on `centre_on` (default: the first PTV among the structures, else the first
        structure; dose trilinear, masks rasterized directly at the model voxel centres); "ct" uses
        the CT grid. A plan without RTDOSE gives `dose=None` (grids "model" and "ct" only).
    prescription_gy: overrides the RTPLAN's prescription (None: read from the RTPLAN).
    include_ct: also keep the CT (HU) on the case grid.
    keep_ids: the case id is the PatientID made file-safe (NOT de-identified); else a hash of the
        plan's UIDs salted with `salt` (None: a random salt, ids not reproducible).
    style: the planning-style label stored in the case.
    min_coverage: the share of a target's or OAR's contoured volume that must have dose (the
        body's coverage is recorded only: the body is usually longer than the dose grid).
    read_dose: False ignores the export's RTDOSE files (the case gets no dose): what a prediction
        needs, which must not fail on a dose it does not use.
    """

    structures: tuple[str, ...] = PROSTATE_STRUCTURES
    grid: str = "dose"
    aliases: AliasTable | None = None
    prescription_gy: float | None = None
    include_ct: bool = False
    model_shape: tuple[int, ...] = MODEL_SHAPE
    model_spacing_mm: tuple[float, ...] = MODEL_SPACING_MM
    centre_on: str | None = None
    keep_ids: bool = False
    salt: str | None = None
    style: str = ""
    min_coverage: float = MIN_COVERAGE
    read_dose: bool = True

    def __post_init__(self):
        for name in ("structures", "model_shape", "model_spacing_mm"):  # any sequence given: kept as a tuple
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @classmethod
    def given(cls, options: ReadOptions | None = None, **fields) -> ReadOptions:
        """`options`, or without them options made of `fields` (a caller's keyword arguments).

        Raises TypeError for both, or for `options` that are not ReadOptions.
        """
        if options is None:
            return cls(**fields)
        if not isinstance(options, cls):
            raise TypeError(f"options must be ReadOptions, got {type(options).__name__}; pass structures= by name")
        if fields:
            raise TypeError(f"give ReadOptions or their fields ({', '.join(fields)}), not both")
        return options


def _plan_ct(plan: PlanFiles, options: ReadOptions) -> CtSeries | None:
    """The plan's CT series (pixels only with `include_ct`), when it has one or the options need it."""
    need_ct = options.include_ct or options.grid == "ct" or bool(plan.ct)
    ct = read_ct(plan.ct, load_pixels=options.include_ct) if (need_ct and plan.ct) else None
    if (options.include_ct or options.grid == "ct") and ct is None:
        if plan.ct_missing:
            raise FlaxdoseError(f"{plan.ct_missing}: export the referenced CT series, or import without "
                                "--include_ct on --grid model or dose (the CT then is not needed)")
        raise FlaxdoseError(f"no CT series for the plan in {plan.label}; export the planning CT with the plan")
    return ct


def _plan_rtplan_and_dose(plan: PlanFiles, options: ReadOptions):
    """(the RTPLAN when the prescription or the dose needs it, the plan dose when it is read) of `plan`."""
    read_dose = options.read_dose
    needs_plan = options.prescription_gy is None or (read_dose and (  # the RTPLAN says what the dose is part of
        plan.dose_kind in ("FRACTION", "BEAM") or any(d.ref_fraction_group is not None for d in plan.doses)))
    rtplan = read_rtplan(plan.plan.path) if plan.plan is not None and needs_plan else None
    dose = plan_dose(plan, rtplan) if plan.doses and read_dose else None
    if dose is None and options.grid == "dose":
        raise FlaxdoseError(f"no RTDOSE for the plan in {plan.label}" + ("" if read_dose else " (read_dose=False)")
                            + ": the dose grid (--grid dose) needs the plan dose; export it, or use --grid model or ct")
    return rtplan, dose


def _case_grid(plan: PlanFiles, options: ReadOptions, rois: dict[str, RoiContours], ct: CtSeries | None,
               dose: PlanDose | None) -> Grid:
    """The grid the case is read on (`options.grid`)."""
    if options.grid == "dose":
        return dose.grid
    if options.grid == "ct":
        return ct.grid
    structures = options.structures
    centre_name = options.centre_on or next((s for s in structures if s.upper().startswith("PTV")), structures[0])
    if centre_name not in rois:
        raise FlaxdoseError(f"cannot centre the model grid on {centre_name!r}: it is not among {list(structures)}")
    reference = ct.grid if ct is not None else dose.grid if dose is not None else None
    if reference is None:
        missing = f" ({plan.ct_missing})" if plan.ct_missing else ""
        raise FlaxdoseError(f"the plan in {plan.label} has neither CT nor dose to place the model grid "
                            f"on{missing}; export the planning CT with it")
    return _model_grid(rois[centre_name], reference, options.model_shape, options.model_spacing_mm)


def _structure_masks(plan: PlanFiles, options: ReadOptions, matched: dict[str, Roi], listed: dict[str, RoiContourList],
                     rois: dict[str, RoiContours], target: Grid, dose: PlanDose | None):
    """(masks, facts, warnings, notes) of the structures on `target`; warnings and notes are logged."""
    facts, warnings, notes = {}, [], list(plan.notes)
    masks = []
    for s in options.structures:
        placed = rasterize_roi(rois[s], target, dose.grid if dose is not None else None, s)
        facts[s], found = _structure_facts(s, matched[s], rois[s], placed, target, dose, options.min_coverage,
                                           plan.label)
        warnings += found
        notes += listed[s].notes(s)
        masks.append(placed.mask)
    for line in warnings:
        log.warning("%s: %s", plan.label, line)
    for line in notes:
        log.info("%s: %s", plan.label, line)
    return masks, facts, warnings, notes


def _prescription(plan: PlanFiles, options: ReadOptions, rtplan, dose: PlanDose | None) -> tuple[float, str]:
    """(prescription Gy, its source) of the plan; the dose checked against it."""
    prescription_gy, source = options.prescription_gy, "argument"
    if prescription_gy is None:
        prescription_gy, source = (rtplan.prescription_gy, rtplan.prescription_source) if rtplan else (None, "none")
        if rtplan is not None and not prescription_gy and dose is not None:  # a cut or incomplete RTPLAN
            raise FlaxdoseError(f"the RTPLAN {plan.plan.path} gives no prescription (no TargetPrescriptionDose or "
                                "dose reference): re-export it, or pass the prescription (--prescription_gy)")
        prescription_gy = prescription_gy or 0.0
    if dose is not None:
        check_dose_fits_prescription(float(dose.dose.max()), float(prescription_gy), dose.source, source)
    return prescription_gy, source


def read_plan(plan: PlanFiles, options: ReadOptions = ReadOptions(), case_id: str | None = None) -> Case:
    """Build a `Case` from one plan's files, read as `options` say (see `ReadOptions`).

    `case_id` names the case (default: `plan_case_id` of `options.keep_ids` and `options.salt`).
    Refuses (FlaxdoseError) a plan whose structures lack contours, whose grid loses a
    structure, whose dose is not one plan's planned dose or does not fit the prescription,
    or whose dose covers less than `options.min_coverage` of a target's or OAR's contoured volume
    (the body's coverage is recorded only: the body is usually longer than the dose grid).
    """
    structures, grid = options.structures, options.grid
    if grid not in ("dose", "model", "ct"):
        raise FlaxdoseError(f"grid must be 'dose', 'model' or 'ct', got {grid!r}")
    if not 0.0 <= options.min_coverage <= 1.0:
        raise FlaxdoseError(f"min_coverage must be in [0, 1], got {options.min_coverage}")
    check_external_photon(plan.plan, plan.label, plan.doses)  # first: no other refusal's advice applies to it
    if plan.problems:
        raise FlaxdoseError(f"plan in {plan.label}: " + "; ".join(plan.problems))
    if plan.struct is None:
        raise FlaxdoseError(f"no RTSTRUCT for the plan in {plan.label}; export the structure set with the plan")
    matched, listed = _structure_contours(plan, structures, options.aliases or AliasTable())
    ct = _plan_ct(plan, options)
    rtplan, dose = _plan_rtplan_and_dose(plan, options)
    rois = contour_planes({s: listed[s].polygons for s in structures}, ct.slices_z if ct is not None else None,
                          ct.slice_spacing if ct is not None else None, plan.struct.path)
    target = _case_grid(plan, options, rois, ct, dose)
    masks, facts, warnings, notes = _structure_masks(plan, options, matched, listed, rois, target, dose)

    dose_out = None
    if dose is not None:
        dose_out = dose.dose if target == dose.grid else resample(dose.dose, dose.grid, target, order=1, cval=0.0)
    ct_out = None
    if options.include_ct:
        ct_out = ct.hu if target == ct.grid else resample(ct.hu, ct.grid, target, order=1, cval=-1000.0)
    prescription_gy, source = _prescription(plan, options, rtplan, dose)
    meta = {
        "source": "dicom",
        "grid": grid,
        "grid_geometry": target.as_dict(),
        "native_dose_grid": dose.grid.as_dict() if dose is not None else None,
        "patient_position": ct.patient_position if ct is not None else "",
        "structure_rois": {s: matched[s].name for s in structures},
        "structures": facts,
        "prescription_source": source,
        "dose_summation_type": "/".join(sorted({d.dose_summation or "missing" for d in plan.doses})),
        "dose_source": dose.source if dose is not None else "none",
        "dose_type": dose.dose_type if dose is not None else "",
        "dose_max_gy": round(float(dose.dose.max()), 4) if dose is not None else None,
        "min_coverage": options.min_coverage,
        "warnings": warnings,
        "notes": notes,
        "deidentified": not options.keep_ids,
    }
    return Case(
        case_id=case_id or plan_case_id(plan, options.keep_ids,
                                        options.salt if options.salt is not None else secrets.token_hex(16)),
        structures=tuple(structures),
        masks=np.stack(masks),
        dose=dose_out,
        spacing_mm=target.spacing_mm,
        origin_mm=target.origin_mm,
        prescription_gy=float(prescription_gy),
        style=options.style,
        ct=ct_out,
        meta=meta,
    )


def read_rt(paths: str | os.PathLike | Iterable[str | os.PathLike], options: ReadOptions | None = None,
            **fields) -> Case:
    """Read one patient's DICOM-RT export (CT, RTSTRUCT, RTDOSE, RTPLAN) into a `Case`.

    `paths`: files and/or folders (searched recursively) holding exactly one plan. `options`: how it
    is read (`ReadOptions`); without them, `fields` (`ReadOptions` fields: ``structures``, ``grid``,
    ``include_ct``, ...) make them, e.g. ``read_rt(folder, structures=("PTV", "Rectum"), grid="ct")``.
    """
    options = ReadOptions.given(options, **fields)
    with Unpacker() as unpacker:  # a zip or .dcm.gz among the paths is read too, until the case is built
        scanned = scan_tree(paths, unpacker=unpacker)
        if scanned.unreadable:  # part of the plan may be inside
            path, why = scanned.unreadable[0]
            raise FlaxdoseError(f"{path}: {why}")
        return read_plan(_one_plan(scanned, paths), options)


def _one_plan(scanned: ScanResult, paths) -> PlanFiles:
    """The one external photon plan among the scanned files (others beside it left out); refuses none or several."""
    found = group_plans(scanned.files)
    plans = found.plans
    damage = plan_damage(scanned.damaged)  # any damaged file among the paths given stops the plan
    if not plans:
        reasons = [v for v in found.patients.values() if isinstance(v, str)]
        reason = (f"no complete DICOM-RT plan (CT + RTSTRUCT [+ RTDOSE]) found in {paths}"
                  + (f": {reasons[0]}" if reasons else ""))
        raise FlaxdoseError(f"{damage}; without them: {reason}" if damage else reason)
    photon = [p for p in plans if not (p.plan is not None and p.plan.not_photon)
              and not any(d.ref_plan_class == RT_ION_PLAN_STORAGE for d in p.doses)]
    if not photon:
        check_external_photon(plans[0].plan, plans[0].label, plans[0].doses)
    if len(photon) > 1:
        raise FlaxdoseError(
            f"{len(photon)} plans found in {paths} ({len(found.patients)} patient(s)); read_rt reads one plan: pass "
            "one plan's files, or import them all with `python -m flaxdose.import_dicom`"
        )
    plan = photon[0]  # brachytherapy and ion plans beside it are left out
    if damage:
        plan.problems = plan.problems + [damage]
    return plan
