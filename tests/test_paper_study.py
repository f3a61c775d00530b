"""The whole study at the `smoke` scale: data, source model, four transfers and the control,
evaluation with the oracle, the report with the paper's statistics."""

import json

import pytest
from flaxdose.launch import paper_study

from flaxdose.data.case import Dataset
from flaxdose.errors import FlaxdoseError


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A smoke study run as two commands (--until source, then the rest): (workdir, results, report)."""
    root = tmp_path_factory.mktemp("study")
    assert paper_study.run_study("smoke", root / "study", root / "results", until="source") is None
    first = set(json.loads((root / "study" / "stages.json").read_text()))
    report = paper_study.run_study("smoke", root / "study", root / "results")
    return root / "study", root / "results", report, first


def test_smoke_study_runs_end_to_end_and_resumes(study, capsys):
    workdir, results, report, first = study
    assert first == {"data", "source"}
    text = report.read_text()
    for style in ("source", "internal_a", "internal_b", "internal_c", "external"):
        assert f"| {style} |" in text
        assert (workdir / "eval" / style / "summary.json").is_file()
    for heading in ("## Transfer gains against the control", "## Checks (issue 12)", "Wall time", "load average"):
        assert heading in text
    assert list((results / "paper_study_smoke").glob("external_dice.png"))
    source = json.loads((workdir / "eval" / "source" / "summary.json").read_text())
    assert source["models"] == [paper_study.SOURCE_MODEL, paper_study.CONTROL_MODEL]
    external = json.loads((workdir / "eval" / "external" / "summary.json").read_text())
    assert external["models"] == [paper_study.SOURCE_MODEL, paper_study.TARGET_MODEL, paper_study.ORACLE_MODEL]
    assert len(external["paired_ttests"]) == 2 and "PTV D2 err_pct" in external["paired_ttests"][0]["p_values"]
    stages = json.loads((workdir / "stages.json").read_text())
    assert set(stages) >= {"data", "source", "external", "control", "evaluate external"}
    capsys.readouterr()
    paper_study.run_study("smoke", workdir, results)
    assert capsys.readouterr().out.count("done earlier, skipped") == len(stages)
    with pytest.raises(FlaxdoseError, match="not a stage"):
        paper_study.run_study("smoke", workdir, results, until="sauce")
    with pytest.raises(FlaxdoseError, match="not a stage"):  # a typo leaves no new folder behind
        paper_study.run_study("smoke", workdir.parent / "typo", results, until="sauce")
    assert not (workdir.parent / "typo").exists()


def test_oracle_is_the_same_patients_source_plan(study):
    """The oracle answers a target case with the source-style plan of the same anatomy, under the target's id."""
    workdir = study[0]
    oracle = paper_study.SourcePlans(Dataset.open(workdir / "data" / paper_study.ORACLE))
    external = Dataset.open(workdir / "data" / "external")
    cases = [external.load(i) for i in external.split("test")]
    plans = oracle.predict(cases)
    source = Dataset.open(workdir / "data" / "source")
    first_source_test = source.load(source.split("test")[0])  # the same patient (anatomy 5000)
    assert [p.case_id for p in plans] == [c.case_id for c in cases]
    assert (plans[0].dose == first_source_test.dose).all() and not (plans[0].dose == cases[0].dose).all()
    assert (plans[1].masks == cases[1].masks).all()


def test_a_workdir_holding_another_study_is_refused(tmp_path):
    """Finished stages are skipped on a rerun: under another --scale or --seed they would be reported as the new
    study's, so that workdir is refused before anything runs; the same settings resume."""
    made = []
    stages = paper_study.Stages(tmp_path, study={"scale": "smoke", "seed": 0})
    stages.run("data", lambda: made.append("data"))
    with pytest.raises(FlaxdoseError, match=r"another paper_study \(scale 'smoke' \(now 'cpu'\)\).*new --workdir"):
        paper_study.Stages(tmp_path, study={"scale": "cpu", "seed": 0})
    with pytest.raises(FlaxdoseError, match=r"seed 0 \(now 1\)"):
        paper_study.Stages(tmp_path, study={"scale": "smoke", "seed": 1})
    again = paper_study.Stages(tmp_path, study={"scale": "smoke", "seed": 0})
    again.run("data", lambda: made.append("data twice"))
    assert made == ["data"] and again.done.keys() == {"data"}
    (tmp_path / "study.json").unlink()  # a workdir from before study.json: taken as the study asked for
    assert paper_study.Stages(tmp_path, study={"scale": "smoke", "seed": 0}).done.keys() == {"data"}
