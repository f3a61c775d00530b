"""Reading DICOM files: pydicom access that turns damage into FlaxdoseError, headers, scanning, grouping.

`scan` reads the header of every file under some folders (files that are not DICOM are
ignored, damaged DICOM is listed); `group_plans` ties the files of each patient into plans
(CT series, RTSTRUCT, RTDOSE, RTPLAN).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from flaxdose.errors import FlaxdoseError

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RTDOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
RTPLAN_STORAGES = ("1.2.840.10008.5.1.4.1.1.481.5", "1.2.840.10008.5.1.4.1.1.481.8")  # RT Plan, RT Ion Plan

MAX_VOXELS = 600_000_000  # refuse pixel data larger than this (a damaged header)


@contextlib.contextmanager
def reading(path, what: str):
    """Context: anything pydicom or a damaged file raises becomes a FlaxdoseError naming `path` and `what`."""
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


def attr(ds, keyword: str, path, required: bool = True):
    """`ds.keyword`, or None when absent or empty; a missing required one raises FlaxdoseError naming `path`."""
    value = ds.get(keyword) if hasattr(ds, "get") else None
    if value is None or (not isinstance(value, (str, bytes)) and hasattr(value, "__len__") and len(value) == 0):
        if required:
            raise FlaxdoseError(
                f"{path}: required attribute {keyword} is missing; re-export the file from the planning system"
            )
        return None
    return value


def floats(ds, keyword: str, path, n: int | None = None, required: bool = True) -> np.ndarray | None:
    """A numeric attribute as float64 (n,) (n values when given, all finite); None when absent and not required."""
    value = attr(ds, keyword, path, required)
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


def integer(ds, keyword: str, path, lo: int = 1, hi: int = 1 << 20, default=None) -> int:
    """An integer attribute within [lo, hi] (else FlaxdoseError); `default` when absent (None: required)."""
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


def text(ds, keyword: str) -> str:
    """A string attribute, stripped; '' when absent or unreadable (never raises)."""
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


def read_dataset(path, stop_before_pixels: bool):
    """pydicom.dcmread, retried with force=True for files without the DICOM preamble.

    Raises pydicom's InvalidDicomError when the file is not DICOM at all.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
        if "SOPClassUID" not in ds and "Modality" not in ds:
            raise
        return ds


def read_full(f: DicomFile):
    """The whole dataset of `f` (pixels included); damage raises FlaxdoseError naming the file."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with reading(f.path, f.modality or "the file"):
            return read_dataset(f.path, stop_before_pixels=False)


def read_header(path):
    """The dataset of `path` without pixel data; damage raises FlaxdoseError naming the file."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with reading(path, "the header"):
            return read_dataset(path, stop_before_pixels=True)


def file_header(path: Path) -> DicomFile | None:
    """Header facts, or None for a file that is not DICOM. Damaged DICOM -> FlaxdoseError."""
    import warnings

    from pydicom.errors import InvalidDicomError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = read_dataset(path, stop_before_pixels=True)
        except InvalidDicomError:
            return None
        except FlaxdoseError:
            raise
        except Exception as e:  # noqa: BLE001
            raise FlaxdoseError(f"{path}: unreadable DICOM file ({type(e).__name__}: {str(e)[:120]})") from None
        with reading(path, "the DICOM header"):
            sop_class = text(ds, "SOPClassUID")
            modality = text(ds, "Modality").upper()
            if not modality:
                modality = {CT_STORAGE: "CT", RTDOSE_STORAGE: "RTDOSE", RTSTRUCT_STORAGE: "RTSTRUCT"}.get(sop_class, "")
                modality = modality or ("RTPLAN" if sop_class in RTPLAN_STORAGES else "")
            f = DicomFile(
                path=Path(path), modality=modality, sop_class=sop_class, sop_uid=text(ds, "SOPInstanceUID"),
                patient_id=text(ds, "PatientID"), study_uid=text(ds, "StudyInstanceUID"),
                series_uid=text(ds, "SeriesInstanceUID"), for_uid=text(ds, "FrameOfReferenceUID"),
            )
            if modality == "RTSTRUCT":
                refs = ds.get("ReferencedFrameOfReferenceSequence") or []
                if not f.for_uid and refs:
                    f.for_uid = text(refs[0], "FrameOfReferenceUID")
                for ref in refs:
                    for study in ref.get("RTReferencedStudySequence") or []:
                        for series in study.get("RTReferencedSeriesSequence") or []:
                            f.ref_series_uid = f.ref_series_uid or text(series, "SeriesInstanceUID")
            elif modality == "RTDOSE":
                plans = ds.get("ReferencedRTPlanSequence") or []
                f.ref_plan_uid = text(plans[0], "ReferencedSOPInstanceUID") if plans else ""
                f.dose_summation = text(ds, "DoseSummationType").upper()
            elif modality == "RTPLAN":
                sets = ds.get("ReferencedStructureSetSequence") or []
                f.ref_struct_uid = text(sets[0], "ReferencedSOPInstanceUID") if sets else ""
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
            f = file_header(path)
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
