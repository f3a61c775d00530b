"""Voxel spacing: a run stores the spacing it trained on and prediction refuses another (with the fixes:
--model_spacing_mm, synthetic --scale, import_dicom --model_shape); a checkpoint from before the spacing was
stored recovers it from its training data; qa --dicom reads on predict --dicom's grid and names the folder."""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import dicom_factory as F
import pytest

from flaxdose import config as config_lib
from flaxdose import inference, planqa
from flaxdose.data import Dataset
from flaxdose.errors import FlaxdoseError
from flaxdose.inference import predictor
from flaxdose.synthetic.phantom import phantom_case

PHANTOM_SPACING = [4.0, 4.0, 5.0]  # phantom_case's default voxel size (x, y, z) mm
PHANTOM = {"min": [4.0, 4.0, 5.0], "max": [4.0, 4.0, 5.0]}  # phantom_case's voxel size (x, y, z) mm


@pytest.fixture(scope="module")
def trained(tiny_run):
    """conftest's tiny run (2 steps on 16x16x8 phantoms of 4 x 4 x 5 mm) and its dataset."""
    workdir, data = tiny_run
    return workdir, Dataset.open(data)


def without_stored_spacing(workdir: Path, copy: Path, **data) -> Path:
    """A copy of `workdir` whose checkpoints' metadata lack the training spacing (as before flaxdose stored
    it), with `data` settings changed in its config.json."""
    shutil.copytree(workdir, copy)
    metas = list(copy.glob("*/*/meta/metadata"))
    assert metas
    for path in metas:
        meta = json.loads(path.read_text())
        del meta[inference.SPACING_KEY]
        path.write_text(json.dumps(meta))
    config = json.loads((copy / "config.json").read_text())
    config["data"].update(data)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


# ---------------------------------------------------------------- 1. the spacing range, stored and checked
def test_spacing_range_and_tolerance_by_hand():
    case = phantom_case(0, 0, shape=(8, 8, 4))
    one = inference.spacing_record([(4.0, 4.0, 3.0), (4.0, 4.0, 3.0)])
    assert one == {"min": [4.0, 4.0, 3.0], "max": [4.0, 4.0, 3.0]}
    inference.check_spacing(case.replace(spacing_mm=(4.19, 3.81, 3.14)), one)  # within 5 %: 3.8-4.2, 2.85-3.15
    inference.check_spacing(case.replace(spacing_mm=(9.0, 9.0, 9.0)), None)  # nothing stored: nothing to check
    for off in ((4.21, 4.0, 3.0), (4.0, 3.79, 3.0), (4.0, 4.0, 3.16)):
        with pytest.raises(FlaxdoseError, match=r"trained on 4x4x3 mm \(it accepts 3\.8-4\.2x3\.8-4\.2x2\.85-3\.15\)") as e:
            inference.check_spacing(case.replace(spacing_mm=off), one, "model 'm'")
        assert f"voxel spacing {'x'.join(f'{v:g}' for v in off)} mm" in str(e.value)
        assert "--model_spacing_mm 4,4,3" in str(e.value)
    # Spacings that vary (2 to 5 mm in x and y): widened by sqrt(5 / 2) = 1.5811 each way, then 5 %:
    # 2 / 1.5811 x 0.95 = 1.2017 to 5 x 1.5811 x 1.05 = 8.3010 mm; z (3 mm alone) stays 2.85-3.15.
    varied = inference.spacing_record([(2.0, 2.0, 3.0), (5.0, 5.0, 3.0)])
    inference.check_spacing(case.replace(spacing_mm=(8.29, 1.21, 3.14)), varied)
    for off in ((8.32, 4.0, 3.0), (4.0, 1.19, 3.0), (4.0, 4.0, 3.16)):
        with pytest.raises(FlaxdoseError, match=r"trained on 2-5x2-5x3 mm \(it accepts 1\.202-8\.301x1\.202-8\.301x2\.85-3\.15\)"):
            inference.check_spacing(case.replace(spacing_mm=off), varied)
    # OpenKBP's sample patients: pt_1-3 train (3.906-4.88 mm in x), pt_201 (5.422 mm, 11 % beyond) validates
    openkbp = inference.spacing_record([(3.906, 3.906, 2.5), (4.625, 4.625, 3.0), (4.88, 4.88, 2.5)])
    inference.check_spacing(case.replace(spacing_mm=(5.422, 5.422, 3.0)), openkbp)


