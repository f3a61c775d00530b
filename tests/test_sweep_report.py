"""The sweep report's statistics (flaxdose.sweeps.report): the paired rise test and the bootstrap interval of
the plans to expect, checked against hand computations; case_results.csv written and read back; old results
without per-case Dice; a case_results.csv that does not match its results.csv."""

import csv
import json
import types

import numpy as np
import pytest
from scipy import stats

from flaxdose.errors import FlaxdoseError
from flaxdose.sweeps import report

CONFIG = types.SimpleNamespace(base=types.SimpleNamespace(
    train=types.SimpleNamespace(steps=10, batch_size=2), data=types.SimpleNamespace(patch_shape=(16, 16, 8)),
    model=types.SimpleNamespace(features=(4, 8))))


def runs(style, mode, points, lr=1e-3, with_cases=True):
    """result.json rows: points = {n plans: {seed: {case id: Dice}}}; dice_mean = the mean over the cases."""
    out = []
    for n, seeds in points.items():
        for seed, cases in seeds.items():
            row = {"run_id": f"{style}_n{n:03d}_{mode}_seed{seed}_lr{lr:g}", "style": style, "n_train": n, "mode": mode,
                   "seed": seed, "learning_rate": lr, "steps": 10, "n_test": len(cases),
                   "dice_mean": float(np.mean(list(cases.values()))), "dice_sd": 0.01, "dvh_abs_err_pct": 5.0 - n / 10,
                   "final_loss": 0.01, "wave": "w", "wave_size": 2, "wave_layout": "2x1", "wave_wall_s": 1.5}
            if with_cases:
                row["case_dice"] = dict(cases)
            out.append(row)
    return out


def by_n_cases(points):
    """`case_curves`' shape for one curve: n -> [(seed, {case: Dice})]."""
    return {n: [(seed, cases) for seed, cases in seeds.items()] for n, seeds in points.items()}


# ---------------------------------------------------------------- does the curve rise?
LOW = {0: {c: 0.70 + 0.01 * i for i, c in enumerate("abcdef")}, 1: {c: 0.71 + 0.01 * i for i, c in enumerate("abcdef")}}
# per case, the seeds' differences average to (x 100) a 6, b 9, c 3, d 7, e 4, f 5
DIFF = {0: {"a": 0.05, "b": 0.10, "c": 0.02, "d": 0.08, "e": 0.03, "f": 0.06},
        1: {"a": 0.07, "b": 0.08, "c": 0.04, "d": 0.06, "e": 0.05, "f": 0.04}}


def rising_points():
    high = {s: {c: LOW[s][c] + DIFF[s][c] for c in LOW[s]} for s in LOW}
    high[1]["g"] = 0.99  # a case scored only with 29 plans: no pair
    return {2: {**LOW, 2: {"a": 0.1}},  # seed 2 only with 2 plans: not in case a's mean
            10: {0: {"a": 0.5, "b": 0.5, "c": 0.5}},  # a middle point does not enter the test
            29: high}


def test_rise_test_pairs_test_cases_with_their_seeds_averaged():
    t = report.rise_test(by_n_cases(rising_points()))
    assert (t["fewest"], t["most"], t["n_pairs"]) == (2, 29, 6)
    # per-case differences x 100: 6 9 3 7 4 5 -> mean 34/6; sum of squared deviations 216 - 34^2/6 = 70/3
    mean, sd = 34 / 600, np.sqrt(70 / 3 / 5) / 100
    half = 2.5705818366147395 * sd / np.sqrt(6)  # t(0.975, 5 degrees of freedom)
    assert t["mean"] == pytest.approx(mean, rel=1e-9)
    assert t["ci"] == pytest.approx((mean - half, mean + half), rel=1e-6)
    # all 6 differences positive, no ties: W- = 0, the most extreme of 2^6 equally likely sign patterns on each side
    assert t["p"] == pytest.approx(2 / 2**6, rel=1e-12)
    assert t["verdict"] == "rises"


