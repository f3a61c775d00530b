"""Style check (flaxdose.planqa.assess): distance and Welch test by hand, learning-curve recommendation by hand."""

import csv
import json

import numpy as np
import pytest
from scipy import stats

from flaxdose.errors import FlaxdoseError
from flaxdose.planqa import assess


def rows(dice, femur_err_pct, rectum_err_pct):
    return [{"case_id": f"c{i}", "dice_mean": d, "Femur_Head_L Dmean err_pct": f, "Femur_Head_L Dmean abs_err_pct": abs(f),
             "Rectum Dmean err_pct": r, "Rectum Dmean abs_err_pct": abs(r)}
            for i, (d, f, r) in enumerate(zip(dice, femur_err_pct, rectum_err_pct))]


def test_style_distance_by_hand():
    own = rows([0.80, 0.85, 0.90], [1.0, -1.0, 0.0], [2.0, 0.0, -2.0])
    clinic = rows([0.70, 0.72, 0.74], [-8.0, -10.0, -12.0], [2.0, 4.0, 6.0])
    distance = assess.style_distance(own, clinic)
    dice = distance["dice_mean"]
    assert dice["own"]["mean"] == pytest.approx(0.85) and dice["clinic"]["mean"] == pytest.approx(0.72)
    assert dice["difference"] == pytest.approx(-0.13)
    # Welch: variances 0.0025 and 0.0004, n = 3 each; t = -0.13 / sqrt(0.0029 / 3); Welch-Satterthwaite df
    se2 = (0.0025 + 0.0004) / 3
    df = se2**2 / ((0.0025 / 3) ** 2 / 2 + (0.0004 / 3) ** 2 / 2)
    assert df == pytest.approx(2.6240, abs=1e-3)
    assert dice["p"] == pytest.approx(2 * stats.t.sf(0.13 / np.sqrt(se2), df), rel=1e-6)
    # per-case mean |DVH error|: own (1.5, 0.5, 1.0) -> 1.0; clinic (5, 7, 9) -> 7
    assert distance["dvh_abs_err_pct"]["own"]["mean"] == pytest.approx(1.0)
    assert distance["dvh_abs_err_pct"]["difference"] == pytest.approx(6.0)
    # the clinic's femoral heads get 10 % of Rx more than predicted (shift -10), its rectum 4 % less
    assert distance["metrics"]["Femur_Head_L Dmean"] == pytest.approx({"own": 0.0, "clinic": -10.0, "shift": -10.0})
    assert distance["metrics"]["Rectum Dmean"]["shift"] == pytest.approx(4.0)


def curve(**kwargs):
    return assess.LearningCurve("sweep", "internal_c", "full", {2: [0.80, 0.82], 5: [0.85, 0.85], 10: [0.855]},
                                {2: [9.0, 8.0], 5: [7.0, 7.5], 10: [7.0]}, **kwargs)


def test_recommendation_by_hand():
    far = assess.style_distance(rows([0.80, 0.85, 0.90], [1, -1, 0], [2, 0, -2]), rows([0.70, 0.72, 0.74], [-8, -10, -12], [2, 4, 6]))
    rec = assess.recommend(far, curve(baseline_dice=0.75, baseline_dvh=9.5))
    # best 0.855 at 10 plans; 5 plans give 0.85 >= 0.855 - 0.01: the fewest within the margin
    assert rec["adapt"] and rec["plans_needed"] == 5 and rec["runs_at_n"] == 2
    assert rec["expected_dice"] == pytest.approx(0.85) and rec["expected_gain_dice"] == pytest.approx(0.10)
    assert rec["expected_dvh_abs_err_pct"] == pytest.approx(7.25) and "5 plans" in rec["advice"]
    # without a sweep baseline the gain is counted from the clinic's measured Dice (0.72)
    rec = assess.recommend(far, curve())
    assert rec["expected_gain_dice"] == pytest.approx(0.13) and "clinic" in rec["baseline_from"]
    near = assess.style_distance(rows([0.80, 0.85, 0.90], [1, -1, 0], [2, 0, -2]), rows([0.81, 0.86, 0.88], [1, 0, -1], [1, 0, -2]))
    assert not assess.recommend(near, curve(baseline_dice=0.75))["adapt"]
    assert not assess.recommend(far, curve(baseline_dice=0.9))["adapt"]  # adapting would not help on this curve
    rising = assess.LearningCurve("sweep", "internal_c", "full", {2: [0.8], 8: [0.9]}, {2: [9.0], 8: [7.0]}, 0.75)
    assert assess.recommend(far, rising)["plans_needed"] == 8 and "largest point" in assess.recommend(far, rising)["advice"]