def test_a_run_stores_its_spacing_and_prediction_refuses_another(trained):
    workdir, data = trained
    model = inference.Model.load(workdir)
    assert model.train_spacing_mm == {"min": PHANTOM_SPACING, "max": PHANTOM_SPACING}
    case = data.load(data.split("test")[0])
    model.predict([case.replace(spacing_mm=(4.1, 3.9, 5.2))])  # within 5 %
    with pytest.raises(FlaxdoseError, match=r"has voxel spacing 8x8x10 mm .* trained on 4x4x5 mm"):
        model.predict([case.replace(spacing_mm=(8.0, 8.0, 10.0))])
    # mid-training validation builds its model from the config: nothing stored, nothing refused
    assert inference.Model.from_config(config_lib.load_config_json(workdir / "config.json"),
                                       model.params).train_spacing_mm is None


# ---------------------------------------------------------------- 2. a checkpoint without the spacing
def test_a_model_from_before_the_spacing_was_stored_recovers_it_from_its_data(trained, monkeypatch, caplog):
    workdir, data = trained
    restore = predictor.restore_params
    monkeypatch.setattr(predictor, "restore_params", lambda *a, **k: (restore(*a, **k)[0], {"step": 2}))
    with caplog.at_level(logging.WARNING, logger="flaxdose"):
        model = inference.Model.load(workdir)
    assert model.train_spacing_mm == {"min": PHANTOM_SPACING, "max": PHANTOM_SPACING}
    assert "cannot be checked" not in caplog.text
    case = data.load(data.split("test")[0])
    with pytest.raises(FlaxdoseError, match=r"has voxel spacing 8x8x10 mm .* trained on 4x4x5 mm"):
        model.predict([case.replace(spacing_mm=(8.0, 8.0, 10.0))])


def test_a_checkpoint_without_its_spacing_still_refuses_off_spacing_cases(trained, tmp_path):
    workdir, data = trained
    copy = without_stored_spacing(workdir, tmp_path / "old")
    model = inference.Model.load(copy)
    assert model.train_spacing_mm == PHANTOM  # recovered from the training cases' headers
    case = data.load(data.split("test")[0])
    with pytest.raises(FlaxdoseError, match=r"has voxel spacing 8x8x10 mm .* trained on 4x4x5 mm"):
        model.predict([case.replace(spacing_mm=(8.0, 8.0, 10.0))])


def test_built_in_synthetic_data_gives_its_spacing_without_generating_it(trained, tmp_path):
    workdir, _ = trained
    copy = without_stored_spacing(workdir, tmp_path / "old", kind="synthetic", scale=0.5, n_train=3, n_test=1)
    before = sorted(p.name for p in (copy / "data").iterdir())
    # scale 0.5: 4 / 0.5 x 4 / 0.5 x 3 / 0.5 = 8 x 8 x 6 mm
    assert inference.Model.load(copy).train_spacing_mm == {"min": [8.0, 8.0, 6.0], "max": [8.0, 8.0, 6.0]}
    assert sorted(p.name for p in (copy / "data").iterdir()) == before


def test_unreadable_training_data_warns_with_the_consequence_and_fix(trained, tmp_path, caplog):
    workdir, data = trained
    copy = without_stored_spacing(workdir, tmp_path / "old", kind="folder", path=str(tmp_path / "gone"))
    with caplog.at_level(logging.WARNING, logger="flaxdose"):
        model = inference.Model.load(copy)
    assert model.train_spacing_mm is None
    assert "wrong in scale" in caplog.text and "retrain" in caplog.text and "training spacing" in caplog.text