def test_a_small_mixed_rise_is_not_significant():
    points = {2: {0: {"a": 0.80, "b": 0.80, "c": 0.80}}, 5: {0: {"a": 0.85, "b": 0.79, "c": 0.82}}}
    t = report.rise_test(by_n_cases(points))
    d = [0.05, -0.01, 0.02]
    assert t["mean"] == pytest.approx(0.02, rel=1e-9) and t["n_pairs"] == 3
    # ranks of |d|: 3, 1, 2; W- = 1. Of the 8 sign patterns, W- <= 1 in 2 (W- = 0 or 1): p = 2 * 2/8
    assert t["p"] == pytest.approx(0.5, rel=1e-12) == stats.wilcoxon(d).pvalue
    assert t["verdict"] == "no significant rise"


def test_a_falling_curve_does_not_rise():
    points = {2: {0: {c: 0.9 for c in "abcdef"}}, 5: {0: {c: 0.8 - 0.01 * i for i, c in enumerate("abcdef")}}}
    t = report.rise_test(by_n_cases(points))
    assert t["mean"] < 0 and t["p"] == pytest.approx(1 / 32) and t["verdict"] == "no significant rise"


def test_rise_test_edge_cases():
    assert report.rise_test({2: [(0, {"a": 0.8})]}) is None  # one plan count: nothing to compare
    same = report.rise_test(by_n_cases({2: {0: {"a": 0.8, "b": 0.7}}, 5: {0: {"a": 0.8, "b": 0.7}}}))
    assert same["mean"] == 0 and same["p"] == 1.0 and same["verdict"] == "no significant rise"
    one = report.rise_test(by_n_cases({2: {0: {"a": 0.8}}, 5: {0: {"a": 0.9, "b": 0.7}}}))
    assert one["n_pairs"] == 1 and one["ci"] is None
    none = report.rise_test(by_n_cases({2: {0: {"a": 0.8}}, 5: {1: {"a": 0.9}}}))  # other seeds: no pair
    assert none["n_pairs"] == 0 and none["mean"] is None and none["verdict"] == "no significant rise"


# ---------------------------------------------------------------- plans to expect, with a bootstrap interval
def test_bootstrap_interval_collapses_when_every_resample_agrees():
    """Whatever cases are drawn: 2 plans ~0.45, 5 plans ~0.90, 10 plans 0.002 better than 5 -> always 5 plans."""
    cases = [f"c{i}" for i in range(10)]
    five = {c: 0.90 + 0.005 * i for i, c in enumerate(cases)}
    points = {2: {s: {c: 0.40 + 0.01 * i for i, c in enumerate(cases)} for s in (0, 1)},
              5: {s: five for s in (0, 1)}, 10: {s: {c: v + 0.002 for c, v in five.items()} for s in (0, 1)}}
    found = report.bootstrap_plans(by_n_cases(points))
    assert found == {"plans": 5, "low": 5, "high": 5, "n_cases": 10, "resamples": 2000}


def test_bootstrap_interval_of_two_cases_by_hand():
    """Two test cases, a and b; a resample of two cases is aa (1/4), bb (1/4) or ab (1/2).
    aa: means (0.90, 0.90, 0.88) -> 2 plans; bb: (0.50, 0.90, 0.935) -> 10; ab: (0.70, 0.90, 0.9075) -> 5.
    So the point estimate (a and b) is 5, and the 2.5 % and 97.5 % quantiles of the counts are 2 and 10."""
    a, b = (0.90, 0.90, 0.88), (0.50, 0.90, 0.935)
    points = {n: {0: {"a": a[i], "b": b[i]}} for i, n in enumerate((2, 5, 10))}
    found = report.bootstrap_plans(by_n_cases(points))
    assert (found["plans"], found["low"], found["high"]) == (5, 2, 10)
    assert report.bootstrap_plans(by_n_cases(points)) == found  # a fixed seed: the same interval every time
    # the same rule as the point estimate of the runs' mean Dice
    assert report.fewest_plans({n: [np.mean([a[i], b[i]])] for i, n in enumerate((2, 5, 10))})[0] == 5


def test_plans_to_expect_matches_fewest_plans_on_the_runs():
    points = rising_points()
    rows = runs("internal_a", "full", points)
    by_n = report.curves(rows, "dice_mean")["internal_a"]["full"]
    expect = report.plans_to_expect(by_n, report.case_curves(rows)["internal_a"]["full"])
    assert expect["plans"] == report.fewest_plans(by_n)[0]
    assert expect["ci"][0] <= expect["ci"][1] and set(expect["ci"]) <= set(points) and expect["no_ci"] is None
    old = report.plans_to_expect(by_n, None)
    assert old["plans"] == expect["plans"] and old["ci"] is None and "no per-case Dice" in old["no_ci"]
    partial = report.plans_to_expect(by_n, {2: report.case_curves(rows)["internal_a"]["full"][2]})
    assert partial["ci"] is None and "[10, 29]" in partial["no_ci"]
    assert report.plans_to_expect({2: [float("nan")]}, None) is None


