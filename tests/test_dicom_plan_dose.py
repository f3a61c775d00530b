"""The plan's dose and prescription: dose summation types, fractions and beams, dose types and stored
values; plans flaxdose does not model (brachytherapy, ions, no photons) left out by name."""

import dicom_factory as F
import numpy as np
import pydicom
import pytest
from dicom_factory import copy_export, true_dose_on

from flaxdose.data import Dataset
from flaxdose.dicom import import_dicom, read_prescription, read_rt, write_rtdose
from flaxdose.dicom.dose import NotExternalPhotonPlan
from flaxdose.errors import FlaxdoseError


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return F.Exports(tmp_path_factory.mktemp("exports"))


# ------------------------------------------------------------ the prescription
def test_prescription_sources(exports, tmp_path):
    assert read_prescription(exports["HFS"]["plan"]) == (60.0, "RTPLAN TargetPrescriptionDose")
    ds = pydicom.dcmread(exports["HFS"]["plan"])
    del ds.DoseReferenceSequence
    beam = pydicom.Dataset()
    beam.ReferencedBeamNumber = 1
    beam.BeamDose = 1.25
    beam2 = pydicom.Dataset()
    beam2.ReferencedBeamNumber = 2
    beam2.BeamDose = 1.25
    ds.FractionGroupSequence[0].ReferencedBeamSequence = [beam, beam2]
    pydicom.dcmwrite(tmp_path / "RP.dcm", ds)
    value, source = read_prescription(tmp_path / "RP.dcm")
    assert value == pytest.approx(75.0) and "fractions" in source
    case = read_rt(exports["HFS"]["folder"], structures=F.STRUCTURES, prescription_gy=70.0)
    assert case.prescription_gy == 70.0 and case.meta["prescription_source"] == "argument"


def test_an_rtplan_without_a_prescription_is_refused_not_read_as_zero(rt_export, tmp_path):
    export = copy_export(rt_export, tmp_path / "p")
    ds = pydicom.dcmread(export["plan"])
    for item in ds.get("DoseReferenceSequence") or []:
        if "TargetPrescriptionDose" in item:
            del item.TargetPrescriptionDose
    ds.save_as(export["plan"])
    with pytest.raises(FlaxdoseError, match="gives no prescription"):
        read_rt(export["folder"], structures=F.STRUCTURES)
    case = read_rt(export["folder"], structures=F.STRUCTURES, prescription_gy=F.PRESCRIPTION)
    assert case.prescription_gy == F.PRESCRIPTION


# ------------------------------------------------------------ dose summation types, fractions and beams
def test_fraction_dose_is_scaled_by_the_planned_fractions(rt_export, tmp_path):
    export = copy_export(rt_export, tmp_path / "p", skip=("RD.dcm",))
    F.write_dose(export, "RD_fraction.dcm", "FRACTION", scale=1 / F.FRACTIONS, fraction_group=1)
    case = read_rt(export["folder"], structures=F.STRUCTURES)
    true = true_dose_on(case)
    assert np.abs(case.dose - true).max() <= 1e-3 * true.max()  # stored per fraction to 1e-5 Gy
    assert case.meta["dose_source"] == "FRACTION x 30" and case.meta["dose_summation_type"] == "FRACTION"
    (export["folder"] / "RP.dcm").unlink()  # without its plan the number of fractions is unknown
    with pytest.raises(FlaxdoseError, match="FRACTION dose needs its RTPLAN"):
        read_rt(export["folder"], structures=F.STRUCTURES)


def test_beam_doses_of_one_plan_are_summed_once_all_are_there(rt_export, tmp_path):
    src = tmp_path / "src"
    export = copy_export(rt_export, src / "p", skip=("RD.dcm",))
    F.write_dose(export, "RD_beam1.dcm", "BEAM", scale=0.3, beams=[1], x_range=(-54.0, 54.0))
    F.write_dose(export, "RD_beam2.dcm", "BEAM", scale=0.7, beams=[2])  # a larger grid: summed on beam 1's
    summary = import_dicom(src, tmp_path / "ds", F.STRUCTURES, "dose", progress=False)
    assert len(summary.case_ids) == 1 and not summary.failures  # one case, not two of part of the dose
    case = Dataset.open(tmp_path / "ds").load(summary.case_ids[0])
    assert case.shape == (37, 39, 32) and case.origin_mm[0] == -54.0
    true = true_dose_on(case)
    assert np.abs(case.dose - true).max() <= 1e-3 * true.max()
    assert case.meta["dose_source"] == "sum of 2 BEAM doses"
    assert case.meta["structures"]["Body"]["coverage"] < 1.0  # the body is wider than the dose: recorded only
    (export["folder"] / "RD_beam2.dcm").unlink()
    with pytest.raises(FlaxdoseError, match=r"missing \[\(1, 2\)\].*partial set"):
        read_rt(export["folder"], structures=F.STRUCTURES)


