"""Reading DICOM files: pydicom access that turns damage into FlaxdoseError, headers, scanning, grouping.

`scan_tree` reads the header of every file under some folders and lists what it did not read
(files that are not DICOM, hidden files, archives it could not unpack; damaged DICOM apart);
with an `Unpacker` it reads the files inside archives too. `group_plans` ties the files of each
patient into plans (CT series, RTSTRUCT, RTDOSE, RTPLAN) by what they are (SOP class) and by
the Type 1/2 references between them, never by optional (Type 3) attributes alone:

- a file's kind is its SOP Class UID (Modality only where the class is missing; Enhanced CT
  is CT); media directories (DICOMDIR), other SOP classes and flaxdose's own predicted
  RTDOSEs are set aside and listed, as are RTPLANs that no dose belongs to;
- copies of one instance (same SOP Instance UID, same content) count once; differing files
  that share a SOP Instance UID stop the plans that use that UID;
- an RTSTRUCT's frame of reference is the one its ROIs name (ReferencedFrameOfReferenceUID,
  Type 1 in the StructureSetROISequence), else its ReferencedFrameOfReferenceSequence; an
  RTPLAN without one (the module is optional there) takes its structure set's or dose's;
- an RTDOSE belongs to the RTPLAN its ReferencedRTPlanSequence names (else the frame of
  reference's only RTPLAN); an RTPLAN to the structure set its ReferencedStructureSetSequence
  names (a plan whose structure set is missing is refused; without a reference, the frame of
  reference's only RTSTRUCT); the CT is the series the structure set references, never
  another series on the frame of reference;
- per RTPLAN the dose is its PLAN dose; else its FRACTION doses; else all its BEAM doses
  (the reader sums them after checking that every fraction group or beam has its dose);
  PHYSICAL doses are chosen over EFFECTIVE ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import filecmp
import os
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from tqdm import tqdm

from flaxdose.dicom.archives import Unpacker, archive_kind
from flaxdose.dicom.damage import FIX, file_damage
from flaxdose.errors import FlaxdoseError

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_STORAGES = ("1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2")  # Enhanced, Legacy Converted
RTDOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
RTPLAN_STORAGES = ("1.2.840.10008.5.1.4.1.1.481.5", "1.2.840.10008.5.1.4.1.1.481.8")  # RT Plan, RT Ion Plan
RT_ION_PLAN_STORAGE = RTPLAN_STORAGES[1]
MEDIA_DIRECTORY_STORAGE = "1.2.840.10008.1.3.10"  # the DICOMDIR of CD/USB exports
KINDS = {CT_STORAGE: "CT", **{uid: "CT" for uid in ENHANCED_CT_STORAGES}, RTDOSE_STORAGE: "RTDOSE",
         RTSTRUCT_STORAGE: "RTSTRUCT",
         **{uid: "RTPLAN" for uid in RTPLAN_STORAGES}, MEDIA_DIRECTORY_STORAGE: "MEDIA"}
# DoseSummationType values by what the reader does with them (PS3.3 C.8.8.3.4)
PLAN_DOSE, FRACTION_DOSES, BEAM_DOSE = "PLAN", ("FRACTION", "FRACTION_SESSION"), "BEAM"

NOT_TREATMENT_INTENTS = ("VERIFICATION", "MACHINE_QA", "SERVICE")  # PlanIntent of plans no patient receives

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
    """Header facts of one DICOM file, enough to group files into plans.

    `kind` (from the SOP class) is what the file is: "CT", "RTSTRUCT", "RTDOSE", "RTPLAN",
    "MEDIA" (a DICOMDIR) or "" (anything else). `copies` lists identical copies of this
    instance that were set aside; `conflicts` lists differing files with the same SOP
    Instance UID (a plan that uses this file is refused).
    """

    path: Path
    modality: str
    sop_class: str
    sop_uid: str
    patient_id: str
    study_uid: str
    series_uid: str
    for_uid: str
    ref_plan_uid: str = ""  # RTDOSE: ReferencedRTPlanSequence
    ref_plan_class: str = ""  # RTDOSE: the SOP class it names there (RT Plan or RT Ion Plan)
    ref_struct_uid: str = ""  # RTPLAN: ReferencedStructureSetSequence
    ref_series_uid: str = ""  # RTSTRUCT: the image series of RTReferencedSeriesSequence
    ref_image_uids: frozenset[str] = frozenset()  # RTSTRUCT: images its contours name (ContourImageSequence)
    dose_summation: str = ""  # RTDOSE: DoseSummationType
    ref_fraction_group: int | None = None  # RTDOSE: ReferencedFractionGroupNumber
    ref_beams: tuple[int, ...] = ()  # RTDOSE: ReferencedBeamNumber of its ReferencedBeamSequence
    dose_type: str = ""  # RTDOSE: DoseType (PHYSICAL, EFFECTIVE, ERROR)
    predicted: bool = False  # RTDOSE: written by flaxdose (a prediction, never a plan's dose)
    not_photon: str = ""  # RTPLAN: what the plan is when it is not an external photon beam plan
    copies: list[Path] = dataclasses.field(default_factory=list)
    conflicts: list[Path] = dataclasses.field(default_factory=list)

    @property
    def kind(self) -> str:
        """"CT", "RTSTRUCT", "RTDOSE", "RTPLAN", "MEDIA" or "": by SOP Class UID, by Modality only without one."""
        if self.sop_class:
            return KINDS.get(self.sop_class, "")
        return self.modality if self.modality in ("CT", "RTSTRUCT", "RTDOSE", "RTPLAN") else ""


def _default_transfer_syntax(ds) -> None:
    """Give a dataset read without File Meta the transfer syntax pydicom detected (PS3.5 default: implicit VR LE)."""
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = getattr(ds, "original_encoding", (None, None))
        if implicit is None or implicit:
            meta.TransferSyntaxUID = ImplicitVRLittleEndian
        else:
            meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def read_dataset(path, stop_before_pixels: bool):
    """pydicom.dcmread; files without preamble and File Meta (bare datasets) are read with force=True.

    A bare dataset gets the transfer syntax pydicom detected (implicit VR little endian, the
    DICOM default, for most), so its pixel data decodes. Raises pydicom's InvalidDicomError
    when the file is not DICOM at all.
    """
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
        if "SOPClassUID" not in ds and "Modality" not in ds:
            raise
    _default_transfer_syntax(ds)
    return ds


def read_full(f: DicomFile):
    """The whole dataset of `f` (pixels included); damage raises FlaxdoseError naming the file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with reading(f.path, f.kind or f.modality or "the file"):
            return read_dataset(f.path, stop_before_pixels=False)


