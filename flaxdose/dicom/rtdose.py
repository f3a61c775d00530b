"""RTDOSE export: a predicted dose back onto the patient's CT as a DICOM RT Dose object.

`write_rtdose` writes one RT Dose instance (PS3.3 A.18: Patient, General Study, RT Series,
Frame of Reference, General Equipment, General Image, Image Plane, Image Pixel,
Multi-frame, RT Dose, SOP Common modules) that a planning system and 3D Slicer load on the
reference CT: Study Instance UID and Frame of Reference UID (and the patient module) come
from the CT, SOP Instance and Series Instance UIDs are new. Dose is stored as 32-bit (or 16-bit)
unsigned integers x DoseGridScaling, the scaling chosen so the maximum does not clip;
negative predicted doses are stored as 0. The file is written atomically.

A PLAN dose must reference its RTPLAN (ReferencedRTPlanSequence, Type 1C): give `plan_path`
(`flaxdose.inference.export_plan_rtdose` passes the export's RTPLAN). Manufacturer "flaxdose" and
SeriesDescription "flaxdose predicted dose" mark the file as a prediction, so flaxdose's readers
never take it for a plan's dose. A patient or study value of the CT that is invalid for its VR
(a date written 02.01.2024) is left empty rather than copied into an invalid file. Files written
with a plan pass dciodvfy (dicom3tools) without an error (tests/test_rtdose.py).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds, validate_value

from flaxdose.data.case import Case
from flaxdose.data.grid import Grid
from flaxdose.dicom.damage import plan_damage
from flaxdose.dicom.files import CT_STORAGE, RTDOSE_STORAGE, read_header, scan
from flaxdose.dicom.geometry import axial_directions, lps_layout, resample
from flaxdose.dicom.readers import read_ct
from flaxdose.errors import FlaxdoseError
from flaxdose.io import atomic_file

_MAX_STORED = {32: 2**32 - 1, 16: 2**16 - 1}
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.1"  # pydicom's root, as pydicom writes by default
log = logging.getLogger("flaxdose")


def _ds(value: float) -> str:
    return format_number_as_ds(float(value))


def dose_grid_scaling(max_dose_gy: float, bits: int = 32) -> str:
    """DoseGridScaling as a <= 16-character DS string such that max/scaling <= 2**bits - 1."""
    if not max_dose_gy > 0:
        return _ds(1e-6)
    top = _MAX_STORED[bits]
    scaling = max_dose_gy / (top * (1 - 1e-7))
    text = _ds(scaling)
    while np.rint(max_dose_gy / float(text)) > top:  # DS rounding went down: step up
        scaling *= 1 + 1e-9
        text = _ds(scaling)
    return text


def _valid_or_empty(keyword: str, value):
    """`value` when it is valid for `keyword`'s VR, else "" (logged by attribute name, never the value)."""
    try:
        validate_value(dictionary_VR(keyword), value, pydicom.config.RAISE)
        return value
    except (ValueError, TypeError, KeyError):
        log.warning("the reference CT's %s is not a valid DICOM value: left empty in the RTDOSE", keyword)
        return ""


def _reference_ct(reference_ct, ct_series_uid: str | None):
    files, damaged = scan(reference_ct)
    damage = plan_damage(damaged, where="in the reference CT")  # a cut slice must not silently shorten the series
    if damage:
        raise FlaxdoseError(damage)
    cts = [f for f in files if f.modality == "CT" or f.sop_class == CT_STORAGE]
    if not cts:
        raise FlaxdoseError(f"no CT images found in {reference_ct}; --reference must name the patient's CT folder")
    series = sorted({f.series_uid for f in cts})
    if ct_series_uid is not None:
        cts = [f for f in cts if f.series_uid == ct_series_uid]
        if not cts:
            raise FlaxdoseError(f"{reference_ct} holds no CT series {ct_series_uid}; it holds {series}")
    elif len(series) > 1:
        raise FlaxdoseError(
            f"{reference_ct} holds {len(series)} CT series {series}: write onto the planning CT, e.g. with predict "
            "--dicom PATIENT_DIR (the series its structure set references), a --reference folder holding that series "
            "alone, or ct_series_uid= in Python"
        )
    return cts


