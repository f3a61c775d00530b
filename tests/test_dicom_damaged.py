"""Damaged files: cut, empty, mutated or foreign DICOM files are named and stop only the plan beside them,
never raise anything but FlaxdoseError; one rule for every caller (`flaxdose.dicom.damage`). Expected
values come from the factory's constants and the bytes written here."""

import os
import shutil
from pathlib import Path

import dicom_factory as F
import numpy as np
import pydicom
import pytest
from dicom_factory import copy_export, cut, true_dose_on
from pydicom.uid import DeflatedExplicitVRLittleEndian

from flaxdose.data import Case, Dataset
from flaxdose.dicom import import_dicom, read_dose, read_rt, scan
from flaxdose.dicom.damage import damaged_among, plan_damage
from flaxdose.errors import FlaxdoseError


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return F.Exports(tmp_path_factory.mktemp("exports"))


PYDICOM_TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


CT_PIXEL_BYTES = F.CT_SHAPE_XYZ[0] * F.CT_SHAPE_XYZ[1] * 2  # 64 columns x 48 rows, 16 bits allocated


# ------------------------------------------------------------ foreign and mutated files
def _rt_test_files():
    files, _ = scan(PYDICOM_TEST_FILES)
    return sorted(str(f.path) for f in files if f.modality.startswith("RT"))


def test_pydicom_rt_test_files_import_or_clear_error():
    paths = _rt_test_files()
    assert len(paths) >= 8
    for path in paths:
        try:
            case = read_rt([path])
            assert isinstance(case, Case)
        except FlaxdoseError as e:
            assert str(e)
    doses = [p for p in paths if "rtdose" in Path(p).name]
    for path in doses:
        try:
            dose, grid = read_dose(path, require_gy=False)
            assert dose.ndim == 3 and np.isfinite(dose).all() and min(grid.spacing_mm) > 0
        except FlaxdoseError:
            pass
    with pytest.raises(FlaxdoseError, match="RELATIVE"):
        read_dose(PYDICOM_TEST_FILES / "rtdose.dcm")
    dose, grid = read_dose(PYDICOM_TEST_FILES / "rtdose.dcm", require_gy=False)
    assert dose.shape == (10, 10, 15) and grid.spacing_mm == (10.0, 10.0, 5.0)
    # a structure set and a dose of two different patients are never combined
    with pytest.raises(FlaxdoseError):
        read_rt([PYDICOM_TEST_FILES / "rtstruct.dcm", PYDICOM_TEST_FILES / "rtdose.dcm"])


def _mutations(data: bytes, rng, n):
    for _ in range(n):
        kind = rng.integers(3)
        if kind == 0:
            yield data[: int(rng.integers(0, len(data)))]
        else:
            b = bytearray(data)
            for pos in rng.integers(128, len(b), size=int(rng.integers(1, 40))):
                b[pos] = int(rng.integers(256)) if kind == 1 else b[pos] ^ 0xFF
            yield bytes(b)


def test_fuzz_truncated_and_mutated_files_raise_only_flaxdose_errors(exports, tmp_path):
    rng = np.random.default_rng(1234)
    src = exports["HFS"]
    small = tmp_path / "small"  # RTSTRUCT + RTDOSE without CT: fast to read
    small.mkdir()
    shutil.copy(src["struct"], small / "RS.dcm")
    shutil.copy(src["dose"], small / "RD.dcm")
    outcomes = {"ok": 0, "error": 0}
    for target, n in (("RD.dcm", 25), ("RS.dcm", 25)):
        original = (small / target).read_bytes()
        for data in _mutations(original, rng, n):
            (small / target).write_bytes(data)
            try:
                read_rt(small, structures=F.STRUCTURES)
                outcomes["ok"] += 1
            except FlaxdoseError:
                outcomes["error"] += 1
        (small / target).write_bytes(original)
    ct_dir = tmp_path / "ct"
    shutil.copytree(src["folder"], ct_dir)
    victim = sorted(ct_dir.glob("CT_*.dcm"))[7]
    original = victim.read_bytes()
    for data in _mutations(original, rng, 6):
        victim.write_bytes(data)
        try:
            read_rt(ct_dir, structures=F.STRUCTURES, include_ct=True)
            outcomes["ok"] += 1
        except FlaxdoseError:
            outcomes["error"] += 1
    assert outcomes["error"] > 10  # the mutations do break files; none escaped as another exception


