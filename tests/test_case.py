import json

import numpy as np
import pytest

from flaxdose.data import PROSTATE_STRUCTURES, Case, Dataset, write_dataset
from flaxdose.synthetic.phantom import phantom_case, phantom_cases
from flaxdose.errors import FlaxdoseError


def test_case_round_trip_without_pickle(tmp_path):
    case = phantom_case(0, 1).replace(meta={"note": "x"}, possible_dose_mask=np.ones((32, 32, 16), bool))
    path = case.save(tmp_path / "c.npz")
    with np.load(path, allow_pickle=False) as z:  # readable with pickle disabled
        assert "masks" in z
    back = Case.load(path)
    assert back.structures == PROSTATE_STRUCTURES
    np.testing.assert_array_equal(back.masks, case.masks)
    np.testing.assert_array_equal(back.dose, case.dose)
    np.testing.assert_array_equal(back.possible_dose_mask, case.possible_dose_mask)
    assert back.spacing_mm == case.spacing_mm and back.prescription_gy == 70.0 and back.meta == {"note": "x"}
    assert back.ct is None


def test_case_rejects_inconsistent_shapes():
    case = phantom_case(0, 0)
    with pytest.raises(FlaxdoseError, match="dose has shape"):
        case.replace(dose=np.zeros((4, 4, 4), np.float32))
    with pytest.raises(FlaxdoseError, match="masks must have shape"):
        case.replace(structures=case.structures[:-1])
    with pytest.raises(FlaxdoseError, match="NaN"):
        case.replace(dose=np.full(case.shape, np.nan, np.float32))
    with pytest.raises(FlaxdoseError, match="expects"):
        case.check_structures(tuple(reversed(PROSTATE_STRUCTURES)))


def test_damaged_case_file_is_a_clear_error(tmp_path):
    path = phantom_case(0, 0).save(tmp_path / "c.npz")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(FlaxdoseError, match="damaged"):
        Case.load(path)
    with pytest.raises(FlaxdoseError, match="does not exist"):
        Case.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "junk.npz", format=np.array([{"a": 1}], dtype=object))  # a pickle, not a case
    with pytest.raises(FlaxdoseError, match=r"holds pickled objects\); it is damaged") as error:
        Case.load(tmp_path / "junk.npz")
    assert "you trust the file" not in str(error.value)


def test_dataset_write_open_and_refusals(tmp_path):
    cases = phantom_cases(0, 3, shape=(8, 8, 8))
    ids = [c.case_id for c in cases]
    ds = write_dataset(tmp_path / "ds", cases, {"train": ids[:2], "test": ids[2:]})
    assert ds.split("test") == ids[2:] and ds.structures == PROSTATE_STRUCTURES
    assert json.loads((tmp_path / "ds" / "manifest.json").read_text())["num_cases"] == 3
    np.testing.assert_array_equal(ds.load(ids[0]).dose, cases[0].dose)
    with pytest.raises(FlaxdoseError, match="already holds"):
        write_dataset(tmp_path / "ds", cases, {"train": ids})
    with pytest.raises(FlaxdoseError, match="no split"):
        ds.split("val")
    with pytest.raises(FlaxdoseError, match="not written"):
        write_dataset(tmp_path / "bad", cases, {"train": ["nobody"]})
    assert not (tmp_path / "bad").exists()  # nothing half-written
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]
    (tmp_path / "empty").mkdir()
    for folder, message in [(tmp_path / "nope", "does not exist"), (tmp_path / "empty", "no manifest")]:
        with pytest.raises(FlaxdoseError, match=message):
            Dataset.open(folder)


def test_a_raw_export_or_challenge_folder_points_to_its_importer(tmp_path):
    (tmp_path / "dicom" / "p1").mkdir(parents=True)
    (tmp_path / "dicom" / "p1" / "CT_001.dcm").write_bytes(b"")
    (tmp_path / "okbp" / "validation-pats" / "pt_201").mkdir(parents=True)
    (tmp_path / "okbp" / "validation-pats" / "pt_201" / "dose.csv").write_text(",data\n")
    (tmp_path / "other").mkdir()
    for folder, hint in (("dicom", "flaxdose.import_dicom"), ("okbp", "flaxdose.convert_openkbp"),
                         ("other", "write_dataset")):
        with pytest.raises(FlaxdoseError, match=hint):
            Dataset.open(tmp_path / folder)


def test_failure_list_names_a_shared_reason_once():
    from flaxdose.data.case import failure_list

    failed = {"a": "case 'a' has voxel spacing 4x4x3 mm", "b": "case 'b' has voxel spacing 4x4x3 mm", "c": "no PTV"}
    assert failure_list(failed) == "case a: case 'a' has voxel spacing 4x4x3 mm; likewise case b; case c: no PTV"
    many = {str(i): "no PTV" for i in range(7)}
    assert failure_list(many) == "cases 0, 1, 2, 3, 4 and 2 more: no PTV"
    named = {str(i): f"case {str(i)!r} has no PTV" for i in range(7)}  # every id shown is filled in, never a placeholder
    assert failure_list(named) == "case 0: case '0' has no PTV; likewise cases 1, 2, 3, 4 and 2 more"
    assert failure_list({"x": "case 'x' has no PTV"}) == "case x: case 'x' has no PTV"
    files = {f"d/chunk{i}": "a Zstandard-compressed file" for i in range(7)} | {"p1": "no RTSTRUCT", "p2": "no CT"}
    assert failure_list(files, limit=3, noun="plan", reasons=2) == \
        "plans d/chunk0, d/chunk1, d/chunk2 and 4 more: a Zstandard-compressed file; plan p1: no RTSTRUCT; and 1 more reason(s)"


def test_a_case_file_gone_from_its_dataset_says_how_to_get_it_back(tmp_path):
    cases = [phantom_case(0, i) for i in range(2)]
    dataset = write_dataset(tmp_path / "d", cases, {"train": [c.case_id for c in cases]})
    dataset.case_path(cases[0].case_id).unlink()
    fix = r"does not exist, though its dataset lists it; restore the file or write the dataset again \(built-in data"
    with pytest.raises(FlaxdoseError, match=fix):
        dataset.load(cases[0].case_id)
    with pytest.raises(FlaxdoseError, match=fix):
        dataset.case_spacing_mm(cases[0].case_id)  # the header-only read says the same