class _Frames(NamedTuple):
    """A dose as the RTDOSE stores it: [frame, row, column] integers x `scaling` in orientation (`row`, `col`)."""

    stored: np.ndarray  # unsigned integers, [frame, row, column]
    scaling: str  # DoseGridScaling (a DS string)
    ipp: np.ndarray  # ImagePositionPatient of the first voxel (mm)
    row: np.ndarray  # direction along a row (ImageOrientationPatient's first three values)
    col: np.ndarray  # direction down a column
    d_col: float  # spacing between columns (mm)
    d_row: float  # spacing between rows (mm)
    d_frame: float  # spacing between frames (mm)


def _dose_volume(dose: Case | np.ndarray, origin_mm, spacing_mm) -> tuple[np.ndarray, Grid]:
    """The [x, y, z] dose (Gy) to write and its grid: a Case's, or an array's with `origin_mm` and `spacing_mm`."""
    if isinstance(dose, Case):
        if dose.dose is None:
            raise FlaxdoseError(f"case {dose.case_id!r} has no dose to export")
        return dose.dose, Grid(dose.origin_mm, dose.spacing_mm, dose.shape)
    volume = np.asarray(dose, np.float32)
    if volume.ndim != 3 or origin_mm is None or spacing_mm is None:
        raise FlaxdoseError(
            "write_rtdose needs a Case, or a 3-D [x, y, z] dose array with origin_mm and spacing_mm"
        )
    return volume, Grid(tuple(float(v) for v in origin_mm), tuple(float(v) for v in spacing_mm), volume.shape)


def _on_output_grid(volume: np.ndarray, src: Grid, ct, directions, output_grid: str, reference_ct):
    """(values, grid, row/column/normal directions) of the dose as written: the input grid unchanged
    (axis-aligned), or resampled onto the CT's pixels and slices within the input grid's extent."""
    if output_grid == "input":
        return volume, src, (np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, 0, 1.0]))
    lo = [src.origin_mm[a] - 1e-3 for a in range(3)]
    hi = [src.origin_mm[a] + (src.shape[a] - 1) * src.spacing_mm[a] + 1e-3 for a in range(3)]
    keep = [(ct.grid.coords(a) >= lo[a]) & (ct.grid.coords(a) <= hi[a]) for a in range(3)]
    if not all(k.any() for k in keep):
        raise FlaxdoseError(
            f"the dose grid (origin {src.origin_mm} mm, {src.shape} voxels) does not overlap the CT in "
            f"{reference_ct}; is this the CT the case was imported from?"
        )
    first = [int(np.nonzero(k)[0][0]) for k in keep]
    out_grid = Grid(
        tuple(float(ct.grid.coords(a)[first[a]]) for a in range(3)),
        ct.grid.spacing_mm,
        tuple(int(k.sum()) for k in keep),
    )
    return resample(volume, src, out_grid, order=1, cval=0.0), out_grid, directions


def _stored_frames(values: np.ndarray, out_grid: Grid, directions, bits: int) -> _Frames:
    """[x, y, z] -> the file's [frame, row, column] in orientation (r, c, n), as unsigned integers that never clip."""
    r, c, n = directions
    d_col, d_row, d_frame = (out_grid.spacing_mm[int(np.argmax(np.abs(v)))] for v in (r, c, n))
    native_shape = tuple(out_grid.shape[int(np.argmax(np.abs(v)))] for v in (n, c, r))
    perm, flips, _ = lps_layout(native_shape, np.zeros(3), r, c, n, d_col, d_row, d_frame)
    native = np.transpose(values, np.argsort(perm))
    if flips:
        native = np.flip(native, axis=tuple(flips))
    ipp = np.array(out_grid.origin_mm, np.float64)
    for k in range(3):
        a = perm[k]
        if a in flips:
            ipp[k] += (out_grid.shape[k] - 1) * out_grid.spacing_mm[k]
    native = np.clip(native, 0.0, None).astype(np.float64)
    scaling_text = dose_grid_scaling(float(native.max()) if native.size else 0.0, bits)
    stored = np.rint(native / float(scaling_text))
    assert stored.max(initial=0) <= _MAX_STORED[bits], "dose_grid_scaling guarantees no clipping"
    stored = np.ascontiguousarray(stored.astype("<u4" if bits == 32 else "<u2"))
    return _Frames(stored, scaling_text, ipp, r, c, d_col, d_row, d_frame)