def read_header(path):
    """The dataset of `path` without pixel data; damage raises FlaxdoseError naming the file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with reading(path, "the header"):
            return read_dataset(path, stop_before_pixels=True)


def pixel_frames(ds, path, frames: int) -> np.ndarray:
    """The stored pixel values as (frames, rows, columns); a size that disagrees with the header raises."""
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


def _int_or_none(ds, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _structure_set_for(ds) -> str:
    """An RTSTRUCT's frame of reference: the one its ROIs name (Type 1), else the Type 3 sequence's."""
    named = [text(item, "ReferencedFrameOfReferenceUID") for item in ds.get("StructureSetROISequence") or []]
    named = [uid for uid in named if uid]
    if named:
        return max(dict.fromkeys(named), key=named.count)  # the most common; ties: the first
    refs = ds.get("ReferencedFrameOfReferenceSequence") or []
    return text(refs[0], "FrameOfReferenceUID") if refs else text(ds, "FrameOfReferenceUID")


def _contour_images(ds) -> frozenset[str]:
    """The CT images an RTSTRUCT's contours name (Type 3): the series they belong to is its CT."""
    return frozenset(
        uid for rc in ds.get("ROIContourSequence") or [] for contour in rc.get("ContourSequence") or []
        for image in contour.get("ContourImageSequence") or [] if (uid := text(image, "ReferencedSOPInstanceUID"))
    )


