import json

import dicom_factory as F
import numpy as np
import pytest

from conftest import run_cli
from flaxdose.data.case import Dataset
from flaxdose.data.pipeline import model_inputs
from flaxdose.dicom import Grid, read_dose, resample
from flaxdose.errors import FlaxdoseError
from flaxdose.inference.dicom_plans import export_rtdose, predict_dicom
from flaxdose.inference.predictor import (
    Model,
    implausible,
    predict_dataset,
    sliding_window,
    window_starts,
)


@pytest.fixture(scope="module")
def workdir(phantom_run):
    return phantom_run  # conftest's session model, shared with tests/test_clinical_path.py


def data_dir(workdir):
    return next((workdir / "data").iterdir())


def test_predict_dataset_writes_clipped_gy_cases(tmp_path, workdir):
    model = Model.load(workdir)
    out = predict_dataset(model, data_dir(workdir), "test", tmp_path / "pred")
    ref = Dataset.open(data_dir(workdir))
    assert out.split("test") == ref.split("test")
    for case_id in out.split("test"):
        pred, truth = out.load(case_id), ref.load(case_id)
        assert pred.shape == truth.shape and pred.dose.min() >= 0
        assert not pred.dose[~truth.mask("Body")].any()
        np.testing.assert_array_equal(pred.masks, truth.masks)
        # trained 30 steps: already in the right range of Gy, not in units of the prescription
        assert 0.3 * truth.dose.max() < pred.dose.max() < 3 * truth.dose.max()
    with pytest.raises(FlaxdoseError, match="already holds"):
        predict_dataset(model, data_dir(workdir), "test", tmp_path / "pred")
    with pytest.raises(FlaxdoseError, match="no split"):
        predict_dataset(model, data_dir(workdir), "validation", tmp_path / "other")


def test_sliding_windows_are_patch_inference_blended(workdir):
    """Without overlap every voxel is exactly patch inference; with overlap each voxel is a
    convex blend of the patch predictions that cover it."""
    model = Model.load(workdir)
    dataset = Dataset.open(data_dir(workdir))
    case = dataset.load(dataset.split("test")[0])
    inputs = model_inputs(case, model.inputs)  # the quick recipe's masks + PTV distance
    run = lambda x: np.asarray(model._predict(model.params, x))
    window = model.window
    assert window == (8, 8, 8) and case.shape == (24, 24, 16)
    tiles = sliding_window(run, inputs, window, overlap=0.0, batch_size=4)
    corner = (slice(8, 16), slice(16, 24), slice(8, 16))
    # batched (4 windows) and single-window convolutions may differ in the last float bits
    np.testing.assert_allclose(tiles[corner], run(inputs[corner][None])[0], rtol=1e-5, atol=1e-5)
    blended = sliding_window(run, inputs, window, overlap=0.5, batch_size=3)
    starts = [(i, j, k) for i in window_starts(24, 8, 0.5) for j in window_starts(24, 8, 0.5) for k in window_starts(16, 8, 0.5)]
    stack = np.full((len(starts), 24, 24, 16), np.nan, np.float32)
    for n, (i, j, k) in enumerate(starts):
        stack[n, i:i + 8, j:j + 8, k:k + 8] = run(inputs[i:i + 8, j:j + 8, k:k + 8][None])[0]
    lo, hi = np.nanmin(stack, axis=0), np.nanmax(stack, axis=0)
    assert np.all(blended >= lo - 1e-5) and np.all(blended <= hi + 1e-5)
    assert window_starts(24, 8, 0.5) == [0, 4, 8, 12, 16] and window_starts(10, 8, 0.5) == [0, 2]


def test_whole_volume_pass_is_available(workdir):
    model = Model.load(workdir, full_volume=True)
    dataset = Dataset.open(data_dir(workdir))
    case = dataset.load(dataset.split("test")[0])
    inputs = model_inputs(case, model.inputs)
    direct = np.asarray(model._predict(model.params, inputs[None]))[0]
    expected = np.clip(direct, 0, None) * 70.0 * case.mask("Body")  # zero outside the body
    np.testing.assert_allclose(model.predict([case])[0].dose, expected, rtol=1e-5, atol=1e-4)