def test_the_plan_dose_is_preferred(rt_export, tmp_path):
    export = copy_export(rt_export, tmp_path / "p")
    F.write_dose(export, "RD_beam1.dcm", "BEAM", scale=0.5, beams=[1])
    F.write_dose(export, "RD_fraction.dcm", "FRACTION", scale=1 / F.FRACTIONS)
    case = read_rt(export["folder"], structures=F.STRUCTURES)
    assert case.meta["dose_source"] == "PLAN"
    assert np.abs(case.dose - true_dose_on(case)).max() <= 1e-3 * F.PRESCRIPTION
    assert "set aside 1 BEAM dose(s)" in " ".join(case.meta["notes"])


@pytest.mark.parametrize("summation", ["MULTI_PLAN", "BRACHY", "RECORD", "CONTROL_POINT", "PLAN_SUM"])
def test_doses_that_are_not_one_plans_dose_are_refused(rt_export, tmp_path, summation):
    export = copy_export(rt_export, tmp_path / "p", skip=("RD.dcm",))
    F.write_dose(export, "RD.dcm", summation)
    with pytest.raises(FlaxdoseError, match=f"DoseSummationType {summation}"):
        read_rt(export["folder"], structures=F.STRUCTURES)


def test_a_fraction_dose_labelled_plan_and_an_error_dose_are_refused(rt_export, tmp_path):
    export = copy_export(rt_export, tmp_path / "p", skip=("RD.dcm",))
    F.write_dose(export, "RD.dcm", "PLAN", scale=1 / F.FRACTIONS)  # peaks near 2.2 Gy beside 60 Gy
    with pytest.raises(FlaxdoseError, match=r"peaks at 2\.\d\d Gy, 4 % of the prescription 60\.00 Gy"):
        read_rt(export["folder"], structures=F.STRUCTURES)
    F.write_dose(export, "RD.dcm", "PLAN", dose_type="ERROR")
    with pytest.raises(FlaxdoseError, match="DoseType ERROR"):
        read_rt(export["folder"], structures=F.STRUCTURES)


def test_a_fraction_dose_of_one_fraction_group_is_not_the_plan_dose(rt_export, tmp_path):
    """25 x 1.8 Gy then a 14 x 2.0 Gy boost (73 Gy) with only group 1's FRACTION dose: refused; with
    both groups' FRACTION doses: their sum, dose x fractions per group."""
    export = copy_export(rt_export, tmp_path / "p", skip=("RD.dcm",))
    F.two_fraction_groups(export["plan"])
    whole = 73.0 / F.PRESCRIPTION  # the plan dose: the phantom's dose shape, peaking near 73 Gy
    F.write_dose(export, "RD_fg1.dcm", "FRACTION", scale=whole * (25 * 1.8 / 73) / 25, fraction_group=1)
    xs, ys, zs = F.coords(F.DOSE_ORIGIN, F.DOSE_SPACING, F.DOSE_SHAPE_XYZ)
    group1_max = whole * (25 * 1.8 / 73) * F.true_dose(*np.meshgrid(xs, ys, zs, indexing="ij")).max()
    assert 0.5 < group1_max / 73.0 < 2.0  # the plausibility window alone would take it for the plan dose
    for rx in (None, 45.0):
        with pytest.raises(FlaxdoseError, match=r"fraction group\(s\) \[1\] are not the plan dose.*also delivers "
                                                r"group 2 \(14 fractions, beams \[3, 4\]\)"):
            read_rt(export["folder"], structures=F.STRUCTURES, prescription_gy=rx)
    F.write_dose(export, "RD_fg2.dcm", "FRACTION", scale=whole * (14 * 2.0 / 73) / 14, fraction_group=2)
    case = read_rt(export["folder"], structures=F.STRUCTURES)
    true = true_dose_on(case, whole)
    assert np.abs(case.dose - true).max() <= 1e-3 * true.max()  # 1e-5 Gy per stored unit x 25 fractions
    assert case.meta["dose_source"] == "FRACTION x 25 + FRACTION x 14" and case.prescription_gy == 73.0