def _dose_references(f: DicomFile, ds) -> None:
    plans = ds.get("ReferencedRTPlanSequence") or []
    if not plans:
        return
    f.ref_plan_uid = text(plans[0], "ReferencedSOPInstanceUID")
    f.ref_plan_class = text(plans[0], "ReferencedSOPClassUID")
    groups = plans[0].get("ReferencedFractionGroupSequence") or []
    if groups:
        f.ref_fraction_group = _int_or_none(groups[0], "ReferencedFractionGroupNumber")
        beams = [_int_or_none(b, "ReferencedBeamNumber") for b in groups[0].get("ReferencedBeamSequence") or []]
        f.ref_beams = tuple(b for b in beams if b is not None)


def flaxdose_prediction(ds) -> bool:
    """Whether an RTDOSE was written by flaxdose (`flaxdose.dicom.rtdose`): Manufacturer "flaxdose", or
    its DoseComment; a prediction written back beside the plan must never become the plan's dose."""
    return text(ds, "Manufacturer").lower() == "flaxdose" or "predicted by flaxdose" in text(ds, "DoseComment").lower()


def plan_technique(ds, sop_class: str) -> str:
    """'' for an external photon beam treatment plan, else what the RTPLAN is ("a brachytherapy plan
    (BrachyTreatmentType HDR)", "an RT Ion Plan", "an electron beam plan (RadiationType ELECTRON)",
    "a verification plan (PlanIntent VERIFICATION)")."""
    if sop_class == RT_ION_PLAN_STORAGE or "IonBeamSequence" in ds:
        return "an RT Ion Plan (proton or ion beams)"
    brachy = text(ds, "BrachyTreatmentType")
    if brachy or "ApplicationSetupSequence" in ds:
        return f"a brachytherapy plan (BrachyTreatmentType {brachy or 'missing'})"
    kinds = {text(b, "RadiationType").upper() for b in ds.get("BeamSequence") or []
             if text(b, "TreatmentDeliveryType").upper() != "SETUP"} - {"", "PHOTON"}
    if kinds:
        names = "/".join(sorted(kinds))
        return f"{'an' if names[0] in 'AEIOU' else 'a'} {names.lower()} beam plan (RadiationType {names})"
    intent = text(ds, "PlanIntent").upper()
    if intent in NOT_TREATMENT_INTENTS:  # a dose computed on a phantom or for the machine
        return f"a {intent.lower().replace('_', ' ')} plan (PlanIntent {intent}), not a patient's treatment plan"
    if text(ds, "RTPlanGeometry").upper() == "TREATMENT_DEVICE":
        return "a plan on a treatment device (RTPlanGeometry TREATMENT_DEVICE), not on the patient"
    return ""


def _claims_dicom(path: Path) -> bool:
    """Named like DICOM (.dcm, .dicom) or carrying the DICM magic of PS3.10 at byte 128."""
    if Path(path).suffix.lower() in (".dcm", ".dicom"):
        return True
    with open(path, "rb") as fh:
        return fh.read(132)[128:132] == b"DICM"


def _not_dicom(path: Path) -> None:
    """None for a file that is not DICOM; FlaxdoseError for one that claims to be (a cut or empty export file)."""
    if not _claims_dicom(path):
        return None
    size = Path(path).stat().st_size
    raise FlaxdoseError(f"{path}: looks like a DICOM file but holds no readable DICOM header ({size} bytes"
                        f"{': empty' if size == 0 else ''}); re-export it, or move it out of the export")