# ------------------------------------------------------------ files cut short or empty
def test_empty_and_cut_export_files_are_named_not_ignored(rt_export_ct, rt_export, tmp_path):
    """A CT slice cut after its first elements, or an empty RTPLAN, fails its patient naming the file;
    an empty .dcm elsewhere is listed as damaged and the healthy patient imports."""
    src = tmp_path / "src"
    cut = copy_export(rt_export_ct, src / "p")
    ct = sorted(cut["folder"].glob("CT_*.dcm"))[1]
    ct.write_bytes(ct.read_bytes()[:600])  # file meta and the first header elements only
    copy_export(rt_export, src / "q")
    (src / "q" / "notes.txt").write_text("not DICOM, not named like it: ignored")
    F.write_export(src / "r", with_ct=False, patient_id="PAT003")
    (src / "r" / "RP.dcm").write_bytes(b"")
    (src / "elsewhere").mkdir()
    (src / "elsewhere" / "RD_copy.dcm").write_bytes(b"")
    summary = import_dicom(src, tmp_path / "ds", F.STRUCTURES, "dose", progress=False)
    assert len(summary.case_ids) == 1  # q
    damaged = {os.path.basename(p): why for p, why in summary.damaged_files}
    assert set(damaged) == {ct.name, "RP.dcm", "RD_copy.dcm"}
    assert "0 bytes: empty" in damaged["RD_copy.dcm"] and "SeriesInstanceUID" in damaged[ct.name]
    failures = dict((os.path.basename(w), why) for w, why in summary.failures)
    assert ct.name in failures["p"] and "RP.dcm" in failures["r"]


@pytest.mark.parametrize("where", ["in the middle", "10 bytes short", "before the contours"])
def test_a_cut_rtstruct_is_a_damaged_file_not_a_missing_alias(rt_export, tmp_path, where):
    export = copy_export(rt_export, tmp_path / "p")
    data = export["struct"].read_bytes()
    keep = {"in the middle": len(data) // 2, "10 bytes short": len(data) - 10,
            "before the contours": data.index(b"\x06\x30\x39\x00SQ")}[where]  # (3006,0039) ROIContourSequence
    cut(export["struct"], keep)
    with pytest.raises(FlaxdoseError) as info:
        read_rt(export["folder"], structures=F.STRUCTURES)
    message = str(info.value)
    assert str(export["struct"]) in message and "damaged" in message and "re-export" in message
    assert "alias" not in message and "ROIs found" not in message
    if where == "before the contours":  # a complete encoding without the Type 1 ROI Contour Sequence
        assert "without ROIContourSequence" in message
    else:  # pydicom reads these without a word
        assert f"after the end of the file ({keep} bytes)" in message


def test_import_skips_the_patient_of_a_cut_rtstruct_and_names_it(rt_export, tmp_path):
    src = tmp_path / "src"
    copy_export(rt_export, src / "good")
    bad = F.write_export(src / "bad", with_ct=False, patient_id="PAT002")
    cut(bad["struct"], -10)
    summary = import_dicom(src, tmp_path / "ds", F.STRUCTURES, "dose", progress=False)
    assert len(summary.case_ids) == 1 and Dataset.open(tmp_path / "ds").manifest["num_cases"] == 1
    assert [os.path.basename(p) for p, _ in summary.damaged_files] == ["RS.dcm"]
    (where, why), = summary.failures
    assert os.path.basename(where) == "bad" and "RS.dcm" in why and "damaged" in why and "alias" not in why


def test_a_ct_slice_cut_inside_its_pixel_data_refuses_the_plan_without_include_ct(rt_export_ct, tmp_path):
    export = copy_export(rt_export_ct, tmp_path / "p")
    slice_ = sorted(export["folder"].glob("CT_*.dcm"))[5]
    size = slice_.stat().st_size
    cut(slice_, -1000)  # inside PixelData, the last element
    with pytest.raises(FlaxdoseError) as info:
        read_rt(export["folder"], structures=F.STRUCTURES)  # CT voxels not imported: the CT gives the geometry
    message = str(info.value)
    assert slice_.name in message and "(7FE0,0010)" in message and f"({size - 1000} bytes)" in message


