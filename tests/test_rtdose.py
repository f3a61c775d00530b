"""RTDOSE export: round trip, required attributes, validation, and dciodvfy when installed."""

import os
import shutil
import subprocess

import dicom_factory as F
import numpy as np
import pydicom
import pytest
from dicom_factory import copy_export, cut

from flaxdose.dicom import Grid, dose_grid_scaling, read_dose, read_rt, resample, write_rtdose
from flaxdose.errors import FlaxdoseError


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("rtdose")
    return {o: F.write_export(root / o, o) for o in ("HFS", "FFS")}


@pytest.fixture(scope="module")
def model_case(export):
    case = read_rt(export["FFS"]["folder"], structures=F.STRUCTURES, grid="model",
                   model_shape=(40, 40, 24), model_spacing_mm=(3.5, 3.5, 3.0))
    # a prediction may be slightly negative: stored as 0
    return case.replace(dose=case.dose - 0.01)


def _strict_read(path):
    old = pydicom.config.settings.reading_validation_mode
    pydicom.config.settings.reading_validation_mode = pydicom.config.RAISE
    try:
        ds = pydicom.dcmread(path)
        for elem in ds.iterall():
            _ = elem.value
            if elem.VR == "DS":
                values = elem.value if elem.VM > 1 else [elem.value]
                assert all(len(str(v)) <= 16 for v in values), elem
        _ = ds.pixel_array
        return ds
    finally:
        pydicom.config.settings.reading_validation_mode = old


@pytest.mark.parametrize("bits", [32, 16])
def test_round_trip_on_input_grid(model_case, export, tmp_path, bits):
    path = write_rtdose(model_case, export["FFS"]["folder"], tmp_path / "rd.dcm", output_grid="input", bits=bits)
    dose, grid = read_dose(path)
    assert grid.shape == model_case.shape
    np.testing.assert_allclose(grid.origin_mm, model_case.origin_mm, atol=1e-6)
    np.testing.assert_allclose(grid.spacing_mm, model_case.spacing_mm, atol=1e-9)
    step = float(pydicom.dcmread(path, stop_before_pixels=True).DoseGridScaling)
    expected = np.clip(model_case.dose, 0, None)
    assert np.abs(dose - expected).max() <= step / 2 + 1e-5 * expected.max()
    assert dose.max() == pytest.approx(expected.max(), abs=step)  # the maximum does not clip
    assert [p.name for p in tmp_path.iterdir()] == ["rd.dcm"]  # no temporary file left behind


def test_a_one_slice_dose_reads_back(model_case, export, tmp_path):
    """A single-frame RTDOSE (with its one-value GridFrameOffsetVector) is read, spacing from SliceThickness."""
    k = 12
    z = model_case.origin_mm[2] + k * model_case.spacing_mm[2]
    one = model_case.replace(masks=model_case.masks[..., k : k + 1], dose=model_case.dose[..., k : k + 1],
                             origin_mm=(*model_case.origin_mm[:2], z))
    path = write_rtdose(one, export["FFS"]["folder"], tmp_path / "rd.dcm", output_grid="input")
    dose, grid = read_dose(path)
    assert grid.shape == (40, 40, 1)
    np.testing.assert_allclose(grid.origin_mm, one.origin_mm, atol=1e-6)
    np.testing.assert_allclose(grid.spacing_mm, model_case.spacing_mm, atol=1e-9)
    step = float(pydicom.dcmread(path, stop_before_pixels=True).DoseGridScaling)
    assert np.abs(dose - np.clip(one.dose, 0, None)).max() <= step / 2 + 1e-5 * one.dose.max()