def file_header(path: Path) -> DicomFile | None:
    """Header facts, or None for a file that is not DICOM. Damaged DICOM -> FlaxdoseError, also for a
    file named .dcm (or with the DICM magic) that has no readable header: an empty or cut export file,
    and for a CT, RTSTRUCT, RTDOSE or RTPLAN that `flaxdose.dicom.damage.file_damage` finds damaged."""

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = read_dataset(path, stop_before_pixels=True)
        except InvalidDicomError:
            return _not_dicom(path)
        except FlaxdoseError:
            raise
        except Exception as e:  # noqa: BLE001
            raise FlaxdoseError(f"{path}: unreadable DICOM file ({type(e).__name__}: {str(e)[:120]}); {FIX}") from None
        directory = text(getattr(ds, "file_meta", {}), "MediaStorageSOPClassUID") == MEDIA_DIRECTORY_STORAGE
        if not directory and not any(k in ds for k in ("SOPClassUID", "SOPInstanceUID", "Modality")):
            return _not_dicom(path)
        with reading(path, "the DICOM header"):
            sop_class = text(ds, "SOPClassUID") or text(getattr(ds, "file_meta", {}), "MediaStorageSOPClassUID")
            modality = text(ds, "Modality").upper()
            f = DicomFile(
                path=Path(path), modality=modality, sop_class=sop_class, sop_uid=text(ds, "SOPInstanceUID"),
                patient_id=text(ds, "PatientID"), study_uid=text(ds, "StudyInstanceUID"),
                series_uid=text(ds, "SeriesInstanceUID"), for_uid=text(ds, "FrameOfReferenceUID"),
            )
            f.modality = modality or (f.kind if f.kind != "MEDIA" else "")
            damage = file_damage(path, ds, f.kind)  # Type 1 UIDs missing, cut short, short PixelData
            if damage:
                raise FlaxdoseError(damage)
            if f.kind == "RTSTRUCT":
                f.for_uid = _structure_set_for(ds)
                for ref in ds.get("ReferencedFrameOfReferenceSequence") or []:
                    for study in ref.get("RTReferencedStudySequence") or []:
                        for series in study.get("RTReferencedSeriesSequence") or []:
                            f.ref_series_uid = f.ref_series_uid or text(series, "SeriesInstanceUID")
                f.ref_image_uids = _contour_images(ds)
            elif f.kind == "RTDOSE":
                f.dose_summation = text(ds, "DoseSummationType").upper()
                f.dose_type = text(ds, "DoseType").upper()
                f.predicted = flaxdose_prediction(ds)
                _dose_references(f, ds)
            elif f.kind == "RTPLAN":
                sets = ds.get("ReferencedStructureSetSequence") or []
                f.ref_struct_uid = text(sets[0], "ReferencedSOPInstanceUID") if sets else ""
                f.not_photon = plan_technique(ds, sop_class)
        return f


@dataclasses.dataclass
class ScanResult:
    """What `scan_tree` found under some paths; nothing is left out unseen.

    files: the header of each readable DICOM file; damaged: (path, why) of damaged DICOM files;
    not_read: (path, why) of files that are not DICOM or hidden; unreadable: (archive, why) of
    archives that could not be unpacked (a patient may be inside); unpacked: (archive, number of
    files) of the archives read.
    """

    files: list[DicomFile] = dataclasses.field(default_factory=list)
    damaged: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    not_read: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    unreadable: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    unpacked: list[tuple[str, int]] = dataclasses.field(default_factory=list)


