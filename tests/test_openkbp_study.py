"""The whole OpenKBP path on the four sample patients: convert, downsample, reference, train, score, report."""

import csv
import json
import subprocess
import sys

import pytest
from flaxdose.launch import openkbp_study
from test_openkbp import SAMPLE, needs_sample

from flaxdose.openkbp import read_sparse_csv


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