def test_round_trip_on_ct_grid_with_plan(model_case, export, tmp_path):
    ffs = export["FFS"]
    path = write_rtdose(model_case, ffs["folder"], tmp_path, plan_path=ffs["plan"])
    assert path.parent == tmp_path and path.name.startswith("RD.")
    ds = _strict_read(path)
    ct = pydicom.dcmread(sorted(ffs["folder"].glob("CT_*.dcm"))[0], stop_before_pixels=True)
    plan = pydicom.dcmread(ffs["plan"], stop_before_pixels=True)
    assert ds.StudyInstanceUID == ct.StudyInstanceUID and ds.FrameOfReferenceUID == ct.FrameOfReferenceUID
    assert ds.SOPInstanceUID != ct.SOPInstanceUID and ds.SeriesInstanceUID != ct.SeriesInstanceUID
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.2" and ds.Modality == "RTDOSE"
    assert ds.PatientID == ct.PatientID and ds.PatientName == ct.PatientName
    assert [float(v) for v in ds.ImageOrientationPatient] == [float(v) for v in ct.ImageOrientationPatient]
    assert ds.DoseSummationType == "PLAN" and ds.DoseUnits == "GY" and ds.DoseType == "PHYSICAL"
    assert ds.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == plan.SOPInstanceUID
    assert ds.FrameIncrementPointer == pydicom.tag.Tag("GridFrameOffsetVector")
    for keyword in ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName",
                    "StudyID", "AccessionNumber", "SeriesNumber", "PositionReferenceIndicator", "Manufacturer",
                    "InstanceNumber", "SliceThickness", "OperatorsName", "NumberOfFrames", "PixelSpacing"):
        assert keyword in ds, keyword
    dose, grid = read_dose(path)
    # CT pixels and slices, cropped to the model grid's extent
    np.testing.assert_allclose(grid.spacing_mm, F.CT_SPACING)
    src = Grid(model_case.origin_mm, model_case.spacing_mm, model_case.shape)
    expected = np.clip(resample(model_case.dose, src, grid), 0, None)  # negative predictions stored as 0
    assert np.abs(dose - expected).max() <= float(ds.DoseGridScaling) + 1e-5 * expected.max()
    # and it matches the original plan dose where both exist (resampled twice)
    X, Y, Z = np.meshgrid(*F.coords(grid.origin_mm, grid.spacing_mm, grid.shape), indexing="ij")
    lo, hi = np.array(F.DOSE_ORIGIN), np.array(F.DOSE_ORIGIN) + (np.array(F.DOSE_SHAPE_XYZ) - 1) * F.DOSE_SPACING
    m_lo = np.array(model_case.origin_mm)
    m_hi = m_lo + (np.array(model_case.shape) - 1) * model_case.spacing_mm
    # one model voxel in from the edges (the model grid holds 0 beyond the plan's dose grid)
    lo, hi = np.maximum(lo, m_lo) + model_case.spacing_mm, np.minimum(hi, m_hi) - model_case.spacing_mm
    inside = (X >= lo[0]) & (X <= hi[0]) & (Y >= lo[1]) & (Y <= hi[1]) & (Z >= lo[2]) & (Z <= hi[2])
    truth = F.true_dose(X, Y, Z)
    assert np.abs(dose - truth)[inside].max() <= 0.01 * truth.max()


def test_reimport_of_exported_dose(model_case, export, tmp_path):
    """The exported RTDOSE loads back on the patient's grid like a TPS dose; written beside the plan's own
    RTDOSE it is recognised as flaxdose's (Manufacturer) and never read as the plan's dose."""
    folder = tmp_path / "patient"
    shutil.copytree(export["FFS"]["folder"], folder)
    path = write_rtdose(model_case, folder, folder / "RD_pred.dcm", plan_path=folder / "RP.dcm")
    assert pydicom.dcmread(path, stop_before_pixels=True).Manufacturer == "flaxdose"
    dose, grid = read_dose(path)
    src = Grid(model_case.origin_mm, model_case.spacing_mm, model_case.shape)
    back = resample(dose, grid, src)  # CT grid -> model grid again
    inner = (slice(6, -6),) * 3  # away from the edge of the plan's dose grid (zero beyond it)
    assert np.abs(back - np.clip(model_case.dose, 0, None))[inner].max() < 0.01 * model_case.dose.max()
    again = read_rt(folder, structures=F.STRUCTURES, grid="model", model_shape=model_case.shape,
                    model_spacing_mm=model_case.spacing_mm)
    plan_dose = read_rt(export["FFS"]["folder"], structures=F.STRUCTURES, grid="model", model_shape=model_case.shape,
                        model_spacing_mm=model_case.spacing_mm).dose
    np.testing.assert_array_equal(again.dose, plan_dose)  # the plan's own dose, not the prediction


def test_dose_grid_scaling_never_clips():
    for bits, top in ((32, 2**32 - 1), (16, 2**16 - 1)):
        for max_dose in (1e-3, 0.7, 1.0, 59.99, 70.0, 78.123456789, 123456.789):
            text = dose_grid_scaling(max_dose, bits)
            assert len(text) <= 16
            stored = np.rint(max_dose / float(text))
            assert top * 0.999 <= stored <= top