def _candidates(paths, others: list | None = None) -> list[Path]:
    """The files under `paths`; entries that are neither files nor folders (broken links) go to `others`."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(p.rglob("*"))
            out += [q for q in found if q.is_file()]
            if others is not None:
                others += [(str(q), "not a file (a broken link?)") for q in found if not q.is_file() and not q.is_dir()]
        elif p.is_file():
            out.append(p)
        else:
            raise FlaxdoseError(f"{p} does not exist; pass DICOM files or folders that hold them")
    return out


def scan_tree(paths: str | os.PathLike | Iterable[str | os.PathLike], progress: bool = False,
              unpacker: Unpacker | None = None) -> ScanResult:
    """Every file under `paths` (files or folders, searched recursively), each read or listed.

    With an `unpacker`, zip and tar archives and compressed files (.dcm.gz) are unpacked into it
    and their files read too (the unpacker must stay open while they are read); without one
    they are listed as not DICOM. Raises FlaxdoseError for a path that does not exist.
    """
    found = ScanResult()
    queue = [(path, 0) for path in _candidates(paths, found.not_read)]
    bar = None
    if progress:
        bar = tqdm(total=len(queue), desc="scanning", unit="file", file=sys.stderr)
    while queue:
        path, depth = queue.pop(0)
        if bar is not None:
            bar.update()
        if path.name.startswith("."):  # .DS_Store, macOS ._* resource forks: not exports
            found.not_read.append((str(path), "hidden file"))
            continue
        kind = archive_kind(path) if unpacker is not None else ""
        if kind:
            try:
                inner = _candidates([unpacker.unpack(path, kind, depth + 1)])
            except ValueError as e:
                found.unreadable.append((str(path), str(e)))
                continue
            found.unpacked.append((str(path), len(inner)))
            queue += [(q, depth + 1) for q in inner]
            if bar is not None:
                bar.total += len(inner)
            continue
        try:
            f = file_header(path)
        except FlaxdoseError as e:
            found.damaged.append((str(path), str(e)))
            continue
        if f is None:
            found.not_read.append((str(path), "not DICOM"))
        else:
            found.files.append(f)
    if bar is not None:
        bar.close()
    return found


def scan(paths: str | os.PathLike | Iterable[str | os.PathLike], progress: bool = False):
    """Headers of every DICOM file under `paths` (files or folders, searched recursively).

    Returns (files, problems): `files` the `DicomFile` of each readable DICOM file, `problems`
    (path, message) of damaged DICOM files; files that are not DICOM at all (archives
    included: `scan_tree` unpacks them) and hidden files are left out. Raises FlaxdoseError
    for a path that does not exist.
    """
    found = scan_tree(paths, progress)
    return found.files, found.damaged


def same_instance(a: Path, b: Path) -> bool:
    """Whether two files hold the same DICOM instance: equal bytes, or equal datasets (any encoding)."""
    if filecmp.cmp(a, b, shallow=False):
        return True
    try:
        return read_full(DicomFile(a, "", "", "", "", "", "", "")) == read_full(DicomFile(b, "", "", "", "", "", "", ""))
    except FlaxdoseError:
        return False


def unique_instances(files: Sequence[DicomFile]) -> tuple[list[DicomFile], list[tuple[Path, Path]]]:
    """One file per SOP Instance UID: (files, [(kept, identical copy set aside)]).

    A differing file with the UID of a kept one is recorded in the kept file's `conflicts`.
    """
    kept: dict[str, DicomFile] = {}
    out, copies = [], []
    for f in files:
        first = kept.get(f.sop_uid) if f.sop_uid else None
        if first is None:
            kept[f.sop_uid] = f
            out.append(f)
        elif same_instance(first.path, f.path):
            first.copies.append(f.path)
            copies.append((first.path, f.path))
        else:
            first.conflicts.append(f.path)
    return out, copies


@dataclasses.dataclass
class PlanFiles:
    """The files of one plan: CT series, structure set, dose(s), plan (some may be absent).

    `doses` holds the one PLAN or FRACTION dose, or the BEAM doses to sum (`dose_kind`
    says which; "" without dose). `problems` stop the plan when it is read; `notes` say
    what was set aside (they go into the case metadata).
    """

    patient_id: str
    for_uid: str
    study_uid: str
    struct: DicomFile | None
    ct: list[DicomFile]
    doses: list[DicomFile]
    plan: DicomFile | None
    dose_kind: str = ""
    problems: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    ct_missing: str = ""  # the structure set's CT series is not in the export (why, naming both series)

    @property
    def ct_series_uid(self) -> str:
        """The SeriesInstanceUID of the plan's CT ('' without CT): the series the case is read from."""
        return self.ct[0].series_uid if self.ct else ""

    @property
    def dose(self) -> DicomFile | None:
        """The first dose file (the only one unless BEAM doses are summed)."""
        return self.doses[0] if self.doses else None

    @property
    def files(self) -> list[DicomFile]:
        """Every file the plan reads: structure set, RTPLAN, CT slices, doses."""
        return [f for f in (self.struct, self.plan, *self.ct, *self.doses) if f is not None]

    @property
    def label(self) -> str:
        """Where the plan lives on disk (for console messages only, never stored)."""
        f = self.struct or self.dose or (self.ct[0] if self.ct else None)
        return str(f.path.parent) if f else "?"