def test_two_fraction_doses_of_one_group_are_refused(rt_export, tmp_path):
    export = copy_export(rt_export, tmp_path / "p", skip=("RD.dcm",))
    F.write_dose(export, "RD_a.dcm", "FRACTION", scale=1 / F.FRACTIONS, fraction_group=1)
    F.write_dose(export, "RD_b.dcm", "FRACTION", scale=1 / F.FRACTIONS, fraction_group=1)
    with pytest.raises(FlaxdoseError, match=r"RD_a.dcm and RD_b.dcm are FRACTION doses of one fraction group \(1\)"):
        read_rt(export["folder"], structures=F.STRUCTURES)


def test_a_plan_dose_of_one_fraction_group_is_refused(rt_export, tmp_path):
    export = copy_export(rt_export, tmp_path / "p", skip=("RD.dcm",))
    F.two_fraction_groups(export["plan"])
    F.write_dose(export, "RD.dcm", "PLAN", scale=(25 * 1.8) / F.PRESCRIPTION, fraction_group=1)  # group 1's 45 Gy
    for rx in (None, 45.0):
        with pytest.raises(FlaxdoseError, match=r"names fraction group 1 .* also delivers fraction group\(s\) \[2\]"):
            read_rt(export["folder"], structures=F.STRUCTURES, prescription_gy=rx)


def test_a_fraction_dose_of_some_of_the_groups_beams_is_refused(rt_export, tmp_path):
    export = copy_export(rt_export, tmp_path / "p", skip=("RD.dcm",))
    F.write_dose(export, "RD.dcm", "FRACTION", scale=0.5 / F.FRACTIONS, beams=[1], fraction_group=1)
    with pytest.raises(FlaxdoseError, match=r"names beams \[1\] of fraction group 1, which delivers beams \[1, 2\]"):
        read_rt(export["folder"], structures=F.STRUCTURES, prescription_gy=30.0)


# ------------------------------------------------------------ dose types and stored values
def test_a_physical_dose_is_chosen_over_an_effective_one_and_an_effective_dose_alone_is_refused(rt_export, tmp_path):
    export = copy_export(rt_export, tmp_path / "p")
    F.write_dose(export, "RD_effective.dcm", scale=1.1, dose_type="EFFECTIVE")
    case = read_rt(export["folder"], structures=F.STRUCTURES)
    assert np.abs(case.dose - true_dose_on(case)).max() <= 1e-3 * F.PRESCRIPTION  # not 1.1 x
    assert any("DoseType EFFECTIVE" in n for n in case.meta["notes"]) and case.meta["dose_type"] == "PHYSICAL"
    export["dose"].unlink()
    with pytest.raises(FlaxdoseError, match="DoseType EFFECTIVE is a biologically weighted"):
        read_rt(export["folder"], structures=F.STRUCTURES)


def test_a_signed_dose_whose_data_read_negative_is_refused(rt_export, tmp_path):
    export = copy_export(rt_export, tmp_path / "p", skip=("RD.dcm",))
    path = F.write_dose(export, "RD.dcm", bits=16, signed=True)
    scaling = float(pydicom.dcmread(path).DoseGridScaling)
    xs, ys, zs = F.coords(F.DOSE_ORIGIN, F.DOSE_SPACING, F.DOSE_SHAPE_XYZ)
    stored = np.rint(F.true_dose(*np.meshgrid(xs, ys, zs, indexing="ij")) / scaling)  # as written, unsigned
    wrapped = stored[stored > 32767] - 65536  # read as two's complement, as PixelRepresentation 1 says
    assert wrapped.size > 1000
    expected = (rf"RD.dcm: {wrapped.size} dose voxels are negative \(min {wrapped.min() * scaling:.2f} Gy\)"
                r".*PixelRepresentation 1.*never negative")
    with pytest.raises(FlaxdoseError, match=expected):
        read_rt(export["folder"], structures=F.STRUCTURES)
    with pytest.raises(FlaxdoseError, match="never negative"):  # whatever the prescription
        read_rt(export["folder"], structures=F.STRUCTURES, prescription_gy=30.0)
    F.write_dose(export, "RD.dcm", bits=16)  # the same data labelled unsigned: the plan dose
    case = read_rt(export["folder"], structures=F.STRUCTURES)
    assert np.abs(case.dose - true_dose_on(case)).max() <= scaling


