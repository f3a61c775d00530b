"""Doses: RTDOSE files, what an RTPLAN says about fractions, beams and prescription, and the plan dose.

The plan dose of a case is, by DoseSummationType (PS3.3 C.8.8.3.4):
- PLAN: the file as it is;
- FRACTION, FRACTION_SESSION: each file x NumberOfFractionsPlanned of the fraction group it
  names (the RTPLAN's only group when it names none), summed, only when every fraction group
  that delivers dose has its file (25 x 1.8 Gy and a 14 x 2 Gy boost: group 1's dose x 25 is
  not the plan's); without the RTPLAN it is refused;
- BEAM: the sum of the plan's BEAM doses on one grid, only when they hold every treatment
  beam of the RTPLAN's fraction groups exactly once (setup beams and beams of zero meterset
  have no dose); a partial set, or one without the RTPLAN, is refused;
- anything else (MULTI_PLAN, PLAN_OVERVIEW, BRACHY, *_SESSION of beams or brachy,
  CONTROL_POINT, RECORD): refused, as are DoseType ERROR and EFFECTIVE (a weighted dose; the
  PHYSICAL one is chosen when both are there);
- a plan that is not an external photon beam plan (brachytherapy, RT Ion Plan, electrons) is
  left out whatever its dose (`NotExternalPhotonPlan`).
A plan dose whose maximum is not between half and twice the prescription is refused too: it
is a fraction or beam dose under another name, or the prescription is wrong.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from flaxdose.data.grid import Grid
from flaxdose.dicom.files import (
    BEAM_DOSE,
    PLAN_DOSE,
    RT_ION_PLAN_STORAGE,
    DicomFile,
    PlanFiles,
    floats,
    integer,
    pixel_frames,
    read_full,
    reading,
    text,
)
from flaxdose.dicom.geometry import (
    POSITION_ROUNDING_MM,
    axial_directions,
    fit_uniform,
    inside_source,
    lps_layout,
    resample,
    to_lps,
)
from flaxdose.errors import FlaxdoseError

# A plan dose peaks near the prescription (prostate VMAT: 103-110 %); outside these bounds
# (fractions of it, or multiples) the dose or the prescription is not what it says.
DOSE_MAX_PER_PRESCRIPTION = (0.5, 2.0)
BRACHY_DOSES = ("BRACHY", "BRACHY_SESSION")
# DoseSummationType values that are not one plan's planned dose, and what they are.
NOT_A_PLAN_DOSE = {
    "MULTI_PLAN": "the dose of several RT Plans",
    "PLAN_OVERVIEW": "the dose of the plans of an RT Plan Overview",
    "BRACHY": "the dose of brachytherapy application setups",
    "BEAM_SESSION": "the dose of beams in one treatment session",
    "BRACHY_SESSION": "the dose of brachytherapy setups in one session",
    "CONTROL_POINT": "the dose of control points of one beam",
    "RECORD": "a dose computed from a treatment record",
}


class NotExternalPhotonPlan(FlaxdoseError):
    """A brachytherapy, ion or electron plan: flaxdose models external photon beam plans only, so such a
    plan is left out of an import (listed), whatever its prescription."""


def check_external_photon(plan: DicomFile | None, label: str, doses: Sequence[DicomFile] = ()) -> None:
    """Refuse (NotExternalPhotonPlan) a plan whose RTPLAN is not an external photon beam plan, or whose
    dose names an RT Ion Plan (the plan itself may be missing from the export)."""
    ion = [d for d in doses if d.ref_plan_class == RT_ION_PLAN_STORAGE]
    if plan is None and ion:
        raise NotExternalPhotonPlan(
            f"{ion[0].path}: the RTDOSE names an RT Ion Plan (proton or ion beams); flaxdose models external photon "
            "beam treatment plans, so it is left out. Import the photon treatment plan's export"
        )
    if plan is not None and plan.not_photon:
        raise NotExternalPhotonPlan(
            f"the RTPLAN {plan.path.name} in {label} is {plan.not_photon}; flaxdose models patients' external "
            "photon beam treatment plans (prostate VMAT), so it is left out whatever the prescription. Import the "
            "photon treatment plan's export"
        )


@dataclasses.dataclass(frozen=True)
class RtDose:
    """One RTDOSE file: dose (float32 [x, y, z], Gy) on its LPS grid, and its DoseType ('' when absent)."""

    dose: np.ndarray
    grid: Grid
    dose_type: str


def read_dose_file(path: str | os.PathLike, require_gy: bool = True) -> RtDose:
    """An RTDOSE file as an `RtDose`: dose in Gy indexed [x, y, z] on its LPS `Grid`, and its DoseType.

    Dose = stored value x DoseGridScaling, on the planes of GridFrameOffsetVector (relative
    form, first value 0, or absolute form, the planes' z). `require_gy=False` also accepts
    DoseUnits RELATIVE (values then are in the file's units). Damage raises FlaxdoseError.
    """
    path = Path(path)
    ds = read_full(DicomFile(path, "RTDOSE", "", "", "", "", "", ""))
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
        if frames == 1:  # one plane: its thickness is the slab it stands for
            thickness = floats(ds, "SliceThickness", path, 1, required=False)
            frame_spacing = float(thickness[0]) if thickness is not None and thickness[0] > 0 else 1.0
        if offsets.size != frames:
            raise FlaxdoseError(
                f"{path}: GridFrameOffsetVector has {offsets.size} values for {frames} frames; the file is damaged"
            )
        if offsets[0] == 0:
            s = offsets.copy()  # relative form: offsets along the normal from ImagePositionPatient
        else:  # absolute form: the z coordinates of the planes (standard orientation only)
            if abs(offsets[0] - ipp[2]) > max(POSITION_ROUNDING_MM, 1e-3 * abs(ipp[2])):  # the same z, rounded
                raise FlaxdoseError(
                    f"{path}: GridFrameOffsetVector starts at {offsets[0]}, neither 0 (relative form) nor the "
                    f"z of ImagePositionPatient {ipp[2]} (absolute form); the file is damaged"
                )
            s = (offsets - ipp[2]) * n[2]
        pixels = pixel_frames(ds, path, frames)
        _check_stored(pixels, scaling, ds, path)
        order = np.argsort(s, kind="stable")
        s = s[order]
        if frames > 1:
            uniform = np.diff(s).min() > 1e-3
            if uniform:
                first, frame_spacing, numbers, worst = fit_uniform(s)
                uniform = worst <= POSITION_ROUNDING_MM and np.diff(numbers).max() == 1
            if not uniform:
                raise FlaxdoseError(
                    f"{path}: dose planes are not uniformly spaced (GridFrameOffsetVector {list(offsets)[:6]}...; "
                    f"rounded offsets may lie {POSITION_ROUNDING_MM} mm off a uniform grid); export the dose on a "
                    "regular grid"
                )
            s = first + frame_spacing * numbers  # the grid the rounded offsets stand for
        ipp0 = ipp + s[0] * n
        dose = pixels[order].astype(np.float64) * scaling
        perm, flips, grid = lps_layout(dose.shape, ipp0, r, c, n, ps[1], ps[0], frame_spacing)
        dose = to_lps(dose.astype(np.float32), perm, flips)
        dose_type = text(ds, "DoseType").upper()
    if not np.isfinite(dose).all():
        raise FlaxdoseError(f"{path}: dose holds non-finite values; the file is damaged")
    return RtDose(dose, grid, dose_type)


def _beyond_bits_stored(ds) -> int:
    """How many native unsigned values have bits set above BitsStored (pydicom masks them away silently)."""
    try:
        allocated, stored = int(ds.get("BitsAllocated", 0) or 0), int(ds.get("BitsStored", 0) or 0)
        syntax = ds.file_meta.TransferSyntaxUID
        if (syntax.is_encapsulated or not 0 < stored < allocated or allocated not in (8, 16, 32)
                or int(ds.get("PixelRepresentation", 0) or 0)):
            return 0
        order = "<" if syntax.is_little_endian else ">"
        raw = np.frombuffer(ds.PixelData, f"{order}u{allocated // 8}", count=len(ds.PixelData) // (allocated // 8))
    except (AttributeError, TypeError, ValueError):
        return 0
    return int(np.count_nonzero(raw >> stored))


def _check_stored(pixels: np.ndarray, scaling: float, ds, path) -> None:
    """Refuse stored doses that contradict the header: negative ones (a physical dose is never negative:
    unsigned values labelled signed, PixelRepresentation 1), or unsigned ones beyond BitsStored bits."""
    fields = ", ".join(f"{k} {ds.get(k)}" for k in ("PixelRepresentation", "BitsAllocated", "BitsStored", "HighBit"))
    beyond = _beyond_bits_stored(ds)
    if beyond:
        raise FlaxdoseError(
            f"{path}: {beyond} stored dose values have bits set above the {ds.get('BitsStored')} bits the header "
            f"gives them ({fields}), which a reader drops; the data contradict the header: re-export the RTDOSE "
            "from the planning system"
        )
    negative = pixels < 0
    if not negative.any():
        return
    raise FlaxdoseError(
        f"{path}: {int(negative.sum())} dose voxels are negative (min {float(pixels.min()) * scaling:.2f} Gy) as the "
        f"header says to read them ({fields}); a physical dose is never negative, so the data contradict the header "
        "(unsigned values labelled signed): re-export the RTDOSE from the planning system"
    )


def read_dose(path: str | os.PathLike, require_gy: bool = True) -> tuple[np.ndarray, Grid]:
    """An RTDOSE file as (dose in Gy indexed [x, y, z], its LPS `Grid`); see `read_dose_file`."""
    rt = read_dose_file(path, require_gy)
    return rt.dose, rt.grid


@dataclasses.dataclass(frozen=True)
class FractionGroup:
    """One fraction group of an RTPLAN: its number, NumberOfFractionsPlanned (None when empty), and
    the numbers of its treatment beams that deliver dose (setup beams and zero-meterset beams left out)."""

    number: int
    fractions: int | None
    beams: tuple[int, ...]

    @property
    def delivers(self) -> bool:
        """Whether the group delivers dose: treatment beams, and fractions (or an empty count)."""
        return bool(self.beams) and self.fractions != 0


@dataclasses.dataclass(frozen=True)
class RtPlan:
    """What flaxdose reads from an RTPLAN: the prescription (Gy or None, and its source) and the fraction groups."""

    path: Path
    prescription_gy: float | None
    prescription_source: str
    fraction_groups: tuple[FractionGroup, ...]


def _optional_int(ds, keyword: str, path) -> int | None:
    value = ds.get(keyword)
    return None if value is None or value == "" else integer(ds, keyword, path, 0, 1 << 30)


def read_rtplan(path: str | os.PathLike) -> RtPlan:
    """An RTPLAN's prescription and fraction groups (RT Plan or RT Ion Plan).

    Prescription: the largest TargetPrescriptionDose of the DoseReferenceSequence, else the
    fraction dose (sum of BeamDose) x NumberOfFractionsPlanned, summed over fraction groups.
    """
    path = Path(path)
    ds = read_full(DicomFile(path, "RTPLAN", "", "", "", "", "", ""))
    with reading(path, "the RTPLAN"):
        targets = [float(item.TargetPrescriptionDose) for item in ds.get("DoseReferenceSequence") or []
                   if item.get("TargetPrescriptionDose") is not None]
        targets = [t for t in targets if np.isfinite(t) and t > 0]
        beams = list(ds.get("BeamSequence") or []) + list(ds.get("IonBeamSequence") or [])
        setup = {int(b.BeamNumber) for b in beams
                 if b.get("BeamNumber") is not None and text(b, "TreatmentDeliveryType").upper() == "SETUP"}
        groups, total = [], 0.0
        for index, group in enumerate(ds.get("FractionGroupSequence") or []):
            number = _optional_int(group, "FractionGroupNumber", path)
            fractions = _optional_int(group, "NumberOfFractionsPlanned", path)
            treatment, per_fraction = [], 0.0
            for item in group.get("ReferencedBeamSequence") or []:
                beam = _optional_int(item, "ReferencedBeamNumber", path)
                meterset = item.get("BeamMeterset")
                if item.get("BeamDose") is not None:
                    per_fraction += float(item.BeamDose)
                if beam is not None and beam not in setup and (meterset is None or float(meterset) != 0):
                    treatment.append(beam)
            total += (fractions or 0) * per_fraction
            groups.append(FractionGroup(index + 1 if number is None else number, fractions, tuple(treatment)))
    if targets:
        prescription, source = max(targets), "RTPLAN TargetPrescriptionDose"
    elif np.isfinite(total) and total > 0:
        prescription, source = float(total), "RTPLAN beam dose x fractions"
    else:
        prescription, source = None, "none"
    return RtPlan(path, prescription, source, tuple(groups))


def read_prescription(path: str | os.PathLike) -> tuple[float | None, str]:
    """Prescription (Gy) from an RTPLAN and the rule that gave it (see `read_rtplan`); (None, "none") if none."""
    plan = read_rtplan(path)
    return plan.prescription_gy, plan.prescription_source


@dataclasses.dataclass(frozen=True)
class PlanDose:
    """The plan dose of a case: float32 [x, y, z] Gy on `grid`, how it was made (`source`,
    e.g. "PLAN", "FRACTION x 28", "sum of 4 BEAM doses") and the files' DoseType."""

    dose: np.ndarray
    grid: Grid
    source: str
    dose_type: str


def plan_dose(plan: PlanFiles, rtplan: RtPlan | None) -> PlanDose:
    """The planned dose of `plan` from its dose files (see the module docstring); FlaxdoseError when
    they cannot be read as one plan's dose. `rtplan`: the plan's RTPLAN, needed for FRACTION and BEAM."""
    if not plan.doses:
        raise FlaxdoseError(f"no RTDOSE for the plan in {plan.label}; export the plan dose")
    kind = plan.dose_kind or PLAN_DOSE
    for name in kind.split("/"):
        if name in BRACHY_DOSES:
            raise NotExternalPhotonPlan(
                f"{plan.dose.path}: DoseSummationType {name} is {NOT_A_PLAN_DOSE[name]}: a brachytherapy dose, left "
                "out (flaxdose models external photon beam treatment plans). Import the photon treatment plan's export"
            )
        if name in NOT_A_PLAN_DOSE or name not in (PLAN_DOSE, "FRACTION", BEAM_DOSE):
            raise FlaxdoseError(
                f"{plan.dose.path}: DoseSummationType {name} ({NOT_A_PLAN_DOSE.get(name, 'not a DICOM term')}) is not "
                "one plan's planned dose; flaxdose reads PLAN doses, FRACTION doses (x the planned fractions) and "
                "complete sets of BEAM doses: export the plan's PLAN dose"
            )
    read = [read_dose_file(f.path) for f in plan.doses]
    dose_type = _one_dose_type(read, plan.label)
    if kind == PLAN_DOSE:
        _check_whole_plan(plan.dose, rtplan)
        return PlanDose(read[0].dose, read[0].grid, "PLAN", dose_type)
    if kind == "FRACTION":
        return _fraction_doses(read, plan, rtplan, dose_type)
    _check_all_beams(plan.doses, rtplan, plan.label)
    return PlanDose(_sum_on_first_grid(read, plan.doses), read[0].grid, f"sum of {len(read)} BEAM doses", dose_type)


def _check_whole_plan(dose: DicomFile, rtplan: RtPlan | None) -> None:
    """Refuse a PLAN dose that names one fraction group of an RTPLAN that delivers others too."""
    if rtplan is None or dose.ref_fraction_group is None:
        return
    others = [g.number for g in rtplan.fraction_groups if g.delivers and g.number != dose.ref_fraction_group]
    if others:
        raise FlaxdoseError(
            f"{dose.path}: the PLAN dose names fraction group {dose.ref_fraction_group} of the RTPLAN "
            f"{rtplan.path.name}, which also delivers fraction group(s) {others}: it is that group's dose, not the "
            "plan's. Export the dose of the whole plan"
        )


def _one_dose_type(read: Sequence[RtDose], label: str) -> str:
    """The DoseType of a plan's dose files: PHYSICAL (or missing); EFFECTIVE, ERROR and mixed types refused."""
    types = sorted({d.dose_type for d in read})
    if types == ["EFFECTIVE"]:
        raise FlaxdoseError(
            f"RTDOSE in {label}: DoseType EFFECTIVE is a biologically weighted (RBE or model-corrected) dose, not "
            "the physical dose flaxdose learns and compares in Gy: export the plan's PHYSICAL dose"
        )
    if "ERROR" in types or len(types) > 1:
        raise FlaxdoseError(
            f"RTDOSE in {label}: DoseType {'/'.join(t or 'missing' for t in types)}; a plan dose is PHYSICAL, one "
            "type for all its files: export the calculated dose"
        )
    return types[0]


def _fraction_doses(read: Sequence[RtDose], plan: PlanFiles, rtplan: RtPlan | None, dose_type: str) -> PlanDose:
    """FRACTION doses x their groups' NumberOfFractionsPlanned, summed: the plan dose only when every
    fraction group that delivers dose has its FRACTION dose (a boost group's may be missing)."""
    scaled, groups = [], {}
    for rt, f in zip(read, plan.doses):
        group = _fraction_group(rtplan, f, plan.label)
        if not group.fractions:
            raise FlaxdoseError(
                f"{f.path}: a FRACTION dose is scaled by NumberOfFractionsPlanned, which fraction group "
                f"{group.number} of the RTPLAN leaves empty; export the PLAN dose"
            )
        if group.number in groups:
            raise FlaxdoseError(f"{groups[group.number].name} and {f.path.name} are FRACTION doses of one fraction "
                                f"group ({group.number}); export each group's dose once, or the PLAN dose")
        if f.ref_beams and set(group.beams) - set(f.ref_beams):
            raise FlaxdoseError(
                f"{f.path}: the FRACTION dose names beams {sorted(f.ref_beams)} of fraction group {group.number}, "
                f"which delivers beams {list(group.beams)}: a part of the fraction is not the plan dose. Export the "
                "PLAN dose, or the whole fraction's dose"
            )
        groups[group.number] = f.path
        scaled.append(RtDose(rt.dose * np.float32(group.fractions), rt.grid, rt.dose_type))
    missing = [g for g in rtplan.fraction_groups if g.delivers and g.number not in groups]
    if missing:
        listed = ", ".join(f"group {g.number} ({g.fractions} fractions, beams {list(g.beams)})" for g in missing)
        raise FlaxdoseError(
            f"{plan.dose.path}: the FRACTION dose(s) of fraction group(s) {sorted(groups)} are not the plan dose: "
            f"the RTPLAN {rtplan.path.name} also delivers {listed}, whose dose is not in the export. Export the "
            "PLAN dose, or a FRACTION dose of every fraction group"
        )
    fractions = {g.number: g.fractions for g in rtplan.fraction_groups}
    source = " + ".join(f"FRACTION x {fractions[n]}" for n in groups)
    return PlanDose(_sum_on_first_grid(scaled, plan.doses), scaled[0].grid, source, dose_type)


def _fraction_group(rtplan: RtPlan | None, dose: DicomFile, label: str) -> FractionGroup:
    """The fraction group a FRACTION or BEAM dose names (or the RTPLAN's only one)."""
    kind = dose.dose_summation or "this"
    if rtplan is None:
        raise FlaxdoseError(
            f"{dose.path}: a {kind} dose needs its RTPLAN (fractions, beams) to become the plan dose, and none "
            f"was found in {label}; export the RTPLAN with it, or export the PLAN dose"
        )
    groups = {g.number: g for g in rtplan.fraction_groups}
    if dose.ref_fraction_group is not None:
        if dose.ref_fraction_group not in groups:
            raise FlaxdoseError(
                f"{dose.path}: the {kind} dose names fraction group {dose.ref_fraction_group}, but the RTPLAN "
                f"{rtplan.path.name} has {sorted(groups)}; export the dose and the plan it belongs to"
            )
        return groups[dose.ref_fraction_group]
    if len(groups) != 1:
        raise FlaxdoseError(
            f"{dose.path}: the {kind} dose names no fraction group and the RTPLAN has {len(groups)}; export the "
            "PLAN dose"
        )
    return next(iter(groups.values()))


def _check_all_beams(doses: Sequence[DicomFile], rtplan: RtPlan | None, label: str) -> None:
    """Refuse BEAM doses that do not hold every treatment beam of the plan exactly once."""
    covered: dict[tuple[int, int], Path] = {}
    for dose in doses:
        group = _fraction_group(rtplan, dose, label)
        if not dose.ref_beams:
            raise FlaxdoseError(
                f"{dose.path}: a BEAM dose that names no beam (ReferencedBeamSequence) cannot be summed into the "
                "plan dose; export the PLAN dose"
            )
        for beam in dose.ref_beams:
            if (group.number, beam) in covered:
                raise FlaxdoseError(
                    f"beam {beam} (fraction group {group.number}) has two BEAM doses, {covered[group.number, beam].name} "
                    f"and {dose.path.name}; export each beam's dose once"
                )
            covered[group.number, beam] = dose.path
    planned = {(g.number, b) for g in rtplan.fraction_groups for b in g.beams}
    missing, extra = sorted(planned - covered.keys()), sorted(covered.keys() - planned)
    if missing or extra:
        raise FlaxdoseError(
            f"the BEAM doses in {label} hold beams {sorted(covered)} (fraction group, beam) but the RTPLAN "
            f"{rtplan.path.name} delivers {sorted(planned)}"
            + (f"; missing {missing}" if missing else "") + (f"; not in the plan {extra}" if extra else "")
            + ": a partial set is not the plan dose. Export every beam's dose, or the PLAN dose"
        )


def _same_grid(a: Grid, b: Grid) -> bool:
    return a.shape == b.shape and np.allclose(a.origin_mm, b.origin_mm, atol=1e-3) and np.allclose(
        a.spacing_mm, b.spacing_mm, atol=1e-6)


def _sum_on_first_grid(read: Sequence[RtDose], files: Sequence[DicomFile]) -> np.ndarray:
    """The sum of beam doses on the first one's grid; others are resampled (trilinear) when they cover it."""
    grid = read[0].grid
    total = read[0].dose.astype(np.float64)
    for rt, f in zip(read[1:], files[1:]):
        if _same_grid(rt.grid, grid):
            total += rt.dose
            continue
        if not all(inside_source(rt.grid, grid.coords(a), a).all() for a in range(3)):
            raise FlaxdoseError(
                f"{f.path}: this {f.dose_summation or 'dose'} dose's grid does not cover the grid of "
                f"{files[0].path.name}, so the doses cannot be summed on one grid; export them on one grid, or the "
                "PLAN dose"
            )
        total += resample(rt.dose, rt.grid, grid)
    return total.astype(np.float32)


def check_dose_fits_prescription(dose_max_gy: float, prescription_gy: float, dose_source: str,
                                 prescription_source: str) -> None:
    """Refuse a plan dose whose maximum lies outside DOSE_MAX_PER_PRESCRIPTION x the prescription (if > 0)."""
    if not prescription_gy > 0:
        return
    lo, hi = DOSE_MAX_PER_PRESCRIPTION
    ratio = dose_max_gy / prescription_gy
    if not lo <= ratio <= hi:
        raise FlaxdoseError(
            f"the plan dose ({dose_source}) peaks at {dose_max_gy:.2f} Gy, {100 * ratio:.0f} % of the prescription "
            f"{prescription_gy:.2f} Gy ({prescription_source}); a plan dose peaks near its prescription, so this is "
            "a fraction, beam or relative dose under another DoseSummationType, or the prescription is wrong: "
            "export the PLAN dose, or give the prescription with --prescription_gy"
        )
