"""Patients delivered as archives (zip, tar, .gz, nested): read like folders, or named when they cannot be."""

import gzip
import os
import subprocess
import sys
import tarfile
import zipfile

import dicom_factory as F
import numpy as np
import pytest
from dicom_factory import copy_export, true_dose_on
from pydicom.uid import DeflatedExplicitVRLittleEndian

from flaxdose.data import Dataset
from flaxdose.dicom import import_dicom, read_rt
from flaxdose.errors import FlaxdoseError


def _zip(folder, path, inner=""):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(folder.rglob("*")):
            z.write(f, f"{inner}{f.relative_to(folder)}")
    return path


def _pack(kind, folder, dest):
    """The export in `folder` delivered as `kind` under `dest`; the number of files a reader must find."""
    files = sorted(f for f in folder.rglob("*") if f.is_file())
    dest.mkdir(parents=True)
    if kind == "zip":
        _zip(folder, dest / "patient.zip", inner="PAT/")
    elif kind == "tar.gz":
        with tarfile.open(dest / "patient.tar.gz", "w:gz") as t:
            t.add(folder, arcname="PAT")
    elif kind == "dcm.gz":  # every file compressed on its own, as some PACS exports write them
        for f in files:
            (dest / f"{f.name}.gz").write_bytes(gzip.compress(f.read_bytes()))
    elif kind == "zip in zip":
        _zip(folder, dest / "inner.zip")
        with zipfile.ZipFile(dest / "outer.zip", "w") as z:
            z.write(dest / "inner.zip", "inner.zip")
        (dest / "inner.zip").unlink()
    return len(files)


@pytest.mark.parametrize("kind", ["zip", "tar.gz", "dcm.gz", "zip in zip"])
def test_patients_delivered_as_archives_are_read(rt_export, tmp_path, kind):
    src = tmp_path / "src"
    copy_export(rt_export, src / "plain")
    second = F.write_export(tmp_path / "second", with_ct=False, patient_id="PAT002")
    count = _pack(kind, second["folder"], src / "packed")
    (src / "notes.txt").write_text("not DICOM")
    summary = import_dicom(src, tmp_path / "ds", F.STRUCTURES, "dose", progress=False)
    assert summary.num_patients == 2 and len(summary.case_ids) == 2 and not summary.failures
    assert sum(n for a, n in summary.unpacked if not a.endswith("outer.zip")) == count
    assert [p.split("/")[-1] for p, why in summary.not_read] == ["notes.txt"]
    assert "1 file(s) not read: not DICOM: notes.txt" in summary.report() and "unpacked and read" in summary.report()
    for cid in summary.case_ids:
        case = Dataset.open(tmp_path / "ds").load(cid)
        assert np.abs(case.dose - true_dose_on(case)).max() <= 1e-3 * F.PRESCRIPTION
    case = read_rt(src / "packed", structures=F.STRUCTURES)  # read_rt reads archives too
    assert np.abs(case.dose - true_dose_on(case)).max() <= 1e-3 * F.PRESCRIPTION


def test_archives_that_cannot_be_read_are_named_and_exit_1(rt_export, tmp_path):
    src = tmp_path / "src"
    copy_export(rt_export, src / "plain")
    (src / "patient2.7z").write_bytes(b"7z\xbc\xaf\x27\x1c" + bytes(200))  # a 7-Zip archive's signature
    good = _zip(rt_export["folder"], tmp_path / "whole.zip")
    (src / "patient3.zip").write_bytes(good.read_bytes()[:300])  # cut short in the copy
    summary = import_dicom(src, tmp_path / "ds", F.STRUCTURES, "dose", progress=False)
    failures = {w.split("/")[-1]: why for w, why in summary.failures}
    assert len(summary.case_ids) == 1 and set(failures) == {"patient2.7z", "patient3.zip"}
    assert "7-Zip archive" in failures["patient2.7z"] and "a patient may be inside" in failures["patient3.zip"]
    with pytest.raises(FlaxdoseError, match="patient2.7z: a 7-Zip archive, which flaxdose cannot unpack"):
        read_rt(src, structures=F.STRUCTURES)
    cli = subprocess.run([sys.executable, "-m", "flaxdose.import_dicom", str(src), "--out", str(tmp_path / "ds2"),
                          "--grid", "dose", "--structures", ",".join(F.STRUCTURES)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert cli.returncode == 1 and "patient2.7z" in cli.stdout and "patient3.zip" in cli.stdout, cli.stderr[-2000:]
    assert "imported 1 plan(s) from 1 patient(s)" in cli.stdout


@pytest.mark.parametrize("magic,what", [(b"\x28\xb5\x2f\xfd", "Zstandard"), (b"Rar!\x1a\x07\x00", "RAR")])
def test_compressed_files_python_cannot_read_are_failures_not_silence(rt_export, tmp_path, magic, what):
    src = tmp_path / "src"
    copy_export(rt_export, src / "plain")
    (src / "patient2.bin").write_bytes(magic + bytes(300))
    summary = import_dicom(src, tmp_path / "ds", F.STRUCTURES, "dose", progress=False)
    assert len(summary.case_ids) == 1
    assert [(w.split("/")[-1], what in why) for w, why in summary.failures] == [("patient2.bin", True)]


def test_fuzzed_deflated_enhanced_and_archived_files_raise_only_flaxdose_errors(rt_export_ct, rt_export, tmp_path):
    """The new readers (inflating, multi-frame, unpacking) on cut and mutated files: FlaxdoseError or a case."""
    rng = np.random.default_rng(25)
    deflated = copy_export(rt_export, tmp_path / "deflated")
    F.reencode(deflated["struct"], DeflatedExplicitVRLittleEndian)
    enhanced = copy_export(rt_export_ct, tmp_path / "enhanced")
    ct = F.to_enhanced_ct(enhanced["folder"])
    zipped = tmp_path / "zipped"
    zipped.mkdir()
    archive = _zip(rt_export["folder"], zipped / "patient.zip")
    errors = 0
    for folder, victim, kwargs in ((deflated["folder"], deflated["struct"], {}),
                                   (enhanced["folder"], ct, {"grid": "ct", "include_ct": True}),
                                   (zipped, archive, {})):
        original = victim.read_bytes()
        for _ in range(8):
            data = bytearray(original)
            if rng.integers(2):
                data = data[: int(rng.integers(0, len(data)))]
            else:
                for pos in rng.integers(128, len(data), size=20):
                    data[pos] ^= 0xFF
            victim.write_bytes(bytes(data))
            try:
                read_rt(folder, structures=F.STRUCTURES, **kwargs)
            except FlaxdoseError:
                errors += 1
        victim.write_bytes(original)
    assert errors > 5
