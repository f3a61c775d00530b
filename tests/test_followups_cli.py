"""Follow-ups of a new-user pass: the training spacing is kept and checked, one bad case no longer
stops predict/evaluate (exit 1, listed), empty structures are noted, -h is --help, missing flags are
named, and a short run's warmup and decay shrink with it."""

import json
import logging
import subprocess
import sys

import pytest

from flaxdose import config as config_lib
from flaxdose import evaluate, evaluation, inference
from flaxdose.data import Dataset, write_dataset
from flaxdose.errors import FlaxdoseError
from flaxdose.inference import predictor
from flaxdose.synthetic.phantom import phantom_case
from flaxdose.training import optim, trainer

PHANTOM_SPACING = [4.0, 4.0, 5.0]  # phantom_case's default voxel size (x, y, z) mm


def run_cli(module, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", f"flaxdose.{module}", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step run on 16x16x8 phantoms (quick's target-distance input) and its dataset."""
    from conftest import tiny_config

    workdir = tmp_path_factory.mktemp("run")
    trainer.train_and_evaluate(tiny_config(**{"train.steps": 2, "train.checkpoint_every": 2, "train.eval_every": 2}),
                               workdir)
    return workdir, Dataset.open(next((workdir / "data").iterdir()))


@pytest.fixture(scope="module")
def with_a_case_without_ptv(trained, tmp_path_factory):
    """The run's test cases plus one whose PTV is not contoured (split "test"), and that case alone ("bad")."""
    _, data = trained
    good = [data.load(i) for i in data.split("test")]
    masks = good[0].masks.copy()
    masks[good[0].structures.index("PTV")] = False
    bad = good[0].replace(case_id="no_ptv", masks=masks)
    root = tmp_path_factory.mktemp("data") / "mixed"
    write_dataset(root, [*good, bad], {"test": [c.case_id for c in good] + ["no_ptv"], "bad": ["no_ptv"]})
    return root, [c.case_id for c in good]


# ---------------------------------------------------------------- 1. voxel spacing
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


# ---------------------------------------------------------------- 2. one bad case
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


def test_evaluate_scores_the_other_cases_and_lists_the_failed_one(trained, with_a_case_without_ptv, tmp_path):
    workdir, _ = trained
    data, good = with_a_case_without_ptv
    summary = evaluate.evaluate_workdirs([workdir], data, "test", tmp_path / "report")
    assert list(summary["failed_cases"]) == ["no_ptv"] and summary["num_cases"] == {workdir.name: len(good)}
    saved = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert list(saved["failed_cases"]) == ["no_ptv"]
    assert "case no_ptv not evaluated: " in (tmp_path / "report" / "report.md").read_text()
    with pytest.raises(FlaxdoseError, match="no case of split 'bad'.*no target voxels"):
        evaluate.evaluate_workdirs([workdir], data, "bad", tmp_path / "none")
    assert not (tmp_path / "none").exists()

    done = run_cli("evaluate", f"--workdir={workdir}", f"--data={data}", f"--out={tmp_path / 'cli'}")
    assert done.returncode == 1, done.stderr[-2000:]
    assert list(json.loads(done.stdout.strip().splitlines()[-1])["failed"]) == ["no_ptv"]


# ---------------------------------------------------------------- 3. empty structures
def test_empty_oar_is_counted_and_noted(tmp_path):
    cases = [phantom_case(0, i, shape=(16, 16, 8)) for i in range(5)]
    rectum = cases[0].structures.index("Rectum")
    for i in (1, 3):  # Rectum empty in 2 of 5 cases
        masks = cases[i].masks.copy()
        masks[rectum] = False
        cases[i] = cases[i].replace(masks=masks)
    predicted = [c.replace(dose=c.dose * 0.95) for c in cases]
    rows = evaluation.evaluate_predictions({"m": predicted}, cases)
    summary = evaluation.write_report(rows, tmp_path / "r", cases, {"m": predicted})
    assert summary["empty_structures"] == {"Rectum": {"empty": 2, "cases": 5}}
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["empty_structures"] == summary["empty_structures"]
    assert summary["metrics"]["m"]["Rectum Dmean err_pct"]["n"] == 3
    assert "- Rectum: empty in 2 of 5 cases; its DVH metrics average the other 3." in (tmp_path / "r" / "report.md").read_text()


# ---------------------------------------------------------------- 4. -h is --help
COMMANDS = ("train", "predict", "evaluate", "qa", "import_dicom", "assess_style", "convert_openkbp", "synth")


@pytest.mark.parametrize("command", COMMANDS)
def test_short_h_is_help(command):
    short, long = run_cli(command, "-h", timeout=120), run_cli(command, "--help", timeout=120)
    assert short.returncode == long.returncode == 0, short.stderr[-1000:]
    assert short.stdout == long.stdout and f"flaxdose.{command}" in short.stdout and "--" in short.stdout


def test_help_alias_leaves_values_after_the_separator():
    from flaxdose.cli import help_alias

    assert help_alias(["prog", "-h", "--out=x", "--", "-h"]) == ["prog", "--help", "--out=x", "--", "-h"]


# ---------------------------------------------------------------- 5. missing flags are named
@pytest.mark.parametrize("command, args, missing", [
    ("assess_style", ["--workdirs=w", "--data=d"], "missing --own_data (held-out plans of the model's own style), "
                                                   "--out (the report folder)"),
    ("convert_openkbp", ["some_src"], "missing --out (the dataset folder to write)"),
])
def test_missing_required_flags_are_named(command, args, missing, tmp_path):
    done = run_cli(command, *args, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith(f"flaxdose: error: {missing}; usage: python -m flaxdose.{command}")


# ---------------------------------------------------------------- 6. a short run's schedule
def test_warmup_and_decay_scale_down_with_a_short_run_by_hand(caplog):
    # 20 steps, warmup 20 + decay 125 = 145: x 20/145 -> 2.76 and 17.24, rounded down: 2 and 17
    assert optim.scaled_warmup_decay(20, 125, 20) == (2, 17)
    assert optim.scaled_warmup_decay(1, 1000, 20) == (1, 19)  # 0.02 -> kept at 1; 19.98 -> 19
    assert optim.scaled_warmup_decay(20, 125, 1) == (0, 1)  # one step: no room for a warmup
    assert optim.scaled_warmup_decay(20, 125, 500) == (20, 125)  # fits: unchanged
    config = config_lib.load_config("quick", {"train.steps": 20, "train.warmup_steps": 40, "train.decay_steps": 250})
    with caplog.at_level(logging.WARNING, logger="flaxdose"):
        fitted = optim.fit_schedule(config)
    assert (fitted.train.warmup_steps, fitted.train.decay_steps) == (2, 17)
    # warmup 40 >= 20 steps: both scaled by 20 / (40 + 250): 2.76 and 17.24, rounded down: 2 and 17
    assert (config.train.warmup_steps, config.train.decay_steps) == (40, 250)  # the caller's config is untouched
    assert "warmup 2 and decay 17 steps (both scaled down" in caplog.text
    import jax

    from flaxdose.model import UNetSpec

    spec, devices = UNetSpec.from_config(config.model), jax.local_devices()[:1]
    with pytest.raises(FlaxdoseError, match="warmup_steps=40 must be"):
        trainer.check_setup(config, spec, devices)  # what train_and_evaluate checked before fitting
    trainer.check_setup(fitted, spec, devices)  # valid now
    unchanged = config_lib.load_config("quick")  # its own warmup and decay fit its steps
    assert optim.fit_schedule(unchanged) is unchanged


@pytest.mark.parametrize("command", ["predict", "evaluate", "qa"])
def test_a_batch_size_below_1_is_a_one_line_flag_error(command, tmp_path):
    result = run_cli(command, "--batch_size=0", f"--out={tmp_path / 'o'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--batch_size=0" in result.stderr and "positive" in result.stderr


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
