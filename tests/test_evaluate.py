"""Evaluation: per-case rows, the report folder (CSV, summary, figures), paired t-tests, bad input."""

import csv
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import run_cli

from flaxdose import evaluate, evaluation
from flaxdose.data import Dataset, write_dataset
from flaxdose.errors import FlaxdoseError
from flaxdose.run import Run
from flaxdose.synthetic.phantom import phantom_case

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tiny_run):
    """One tiny trained workdir (conftest's tiny_run); its checkpoints at steps 1 and 2 serve as two models."""
    return tiny_run


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_case_row_by_hand():
    ref = phantom_case(0, 0, shape=(16, 16, 8))
    same = evaluation.evaluate_case(ref, ref, "m")
    assert all(same[k] == 1.0 for k in evaluation.DICE_KEYS)
    assert all(same[k] == 0.0 for k in same if k.endswith("err_gy") or k.endswith("err_pct"))
    colder = evaluation.evaluate_case(ref.replace(dose=ref.dose * 0.9), ref, "m")
    # Every DVH metric scales with the dose: error = -0.1 x reference, % of the 70 Gy prescription.
    for key in ("PTV Dmean", "PTV D95", "Rectum D2"):
        expected = -0.1 * colder[f"{key} ref_gy"]
        assert colder[f"{key} err_gy"] == pytest.approx(expected, rel=1e-5)
        assert colder[f"{key} err_pct"] == pytest.approx(100 * expected / 70.0, rel=1e-5)
        assert colder[f"{key} abs_err_gy"] == pytest.approx(-expected, rel=1e-5)
    # The phantom PTV gets exactly 70 Gy: the reference's 100 % volume is the PTV, the
    # prediction's (max 63 Gy) is empty, so Dice = 0.
    assert colder["dice_100"] == 0.0 and colder["case_id"] == ref.case_id and colder["model"] == "m"


def test_predictions_on_another_grid_are_refused():
    ref = phantom_case(0, 0, shape=(16, 16, 8))
    other_shape = phantom_case(0, 0, shape=(16, 16, 10))
    with pytest.raises(FlaxdoseError, match="grid"):
        evaluation.evaluate_case(other_shape, ref, "m")
    with pytest.raises(FlaxdoseError, match="grid"):
        evaluation.evaluate_case(ref.replace(spacing_mm=(2.0, 2.0, 2.0)), ref, "m")
    with pytest.raises(FlaxdoseError, match="order"):
        evaluation.evaluate_predictions({"m": [phantom_case(0, 1, shape=(16, 16, 8))]}, [ref])
    with pytest.raises(FlaxdoseError, match="predictions for 1"):
        evaluation.evaluate_predictions({"m": []}, [ref])


class _Echo:
    """A predictor answering each case with its own reference dose."""

    def predict(self, cases, batch_size=1, progress=False):
        return list(cases)


def test_a_reference_dose_that_is_no_plan_is_not_scored(tmp_path):
    """An all-zero reference dose would enter the means as Dice 0 and +100 % errors."""
    ref = phantom_case(0, 0, shape=(16, 16, 8))
    with pytest.raises(FlaxdoseError, match="zero everywhere"):
        evaluation.evaluate_case(ref, ref.replace(dose=np.zeros_like(ref.dose)), "m")
    cases = [phantom_case(0, i, shape=(16, 16, 8)) for i in range(3)]
    cases[1] = cases[1].replace(dose=np.zeros_like(cases[1].dose))
    write_dataset(tmp_path / "d", cases, {"test": [c.case_id for c in cases]})
    data = Dataset.open(tmp_path / "d")
    ev = evaluation.evaluate_models({"m": _Echo()}, data, "test", keep_going=True)
    assert list(ev.failed) == [cases[1].case_id] and [r["case_id"] for r in ev.rows] == [cases[0].case_id, cases[2].case_id]
    assert all(r["dice_mean"] == 1.0 for r in ev.rows)  # a plan scored against itself


def test_summary_statistics_and_paired_ttest_by_hand():
    rows = [{"case_id": c, "model": m, "dice_mean": v}
            for m, values in (("a", (0.8, 0.9, 0.7)), ("b", (0.85, 0.97, 0.76))) for c, v in zip("xyz", values)]
    summary = evaluation.summarize(rows)
    assert summary["metrics"]["a"]["dice_mean"]["mean"] == pytest.approx(0.8)
    assert summary["metrics"]["a"]["dice_mean"]["sd"] == pytest.approx(0.1)  # sample SD (ddof=1)
    test = summary["paired_ttests"][0]
    # differences b - a = 0.05, 0.07, 0.06: mean 0.06, SD 0.01, t = 0.06 / (0.01 / sqrt 3) = 10.392, df 2
    assert test["models"] == ["a", "b"] and test["mean_difference"]["dice_mean"] == pytest.approx(0.06)
    assert test["p_values"]["dice_mean"] == pytest.approx(0.009133, abs=2e-5)