# ---------------------------------------------------------------- case_results.csv and summary.md
def sweep_rows():
    rows = runs("internal_a", "full", rising_points())
    falling = {2: {0: {"a": 0.8, "b": 0.8}}, 5: {0: {"a": 0.7, "b": 0.75}}}
    return rows + runs("internal_a", "paper", falling) + runs("external", "full", falling)


def test_case_results_round_trip(tmp_path):
    rows = sweep_rows()
    report.write(tmp_path, rows, [], len(rows), CONFIG, "test")
    with open(tmp_path / "case_results.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert tuple(lines[0]) == report.CASE_COLUMNS and len(lines) == sum(len(r["case_dice"]) for r in rows)
    assert "case_dice" not in (tmp_path / "results.csv").read_text()  # results.csv stays flat
    for path in (tmp_path, tmp_path / "results.csv"):
        back, baselines = report.read_results(path)
        assert baselines == []
        for original, read in zip(rows, back, strict=True):
            assert read["case_dice"] == original["case_dice"]
            for key in report.COLUMNS:
                assert read[key] == original[key], key


def test_summary_tests_the_rise_and_gives_plans_with_an_interval(tmp_path):
    rows = sweep_rows()
    summary = report.write(tmp_path, rows, [], len(rows), CONFIG).read_text()
    assert "| 0 (source model) |" not in summary and "| 29 |" in summary  # the Dice tables stay
    assert "| full | 2 → 29 | 6 | +0.057 [+0.034, +0.079] | 0.031 | rises |" in summary  # 34/600 +- 0.0227 (by hand above)
    assert "| paper | 2 → 5 | 2 | -0.075 [" in summary and "| no significant rise |" in summary
    expect = report.plans_to_expect(report.curves(rows, "dice_mean")["internal_a"]["full"],
                                    report.case_curves(rows)["internal_a"]["full"])
    assert f"- full: Plans to expect: {expect['plans']} (95 % CI {expect['ci'][0]}-{expect['ci'][1]})" in summary
    assert "- paper: Plans to expect: 2 (95 % CI 2-2)" in summary
    # read back from the report folder, the statistics are the same
    again = report.write(tmp_path / "again", report.read_results(tmp_path)[0], [], len(rows), CONFIG).read_text()
    assert again.split("Cells:")[1] == summary.split("Cells:")[1]


def test_old_results_without_case_dice(tmp_path):
    rows = runs("internal_a", "full", rising_points(), with_cases=False)
    summary = report.write(tmp_path, rows, [], len(rows), CONFIG).read_text()
    assert "Does the curve rise? Not tested: these results have no per-case Dice" in summary
    assert "- full: Plans to expect: 29 (no CI: these results have no per-case Dice" in summary
    assert (tmp_path / "case_results.csv").read_text().strip() == ",".join(report.CASE_COLUMNS)
    back, _ = report.read_results(tmp_path)
    assert not any("case_dice" in r for r in back)
    (tmp_path / "case_results.csv").unlink()  # a report written before case_results.csv existed
    assert not any("case_dice" in r for r in report.read_results(tmp_path / "results.csv")[0])


def test_results_from_a_sweep_folder(tmp_path):
    rows = sweep_rows()
    for row in rows:
        (tmp_path / "runs" / row["run_id"]).mkdir(parents=True)
        (tmp_path / "runs" / row["run_id"] / "result.json").write_text(json.dumps(row))
    (tmp_path / "runs" / "unfinished").mkdir()
    (tmp_path / "baseline").mkdir()
    (tmp_path / "baseline" / "internal_a.json").write_text(json.dumps({"style": "internal_a", "dice_mean": 0.6}))
    back, baselines = report.read_results(tmp_path)
    assert sorted(r["run_id"] for r in back) == sorted(r["run_id"] for r in rows) and baselines[0]["dice_mean"] == 0.6
    assert {r["run_id"]: r["case_dice"] for r in back} == {r["run_id"]: r["case_dice"] for r in rows}


# ---------------------------------------------------------------- clear errors
def write_report(tmp_path):
    rows = sweep_rows()
    report.write(tmp_path, rows, [], len(rows), CONFIG)
    return tmp_path / "case_results.csv"


def edit_case_results(path, change):
    with open(path, newline="") as f:
        lines = list(csv.DictReader(f))
    lines = change(lines)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(lines[0]))
        writer.writeheader()
        writer.writerows(lines)