def _referenced_plan(plan_path, ct_ds):
    """The RTPLAN header at `plan_path` (None without one), checked to be an RTPLAN on the CT's frame of reference."""
    if plan_path is None:
        return None
    plan = read_header(Path(plan_path))
    if str(plan.get("Modality", "")).upper() != "RTPLAN":
        raise FlaxdoseError(f"{plan_path} is not an RTPLAN (Modality {plan.get('Modality')!r}); pass the plan file")
    plan_for = str(plan.get("FrameOfReferenceUID", "") or "")
    if plan_for and plan_for != str(ct_ds.get("FrameOfReferenceUID", "")):
        raise FlaxdoseError(
            f"RTPLAN {plan_path} is on frame of reference {plan_for}, the CT on "
            f"{ct_ds.get('FrameOfReferenceUID')}; pass the plan that belongs to this CT"
        )
    if not plan.get("SOPInstanceUID") or not plan.get("SOPClassUID"):
        raise FlaxdoseError(f"{plan_path} has no SOP Instance/Class UID; it is not a valid RTPLAN")
    return plan


def _file_meta(sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTDOSE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = "FLAXDOSE"
    return meta


def _series_of_the_ct(ds: Dataset, ct_ds, series_description: str, series_number: int) -> None:
    """The Patient, General Study, RT Series, Frame of Reference and General Equipment modules."""
    # Patient + General Study: from the reference CT (type 2: present, possibly empty); a value the CT holds
    # in a form its VR does not allow (a date written 02.01.2024) is left empty, never copied into an invalid file
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        setattr(ds, keyword, _valid_or_empty(keyword, ct_ds.get(keyword, "") or ""))
    ds.StudyInstanceUID = ct_ds.StudyInstanceUID
    # RT Series
    ds.Modality = "RTDOSE"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = int(series_number)
    ds.SeriesDescription = series_description[:64]
    ds.OperatorsName = ""
    # Frame of Reference
    ds.FrameOfReferenceUID = ct_ds.FrameOfReferenceUID
    ds.PositionReferenceIndicator = ct_ds.get("PositionReferenceIndicator", "") or ""
    # General Equipment
    ds.Manufacturer = "flaxdose"
    ds.SoftwareVersions = "flaxdose"


def _dose_image(ds: Dataset, frames: _Frames, bits: int, dose_comment: str, plan) -> None:
    """The General Image, Image Plane, Image Pixel, Multi-frame and RT Dose modules."""
    # General Image
    ds.InstanceNumber = 1
    ds.ContentDate = ds.InstanceCreationDate
    ds.ContentTime = ds.InstanceCreationTime
    # Image Plane
    ds.PixelSpacing = [_ds(frames.d_row), _ds(frames.d_col)]
    ds.ImageOrientationPatient = [_ds(v) for v in (*frames.row, *frames.col)]
    ds.ImagePositionPatient = [_ds(v) for v in frames.ipp]
    ds.SliceThickness = _ds(frames.d_frame)
    # Image Pixel + RT Dose
    count, rows, cols = frames.stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.NumberOfFrames = count
    ds.FrameIncrementPointer = pydicom.tag.Tag("GridFrameOffsetVector")
    ds.GridFrameOffsetVector = [_ds(k * frames.d_frame) for k in range(count)]
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseComment = dose_comment[:64]
    ds.DoseSummationType = "PLAN"
    if plan is not None:
        ref = Dataset()
        ref.ReferencedSOPClassUID = plan.SOPClassUID
        ref.ReferencedSOPInstanceUID = plan.SOPInstanceUID
        ds.ReferencedRTPlanSequence = DSequence([ref])
    ds.DoseGridScaling = frames.scaling
    ds.PixelData = frames.stored.tobytes()


def _rtdose_dataset(ct_ds, plan, frames: _Frames, bits: int, series_description: str, series_number: int,
                    dose_comment: str) -> Dataset:
    """The RT Dose instance (with its File Meta) of `frames` on the reference CT's series."""
    now = datetime.datetime.now()
    sop_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(sop_uid)
    ds.SpecificCharacterSet = ct_ds.get("SpecificCharacterSet", "ISO_IR 100") or "ISO_IR 100"
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.SOPClassUID = RTDOSE_STORAGE
    ds.SOPInstanceUID = sop_uid
    _series_of_the_ct(ds, ct_ds, series_description, series_number)
    _dose_image(ds, frames, bits, dose_comment, plan)
    return ds


def _write_valid(ds: Dataset, out_path: str | os.PathLike) -> Path:
    """Write `ds` atomically at `out_path` (a folder gets ``RD.<SOPInstanceUID>.dcm``), refusing an invalid dataset."""
    out_path = Path(out_path)
    if out_path.is_dir():
        out_path = out_path / f"RD.{ds.SOPInstanceUID}.dcm"
    old_mode = pydicom.config.settings.writing_validation_mode
    try:
        pydicom.config.settings.writing_validation_mode = pydicom.config.RAISE
        with atomic_file(out_path, "wb") as f:
            try:
                pydicom.dcmwrite(f, ds, enforce_file_format=True)
            except (ValueError, TypeError) as e:
                raise FlaxdoseError(f"cannot write a valid RTDOSE ({e}); check the reference CT's patient/study attributes") from None
    finally:
        pydicom.config.settings.writing_validation_mode = old_mode
    return out_path


def write_rtdose(
    dose: Case | np.ndarray,
    reference_ct: str | os.PathLike | Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    plan_path: str | os.PathLike | None = None,
    *,
    origin_mm: Sequence[float] | None = None,
    spacing_mm: Sequence[float] | None = None,
    output_grid: str = "ct",
    ct_series_uid: str | None = None,
    series_description: str = "flaxdose predicted dose",
    series_number: int = 901,
    dose_comment: str = "Predicted by flaxdose (not a calculated dose)",
    bits: int = 32,
) -> Path:
    """Write `dose` (Gy) as an RTDOSE on the frame of reference of the CT in `reference_ct`.

    dose: a `Case` (its `dose`, `origin_mm`, `spacing_mm` are used) or an [x, y, z] array
        with `origin_mm` and `spacing_mm` (LPS, patient coordinates of that CT).
    reference_ct: the CT folder (or files) the case was imported from.
    out_path: the file to write, or an existing folder (file `RD.<SOPInstanceUID>.dcm`).
    plan_path: an RTPLAN file; when given, DoseSummationType PLAN references it.
    output_grid: "ct" resamples (trilinear) onto the CT's pixels and slices, cropped to
        the extent of the input grid, in the CT's orientation; "input" writes the input grid
        unchanged (axis-aligned, ImageOrientationPatient 1\\0\\0\\0\\1\\0).
    bits: 32 (default) or 16 bits per stored dose value.
    Returns the path written. Patient and study attributes are copied from the CT, so the
    file carries the patient's identity like the CT it belongs to.
    Raises FlaxdoseError for a case without dose, an array without geometry, non-finite dose,
    bad `bits` / `output_grid`, no (or several, without `ct_series_uid`) CT series in
    `reference_ct`, a dose grid that does not overlap the CT, an RTPLAN on another frame of
    reference, or a dataset pydicom refuses to write.
    """
    volume, src = _dose_volume(dose, origin_mm, spacing_mm)
    if not np.isfinite(volume).all():
        raise FlaxdoseError("the dose to export holds NaN or infinite values")
    if bits not in _MAX_STORED:
        raise FlaxdoseError(f"bits must be 16 or 32, got {bits}")
    if output_grid not in ("ct", "input"):
        raise FlaxdoseError(f"output_grid must be 'ct' or 'input', got {output_grid!r}")
    cts = _reference_ct(reference_ct, ct_series_uid)
    ct = read_ct(cts, load_pixels=False)
    ct_ds = read_header(cts[0].path)
    directions = axial_directions(ct.orientation, f"CT {cts[0].path}")  # an Enhanced CT keeps it per frame
    values, out_grid, directions = _on_output_grid(volume, src, ct, directions, output_grid, reference_ct)
    frames = _stored_frames(values, out_grid, directions, bits)
    plan = _referenced_plan(plan_path, ct_ds)
    ds = _rtdose_dataset(ct_ds, plan, frames, bits, series_description, series_number, dose_comment)
    return _write_valid(ds, out_path)
