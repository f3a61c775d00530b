"""The whole OpenKBP path on the four sample patients: convert, downsample, reference, train, score, report; the
tuning study on train-pats alone, the CT study on the patients with a CT, the comparison table."""

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from flaxdose.launch import openkbp_study
from flaxdose.launch.paper_study import Stages
from test_openkbp import SAMPLE, needs_sample

from flaxdose.data.case import Dataset
from flaxdose.errors import FlaxdoseError
from flaxdose.evaluation.openkbp import subset_scores
from flaxdose.openkbp import convert_openkbp, read_sparse_csv


@needs_sample
def test_smoke_study_runs_end_to_end_and_resumes(tmp_path, capsys):
    report = openkbp_study.run_study("smoke", SAMPLE, tmp_path / "study", tmp_path / "results")
    text = report.read_text()
    assert report.name == "openkbp_smoke.md"
    for row in ("| flaxdose network", "| distance-to-target model", "| reference dose sent through the 32^3 grid",
                "| best challenge entry (published) | 2.43 | 1.48 |", "Wall time", "Load average"):
        assert row in text
    eval_dir = tmp_path / "study" / "eval"
    summary = json.loads((eval_dir / "summary.json").read_text())
    assert summary["models"] == ["network", "distance-to-target"] and summary["downsample"] == 4
    for model in ("network", "distance-to-target"):
        scores = summary["scores"][model]
        assert scores["num_cases"] == 1 and scores["dose_score"] > 0 and scores["dvh_score"] > 0
        idx, values = read_sparse_csv(eval_dir / "submission" / model / "pt_201.csv")
        assert idx.size > 10_000 and (values > 0).all()
    with open(eval_dir / "patients.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["case_id"]) for r in rows] == [("network", "pt_201"), ("distance-to-target", "pt_201")]
    assert float(rows[1]["dose_score"]) == pytest.approx(summary["scores"]["distance-to-target"]["dose_score"])
    assert sorted(p.name for p in (tmp_path / "results" / "openkbp_smoke").iterdir()) == ["dvh_errors.png"]  # no patient figure leaves the run
    stages = json.loads((tmp_path / "study" / "stages.json").read_text())
    assert list(stages) == ["convert validation-pats", "convert at 32^3", "distance-to-target", "train", "anneal", "evaluate", "grid floor"]
    capsys.readouterr()
    openkbp_study.run_study("smoke", SAMPLE, tmp_path / "study", tmp_path / "results")
    assert capsys.readouterr().out.count("done earlier, skipped") == len(stages)
    # the evaluate face scores the same way
    out = tmp_path / "cli-eval"
    cmd = [sys.executable, "-m", "flaxdose.evaluate", "--openkbp", "--workdir", str(tmp_path / "study" / "model_annealed"),
           "--data", str(tmp_path / "study" / "data" / "openkbp"), "--split", "val", "--out", str(out),
           "--baseline", str(tmp_path / "study" / "distance_to_target.json"), "--mirror"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["scores"] == summary["scores"]
    assert (out / "submission" / "network" / "pt_201.csv").is_file()
    small = subprocess.run([*cmd[:7], str(tmp_path / "study" / "data" / "openkbp_4x"), *cmd[8:], "--overwrite"],
                           capture_output=True, text=True, timeout=300)
    assert small.returncode == 2 and "is downsampled" in small.stderr


def _tuning_source(root):
    """A provided-data folder whose train-pats holds five patients (pt_4: pt_201's plan under another name; pt_5:
    pt_1's without its CT) and whose validation-pats is broken: a study that read it would fail."""
    train = root / "provided-data" / "train-pats"
    train.mkdir(parents=True)
    for name in ("pt_1", "pt_2", "pt_3"):
        (train / name).symlink_to(SAMPLE / "train-pats" / name)
    (train / "pt_4").symlink_to(SAMPLE / "validation-pats" / "pt_201")
    (train / "pt_5").mkdir()
    for f in (SAMPLE / "train-pats" / "pt_1").iterdir():
        if f.name != "ct.csv":
            (train / "pt_5" / f.name).symlink_to(f)
    broken = root / "provided-data" / "validation-pats" / "pt_201"
    broken.mkdir(parents=True)
    (broken / "dose.csv").write_text("not a dose\n")
    return root / "provided-data"


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@needs_sample
def test_tune_study_scores_held_out_train_pats_and_never_reads_validation_pats(tmp_path):
    src, workdir = _tuning_source(tmp_path), tmp_path / "tune"
    report = openkbp_study.run_study("smoke", src, workdir, tmp_path / "results", tune_val=2)
    assert report.name == "openkbp_smoke_tune.md" and not (tmp_path / "results" / "openkbp_smoke.md").exists()
    text = report.read_text()
    assert text.startswith("# OpenKBP, scale `smoke`: tuning split of train-pats (2 held out)")
    assert "validation-pats" not in text and "pt_201" not in text and "--tune --tune_val 2" in text
    # the fixed shuffle holds out pt_3 and pt_5; validation-pats was never converted
    full, coarse = Dataset.open(workdir / "data" / "openkbp"), Dataset.open(workdir / "data" / "openkbp_4x")
    assert full.splits == {"val": ["pt_3", "pt_5"]}
    assert coarse.splits == {"train": ["pt_1", "pt_2", "pt_4"], "val": ["pt_3", "pt_5"]}
    assert json.loads((workdir / "study.json").read_text()) == {"scale": "smoke", "seed": 0, "tune": True, "tune_val": 2}
    assert list(json.loads((workdir / "stages.json").read_text()))[:2] == ["convert held-out train-pats",
                                                                           "convert train-pats at 32^3"]
    eval_dir = workdir / "eval"
    assert {r["case_id"] for r in _rows(eval_dir / "patients.csv")} == {"pt_3", "pt_5"}
    # every patient: the numbers of summary.json; pt_3 alone has a CT: the second table, by hand from the CSV rows
    summary = json.loads((eval_dir / "summary.json").read_text())["scores"]
    for model, s in subset_scores(eval_dir).items():
        assert (s["dose_score"], s["dvh_score"]) == pytest.approx((summary[model]["dose_score"], summary[model]["dvh_score"]))
    assert "### Patients with a CT (n = 1 of 2)" in text
    ct_part = text.split("### Patients with a CT", 1)[1].split("## Per metric")[0]
    for model, label in (("network", "flaxdose network"), ("distance-to-target", "distance-to-target model")):
        dose = next(float(r["dose_score"]) for r in _rows(eval_dir / "patients.csv")
                    if (r["model"], r["case_id"]) == (model, "pt_3"))
        dvh = np.mean([abs(float(r["error_gy"])) for r in _rows(eval_dir / "dvh_metrics.csv")
                       if (r["model"], r["case_id"]) == (model, "pt_3")])
        row = next(line for line in ct_part.splitlines() if line.startswith(f"| {label}"))
        assert f"| {dose:.2f} | {dvh:.2f} | held-out train-pats (tuning split) with a CT, 1 patient |" in row
    assert "| reference dose sent through the 32^3 grid and back |" in ct_part
    # a workdir of one mode is refused to the other (and to another held-out count), before anything runs
    for tune_val in (None, 1):
        with pytest.raises(FlaxdoseError, match="holds another openkbp_study"):
            openkbp_study.run_study("smoke", SAMPLE if tune_val is None else src, workdir, tmp_path / "results",
                                    tune_val=tune_val)
    # the comparison table, here of one study: all scored patients and those with a CT, the targets' errors
    out = tmp_path / "compare.md"
    cmd = [sys.executable, "-m", "flaxdose.launch.openkbp_study", "--compare", str(workdir), "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    table = out.read_text()
    net, dist = summary["network"], summary["distance-to-target"]
    assert (f"| `tune` | smoke | 0 | train-pats split (2 held out) | masks only | all: 2 | {net['dose_score']:.2f} | "
            f"{net['dvh_score']:.2f} | {dist['dose_score']:.2f} | {dist['dvh_score']:.2f} |") in table
    assert "| masks only | with a CT: 1 |" in table and "over the scored patients with a CT" in table
    ptv70_d99 = [float(r["error_gy"]) for r in _rows(eval_dir / "dvh_metrics.csv")
                 if (r["model"], r["roi"], r["metric"]) == ("network", "PTV70", "D_99")]
    assert f"| PTV70 D_99 | {np.mean(ptv70_d99):+.2f} ({np.mean(np.abs(ptv70_d99)):.2f}) |" in table
    assert sum(line.startswith(("| PTV56 D_", "| PTV63 D_", "| PTV70 D_")) for line in table.splitlines()) == 2 * 9
    with pytest.raises(FlaxdoseError, match="no finished OpenKBP study"):
        openkbp_study.compare_studies([workdir, tmp_path], out)
    with pytest.raises(FlaxdoseError, match="does not exist"):
        openkbp_study.compare_studies([workdir, tmp_path / "typo"], out)
    with pytest.raises(FlaxdoseError, match="same study twice"):
        openkbp_study.compare_studies([workdir, workdir], out)
    other = tmp_path / "other_split"  # a study that scored another split is not compared with this one
    shutil.copytree(workdir, other)
    (other / "study.json").write_text(json.dumps({"scale": "smoke", "seed": 0, "tune": True, "tune_val": 1}))
    with pytest.raises(FlaxdoseError, match="scored different patients"):
        openkbp_study.compare_studies([workdir, other], out)


@needs_sample
def test_a_refused_study_does_not_lock_its_workdir(tmp_path):
    """Settings refused before any stage finished (too many held out) leave a workdir the corrected run takes."""
    src, workdir = _tuning_source(tmp_path), tmp_path / "w"
    with pytest.raises(FlaxdoseError, match="--tune_val 9 cannot hold out"):
        openkbp_study.run_study("smoke", src, workdir, tmp_path / "results", tune_val=9)
    assert json.loads((workdir / "study.json").read_text())["tune_val"] == 9
    Stages(workdir, "openkbp_study", study={"scale": "smoke", "seed": 0, "tune": True, "tune_val": 2})  # no refusal
    assert json.loads((workdir / "study.json").read_text())["tune_val"] == 2


@needs_sample
def test_ct_study_trains_and_scores_only_the_patients_with_a_ct(tmp_path):
    src, workdir = _tuning_source(tmp_path), tmp_path / "ct"
    report = openkbp_study.run_study("smoke_ct", src, workdir, tmp_path / "results", tune_val=2)
    assert report.name == "openkbp_smoke_ct_tune.md"
    text = report.read_text()
    assert "masks + CT)" in text and "Patients with a CT" not in text  # every scored patient has one
    for data in ("openkbp", "openkbp_4x"):  # pt_5 has no CT: left out of the splits, and recorded
        manifest = Dataset.open(workdir / "data" / data).manifest
        assert manifest["splits"]["val"] == ["pt_3"] and manifest["ct_subset"]["left_out"]["val"] == ["pt_5"]
    assert Dataset.open(workdir / "data" / "openkbp_4x").split("train") == ["pt_1", "pt_2", "pt_4"]
    assert {r["case_id"] for r in _rows(workdir / "eval" / "patients.csv")} == {"pt_3"}
    assert json.loads((workdir / "model" / "config.json").read_text())["model"]["in_channels"] == 11  # masks + CT
    table = openkbp_study.compare_studies([workdir], tmp_path / "compare.md").read_text()
    assert "| masks + CT | all: 1 |" in table and "| masks + CT | with a CT: 1 |" in table
    assert "over the scored patients with a CT" not in table  # no study scored a patient without one


def test_tune_split_is_fixed_and_refuses_what_cannot_be_held_out(tmp_path):
    patients = [f"pt_{i}" for i in range(1, 197)]
    split = openkbp_study.tune_split(patients, 36)
    assert split == openkbp_study.tune_split(patients, 36) and len(split["val"]) == 36 and len(split["train"]) == 160
    assert sorted(split["train"] + split["val"], key=patients.index) == patients
    assert split["val"] == sorted(split["val"], key=patients.index)  # kept in the challenge's order
    for bad in (0, 196):
        with pytest.raises(FlaxdoseError, match=f"--tune_val {bad} cannot hold out"):
            openkbp_study.tune_split(patients, bad)
    with pytest.raises(FlaxdoseError, match="has no train-pats folder"):
        openkbp_study.study_splits(tmp_path, tune_val=2)


@needs_sample
def test_conversion_of_named_patients_refuses_one_it_does_not_hold(tmp_path):
    with pytest.raises(FlaxdoseError, match=r"patients \['pt_9'\] are not under"):
        convert_openkbp(SAMPLE, tmp_path / "out", splits={"train": ["pt_1", "pt_9"]})
    with pytest.raises(FlaxdoseError, match="name a patient twice"):
        convert_openkbp(SAMPLE, tmp_path / "out", splits={"train": ["pt_1"], "val": ["pt_1"]})
    assert not (tmp_path / "out").exists()