def test_learning_curve_from_a_results_csv(tmp_path):
    path = tmp_path / "results.csv"
    runs = [("internal_c", 2, "full", 0.80), ("internal_c", 2, "full", 0.82), ("internal_c", 8, "full", 0.86),
            ("internal_c", 2, "paper", 0.70), ("internal_c", 8, "paper", 0.75), ("external", 2, "full", 0.6)]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run_id", "style", "n_train", "mode", "seed", "learning_rate", "dice_mean", "dvh_abs_err_pct"])
        writer.writerows([f"r{i}", s, n, m, i, "0.0003", d, "5.0"] for i, (s, n, m, d) in enumerate(runs))
    found = assess.learning_curve(path, "internal_c")  # the best curve: full
    assert found.name == "full" and found.dice == {2: [0.80, 0.82], 8: [0.86]} and found.baseline_dice is None
    assert assess.learning_curve(tmp_path, "internal_c", "paper").dice == {2: [0.70], 8: [0.75]}
    with pytest.raises(FlaxdoseError, match="no finished run of style"):
        assess.learning_curve(path, "internal_a")
    with pytest.raises(FlaxdoseError, match="no curve"):
        assess.learning_curve(path, "internal_c", "scratch")


def write_curve(folder, with_cases):
    """A sweep report on style internal_c (curve full): 2 plans Dice 0.80 on every case, 5 and 10 plans 0.90 and
    0.905: the plans to expect are 5 whatever test cases are drawn, and 10 plans beat 2 on all 6 test cases."""
    from types import SimpleNamespace

    from flaxdose.sweeps import report

    rows = []
    for n, dice in ((2, 0.80), (5, 0.90), (10, 0.905)):
        for seed in (0, 1):
            cases = {c: dice + 0.001 * i for i, c in enumerate("abcdef")}
            rows.append({"run_id": f"r{n}_{seed}", "style": "internal_c", "n_train": n, "mode": "full", "seed": seed,
                         "learning_rate": 1e-3, "dice_mean": float(np.mean(list(cases.values()))), "dvh_abs_err_pct": 5.0,
                         **({"case_dice": cases} if with_cases else {})})
    config = SimpleNamespace(base=SimpleNamespace(train=SimpleNamespace(steps=1, batch_size=1),
                                                  data=SimpleNamespace(patch_shape=(8, 8, 8)),
                                                  model=SimpleNamespace(features=(4,))))
    report.write(folder, rows, [], len(rows), config)
    return folder


FAR = (rows([0.80, 0.85, 0.90], [1, -1, 0], [2, 0, -2]), rows([0.70, 0.72, 0.74], [-8, -10, -12], [2, 4, 6]))


def test_recommendation_gives_the_plans_with_their_interval(tmp_path):
    folder = write_curve(tmp_path / "report", with_cases=True)
    found = assess.learning_curve(folder, "internal_c")
    assert sorted(found.case_dice) == [2, 5, 10] and len(found.case_dice[5]) == 2
    rec = assess.recommend(assess.style_distance(*FAR), found)
    assert rec["plans_needed"] == 5 and rec["plans_needed_ci"] == (5, 5) and rec["plans_needed_ci_missing"] is None
    assert "5 plans (95 % CI 5-5 plans)" in rec["advice"]
    rise = rec["curve_rises"]
    # the 6 differences 0.105 (10 plans - 2, per case, seeds averaged), all positive: exact two-sided p = 2 / 2^6
    assert (rise["fewest"], rise["most"], rise["n_pairs"]) == (2, 10, 6) and rise["mean"] == pytest.approx(0.105)
    assert rise["p"] == pytest.approx(1 / 32) and rise["verdict"] == "rises"
    result = {"distance": assess.style_distance(*FAR), "recommendation": rec, "own_rows": FAR[0], "clinic_rows": FAR[1]}
    text = assess.markdown(result, "note")
    assert "Plans to expect: 5 (95 % CI 5-5;" in text and "Does the curve rise? rises: Dice with 10 plans - with 2, +0.105" in text
    saved = assess.write_assessment(result, tmp_path / "assessment")
    assert json.loads((saved.parent / "assessment.json").read_text())["recommendation"]["plans_needed_ci"] == [5, 5]


