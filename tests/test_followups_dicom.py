"""DICOM import follow-ups of a new-user pass: files cut short are diagnosed as damaged (an RTSTRUCT
is never read as misnamed ROIs, a CT slice's cut pixel data is found without --include_ct), the
dataset folder is never inside (or around) its source, and read_rt and import_dicom share one
damaged-file rule. Expected values come from the factory's constants and the bytes written here."""

import os
import shutil
import subprocess
import sys

import dicom_factory as F
import pydicom
import pytest

from flaxdose.data import Dataset
from flaxdose.dicom import import_dicom, read_rt, scan
from flaxdose.dicom.damage import damaged_among, plan_damage
from flaxdose.errors import FlaxdoseError

CT_PIXEL_BYTES = F.CT_SHAPE_XYZ[0] * F.CT_SHAPE_XYZ[1] * 2  # 64 columns x 48 rows, 16 bits allocated




def copy_export(export, dest):
    shutil.copytree(export["folder"], dest)
    return {**export, "folder": dest, "struct": dest / "RS.dcm", "plan": dest / "RP.dcm", "dose": dest / "RD.dcm"}


def cut(path, keep):
    """Keep the first `keep` bytes of a file (a negative `keep` drops that many from its end); the new size."""
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    return len(data[:keep])


def run_cli(src, out):
    cmd = [sys.executable, "-m", "flaxdose.import_dicom", str(src), "--out", str(out), "--grid", "dose",
           "--structures", ",".join(F.STRUCTURES)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "JAX_PLATFORMS": "cpu"})


# ------------------------------------------------------------ 1. a cut RTSTRUCT is damaged, not misnamed
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


# ------------------------------------------------------------ 2. a CT slice with cut pixel data
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


def test_cli_imports_the_others_and_exits_1_naming_the_cut_ct_slice(rt_export_ct, rt_export, tmp_path):
    src = tmp_path / "src"
    export = copy_export(rt_export_ct, src / "p")
    copy_export(rt_export, src / "q")  # PAT001 as well: another frame of reference, imported
    slice_ = sorted(export["folder"].glob("CT_*.dcm"))[0]
    cut(slice_, -100)
    result = run_cli(src, tmp_path / "ds")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "FAILED" in result.stdout and slice_.name in result.stdout
    assert Dataset.open(tmp_path / "ds").manifest["num_cases"] == 1


# ------------------------------------------------------------ 3. the dataset folder apart from its source
def test_a_dataset_folder_inside_around_or_equal_to_the_source_is_refused(rt_export, tmp_path):
    src = tmp_path / "src"
    copy_export(rt_export, src / "p")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for out, says in ((src / "datasets" / "ds", "lies inside the source folder"), (src, "is the source folder"),
                      (tmp_path, "holds the source")):
        with pytest.raises(FlaxdoseError) as info:
            import_dicom(src, out, F.STRUCTURES, "dose", overwrite=True, progress=False)
        assert says in str(info.value) and str(out) in str(info.value) and str(src) in str(info.value)
        assert "choose a dataset folder outside" in str(info.value)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written, nothing replaced
    # a file given as source: a dataset beside it is not inside anything the import reads
    summary = import_dicom([src / "p" / "RS.dcm", src / "p" / "RD.dcm", src / "p" / "RP.dcm"], src / "p" / "ds",
                           F.STRUCTURES, "dose", progress=False)
    assert len(summary.case_ids) == 1


def test_cli_refuses_out_inside_src_with_exit_2(rt_export, tmp_path):
    src = tmp_path / "src"
    copy_export(rt_export, src / "p")
    result = run_cli(src, src / "ds")
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("flaxdose: error:") and str(src / "ds") in line and "outside" in line
    assert not (src / "ds").exists() and sorted(p.name for p in src.iterdir()) == ["p"]


# ------------------------------------------------------------ 4. one damaged-file rule, two scopes
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


def test_rtdose_export_refuses_a_reference_ct_with_a_cut_slice(rt_export_ct, tmp_path):
    """The reference CT gives the RTDOSE its grid: a cut slice is named, never silently left out."""
    from flaxdose.dicom import write_rtdose

    case = read_rt(rt_export_ct["folder"], structures=F.STRUCTURES, grid="model", model_shape=(40, 40, 24),
                   model_spacing_mm=(3.5, 3.5, 3.0))
    reference = copy_export(rt_export_ct, tmp_path / "ref")["folder"]
    slice_ = sorted(reference.glob("CT_*.dcm"))[-1]
    cut(slice_, -500)
    with pytest.raises(FlaxdoseError, match=f"in the reference CT: {slice_.name}"):
        write_rtdose(case, reference, tmp_path / "rd.dcm")
    assert not (tmp_path / "rd.dcm").exists()