@dataclasses.dataclass
class Grouping:
    """What `group_plans` found: plans per patient (or why none), copies set aside, files ignored."""

    patients: dict[str, list[PlanFiles] | str]
    copies: list[tuple[Path, Path]]  # (kept, identical copy set aside)
    ignored: list[tuple[Path, str]]  # (file, why): media directories, SOP classes flaxdose does not use
    unused: list[tuple[Path, str]] = dataclasses.field(default_factory=list)  # (RTPLAN, why): plans without dose

    @property
    def plans(self) -> list[PlanFiles]:
        """Every plan found, over all patients (patients without a plan left out)."""
        return [p for v in self.patients.values() if isinstance(v, list) for p in v]


def group_plans(files: Sequence[DicomFile]) -> Grouping:
    """Group files by patient and frame of reference into plans (see the module docstring).

    Identical copies of an instance count once; media directories and SOP classes other
    than CT, RTSTRUCT, RTDOSE and RTPLAN are set aside. A frame of reference gives one plan
    per RTPLAN with doses (and one per PLAN dose that names no RTPLAN).
    """
    files, copies = unique_instances(files)
    used, ignored = [], []
    for f in files:
        if f.kind == "MEDIA":
            ignored.append((f.path, "media directory (DICOMDIR)"))
        elif not f.kind:
            ignored.append((f.path, f"{f.modality or 'unknown'} object (SOP class {f.sop_class or 'missing'})"))
        elif f.predicted:
            ignored.append((f.path, "flaxdose prediction (not a calculated dose)"))
        else:
            used.append(f)
    by_patient: dict[str, list[DicomFile]] = defaultdict(list)
    for f in used:
        by_patient[f.patient_id].append(f)
    found = Grouping({pid: _patient_plans(pid, pfiles) for pid, pfiles in by_patient.items()}, copies, ignored)
    taken = {p.plan.sop_uid for p in found.plans if p.plan is not None}
    found.unused = [(f.path, "an RTPLAN that no RTDOSE in the export belongs to (no case: export its dose)")
                    for f in used if f.kind == "RTPLAN" and f.sop_uid not in taken
                    and isinstance(found.patients.get(f.patient_id), list)]
    return found