def test_recommendation_from_old_results_has_no_interval(tmp_path):
    folder = write_curve(tmp_path / "report", with_cases=False)
    for path in (folder, folder / "results.csv"):
        found = assess.learning_curve(path, "internal_c")
        assert found.case_dice is None
        rec = assess.recommend(assess.style_distance(*FAR), found)
        assert rec["plans_needed"] == 5 and rec["plans_needed_ci"] is None and rec["curve_rises"] is None
        assert "no per-case Dice" in rec["plans_needed_ci_missing"] and "no confidence interval" in rec["advice"]
        text = assess.markdown({"distance": assess.style_distance(*FAR), "recommendation": rec}, "note")
        assert "Plans to expect: 5 (no confidence interval: these results have no per-case Dice" in text
        assert "Does the curve rise? Not tested" in text


def write_sweep_folder(root):
    """A sweep folder on internal_c (curve full): unadapted source model Dice 0.649 (baseline/, row 0); 2 plans
    0.700, 5 plans 0.713, 10 plans 0.715 on every test case: 5 plans are the fewest within 0.01 of the best."""
    from flaxdose.sweeps import report

    (root / "baseline").mkdir(parents=True)
    (root / "baseline" / "internal_c.json").write_text(json.dumps(
        {"style": "internal_c", "n_train": 0, "mode": "source model", "dice_mean": 0.649, "dvh_abs_err_pct": 9.0}))
    for n, dice in ((2, 0.700), (5, 0.713), (10, 0.715)):
        for seed in (0, 1):
            row = {"run_id": f"r{n}_{seed}", "style": "internal_c", "n_train": n, "mode": "full", "seed": seed,
                   "learning_rate": 1e-3, "dice_mean": dice, "dvh_abs_err_pct": 5.0, "case_dice": dict.fromkeys("abc", dice)}
            (root / "runs" / row["run_id"]).mkdir(parents=True)
            (root / "runs" / row["run_id"] / "result.json").write_text(json.dumps(row))
    return report


def test_a_report_folder_recommends_like_its_sweep_folder(tmp_path):
    from types import SimpleNamespace

    report = write_sweep_folder(tmp_path / "sweep")
    config = SimpleNamespace(base=SimpleNamespace(train=SimpleNamespace(steps=1, batch_size=1),
                                                  data=SimpleNamespace(patch_shape=(8, 8, 8)),
                                                  model=SimpleNamespace(features=(4,))))
    rows, baselines = report.read_results(tmp_path / "sweep")
    report.write(tmp_path / "report", rows, baselines, len(rows), config)
    distance = assess.style_distance(*FAR)  # the clinic's own Dice: 0.72, above the sweep's row 0
    recs = [assess.recommend(distance, assess.learning_curve(path, "internal_c"))
            for path in (tmp_path / "sweep", tmp_path / "report", tmp_path / "report" / "results.csv")]
    for rec in recs:
        assert rec["adapt"] and rec["plans_needed"] == 5 and rec["baseline_dice"] == pytest.approx(0.649)
        assert rec["expected_gain_dice"] == pytest.approx(0.713 - 0.649) and not rec["baseline_missing"]
        assert rec == recs[0] | {"curve": rec["curve"]}
    text = assess.markdown({"distance": distance, "recommendation": recs[1]}, "note")
    assert "Unadapted Dice (row 0 of the curve) 0.649: the sweep's unadapted source model" in text
    # a report written before baselines.json: still a recommendation, but it says the baseline is not the curve's
    (tmp_path / "report" / "baselines.json").unlink()
    rec = assess.recommend(distance, assess.learning_curve(tmp_path / "report", "internal_c"))
    assert rec["baseline_missing"] and rec["baseline_dice"] == pytest.approx(0.72) and not rec["adapt"]
    assert "the curve has no baseline" in rec["advice"] and "clinic's plans" in rec["baseline_from"]
    text = assess.markdown({"distance": distance, "recommendation": rec}, "note")
    assert "Unadapted Dice (row 0 of the curve) 0.720" in text and "The curve has no baseline" in text


def test_the_printed_line_summarizes_the_rise_test():
    from flaxdose.assess_style import rise_summary

    rise = {"fewest": 2, "most": 10, "n_pairs": 6, "mean": 0.105, "ci": (0.1, 0.11), "p": 1 / 32, "verdict": "rises"}
    assert rise_summary(rise) == {"verdict": "rises", "p": 1 / 32, "mean": 0.105} and rise_summary(None) is None