def test_export_errors(model_case, export, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FlaxdoseError, match="no CT images"):
        write_rtdose(model_case, empty, tmp_path / "x.dcm")
    far = model_case.replace(origin_mm=(1000.0, 1000.0, 1000.0))
    with pytest.raises(FlaxdoseError, match="does not overlap"):
        write_rtdose(far, export["FFS"]["folder"], tmp_path / "x.dcm")
    with pytest.raises(FlaxdoseError, match="frame of reference"):
        write_rtdose(model_case, export["FFS"]["folder"], tmp_path / "x.dcm", plan_path=export["HFS"]["plan"])
    with pytest.raises(FlaxdoseError, match="origin_mm and spacing_mm"):
        write_rtdose(model_case.dose, export["FFS"]["folder"], tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()


def _dciodvfy(path):
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return result.stdout + result.stderr


def _as_16_bit(path, out):
    """The same RTDOSE with its pixel data re-encoded at 16 bits (DoseGridScaling adjusted), every other
    attribute unchanged: what dciodvfy can check of a 32-bit file, whose pixel data its Debian build
    (dicom3tools 2022) cannot parse (it aborts: Assertion `bitsallocated <= bytesinword*8u')."""
    ds = pydicom.dcmread(path)
    dose = ds.pixel_array.astype(np.float64) * float(ds.DoseGridScaling)
    ds.DoseGridScaling = dose_grid_scaling(float(dose.max()), 16)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelData = np.rint(dose / float(ds.DoseGridScaling)).astype("<u2").tobytes()
    ds.save_as(out, enforce_file_format=True)
    return out


def need_dciodvfy():
    """Skip without dciodvfy (Debian's dicom3tools), except where FLAXDOSE_REQUIRE_DCIODVFY is set (.ci/run): fail."""
    if shutil.which("dciodvfy") is None:
        if os.environ.get("FLAXDOSE_REQUIRE_DCIODVFY"):
            pytest.fail("dciodvfy is required here (FLAXDOSE_REQUIRE_DCIODVFY) but not on PATH: apt-get install dicom3tools")
        pytest.skip("dciodvfy (Debian dicom3tools) not installed; .ci/run installs it")


@pytest.mark.parametrize("bits", [16, 32])
def test_dciodvfy_accepts_the_export(model_case, export, tmp_path, bits):
    """Every RTDOSE written with its RTPLAN passes dciodvfy without an Error line (issue 30): 16 bit as written,
    32 bit through a 16-bit copy of it (the rest is read strictly by pydicom, `_strict_read`)."""
    need_dciodvfy()
    path = write_rtdose(model_case, export["FFS"]["folder"], tmp_path / "rd.dcm",
                        plan_path=export["FFS"]["plan"], bits=bits)
    _strict_read(path)
    report = _dciodvfy(path)
    if bits == 32 and "bitsallocated <= bytesinword" in report:
        report = _dciodvfy(_as_16_bit(path, tmp_path / "rd16.dcm"))
    assert "RTDose" in report
    assert [line for line in report.splitlines() if "Error" in line] == [], report
    # without its RTPLAN a PLAN dose lacks the Type 1C ReferencedRTPlanSequence: the validator says so
    bare = write_rtdose(model_case, export["FFS"]["folder"], tmp_path / "bare.dcm", bits=16)
    assert "ReferencedRTPlanSequence" in _dciodvfy(bare)


def test_an_invalid_value_of_the_ct_is_not_copied(model_case, export, tmp_path):
    """A CT whose StudyDate is written 02.01.2024 (not a DICOM DA) gives an RTDOSE with that attribute empty
    (Type 2), not an invalid file."""
    folder = tmp_path / "ct"
    shutil.copytree(export["FFS"]["folder"], folder)
    for path in folder.glob("CT_*.dcm"):
        ds = pydicom.dcmread(path)
        ds.StudyDate = "02.01.2024"
        ds.save_as(path)
    path = write_rtdose(model_case, folder, tmp_path / "rd.dcm", plan_path=folder / "RP.dcm")
    ds = _strict_read(path)
    assert ds.StudyDate == "" and ds.StudyTime == "101010"

# ------------------------------------------------------------ reference CTs
def test_a_prediction_is_written_onto_an_enhanced_ct(rt_export_ct, tmp_path):
    export = copy_export(rt_export_ct, tmp_path / "p")
    F.to_enhanced_ct(export["folder"])
    case = read_rt(export["folder"], structures=F.STRUCTURES, grid="ct")
    out = write_rtdose(case, export["folder"], tmp_path / "RD_pred.dcm")
    dose, grid = read_dose(out)
    assert grid.spacing_mm == F.CT_SPACING and np.allclose(grid.origin_mm, F.CT_ORIGIN)
    true = F.true_dose(*np.meshgrid(*F.coords(grid.origin_mm, grid.spacing_mm, grid.shape), indexing="ij"))
    inside = dose > 0  # the CT grid beyond the dose grid gets no dose
    assert inside.sum() > 0.5 * dose.size and np.abs(dose - true)[inside].max() <= 0.005 * true.max()


def test_rtdose_export_refuses_a_reference_ct_with_a_cut_slice(rt_export_ct, tmp_path):
    """The reference CT gives the RTDOSE its grid: a cut slice is named, never silently left out."""
    case = read_rt(rt_export_ct["folder"], structures=F.STRUCTURES, grid="model", model_shape=(40, 40, 24),
                   model_spacing_mm=(3.5, 3.5, 3.0))
    reference = copy_export(rt_export_ct, tmp_path / "ref")["folder"]
    slice_ = sorted(reference.glob("CT_*.dcm"))[-1]
    cut(slice_, -500)
    with pytest.raises(FlaxdoseError, match=f"in the reference CT: {slice_.name}"):
        write_rtdose(case, reference, tmp_path / "rd.dcm")
    assert not (tmp_path / "rd.dcm").exists()