@pytest.mark.parametrize("change, message", [
    (lambda ls: [*ls, {**ls[0], "run_id": "internal_a_n099_full_seed0_lr0.001"}], "which .*results.csv does not list"),
    (lambda ls: [{**ls[0], "n_train": "5"}, *ls[1:]], "n_train 5, results.csv 2"),
    (lambda ls: [*ls, ls[0]], "repeats case 'a'"),
    (lambda ls: [{**ls[0], "dice": "high"}, *ls[1:]], "column 'dice' holds 'high', not a number"),
    (lambda ls: [{k: v for k, v in line.items() if k != "seed"} for line in ls], r"lacks the column\(s\) \['seed'\]"),
])
def test_a_case_results_csv_that_does_not_match_is_refused(tmp_path, change, message):
    edit_case_results(write_report(tmp_path), change)
    with pytest.raises(FlaxdoseError, match=message) as e:
        report.read_results(tmp_path)
    assert "--stage=report" in str(e.value) or "not a number" in str(e.value)


def test_bad_results_paths_and_cells_are_refused(tmp_path):
    with pytest.raises(FlaxdoseError, match="neither a sweep folder"):
        report.read_results(tmp_path)
    (tmp_path / "results.csv").write_text("run_id,style,n_train,mode,seed,learning_rate,dice_mean\nr,s,two,full,0,0.001,0.8\n")
    with pytest.raises(FlaxdoseError, match="line 2: column 'n_train' holds 'two'"):
        report.read_results(tmp_path)


def test_a_report_folder_keeps_the_sweeps_baselines(tmp_path):
    rows, baselines = sweep_rows(), [{"style": "internal_a", "n_train": 0, "mode": "source model", "dice_mean": 0.649}]
    report.write(tmp_path, rows, baselines, len(rows), CONFIG)
    assert json.loads((tmp_path / "baselines.json").read_text()) == baselines
    for path in (tmp_path, tmp_path / "results.csv"):
        assert report.read_results(path)[1] == baselines
    (tmp_path / "baselines.json").write_text("{}")
    with pytest.raises(FlaxdoseError, match="baselines.json is not a list of baselines.*--stage=report"):
        report.read_results(tmp_path)
    (tmp_path / "baselines.json").unlink()  # a report written before baselines.json: rows, no baselines
    assert report.read_results(tmp_path)[1] == []


HEADER = "run_id,style,n_train,mode,seed,learning_rate,dice_mean\n"


@pytest.mark.parametrize("content, message", [
    ("run_id,style,n_train,mode,learning_rate\nr,s,2,full,0.001\n", r"lacks the column\(s\) \['seed', 'dice_mean'\]"),
    (b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary", "is not a CSV text file"),
    ("", r"lacks the column\(s\)"),
    (HEADER, "lists no runs"),
    (HEADER + "r,s,2,full,0,0.001,0.8\nq,s,5,full,0,0.001,0.9\nr,s,2,full,0,0.001,0.8\n", "line 4 repeats run 'r' of line 2"),
])
def test_a_broken_results_csv_is_refused_with_the_fix(tmp_path, content, message):
    path = tmp_path / "results.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    for where in (tmp_path, path):
        with pytest.raises(FlaxdoseError, match=message) as e:
            report.read_results(where)
        assert str(path) in str(e.value) and "--stage=report" in str(e.value) and "\n" not in str(e.value)


def test_a_number_error_names_the_file_it_is_in(tmp_path):
    edit_case_results(write_report(tmp_path), lambda ls: [{**ls[0], "dice": "high"}, *ls[1:]])
    with pytest.raises(FlaxdoseError, match="case_results.csv line 2: column 'dice'.*sweep's case_results.csv"):
        report.read_results(tmp_path)