def test_stored_dose_bits_above_bits_stored_are_refused_not_masked(rt_export, tmp_path):
    export = copy_export(rt_export, tmp_path / "p", skip=("RD.dcm",))

    def twelve_bits(ds):
        ds.BitsStored, ds.HighBit = 12, 11

    path = F.write_dose(export, "RD.dcm", bits=16, edit=twelve_bits)  # values up to 65000 labelled 12-bit
    raw = np.frombuffer(pydicom.dcmread(path).PixelData, "<u2")
    beyond = int(np.count_nonzero(raw > 4095))
    assert beyond > 1000 and pydicom.dcmread(path).pixel_array.max() <= 4095  # pydicom masks them silently
    with pytest.raises(FlaxdoseError, match=rf"RD.dcm: {beyond} stored dose values have bits set above the 12 bits"):
        read_rt(export["folder"], structures=F.STRUCTURES, prescription_gy=4.0)


def test_dose_planes_written_to_a_hundredth_are_one_uniform_grid(rt_export, tmp_path):
    export = copy_export(rt_export, tmp_path / "p", skip=("RD.dcm",))
    path = F.write_dose(export, "RD.dcm", z_spacing=1.875, round_mm=0.01)  # offsets 0, 1.88, 3.75, 5.62, ...
    offsets = np.array(pydicom.dcmread(path).GridFrameOffsetVector, float)
    assert set(np.round(np.diff(offsets), 2)) == {1.87, 1.88} and offsets.size == 42
    case = read_rt(export["folder"], structures=F.STRUCTURES)
    assert abs(case.spacing_mm[2] - 1.875) < 1e-3 and abs(case.origin_mm[2] - F.DOSE_ORIGIN[2]) < 0.01
    assert case.shape[2] == 42
    assert np.abs(case.dose - true_dose_on(case)).max() <= 2e-3 * F.PRESCRIPTION
    F.write_dose(export, "RD.dcm", edit=lambda ds: setattr(ds, "GridFrameOffsetVector",
                                                            [2.5 * k + 0.3 * (k > 15) for k in range(32)]))
    with pytest.raises(FlaxdoseError, match="not uniformly spaced"):
        read_rt(export["folder"], structures=F.STRUCTURES)


def test_flaxdose_predictions_beside_the_plan_are_never_its_dose(rt_export_ct, tmp_path):
    src = tmp_path / "src"
    export = copy_export(rt_export_ct, src / "p")
    case = read_rt(export["folder"], structures=F.STRUCTURES)
    half = case.replace(dose=case.dose * 0.5)  # a prediction unlike the plan dose
    write_rtdose(half, export["folder"], export["folder"] / "RD_predicted.dcm", plan_path=export["plan"])
    write_rtdose(half, export["folder"], export["folder"] / "RD_predicted_no_plan.dcm")
    again = read_rt(export["folder"], structures=F.STRUCTURES)
    assert again.meta["dose_source"] == "PLAN"
    assert np.abs(again.dose - true_dose_on(again)).max() <= 1e-3 * F.PRESCRIPTION
    summary = import_dicom(src, tmp_path / "ds", F.STRUCTURES, "dose", progress=False)
    assert len(summary.case_ids) == 1 and not summary.failures
    skipped = {p.split("/")[-1]: why for p, why in summary.set_aside}
    assert skipped == {"RD_predicted.dcm": "flaxdose prediction (not a calculated dose)",
                       "RD_predicted_no_plan.dcm": "flaxdose prediction (not a calculated dose)"}
    assert "2 file(s) set aside: flaxdose prediction" in summary.report()
    export["dose"].unlink()  # only predictions left: no plan dose
    with pytest.raises(FlaxdoseError, match="no RTDOSE"):
        import_dicom(src, tmp_path / "ds2", F.STRUCTURES, "dose", progress=False)


