"""The whole study at the `smoke` scale: data, source model, four transfers, evaluation, report."""

import json

from launch import paper_study


def test_smoke_study_runs_end_to_end_and_resumes(tmp_path, capsys):
    report = paper_study.run_study("smoke", tmp_path / "study", tmp_path / "results")
    text = report.read_text()
    for style in ("source", "internal_a", "internal_b", "internal_c", "external"):
        assert f"| {style} |" in text
        assert (tmp_path / "study" / "eval" / style / "summary.json").is_file()
    assert "target model" in text and "Wall time" in text
    assert list((tmp_path / "results" / "paper_study_smoke").glob("external_dice.png"))
    stages = json.loads((tmp_path / "study" / "stages.json").read_text())
    assert set(stages) >= {"data", "source", "external", "evaluate external"}
    capsys.readouterr()
    paper_study.run_study("smoke", tmp_path / "study", tmp_path / "results")
    assert capsys.readouterr().out.count("done earlier, skipped") == len(stages)
