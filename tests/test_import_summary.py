"""What import_dicom's summary says: which damaged files refused the plans beside them and which were
ignored, and the split counts (0 test patients said outright, with how to evaluate such an import)."""

import shutil

import dicom_factory as F

from flaxdose.data import write_dataset
from flaxdose.dicom import import_dicom


def test_import_summary_says_damaged_files_refused_their_plan_or_were_ignored(rt_export, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(rt_export["folder"], src / "good")
    bad = F.write_export(src / "bad", with_ct=False, patient_id="PAT002")
    (bad["folder"] / "RS_copy.dcm").write_bytes(b"")  # empty: damaged, beside PAT002's plan
    (src / "junk").mkdir()
    (src / "junk" / "old.dcm").write_bytes(b"")  # damaged, in a folder of no plan
    summary = import_dicom(src, tmp_path / "ds", F.STRUCTURES, "dose", progress=False)
    report = summary.report()
    assert len(summary.case_ids) == 1 and len(summary.failures) == 1
    assert "1 patient(s)/plan(s) FAILED" in report
    lines = report.splitlines()
    i = lines.index("1 damaged DICOM file(s) found: the plans beside them were refused (listed above):")
    assert "RS_copy.dcm" in lines[i + 1]
    j = lines.index("1 damaged DICOM file(s) in folders without a plan, ignored:")
    assert "old.dcm" in lines[j + 1] and j == i + 2
    assert "file(s) ignored:" not in report


def test_only_refused_damage_says_nothing_was_ignored(rt_export, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(rt_export["folder"], src / "good")
    bad = F.write_export(src / "bad", with_ct=False, patient_id="PAT002")
    (bad["folder"] / "RS_copy.dcm").write_bytes(b"")
    report = import_dicom(src, tmp_path / "ds", F.STRUCTURES, "dose", progress=False).report()
    assert "the plans beside them were refused" in report and "ignored" not in report


def test_the_import_summary_says_0_test_patients(tmp_path):
    """An import without a test split says so outright (was silent), and how to evaluate it; with one, the counts."""
    from flaxdose.import_dicom import split_line
    from flaxdose.synthetic.phantom import phantom_case

    cases = [phantom_case(0, i, shape=(8, 8, 4)) for i in range(3)]
    ids = [c.case_id for c in cases]
    write_dataset(tmp_path / "none", cases, {"train": ids})
    line = split_line(str(tmp_path / "none"), 0.0)
    assert line.startswith("splits: train 3 plan(s); 0 test patients (--test_fraction 0)") and "--split all" in line
    write_dataset(tmp_path / "some", cases, {"train": ids[:2], "test": ids[2:]})
    assert split_line(str(tmp_path / "some"), 0.3) == ("splits: train 2 plan(s), test 1 plan(s) (the plans of one "
                                                       "patient stay in one split)")