# ------------------------------------------------------------ plans left out
def test_brachytherapy_and_ion_plans_are_left_out_by_name_whatever_the_prescription(rt_export, tmp_path):
    src = tmp_path / "src"
    vmat = copy_export(rt_export, src / "vmat")
    hdr = F.write_export(src / "hdr", with_ct=False, with_dose=False)  # the same patient: own CT frame, structures
    F.make_brachy(hdr["plan"])
    F.write_dose(hdr, "RD.dcm", scale=15.0 / F.PRESCRIPTION)  # a 15 Gy HDR boost
    ion = F.write_export(src / "ion", with_ct=False, with_dose=False, patient_id="PAT002")
    F.make_ion(ion["plan"])
    F.write_dose(ion, "RD_physical.dcm")
    F.write_dose(ion, "RD_rbe.dcm", scale=1.1, dose_type="EFFECTIVE")
    for rx in (None, 15.0):  # the advice of the first round, followed: still left out
        with pytest.raises(NotExternalPhotonPlan, match=r"is a brachytherapy plan \(BrachyTreatmentType HDR\)"):
            read_rt(src / "hdr", structures=F.STRUCTURES, prescription_gy=rx)
    with pytest.raises(NotExternalPhotonPlan, match="is an RT Ion Plan"):
        read_rt(src / "ion", structures=F.STRUCTURES)
    case = read_rt([src / "vmat", src / "hdr"], structures=F.STRUCTURES)  # the boost beside it is left out
    assert np.abs(case.dose - true_dose_on(case)).max() <= 1e-3 * F.PRESCRIPTION
    summary = import_dicom(src, tmp_path / "ds", F.STRUCTURES, "dose", progress=False)
    assert len(summary.case_ids) == 1 and not summary.failures and summary.num_patients == 2
    left = {w.split("/")[-1]: why for w, why in summary.left_out}
    assert set(left) == {"hdr", "ion"} and "brachytherapy" in left["hdr"] and "RT Ion Plan" in left["ion"]
    assert "2 plan(s) left out" in summary.report()
    assert vmat["folder"].name == "vmat"


@pytest.mark.parametrize("edit,match", [
    (lambda ds: setattr(ds, "PlanIntent", "VERIFICATION"), r"a verification plan \(PlanIntent VERIFICATION\)"),
    (lambda ds: setattr(ds, "RTPlanGeometry", "TREATMENT_DEVICE"), "RTPlanGeometry TREATMENT_DEVICE"),
    (lambda ds: [setattr(b, "RadiationType", "ELECTRON") for b in ds.BeamSequence],
     r"an electron beam plan \(RadiationType ELECTRON\)"),
], ids=["verification", "treatment device", "electrons"])
def test_plans_no_patient_receives_as_photons_are_left_out(rt_export, tmp_path, edit, match):
    export = copy_export(rt_export, tmp_path / "p")
    F._edit(export["plan"], edit)
    with pytest.raises(NotExternalPhotonPlan, match=match):
        read_rt(export["folder"], structures=F.STRUCTURES, prescription_gy=F.PRESCRIPTION)


def test_a_brachy_dose_and_a_dose_naming_a_missing_ion_plan_are_left_out(rt_export, tmp_path):
    export = copy_export(rt_export, tmp_path / "p", skip=("RD.dcm",))
    F.write_dose(export, "RD.dcm", "BRACHY")
    with pytest.raises(NotExternalPhotonPlan, match="DoseSummationType BRACHY .* a brachytherapy dose"):
        read_rt(export["folder"], structures=F.STRUCTURES, prescription_gy=F.PRESCRIPTION)
    export["plan"].unlink()
    F.write_dose(export, "RD.dcm", plan_uid=pydicom.uid.generate_uid(),
                 edit=lambda ds: setattr(ds.ReferencedRTPlanSequence[0], "ReferencedSOPClassUID",
                                         "1.2.840.10008.5.1.4.1.1.481.8"))
    with pytest.raises(NotExternalPhotonPlan, match="the RTDOSE names an RT Ion Plan"):
        read_rt(export["folder"], structures=F.STRUCTURES, prescription_gy=F.PRESCRIPTION)