def _patient_plans(pid: str, files: list[DicomFile]) -> list[PlanFiles] | str:
    by_uid = {f.sop_uid: f for f in files if f.sop_uid}
    for plan in (f for f in files if f.kind == "RTPLAN" and not f.for_uid):
        # the Frame of Reference module is optional in an RTPLAN: take its structure set's or dose's
        struct = by_uid.get(plan.ref_struct_uid)
        doses = [d.for_uid for d in files if d.kind == "RTDOSE" and d.ref_plan_uid == plan.sop_uid and d.for_uid]
        plan.for_uid = (struct.for_uid if struct is not None else "") or (doses[0] if doses else "")
    frames = {f.for_uid for f in files if f.for_uid and f.kind in ("CT", "RTDOSE")}
    for struct in (f for f in files if f.kind == "RTSTRUCT" and not f.for_uid):
        # a damaged structure set naming no frame of reference: its plan's, else the patient's only one
        plans = [p.for_uid for p in files if p.kind == "RTPLAN" and p.ref_struct_uid == struct.sop_uid and p.for_uid]
        struct.for_uid = plans[0] if plans else next(iter(frames)) if len(frames) == 1 else ""
    by_for: dict[str, list[DicomFile]] = defaultdict(list)
    for f in files:
        by_for[f.for_uid].append(f)
    plans, reasons = [], []
    for for_uid, group in by_for.items():
        kinds = defaultdict(list)
        for f in group:
            kinds[f.kind].append(f)
        structs = kinds["RTSTRUCT"]
        if not structs:
            if kinds["RTDOSE"] or kinds["CT"]:
                reasons.append(
                    f"frame of reference with {len(kinds['CT'])} CT slices and {len(kinds['RTDOSE'])} RTDOSE "
                    "but no RTSTRUCT; export the structure set too"
                )
            continue
        for plan, dose_kind, doses, problems, notes in _dose_units(kinds["RTDOSE"], kinds["RTPLAN"], by_uid):
            struct, struct_problems = _structure_set(structs, plan, by_uid)
            cts, ct_problems, ct_missing = _ct_series(kinds["CT"], struct)
            problems = problems + struct_problems + ct_problems + _conflicts([struct, plan, *doses, *cts])
            if ct_missing:  # the case metadata names no UIDs
                notes = notes + ["the structure set's CT series is not in the export; another CT series on its "
                                 "frame of reference was not used"]
            plans.append(PlanFiles(pid, for_uid, struct.study_uid, struct, cts, doses, plan, dose_kind, problems, notes,
                                   ct_missing))
    return plans if plans else ("; ".join(reasons) or "no RTSTRUCT found")


def _dose_units(doses: list[DicomFile], rtplans: list[DicomFile], by_uid: dict[str, DicomFile]):
    """(RTPLAN or None, dose kind, doses, problems, notes) per plan: PLAN, else FRACTION, else the BEAM doses."""
    sole_plan = rtplans[0] if len(rtplans) == 1 else None
    by_ref: dict[str, list[DicomFile]] = defaultdict(list)
    for d in doses:
        by_ref[d.ref_plan_uid].append(d)
    units = []
    for ref, group in by_ref.items():
        plan = by_uid.get(ref) if ref else sole_plan
        plan = plan if plan is not None and plan.kind == "RTPLAN" else None
        group, notes = _physical_first(group)
        by_type: dict[str, list[DicomFile]] = defaultdict(list)
        for d in group:
            by_type[d.dose_summation or PLAN_DOSE].append(d)  # Type 1; a missing one reads as PLAN (noted)
        fractions = [d for t in FRACTION_DOSES for d in by_type.get(t, [])]
        if PLAN_DOSE in by_type:
            chosen, kind = by_type[PLAN_DOSE], PLAN_DOSE
        elif fractions:  # one per fraction group: the reader sums them once every group has its dose
            chosen, kind = sorted(fractions, key=lambda d: d.ref_fraction_group or 0), "FRACTION"
        elif BEAM_DOSE in by_type:
            chosen, kind = sorted(by_type[BEAM_DOSE], key=lambda d: d.ref_beams), BEAM_DOSE
        else:
            chosen, kind = group, "/".join(sorted(by_type))
        notes += [f"set aside {len(v)} {t} dose(s): the plan has a {kind} dose"
                  for t, v in sorted(by_type.items()) if v[0] not in chosen]
        if ref and plan is None:
            notes.append("the dose names an RTPLAN that is not in the export: no prescription, fractions or beams")
        elif not ref and plan is not None:
            notes.append("the dose names no RTPLAN: the only RTPLAN on its frame of reference is taken as its plan")
        notes += ["DoseSummationType missing: read as PLAN" for d in chosen if not d.dose_summation]
        if kind == PLAN_DOSE and not ref:  # doses that name no RTPLAN: one plan each
            units += [(plan, kind, [d], [], notes) for d in chosen]
        elif kind == PLAN_DOSE and len(chosen) > 1:
            names = [d.path.name for d in chosen]
            units.append((plan, kind, chosen, [f"{len(chosen)} {kind} doses {names} belong to one RTPLAN; "
                                                "export only the plan's final dose"], notes))
        else:
            units.append((plan, kind, chosen, [], notes))
    return units or [(sole_plan, "", [], [], [])]