def test_evaluate_cli_function_writes_report(trained, tmp_path):
    model, data = trained
    out = tmp_path / "report"
    summary = evaluate.evaluate_workdirs([model], data, "test", out)
    rows = read_csv(out / "cases.csv")
    ids = Dataset.open(data).split("test")
    assert [r["case_id"] for r in rows] == ids and {r["model"] for r in rows} == {model.name}
    assert {"dice_10", "dice_100", "dice_mean", "PTV D98 err_pct", "Rectum D2 abs_err_gy"} <= set(rows[0])
    assert 0.0 <= float(rows[0]["dice_mean"]) <= 1.0
    saved = json.loads((out / "summary.json").read_text())
    assert saved["models"] == [model.name] and saved["paired_ttests"] == []
    assert saved["metrics"][model.name]["dice_mean"]["n"] == len(ids)
    assert summary["figures"][:2] == ["dice.png", "dvh_errors.png"] and summary["figures"][2].startswith("case_")
    for name in summary["figures"]:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    report = (out / "report.md").read_text()
    assert "| dice_mean |" in report
    # the report shows every figure in place, through links relative to report.md that resolve in the folder
    import re
    from urllib.parse import unquote

    shown = [unquote(link) for link in re.findall(r"!\[[^\]]+\]\(([^)]+)\)", report)]
    assert shown == summary["figures"] and all((out / name).is_file() for name in shown)
    with pytest.raises(FlaxdoseError, match="overwrite"):
        evaluate.evaluate_workdirs([model], data, "test", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no temporary folder left


def test_compare_gives_paired_p_values(trained, tmp_path):
    workdir, data = trained
    a, b = workdir / "checkpoints" / "1", workdir / "checkpoints" / "2"
    out = tmp_path / "compare"
    out.mkdir()
    (out / "precious.txt").write_text("hi")  # not an evaluation's: --overwrite refuses it, before any prediction
    with pytest.raises(FlaxdoseError, match="is not an earlier evaluation report .*precious.txt.* choose another --out"):
        evaluate.evaluate_workdirs([a, b], data, "test", out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    (out / "precious.txt").unlink()
    for name in ("summary.json", "report.md", "old.png"):  # an earlier evaluation: replaced with --overwrite
        (out / name).write_text("old")
    summary = evaluate.evaluate_workdirs([a, b], data, "test", out, names=["source", "target"], overwrite=True,
                                         example_case=Dataset.open(data).split("test")[0])
    test = summary["paired_ttests"][0]
    assert test["models"] == ["source", "target"] and test["num_pairs"] == 2
    p = test["p_values"]["dice_mean"]
    assert p is not None and 0.0 <= p <= 1.0
    assert "PTV D95 err_gy" in test["p_values"]
    assert not (out / "old.png").exists() and "p (target vs source)" in (out / "report.md").read_text()
    assert {r["model"] for r in read_csv(out / "cases.csv")} == {"source", "target"}


def test_empty_split_is_an_error(tmp_path):
    case = phantom_case(0, 0, shape=(16, 16, 8))
    data = write_dataset(tmp_path / "d", [case], {"train": [case.case_id], "test": []})
    with pytest.raises(FlaxdoseError, match="empty"):
        evaluation.load_references(data, "test")
    with pytest.raises(FlaxdoseError, match="empty"):  # before any model is loaded
        evaluate.evaluate_workdirs([tmp_path / "no_model"], data.root, "test", tmp_path / "out")
    result = subprocess.run(
        [sys.executable, "-m", "flaxdose.evaluate", f"--workdir={tmp_path / 'no_model'}", f"--data={data.root}",
         "--split=test", f"--out={tmp_path / 'out'}"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.startswith("flaxdose: error: split 'test'")
    assert not (tmp_path / "out").exists()


def test_the_papers_statistics_by_hand():
    """Per-level means, their range over the levels ("mean DSC 0.81-0.94"), and one p column per model."""
    levels = [f"dice_{p}" for p in range(10, 101, 10)]
    rows = []
    for model, shift in (("source", 0.0), ("target", 0.05), ("oracle", 0.1)):
        for case, offset in (("x", 0.0), ("y", 0.02), ("z", 0.01)):
            dice = {k: 0.5 + 0.04 * i + shift + offset * (1 + (model == "target")) for i, k in enumerate(levels)}
            rows.append({"case_id": case, "model": model, **dice, "dice_mean": float(np.mean(list(dice.values())))})
    summary = evaluation.summarize(rows)
    means = evaluation.level_means(summary, "target")
    assert list(means) == list(range(10, 101, 10))
    assert means[10] == pytest.approx(0.5 + 0.05 + 2 * 0.01) and means[100] == pytest.approx(0.86 + 0.05 + 0.02)
    assert evaluation.level_range(summary, "oracle") == (pytest.approx(0.61), pytest.approx(0.97))
    assert evaluation.dice_mean(summary, "source") == pytest.approx(0.68 + 0.01)
    assert evaluation.ttest(summary, "source", "oracle")["mean_difference"]["dice_50"] == pytest.approx(0.1)
    with pytest.raises(FlaxdoseError, match="against its first model"):
        evaluation.ttest(summary, "target", "oracle")
    table = evaluation.markdown_table(summary)
    assert "| metric | source | target | oracle | p (target vs source) | p (oracle vs source) |" in table


def test_run_dataset_defaults_to_the_data_the_run_trained_on(trained, tmp_path):
    workdir, data = trained
    assert Run.open(workdir).dataset_path().resolve() == data.resolve()
    assert Run.open(workdir / "checkpoints" / "1").dataset_path().resolve() == data.resolve()
    config = json.loads((workdir / "config.json").read_text())
    config["data"].update(kind="folder", path=str(tmp_path / "gone"))
    moved = tmp_path / "run"
    moved.mkdir()
    (moved / "config.json").write_text(json.dumps(config))
    (moved / "checkpoints").symlink_to(workdir / "checkpoints")
    with pytest.raises(FlaxdoseError, match="gone; pass --data"):
        Run.open(moved).dataset_path()
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, "-m", "flaxdose.evaluate", f"--workdir={workdir}", f"--out={out}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert str(data.resolve()) in json.loads((out / "summary.json").read_text())["note"]


def damaged_copy(trained, tmp_path, folder="best"):
    """A copy of the trained workdir and its newest step folder under `folder` (best/ or checkpoints/)."""
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(trained[0], workdir, ignore=shutil.ignore_patterns("data"))
    step_dir = max((p for p in (workdir / folder).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    return workdir, step_dir


def test_a_damaged_checkpoint_is_one_error_naming_its_step_folder_and_the_fix(trained, tmp_path):
    """A truncated array file (a half-copied checkpoint) is one FlaxdoseError naming the step folder and what
    deleting it falls back to; after that deletion the model loads from the fallback. A step folder missing its
    parameter metadata says so (it was reported as "a different model")."""
    import shutil

    from flaxdose.inference.predictor import Model

    workdir, step_dir = damaged_copy(trained, tmp_path)
    biggest = max((p for p in (step_dir / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    latest = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    with pytest.raises(FlaxdoseError) as error:
        Model.load(workdir)
    message = str(error.value)
    assert f"checkpoint {step_dir} is damaged" in message and f"rm -r {step_dir}" in message
    assert f"fall back to the latest training checkpoint (checkpoints/{latest})" in message
    shutil.rmtree(step_dir)  # the fix the message gives
    assert Model.load(workdir).params is not None

    latest_dir = workdir / "checkpoints" / str(latest)
    (latest_dir / "params" / "_METADATA").unlink()
    with pytest.raises(FlaxdoseError, match=r"missing file params/_METADATA") as error:
        Model.load(workdir, "latest")
    assert "different model" not in str(error.value)
    assert f"previous checkpoint (step {latest - 1}; rerunning training resumes from it)" in str(error.value)


@pytest.mark.parametrize("what", ["manifest", "array"])
def test_evaluate_stops_once_on_a_damaged_checkpoint(trained, tmp_path, what):
    """The command line: one `flaxdose: error:` line, exit 2, and nothing else: no traceback of orbax's abandoned
    reads ("Event loop is closed", one per array in flight; "Exception ignored in" a read coroutine)."""
    workdir, step_dir = damaged_copy(trained, tmp_path)
    if what == "manifest":
        (step_dir / "params" / "manifest.ocdbt").write_bytes(b"not an ocdbt manifest")
        detail = f"unreadable file {step_dir / 'params' / 'manifest.ocdbt'}"
    else:  # the array data, cut short as by an interrupted copy
        data = max((p for p in (step_dir / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        data.write_bytes(data.read_bytes()[:100])
        detail = "truncated data of parameter "
    result = subprocess.run([sys.executable, "-m", "flaxdose.evaluate", f"--workdir={workdir}",
                             f"--data={trained[1]}", f"--out={tmp_path / 'report'}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"flaxdose: error: checkpoint {step_dir} is damaged ({detail}"), lines
    assert lines[0].endswith(f"); delete that step folder (rm -r {step_dir}) to fall back to the latest training "
                             "checkpoint (checkpoints/2), or copy it again whole if it came from elsewhere")
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("damage, detail", [
    (lambda step: __import__("shutil").rmtree(step / "params"), "missing folder params"),
    (lambda step: __import__("shutil").rmtree(step / "meta"), "missing folder meta"),
    (lambda step: (step / "meta" / "metadata").write_text('{"step": 2, "val_lo'),
     "unreadable file meta/metadata: not valid JSON, cut short or overwritten"),
], ids=["no_params", "no_meta", "cut_json"])
def test_what_a_damaged_step_folder_lacks_is_named(trained, tmp_path, damage, detail):
    """Never passed over for an older checkpoint unseen (a best/ step without params fell back to checkpoints/)."""
    from flaxdose.inference.predictor import Model

    workdir, step_dir = damaged_copy(trained, tmp_path)
    damage(step_dir)
    with pytest.raises(FlaxdoseError, match=f"checkpoint {step_dir} is damaged \\({detail}\\); delete that step"):
        Model.load(workdir)


def test_a_flipped_byte_in_the_weights_is_refused_never_predicted_with(trained, tmp_path):
    """A single changed byte anywhere in the stored weights (bit rot, a bad copy): every load either refuses
    the checkpoint as damaged or returns exactly the weights that were saved, never other values silently
    (orbax checks no content; the meta's params_sha256 does). The intact load is the reference."""
    import shutil

    from flaxdose.checkpoint import restore_params

    reference, _ = restore_params(trained[0])
    workdir, step_dir = damaged_copy(trained, tmp_path)
    data = max((p for p in (step_dir / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    original = data.read_bytes()
    refused = 0
    for offset in np.linspace(0, len(original) - 1, 9).astype(int):
        flipped = bytearray(original)
        flipped[offset] ^= 0x08
        data.write_bytes(bytes(flipped))
        try:
            params, _ = restore_params(workdir)
        except FlaxdoseError as error:
            assert f"checkpoint {step_dir} is damaged" in str(error)
            refused += 1
            continue
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
            np.testing.assert_array_equal(a, b)
    data.write_bytes(original)
    assert refused >= 5  # most bytes of the file are weights; the rest (headers, padding) may go unread
    shutil.rmtree(workdir)


def test_an_unfinished_run_is_named_and_a_model_predicting_nan_is_blamed_not_the_case(trained, tmp_path, caplog):
    """A new-user pass: a run stopped at step 250 of 1000 predicted without a word, and weights giving NaN
    were reported as "case ...: dose holds NaN or infinite values; fix or drop this case"."""
    import logging
    import shutil

    from flaxdose.inference.predictor import Model

    case = phantom_case(7, 0, shape=(16, 16, 8))
    with caplog.at_level(logging.WARNING):
        model = Model.load(trained[0])  # finished: its 2 planned steps ran
    assert "unfinished" not in caplog.text
    workdir = tmp_path / "run"
    shutil.copytree(trained[0], workdir, ignore=shutil.ignore_patterns("data"))
    config = json.loads((workdir / "config.json").read_text())
    config["train"]["steps"] = 5  # as if stopped at step 2 of 5
    (workdir / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING):
        Model.load(workdir)
    assert "training stopped at step 2 of 5 (an unfinished run)" in caplog.text

    broken = Model(model.spec, jax.tree.map(lambda p: np.full_like(p, np.nan), model.params), model.structures,
                   inputs=model.inputs, window=model.window)
    with pytest.raises(FlaxdoseError, match="predicted NaN or infinite dose for case .*its weights are broken"):
        broken.predict([case])


def test_a_missing_case_file_is_listed_and_the_others_are_scored(trained, tmp_path):
    """A new-user pass: evaluate stopped at the first missing case file (exit 2, no report) where predict lists it
    and goes on; now it is one failed case beside the scored ones."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(trained[1], data)
    ids = Dataset.open(data).split("test")
    (data / f"{ids[0]}.npz").unlink() if (data / f"{ids[0]}.npz").exists() else next(data.rglob(f"{ids[0]}*")).unlink()
    summary = evaluate.evaluate_workdirs([trained[0]], data, "test", tmp_path / "report")
    assert list(summary["failed_cases"]) == [ids[0]] and "does not exist" in summary["failed_cases"][ids[0]]
    assert summary["num_cases"] == {trained[0].name: len(ids) - 1}


# ---------------------------------------------------------------- one bad case, empty structures
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