# ---------------------------------------------------------------- 3. qa --dicom on predict --dicom's grid
def test_dicom_grid_by_hand():
    assert inference.dicom_grid([None]) == ((120, 120, 64), (4.0, 4.0, 3.0))
    assert inference.dicom_grid([{"min": [4.1, 4.0, 3.0], "max": [4.1, 4.0, 3.0]}]) == ((120, 120, 64), (4.0, 4.0, 3.0))
    # 480 x 480 x 192 mm kept: 480 / 8 = 60, 192 / 6 = 32
    assert inference.dicom_grid([{"min": [8, 8, 6], "max": [8, 8, 6]}]) == ((60, 60, 32), (8.0, 8.0, 6.0))
    # the phantoms: 480 / 4 = 120, 192 / 5 = 38.4 -> 38
    assert inference.dicom_grid([PHANTOM, None]) == ((120, 120, 38), (4.0, 4.0, 5.0))


def test_qa_dicom_reads_on_the_members_spacing_and_names_the_folder(trained, tmp_path):
    workdir, data = trained
    export = F.write_export(tmp_path / "patient")
    ensemble = planqa.Ensemble.load([workdir])
    plan = planqa.read_dicom_plan(export["folder"], ensemble)
    assert plan.spacing_mm == (4.0, 4.0, 5.0) and plan.shape == (120, 120, 38) and plan.dose is not None
    with pytest.raises(FlaxdoseError) as e:
        planqa.read_dicom_plan(export["folder"], ensemble, model_spacing_mm=(8, 8, 8))
    message = str(e.value)  # the flag given is the fault: its fix is leaving it out, not a re-import
    assert message.startswith(f"the DICOM export {export['folder']}: model_spacing_mm 8x8x8 mm does not fit")
    assert "trained on 4x4x5 mm" in message and "leave --model_spacing_mm out (the export is then read on 4x4x5 mm)" in message
    assert plan.case_id not in message and "import_dicom" not in message

    out = tmp_path / "qa"
    done = subprocess.run([sys.executable, "-m", "flaxdose.qa", f"--workdirs={workdir}", f"--calibration_data={data.root}",
                           "--calibration_split=test", f"--dicom={export['folder']}", f"--out={out}", "--batch_size=64"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, 3), done.stderr[-2000:]  # checked (flagged or not), not refused on spacing
    assert json.loads((out / "summary.json").read_text())["num_plans"] == 1


# ---------------------------------------------------------------- 4. the spacing error's fixes
def test_spacing_error_offers_the_synthetic_scale_and_the_dicom_shape():
    case = phantom_case(0, 0, shape=(8, 8, 4))
    coarse = {"min": [8.0, 8.0, 6.0], "max": [8.0, 8.0, 6.0]}
    synthetic = case.replace(style="internal_a", meta={"generator": "flaxdose.synthetic", "scale": 1.0},
                             spacing_mm=(4.0, 4.0, 3.0))
    with pytest.raises(FlaxdoseError) as e:
        inference.check_spacing(synthetic, coarse)
    # 4 / 8 = 3 / 6 = 0.5
    assert "python -m flaxdose.synth --style internal_a --n N --out DIR --scale 0.5" in str(e.value)
    assert "--config.data.scale=0.5" in str(e.value)
    fine = {"min": [2.0, 2.0, 1.5], "max": [2.0, 2.0, 1.5]}  # 4 / 2 = 3 / 1.5 = 2
    with pytest.raises(FlaxdoseError, match="--scale 2 "):
        inference.check_spacing(synthetic, fine)
    with pytest.raises(FlaxdoseError, match="no synthetic grid scale"):  # 4 / 5 != 3 / 3
        inference.check_spacing(synthetic, {"min": [5.0, 5.0, 3.0], "max": [5.0, 5.0, 3.0]})
    with pytest.raises(FlaxdoseError) as e:
        inference.check_spacing(case.replace(spacing_mm=(4.0, 4.0, 3.0)), coarse)
    assert "--grid model --model_spacing_mm 8,8,6 --model_shape 60,60,32" in str(e.value)  # 480/8, 192/6