def test_dicom_in_rtdose_out(tmp_path, workdir):
    export = F.write_export(tmp_path / "patient")
    model = Model.load(workdir)
    # the tiny test model expects the 6 prostate structures; the factory adds a 7th ("Box")
    predicted = predict_dicom(model, tmp_path / "patient")
    assert predicted.structures == model.structures and predicted.prescription_gy == F.PRESCRIPTION
    assert predicted.spacing_mm == (4.0, 4.0, 5.0)  # read at the phantoms' spacing it trained on, not 4x4x3
    path = export_rtdose(predicted, tmp_path / "patient", tmp_path / "rtdose", plan=export.get("plan"))
    dose, grid = read_dose(path)
    expected = resample(predicted.dose, Grid(predicted.origin_mm, predicted.spacing_mm, predicted.shape), grid)
    assert dose.shape == grid.shape and dose.max() > 0
    np.testing.assert_allclose(dose, expected, atol=1e-3 * expected.max())  # the prediction, on the CT grid


def test_predict_cli_defaults_data_to_the_runs_dataset(tmp_path, workdir):
    """No --data: the split is read from the dataset the run trained on (issue 12)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "pred"
    result = subprocess.run([sys.executable, "-m", "flaxdose.predict", f"--workdir={workdir}", f"--out={out}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["predicted"] == len(Dataset.open(data_dir(workdir)).split("test"))
    assert Dataset.open(out).split("test") == Dataset.open(data_dir(workdir)).split("test")
    refused = subprocess.run([sys.executable, "-m", "flaxdose.evaluate", "--openkbp", f"--workdir={workdir}",
                              f"--out={tmp_path / 'okbp'}"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--openkbp needs --data" in refused.stderr
    assert not (tmp_path / "okbp").exists()


def test_bad_output_paths_and_a_damaged_checkpoint_are_one_line_errors(tmp_path, workdir):
    """Found by a new-user pass: --dicom without --rtdose_out computed a dose and threw it away
    (exit 0); an --out that cannot be created, and a truncated checkpoint file, ended in tracebacks."""
    import shutil
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "flaxdose.predict", *args], capture_output=True, text=True,
                              timeout=300)

    no_rtdose = cli(f"--workdir={workdir}", f"--dicom={tmp_path}")
    assert no_rtdose.returncode == 2 and "--dicom needs --out OUT" in no_rtdose.stderr
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    under_a_file = cli(f"--workdir={workdir}", f"--out={a_file / 'pred'}")
    assert under_a_file.returncode == 2 and under_a_file.stderr.strip().splitlines()[-1].startswith("flaxdose: error:")
    assert "Traceback" not in under_a_file.stderr and a_file.read_text() == "not a folder"

    damaged = tmp_path / "damaged"
    shutil.copytree(workdir, damaged, ignore=shutil.ignore_patterns("data"))
    arrays = sorted((p for p in (damaged / "best").rglob("*") if p.is_file() and "/d/" in str(p)), key=lambda p: p.stat().st_size)
    assert arrays, "orbax stores the arrays under .../d/"
    arrays[-1].write_bytes(arrays[-1].read_bytes()[:100])  # the largest array file, cut short
    with pytest.raises(FlaxdoseError, match="damaged"):
        Model.load(damaged)


def test_implausible_predictions_are_flagged_not_silent(workdir, caplog):
    """A maximum of 2 x the prescription, or a prescription given in cGy, is logged and kept in the meta."""
    model = Model.load(workdir)
    case = Dataset.open(data_dir(workdir)).load(Dataset.open(data_dir(workdir)).split("test")[0])
    assert implausible(case, case.dose / case.prescription_gy) == ""  # the reference plan itself is plausible
    hot = Model.load(workdir)
    hot.predict_relative = lambda inputs, batch_size=1: np.full(inputs.shape[:3], 2.0, np.float32)
    with caplog.at_level("WARNING", logger="flaxdose"):
        flagged = hot.predict([case])[0]
    assert "2.00 x the prescription" in flagged.meta["prediction_warning"]
    assert case.case_id in caplog.text and "do not use it" in caplog.text
    cgy = model.predict([case.replace(prescription_gy=7000.0)])[0]
    assert "cGy" in cgy.meta["prediction_warning"]


@pytest.mark.parametrize("make, problem", [(lambda p: p / "nonesuch", "does not exist"),
                                           (lambda p: (p / "a.dcm").write_bytes(b"x") and p / "a.dcm", "is not a folder")])
def test_a_dicom_export_that_is_not_a_folder_is_refused_before_it_is_read(make, problem, tmp_path, caplog):
    from flaxdose.inference.dicom_plans import read_dicom_case

    with caplog.at_level("INFO", logger="flaxdose"), pytest.raises(FlaxdoseError, match=problem):
        read_dicom_case([], make(tmp_path))
    assert "reading" not in caplog.text


def test_split_all_predicts_every_case_of_every_split(tmp_path, workdir):
    """As evaluate --split all: an import with only a "train" split can be predicted whole (issue 30)."""
    data = Dataset.open(data_dir(workdir))
    every = [i for ids in data.splits.values() for i in ids]
    assert len(every) == len(set(every)) == 8 and "all" not in data.splits
    out = predict_dataset(Model.load(workdir), data_dir(workdir), "all", tmp_path / "pred")
    assert out.split("all") == every and sorted(out.splits) == ["all"]


def test_rtdose_out_under_an_existing_file_names_the_path_and_the_fix(tmp_path, workdir):
    """--rtdose_out notes.txt/out.dcm (or notes.txt/sub/) was a raw OS error from deep inside the export."""
    import subprocess
    import sys

    from flaxdose.inference.dicom_plans import resolve_rtdose_path

    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    for out in (notes / "out.dcm", notes / "sub" / "folder"):
        with pytest.raises(FlaxdoseError, match=f"{notes} is a file, not a folder.*give a .dcm file or a folder"):
            resolve_rtdose_path(out)
    assert resolve_rtdose_path(tmp_path / "new" / "x.dcm") == tmp_path / "new" / "x.dcm"  # folders made later
    result = subprocess.run([sys.executable, "-m", "flaxdose.predict", f"--workdir={workdir}", f"--dicom={tmp_path}",
                             f"--rtdose_out={notes / 'out.dcm'}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"flaxdose: error: --rtdose_out {notes / 'out.dcm'}: "
                                                             f"{notes} is a file")
    assert notes.read_text() == "keep me"


# ---------------------------------------------------------------- one bad case
@pytest.fixture(scope="module")
def trained(tiny_run):
    return tiny_run  # conftest's tiny run (2 steps on 16x16x8 phantoms), shared with tests/test_evaluate.py


def test_predict_leaves_out_a_case_without_ptv_and_exits_1(trained, with_a_case_without_ptv, tmp_path):
    workdir, _ = trained
    data, good = with_a_case_without_ptv
    out = tmp_path / "pred"
    done = run_cli("predict", f"--workdir={workdir}", f"--data={data}", f"--out={out}")
    assert done.returncode == 1, done.stderr[-2000:]
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert printed["predicted"] == len(good) and list(printed["failed"]) == ["no_ptv"]
    assert "no target voxels" in printed["failed"]["no_ptv"] and "no_ptv" in done.stderr  # logged too
    written = Dataset.open(out)
    assert written.split("test") == good and list(written.manifest["failed"]) == ["no_ptv"]
    assert sorted(p.stem for p in (out / "cases").iterdir()) == sorted(good)

    nothing = run_cli("predict", f"--workdir={workdir}", f"--data={data}", "--split=bad", f"--out={tmp_path / 'none'}")
    assert nothing.returncode == 2 and "flaxdose: error: no case of split 'bad'" in nothing.stderr
    assert "no target voxels" in nothing.stderr and not (tmp_path / "none").exists()