def test_short_or_missing_pixel_data_is_found_from_the_header(rt_export_ct, tmp_path):
    export = copy_export(rt_export_ct, tmp_path / "p")
    short, empty = sorted(export["folder"].glob("CT_*.dcm"))[2:4]
    ds = pydicom.dcmread(short)
    ds.PixelData = ds.PixelData[: CT_PIXEL_BYTES // 2]  # a well-formed file holding half a slice
    ds.save_as(short)
    data = empty.read_bytes()
    cut(empty, data.rindex(b"\xe0\x7f\x10\x00"))  # cut just before the PixelData element: a complete header
    files, damaged = scan(export["folder"])
    why = dict((os.path.basename(p), m) for p, m in damaged)
    assert set(why) == {short.name, empty.name} and len(files) == F.CT_SHAPE_XYZ[2] - 2 + 3
    assert f"PixelData holds {CT_PIXEL_BYTES // 2} bytes" in why[short.name]
    assert f"= {CT_PIXEL_BYTES}" in why[short.name]
    assert "no PixelData" in why[empty.name]


def test_a_deflated_file_cut_short_is_still_damaged(rt_export, tmp_path):
    export = copy_export(rt_export, tmp_path / "p")
    F.reencode(export["struct"], DeflatedExplicitVRLittleEndian)
    data = export["struct"].read_bytes()
    export["struct"].write_bytes(data[: len(data) - 200])  # the compressed stream loses its end
    _, damaged = scan(export["folder"])
    assert [p.split("/")[-1] for p, _ in damaged] == ["RS.dcm"]
    with pytest.raises(FlaxdoseError, match="RS.dcm"):
        read_rt(export["folder"], structures=F.STRUCTURES)


def test_a_ct_in_a_transfer_syntax_the_damage_walk_does_not_know_is_not_called_damaged(rt_export_ct, tmp_path):
    export = copy_export(rt_export_ct, tmp_path / "p")
    slice_path = sorted(export["folder"].glob("CT_*.dcm"))[3]
    ds = pydicom.dcmread(slice_path)
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.9.999.1"  # a private syntax: header readable only
    ds.save_as(slice_path)
    _, damaged = scan(export["folder"])
    assert damaged == []
    case = read_rt(export["folder"], structures=F.STRUCTURES)  # the CT only places the grid here
    assert np.abs(case.dose - true_dose_on(case)).max() <= 1e-3 * F.PRESCRIPTION
    with pytest.raises(FlaxdoseError, match=slice_path.name):  # its pixels cannot be decoded: named
        read_rt(export["folder"], structures=F.STRUCTURES, grid="ct", include_ct=True)


# ------------------------------------------------------------ one rule
def test_one_damaged_file_rule_with_each_callers_scope(rt_export, tmp_path):
    class File:
        def __init__(self, path):
            self.path = path

    damaged = [("/a/RP.dcm", "/a/RP.dcm: empty"), ("/b/CT_1.dcm", "/b/CT_1.dcm: cut")]
    assert damaged_among(damaged, [File("/a/RS.dcm")]) == damaged[:1]
    assert damaged_among(damaged) == damaged and plan_damage(damaged, [File("/c/RS.dcm")]) is None
    assert plan_damage(damaged) == "damaged DICOM file(s) beside the plan: RP.dcm, CT_1.dcm (/a/RP.dcm: empty)"

    src = tmp_path / "src"
    copy_export(rt_export, src / "p")
    (src / "elsewhere").mkdir()
    (src / "elsewhere" / "RD_copy.dcm").write_bytes(b"")
    with pytest.raises(FlaxdoseError, match="RD_copy.dcm"):  # read_rt: any damaged file among its paths
        read_rt(src, structures=F.STRUCTURES)
    summary = import_dicom(src, tmp_path / "ds", F.STRUCTURES, "dose", progress=False)
    assert len(summary.case_ids) == 1 and not summary.failures  # import: only damage in the plan's folders
    assert [os.path.basename(p) for p, _ in summary.damaged_files] == ["RD_copy.dcm"]