def _physical_first(doses: list[DicomFile]) -> tuple[list[DicomFile], list[str]]:
    """The PHYSICAL doses when there are any (EFFECTIVE ones, an ion plan's RBE-weighted copy, set aside)."""
    physical = [d for d in doses if d.dose_type == "PHYSICAL"]
    others = sorted({d.dose_type or "missing" for d in doses if d.dose_type != "PHYSICAL"})
    if not physical or not others:
        return doses, []
    return physical, [f"set aside {len(doses) - len(physical)} dose(s) of DoseType {'/'.join(others)}: the plan "
                      "has a PHYSICAL dose"]


def _structure_set(structs: list[DicomFile], plan: DicomFile | None,
                   by_uid: dict[str, DicomFile]) -> tuple[DicomFile, list[str]]:
    if plan is not None and plan.ref_struct_uid:
        named = [s for s in structs if s.sop_uid == plan.ref_struct_uid]
        if named:
            return named[0], []
        elsewhere = by_uid.get(plan.ref_struct_uid)
        where, fix = ((f"{elsewhere.path}, on another frame of reference than the dose", "its dose on its frame")
                      if elsewhere is not None else ("which is not in the export", "the plan's structure set with it"))
        return structs[0], [  # another structure set on the frame may hold other contours: never guessed
            f"the RTPLAN {plan.path.name} references structure set {plan.ref_struct_uid}, {where}; "
            f"{[s.path.name for s in structs]} on the dose's frame of reference is another one: export {fix}"
        ]
    if len(structs) == 1:
        return structs[0], []
    return structs[0], [
        f"{len(structs)} structure sets share one frame of reference ({[s.path.name for s in structs]}) and no "
        "RTPLAN says which one belongs to the dose; export one structure set per plan"
    ]


def _ct_series(cts: list[DicomFile], struct: DicomFile) -> tuple[list[DicomFile], list[str], str]:
    """(the plan's CT slices, problems, why the referenced CT is missing or ''): the series the structure
    set references; another series on the frame of reference is another scan and is never used instead."""
    series = sorted({c.series_uid for c in cts})
    ref = struct.ref_series_uid or _series_of_images(cts, struct.ref_image_uids)
    if ref in series:
        return [c for c in cts if c.series_uid == ref], [], ""
    if ref and series:
        folders = sorted({str(c.path.parent) for c in cts})
        return [], [], (f"the structure set {struct.path.name} references CT series {ref}, which is not in the "
                        f"export; CT series {series} in {folders} on the same frame of reference is another scan "
                        "and was not used")
    if len(series) <= 1:
        return cts, [], ""
    return cts, [f"{len(series)} CT series share the frame of reference and the structure set names none of "
                 "them; export only the planning CT"], ""


def _series_of_images(cts: list[DicomFile], images: frozenset[str]) -> str:
    """The one CT series holding images that contours name ('' when they name none; "not in the
    export" when the export holds none of them)."""
    if not images:
        return ""
    named = {c.series_uid for c in cts if c.sop_uid in images}
    return next(iter(named)) if len(named) == 1 else "" if named else "(the series of the contours' CT images)"


def _conflicts(files: Sequence[DicomFile | None]) -> list[str]:
    out = [f"{f.path} and {[str(p) for p in f.conflicts]} share SOPInstanceUID {f.sop_uid} but differ; remove the "
           "wrong file (one instance, one content)" for f in files if f is not None and f.conflicts]
    return out[:3]
