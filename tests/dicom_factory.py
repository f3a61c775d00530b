"""Synthetic DICOM-RT exports (CT, RTSTRUCT, RTDOSE, RTPLAN) of an analytic phantom.

Every shape is analytic in patient (LPS) millimetres, so the true mask at any voxel centre
and the true dose at any point are known. Geometry (HFS; other orientations show the same
patient): CT 64 columns x 48 rows, pixels 2.0 mm (x) x 2.5 mm (y), 32 slices 2.5 mm apart;
dose grid 3 mm in-plane on the CT slice planes. The RTPLAN delivers BEAMS (plus a setup beam
without dose) in FRACTIONS fractions. Helpers below shape an export like those people report
from planning systems and PACS/CD exports: other dose summation types, cropped dose grids,
bare datasets without File Meta, a DICOMDIR, contours of other geometric types.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import FileSet
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, RLELossless, generate_uid

CT_SHAPE_XYZ = (64, 48, 32)
CT_SPACING = (2.0, 2.5, 2.5)
CT_ORIGIN = (-63.0, -58.75, -38.75)
DOSE_SHAPE_XYZ = (41, 39, 32)
DOSE_SPACING = (3.0, 3.0, 2.5)
DOSE_ORIGIN = (-60.0, -57.0, -38.75)
PRESCRIPTION = 60.0
FRACTIONS = 30
BEAMS = (1, 2)  # treatment beam numbers of the RTPLAN; beam 99 is a setup beam (no dose)

# ROI number, ROI name (renamed clinical-style), canonical structure, interpreted type
ROIS = [
    (7, "PTV_6000", "PTV", "PTV"),
    (3, "BLADDER", "Bladder", "ORGAN"),
    (12, "rectum", "Rectum", "ORGAN"),
    (5, "Femur Head Lt", "Femur_Head_L", "ORGAN"),
    (9, "RT FEMORAL HEAD", "Femur_Head_R", "ORGAN"),
    (21, "Patient Outline 1", "Body", "EXTERNAL"),
    (4, "Box", "Box", "CONTROL"),
    (30, "PTV_ring", "", "CONTROL"),
]
STRUCTURES = ("PTV", "Bladder", "Rectum", "Femur_Head_L", "Femur_Head_R", "Body", "Box")
BOX_X, BOX_Y, BOX_Z = (-12.0, 15.0), (-54.0, -42.0), (-20.0, 20.0)  # on dose-grid voxel centres


def coords(origin, spacing, shape):
    return [o + d * np.arange(n) for o, d, n in zip(origin, spacing, shape)]


def ct_z():
    return coords(CT_ORIGIN, CT_SPACING, CT_SHAPE_XYZ)[2]


def _in_shape(name, x, y, z):
    """True where (x, y, z) mm lies in structure `name` (broadcasting arrays)."""
    if name == "Body":
        return ((x / 58.0) ** 2 + (y / 52.0) ** 2 <= 1.0) & (z == z)
    if name == "PTV":
        return x**2 + y**2 + z**2 <= 16.0**2
    if name == "Bladder":
        return (x / 20.0) ** 2 + ((y + 22) / 14.0) ** 2 + ((z - 12) / 14.0) ** 2 <= 1.0
    if name == "Rectum":
        r2 = x**2 + (y - 28) ** 2
        return (r2 <= 12.0**2) & (r2 > 6.0**2) & (z >= -25) & (z <= 20)
    if name in ("Femur_Head_L", "Femur_Head_R"):
        xc = 40.0 if name.endswith("L") else -40.0
        return (x - xc) ** 2 + y**2 + (z + 10) ** 2 <= 11.0**2
    if name == "Box":
        eps = 1e-6
        return ((x >= BOX_X[0] - eps) & (x <= BOX_X[1] + eps) & (y >= BOX_Y[0] - eps) & (y <= BOX_Y[1] + eps)
                & (z >= BOX_Z[0]) & (z <= BOX_Z[1]))
    raise KeyError(name)


def truth_masks(origin, spacing, shape, names=STRUCTURES, planes=None):
    """True masks at the voxel centres of a grid; z snapped to the nearest contour plane (slab rule;
    `planes`: the contour planes, default the factory's CT slices)."""
    xs, ys, zs = coords(origin, spacing, shape)
    planes = ct_z() if planes is None else np.asarray(planes, float)
    half = np.median(np.diff(planes)) / 2 if planes.size > 1 else CT_SPACING[2] / 2
    idx = np.abs(zs[:, None] - planes[None, :]).argmin(1)
    ok = np.abs(zs - planes[idx]) <= half + 1e-3
    zsnap = np.where(ok, planes[idx], 1e9)
    X, Y, Z = np.meshgrid(xs, ys, zsnap, indexing="ij")
    return {n: _in_shape(n, X, Y, Z) & (Z < 1e8) for n in names}


def true_dose(x, y, z):
    """A smooth asymmetric dose (Gy): flipped axes change it."""
    return (PRESCRIPTION * np.exp(-((x - 2) ** 2 + (y + 3) ** 2 + (z - 1) ** 2) / (2 * 30.0**2))
            + 0.05 * (x + 70) + 0.03 * (z + 50))


def _circle(xc, yc, r, n=128, z=0.0, reverse=False):
    r = r * np.sqrt(2 * np.pi / (n * np.sin(2 * np.pi / n)))  # polygon with the circle's area
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    if reverse:
        t = t[::-1]
    return np.stack([xc + r * np.cos(t), yc + r * np.sin(t), np.full(n, z)], 1)


def _ellipse(xc, yc, a, b, n=128, z=0.0):
    f = np.sqrt(2 * np.pi / (n * np.sin(2 * np.pi / n)))
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([xc + f * a * np.cos(t), yc + f * b * np.sin(t), np.full(n, z)], 1)


def contours_for(name, z):
    """Closed planar contours (N, 3) of structure `name` on the plane at height z."""
    out = []
    if name == "Body":
        out.append(_ellipse(0, 0, 58.0, 52.0, z=z))
    elif name == "PTV" and abs(z) < 16:
        out.append(_circle(0, 0, np.sqrt(16.0**2 - z**2), z=z))
    elif name == "Bladder" and abs(z - 12) < 14:
        s = np.sqrt(1 - ((z - 12) / 14.0) ** 2)
        out.append(_ellipse(0, -22, 20 * s, 14 * s, z=z))
    elif name == "Rectum" and -25 <= z <= 20:
        out.append(_circle(0, 28, 6.0, z=z, reverse=True))  # the hole first: XOR ignores the order
        out.append(_circle(0, 28, 12.0, z=z))
    elif name in ("Femur_Head_L", "Femur_Head_R") and abs(z + 10) < 11:
        xc = 40.0 if name.endswith("L") else -40.0
        out.append(_circle(xc, 0, np.sqrt(11.0**2 - (z + 10) ** 2), z=z))
    elif name == "Box" and BOX_Z[0] <= z <= BOX_Z[1]:
        (x0, x1), (y0, y1) = BOX_X, BOX_Y
        out.append(np.array([[x0, y0, z], [x1, y0, z], [x1, y1, z], [x0, y1, z]]))
    elif name == "" and abs(z) < 14:
        out.append(_circle(0, 0, 20.0, z=z))
        out.append(_circle(0, 0, 17.0, z=z))
    return out


# --------------------------------------------------------------------------- writing
def _base(modality, sop_class, study, for_uid, patient_id):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Doe^Jane"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19500101"
    ds.PatientSex = "M"
    ds.StudyInstanceUID = study
    ds.StudyDate = "20240102"
    ds.StudyTime = "101010"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.Manufacturer = "factory"
    ds.InstanceNumber = 1
    if for_uid:
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
    return ds


ORIENTATIONS = {  # ImageOrientationPatient (row, column cosines) per patient position
    "HFS": ((1, 0, 0), (0, 1, 0)),
    "FFS": ((-1, 0, 0), (0, 1, 0)),
    "HFP": ((-1, 0, 0), (0, -1, 0)),
    "FFP": ((1, 0, 0), (0, -1, 0)),
}


def _native(origin, spacing, shape, orientation):
    """IPP of the first pixel, in-plane coordinate arrays in pixel order, slice normal."""
    r, c = (np.array(v, float) for v in ORIENTATIONS[orientation])
    xs, ys, zs = coords(origin, spacing, shape)
    col_x = xs if r[0] > 0 else xs[::-1]  # columns run along r (x here)
    row_y = ys if c[1] > 0 else ys[::-1]  # rows run along c (y here)
    return r, c, np.cross(r, c), col_x, row_y, zs


def write_export(folder, orientation="HFS", *, absolute_offsets=False, drop_slice=None, patient_id="PAT001",
                 with_plan=True, with_dose=True, with_ct=True, study=None, for_uid=None, slice_positions=None):
    """Write one patient's export into `folder`; returns dict of paths and UIDs.

    slice_positions: the CT slices' z (mm) as written, and the contour planes (default: the
    factory's 32 slices 2.5 mm apart)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study = study or generate_uid()
    for_uid = for_uid or generate_uid()
    r, c, n, col_x, row_y, zs = _native(CT_ORIGIN, CT_SPACING, CT_SHAPE_XYZ, orientation)
    zs = zs if slice_positions is None else np.asarray(slice_positions, float)
    series = generate_uid()
    ct_uids = []
    X, Y = np.meshgrid(col_x, row_y, indexing="xy")  # (rows, cols)
    for k, z in enumerate(zs):
        if not with_ct or (drop_slice is not None and k == drop_slice):
            continue
        ds = _base("CT", "1.2.840.10008.5.1.4.1.1.2", study, for_uid, patient_id)
        ds.SeriesInstanceUID = series
        ds.PatientPosition = orientation
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [*r, *c]
        ds.ImagePositionPatient = [col_x[0], row_y[0], z]
        ds.PixelSpacing = [CT_SPACING[1], CT_SPACING[0]]  # row spacing (y), column spacing (x)
        ds.SliceThickness = CT_SPACING[2]
        ds.Rows, ds.Columns = len(row_y), len(col_x)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        hu = np.where(_in_shape("Body", X, Y, z), 40.0, -1000.0) + 0.5 * X  # HU ramp in x: flips show
        ds.PixelData = (hu + 1024).astype("<u2").tobytes()
        ct_uids.append(ds.SOPInstanceUID)
        # shuffle file names so the order on disk says nothing about the position
        pydicom.dcmwrite(folder / f"CT_{(k * 7919) % 1000:03d}.dcm", ds, enforce_file_format=True)

    st = _base("RTSTRUCT", "1.2.840.10008.5.1.4.1.1.481.3", study, None, patient_id)
    st.StructureSetLabel = "RS"
    st.StructureSetDate, st.StructureSetTime = "20240102", "101010"
    ref_for = Dataset()
    ref_for.FrameOfReferenceUID = for_uid
    ref_series = Dataset()
    ref_series.SeriesInstanceUID = series
    ref_series.ContourImageSequence = Sequence([])
    ref_study = Dataset()
    ref_study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    ref_study.ReferencedSOPInstanceUID = study
    ref_study.RTReferencedSeriesSequence = Sequence([ref_series])
    ref_for.RTReferencedStudySequence = Sequence([ref_study])
    st.ReferencedFrameOfReferenceSequence = Sequence([ref_for])
    rois, roi_contours, observations = [], [], []
    for number, name, canonical, kind in ROIS:
        item = Dataset()
        item.ROINumber = number
        item.ReferencedFrameOfReferenceUID = for_uid
        item.ROIName = name
        item.ROIGenerationAlgorithm = "MANUAL"
        rois.append(item)
        rc = Dataset()
        rc.ReferencedROINumber = number
        rc.ROIDisplayColor = [255, 0, 0]
        contours = []
        for z in zs:
            for pts in contours_for(canonical, float(z)):
                contours.append(contour_item(pts))
        rc.ContourSequence = Sequence(contours)
        roi_contours.append(rc)
        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.RTROIInterpretedType = kind
        obs.ROIInterpreter = ""
        observations.append(obs)
    st.StructureSetROISequence = Sequence(rois)
    st.ROIContourSequence = Sequence(roi_contours[::-1])  # another order: match by number only
    st.RTROIObservationsSequence = Sequence(observations)
    pydicom.dcmwrite(folder / "RS.dcm", st, enforce_file_format=True)

    out = {"folder": folder, "struct": folder / "RS.dcm", "study": study, "for": for_uid, "ct_series": series}
    plan_uid = None
    if with_plan:
        pl = _base("RTPLAN", "1.2.840.10008.5.1.4.1.1.481.5", study, for_uid, patient_id)
        pl.RTPlanLabel = "plan"
        pl.RTPlanGeometry = "PATIENT"
        pl.RTPlanDate, pl.RTPlanTime = "20240102", "101010"
        refs = []
        for i, rx in enumerate((50.0, PRESCRIPTION)):
            d = Dataset()
            d.DoseReferenceNumber = i + 1
            d.DoseReferenceStructureType = "VOLUME"
            d.DoseReferenceType = "TARGET"
            d.TargetPrescriptionDose = rx
            refs.append(d)
        pl.DoseReferenceSequence = Sequence(refs)
        fg = Dataset()
        fg.FractionGroupNumber = 1
        fg.NumberOfFractionsPlanned = FRACTIONS
        fg.NumberOfBeams = len(BEAMS) + 1
        fg.NumberOfBrachyApplicationSetups = 0
        fg.ReferencedBeamSequence = Sequence([_beam_ref(b, 0.0 if b == 99 else 250.0) for b in (*BEAMS, 99)])
        beams = []
        for number in (*BEAMS, 99):
            beam = Dataset()
            beam.BeamNumber = number
            beam.BeamName = f"B{number}"
            beam.TreatmentDeliveryType = "SETUP" if number == 99 else "TREATMENT"
            beams.append(beam)
        pl.BeamSequence = Sequence(beams)
        pl.FractionGroupSequence = Sequence([fg])
        rs = Dataset()
        rs.ReferencedSOPClassUID = st.SOPClassUID
        rs.ReferencedSOPInstanceUID = st.SOPInstanceUID
        pl.ReferencedStructureSetSequence = Sequence([rs])
        pl.ApprovalStatus = "UNAPPROVED"
        pydicom.dcmwrite(folder / "RP.dcm", pl, enforce_file_format=True)
        plan_uid = pl.SOPInstanceUID
        out["plan"] = folder / "RP.dcm"

    out.update(patient_id=patient_id, orientation=orientation, absolute_offsets=absolute_offsets, plan_uid=plan_uid)
    if with_dose:
        out["dose"] = write_dose(out, "RD.dcm")
    return out


def write_dose(export, name, summation="PLAN", scale=1.0, beams=(), fraction_group=None, x_range=None, z_max=None,
               shift=(0.0, 0.0, 0.0), plan_uid="export", dose_type="PHYSICAL", bits=32, signed=False, edit=None, round_mm=None,
               z_spacing=None):
    """Write `scale` x the true dose as an RTDOSE into the export's folder; returns its path.

    summation: DoseSummationType; beams / fraction_group: the ReferencedBeamSequence /
    ReferencedFractionGroupNumber under its ReferencedRTPlanSequence; x_range, z_max: crop the
    dose grid to x_range[0] <= x <= x_range[1] and z <= z_max (mm); shift: move the grid (mm);
    plan_uid: the RTPLAN referenced ("export": the export's plan; None: none). bits 16: unsigned
    values up to 65000 x DoseGridScaling; signed: PixelRepresentation 1 on the same (unsigned) data, a
    header that contradicts them. edit: a function called with the dataset before it is written.
    round_mm: ImagePositionPatient and GridFrameOffsetVector written rounded to this (e.g. 0.01).
    z_spacing: planes this far apart (mm) over the same z extent (default DOSE_SPACING's).
    """
    spacing, shape = DOSE_SPACING, DOSE_SHAPE_XYZ
    if z_spacing is not None:
        extent = (DOSE_SHAPE_XYZ[2] - 1) * DOSE_SPACING[2]
        spacing, shape = (*DOSE_SPACING[:2], z_spacing), (*DOSE_SHAPE_XYZ[:2], int(extent // z_spacing) + 1)
    xs, ys, zs = coords(np.add(DOSE_ORIGIN, shift), spacing, shape)
    xs = xs if x_range is None else xs[(xs >= x_range[0]) & (xs <= x_range[1])]
    zs = zs if z_max is None else zs[zs <= z_max]
    origin, shape = (xs[0], ys[0], zs[0]), (len(xs), len(ys), len(zs))
    r, c, n, col_x, row_y, dz = _native(origin, spacing, shape, export["orientation"])
    dz = dz if n[2] > 0 else dz[::-1]  # frames run along the normal
    X, Y, Z = np.meshgrid(col_x, row_y, dz, indexing="xy")  # (rows, cols, frames)
    dose = np.transpose(scale * true_dose(X, Y, Z), (2, 0, 1))  # (frames, rows, cols)
    scaling = 1e-5 if bits == 32 else float(f"{dose.max() / 65000:.6g}")
    rd = _base("RTDOSE", "1.2.840.10008.5.1.4.1.1.481.2", export["study"], export["for"], export["patient_id"])
    rd.ImageOrientationPatient = [*r, *c]
    rd.ImagePositionPatient = [col_x[0], row_y[0], dz[0]]
    rd.PixelSpacing = [DOSE_SPACING[1], DOSE_SPACING[0]]
    rd.SliceThickness = spacing[2]
    rd.Rows, rd.Columns, rd.NumberOfFrames = len(row_y), len(col_x), len(dz)
    rd.SamplesPerPixel, rd.PhotometricInterpretation = 1, "MONOCHROME2"
    rd.BitsAllocated, rd.BitsStored, rd.HighBit, rd.PixelRepresentation = bits, bits, bits - 1, int(signed)
    rd.FrameIncrementPointer = pydicom.tag.Tag("GridFrameOffsetVector")
    steps = np.abs(dz - dz[0])
    rd.GridFrameOffsetVector = list(dz) if export["absolute_offsets"] else list(steps)
    if round_mm:
        rnd = lambda values: [f"{v:.6g}" for v in np.round(np.asarray(values, float) / round_mm) * round_mm]
        rd.GridFrameOffsetVector, rd.ImagePositionPatient = rnd(rd.GridFrameOffsetVector), rnd(rd.ImagePositionPatient)
    rd.DoseUnits, rd.DoseType, rd.DoseSummationType = "GY", dose_type, summation
    rd.DoseGridScaling = scaling
    plan_uid = export["plan_uid"] if plan_uid == "export" else plan_uid
    if plan_uid:
        ref = Dataset()
        ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.5"
        ref.ReferencedSOPInstanceUID = plan_uid
        if beams or fraction_group is not None:
            group = Dataset()
            group.ReferencedFractionGroupNumber = 1 if fraction_group is None else fraction_group
            if beams:
                group.ReferencedBeamSequence = Sequence([_beam_ref(b) for b in beams])
            ref.ReferencedFractionGroupSequence = Sequence([group])
        rd.ReferencedRTPlanSequence = Sequence([ref])
    rd.PixelData = np.rint(dose / scaling).astype("<u4" if bits == 32 else "<u2").tobytes()
    if edit is not None:
        edit(rd)
    path = Path(export["folder"]) / name
    pydicom.dcmwrite(path, rd, enforce_file_format=True)
    return path


def _beam_ref(number, meterset=None):
    item = Dataset()
    item.ReferencedBeamNumber = number
    if meterset is not None:
        item.BeamMeterset = meterset
    return item


def strip_file_meta(path, out=None):
    """Rewrite a file as a bare dataset, implicit VR little endian, without preamble or File Meta."""
    ds = pydicom.dcmread(path)
    ds.preamble = None
    del ds.file_meta
    pydicom.dcmwrite(out or path, ds, implicit_vr=True, little_endian=True)


def write_dicomdir(folder, cd):
    """Copy an export into the layout of a CD/USB export (PT000000/ST000000/...) with its DICOMDIR."""
    fileset = FileSet()
    for path in sorted(Path(folder).glob("*.dcm")):
        fileset.add(path)
    fileset.write(cd)


def edit_roi(path, roi_name, edit):
    """Replace the contour items of ROI `roi_name` in the RTSTRUCT at `path` by `edit(items)`
    (a list of contour Datasets; None deletes the ContourSequence)."""
    ds = pydicom.dcmread(path)
    number = next(int(r.ROINumber) for r in ds.StructureSetROISequence if r.ROIName == roi_name)
    item = next(rc for rc in ds.ROIContourSequence if int(rc.ReferencedROINumber) == number)
    contours = edit(list(item.get("ContourSequence") or []))
    if contours is None:
        del item.ContourSequence
    else:
        item.ContourSequence = Sequence(contours)
    pydicom.dcmwrite(path, ds)


def contour_item(points, kind="CLOSED_PLANAR"):
    """One ContourSequence item of (N, 3) points (mm)."""
    item = Dataset()
    item.ContourGeometricType = kind
    item.NumberOfContourPoints = len(points)
    item.ContourData = [f"{v:.6f}" for v in np.asarray(points, float).ravel()]
    return item


# --------------------------------------------------------------------------- encodings, plan kinds, CT forms
def reencode(path, syntax):
    """Rewrite a file in transfer syntax `syntax` (pydicom UID): implicit/explicit VR, big endian (pixel
    bytes swapped as the standard says), deflated, or RLE Lossless (16-bit images only)."""
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array if "PixelData" in ds else None
    if syntax == RLELossless:
        if arr is not None and ds.BitsAllocated <= 16:
            ds.compress(RLELossless, arr)
            ds.save_as(path, enforce_file_format=True)
        return
    if syntax == ExplicitVRBigEndian:
        if arr is not None:
            ds.PixelData = arr.astype(arr.dtype.newbyteorder(">")).tobytes()
        ds.file_meta.TransferSyntaxUID = syntax
        pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=False, force_encoding=True)
        return
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path, enforce_file_format=True)


def rename_roi(path, old, new, charset=None):
    """Rename ROI `old` of the RTSTRUCT at `path` to `new` (SpecificCharacterSet `charset` when given,
    e.g. "ISO_IR 192" for UTF-8 names as written)."""
    ds = pydicom.dcmread(path)
    if charset:
        ds.SpecificCharacterSet = charset
    next(r for r in ds.StructureSetROISequence if r.ROIName == old).ROIName = new
    ds.save_as(path)


def _edit(path, change):
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


def two_fraction_groups(plan_path, groups=((25, (1, 2), 0.9), (14, (3, 4), 1.0)), prescription=73.0):
    """Make the RTPLAN at `plan_path` a sequential boost: fraction groups of (fractions, treatment beams,
    BeamDose per beam and fraction), numbered 1, 2, ...; one TargetPrescriptionDose (default 25 x 1.8 Gy
    then 14 x 2.0 Gy = 73 Gy)."""
    def change(ds):
        ds.DoseReferenceSequence[0].TargetPrescriptionDose = prescription
        ds.DoseReferenceSequence = Sequence(ds.DoseReferenceSequence[:1])
        beams, fgs = [], []
        for number, (fractions, numbers, beam_dose) in enumerate(groups, 1):
            fg = Dataset()
            fg.FractionGroupNumber, fg.NumberOfFractionsPlanned = number, fractions
            fg.NumberOfBeams, fg.NumberOfBrachyApplicationSetups = len(numbers), 0
            refs = [_beam_ref(b, 250.0) for b in numbers]
            for ref in refs:
                ref.BeamDose = beam_dose
            fg.ReferencedBeamSequence = Sequence(refs)
            fgs.append(fg)
            for b in numbers:
                beam = Dataset()
                beam.BeamNumber, beam.BeamName, beam.TreatmentDeliveryType = b, f"B{b}", "TREATMENT"
                beam.RadiationType = "PHOTON"
                beams.append(beam)
        ds.BeamSequence, ds.FractionGroupSequence = Sequence(beams), Sequence(fgs)
    _edit(plan_path, change)


def make_brachy(plan_path, treatment_type="HDR"):
    """Make the RTPLAN at `plan_path` a brachytherapy plan: BrachyTreatmentType, an application setup, a
    fraction group of brachy application setups and no beams (PS3.3 C.8.8.15)."""
    def change(ds):
        del ds.BeamSequence
        ds.BrachyTreatmentTechnique, ds.BrachyTreatmentType = "INTRACAVITARY", treatment_type
        setup = Dataset()
        setup.ApplicationSetupType, setup.ApplicationSetupNumber, setup.TotalReferenceAirKerma = "FLETCHER", 1, 0
        ds.ApplicationSetupSequence = Sequence([setup])
        fg = ds.FractionGroupSequence[0]
        fg.NumberOfFractionsPlanned, fg.NumberOfBeams, fg.NumberOfBrachyApplicationSetups = 1, 0, 1
        del fg.ReferencedBeamSequence
        ref = Dataset()
        ref.ReferencedBrachyApplicationSetupNumber = 1
        fg.ReferencedBrachyApplicationSetupSequence = Sequence([ref])
    _edit(plan_path, change)


def make_ion(plan_path):
    """Make the RTPLAN at `plan_path` an RT Ion Plan (its SOP class; IonBeamSequence of proton beams)."""
    def change(ds):
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.8"
        beams = ds.BeamSequence
        for beam in beams:
            beam.RadiationType = "PROTON"
        del ds.BeamSequence
        ds.IonBeamSequence = beams
    _edit(plan_path, change)


def replace_ct_series(folder, hu_offset=360):
    """Turn the CT slices in `folder` into another series on the same frame of reference (new Series and
    SOP Instance UIDs; `hu_offset` added to every stored value: a body of 400 HU instead of 40)."""
    series = generate_uid()
    for path in sorted(Path(folder).glob("CT_*.dcm")):
        def change(ds):
            ds.SeriesInstanceUID = series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.PixelData = (ds.pixel_array.astype(np.int64) + hu_offset).astype("<u2").tobytes()
        _edit(path, change)
    return series


def to_enhanced_ct(folder, legacy=False):
    """Replace the CT slices in `folder` by one Enhanced CT (multi-frame) file of the same series
    (frames in reverse slice order; orientation, spacing and rescale shared, positions per frame,
    PS3.3 C.7.6.16); `legacy`: the Legacy Converted Enhanced CT SOP class. Returns its path."""
    paths = sorted(Path(folder).glob("CT_*.dcm"))
    slices = sorted((pydicom.dcmread(p) for p in paths), key=lambda d: -float(d.ImagePositionPatient[2]))
    first = slices[0]
    sop_class = "1.2.840.10008.5.1.4.1.1.2.2" if legacy else "1.2.840.10008.5.1.4.1.1.2.1"
    ds = _base("CT", sop_class, first.StudyInstanceUID, first.FrameOfReferenceUID, first.PatientID)
    ds.SeriesInstanceUID, ds.PatientPosition = first.SeriesInstanceUID, first.PatientPosition
    ds.Rows, ds.Columns, ds.NumberOfFrames = first.Rows, first.Columns, len(slices)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    measures, orientation, rescale, shared = Dataset(), Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = first.PixelSpacing, first.SliceThickness
    orientation.ImageOrientationPatient = first.ImageOrientationPatient
    rescale.RescaleIntercept, rescale.RescaleSlope = first.RescaleIntercept, first.RescaleSlope
    rescale.RescaleType = "HU"
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.PixelValueTransformationSequence = Sequence([rescale])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for sl in slices:
        position, item = Dataset(), Dataset()
        position.ImagePositionPatient = sl.ImagePositionPatient
        item.PlanePositionSequence = Sequence([position])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = b"".join(sl.PixelData for sl in slices)
    for p in paths:
        p.unlink()
    out = Path(folder) / "CT_enhanced.dcm"
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out


def name_contour_images(struct_path, ct_folder):
    """Reference from each contour of the RTSTRUCT at `struct_path` the CT image at its height
    (ContourImageSequence), and drop the Type 3 ReferencedFrameOfReferenceSequence naming the series."""
    at_z = {}
    for path in Path(ct_folder).glob("CT_*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        at_z[round(float(ds.ImagePositionPatient[2]), 2)] = (ds.SOPClassUID, ds.SOPInstanceUID)

    def change(ds):
        del ds.ReferencedFrameOfReferenceSequence
        for rc in ds.ROIContourSequence:
            for contour in rc.get("ContourSequence") or []:
                image = Dataset()
                z = round(float(contour.ContourData[2]), 2)
                image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID = at_z[z]
                contour.ContourImageSequence = Sequence([image])
    _edit(struct_path, change)


# --------------------------------------------------------------------------- exports as the tests use them
class Exports(dict):
    """The phantom exported in each orientation (HFS, FFS, HFP, FFP) under `root`, each written when first
    asked for: HFS with the absolute GridFrameOffsetVector form, the others with the relative form."""

    def __init__(self, root):
        super().__init__()
        self.root = Path(root)

    def __missing__(self, orientation):
        self[orientation] = write_export(self.root / orientation, orientation, absolute_offsets=orientation == "HFS")
        return self[orientation]


def copy_export(export, dest, skip=()):
    """A copy of `export` at `dest` (leaving out the files that match the patterns `skip`), described like it."""
    shutil.copytree(export["folder"], dest, ignore=shutil.ignore_patterns(*skip))
    return {**export, "folder": dest, "struct": dest / "RS.dcm", "plan": dest / "RP.dcm", "dose": dest / "RD.dcm"}


def cut(path, keep):
    """Keep the first `keep` bytes of a file (a negative `keep` drops that many from its end); the new size."""
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    return len(data[:keep])


def true_dose_on(case, scale=1.0):
    """The phantom's dose (times `scale`) at the voxel centres of `case`'s grid."""
    return scale * true_dose(*np.meshgrid(*coords(case.origin_mm, case.spacing_mm, case.shape), indexing="ij"))


def stored_hu(case):
    """The CT numbers the factory stores at the case's voxel centres (HU + 1024 as uint16, minus 1024)."""
    X, _, _ = np.meshgrid(*coords(case.origin_mm, case.spacing_mm, case.shape), indexing="ij")
    body = truth_masks(case.origin_mm, case.spacing_mm, case.shape, ["Body"])["Body"]
    return (np.where(body, 40.0, -1000.0) + 0.5 * X + 1024).astype("<u2").astype(np.float32) - 1024


def full_dose_truth(names=STRUCTURES):
    """True masks on the whole (uncropped) dose grid of the factory, and its z and x coordinates."""
    xs, _, zs = coords(DOSE_ORIGIN, DOSE_SPACING, DOSE_SHAPE_XYZ)
    return truth_masks(DOSE_ORIGIN, DOSE_SPACING, DOSE_SHAPE_XYZ, names), xs, zs
