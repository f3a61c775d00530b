"""Style check before adapting: how far a clinic's planning style is from a model's, and what adapting gains.

`style_distance(own_rows, clinic_rows)` compares the model's per-case errors (rows of
`flaxdose.evaluation.evaluate_case`) on held-out plans of its own style ("own") with those on
the clinic's plans. Per group: the mean isodose Dice (``dice_mean``) and the per-case mean
absolute DVH error in % of the prescription (the mean of the case's ``abs_err_pct`` columns);
the difference clinic - own and Welch's unequal-variances t-test (`scipy.stats.ttest_ind`
with ``equal_var=False``: two groups of different patients, so unpaired). Per DVH metric it
also gives the mean signed error (prediction - plan, % of Rx) in each group: a negative shift
on the clinic's plans means the clinic's plans give more dose there than the model predicts.

`recommend(distance, curve)`: adapting is recommended when the model does significantly worse
on the clinic's plans (p < alpha in either test, in the worse direction) and the learning
curve shows a gain. The number of plans is the fewest on the curve whose mean Dice is within
`flaxdose.sweeps.report.ENOUGH_DICE_MARGIN` of its best (`sweep_report.fewest_plans`), with its
95 % percentile-bootstrap interval over the sweep's test cases (`sweep_report.plans_to_expect`;
none for results written before runs recorded per-case Dice, said so), and whether the curve
rises at all (`sweep_report.rise_test`: fewest vs most plans, paired per test case, seeds averaged); the
expected gain is that point's mean Dice minus the unadapted model's Dice on the same test plans
(the sweep's baseline: ``baseline/<style>.json`` of a sweep folder, baselines.json of its report
folder; the clinic's measured Dice, of a different set of plans, when the curve has none, said so in
the advice and report.md). The curve
is a sweep's (`flaxdose.sweeps.runner`): measured, not guessed, on the sweep's target style, which
is the clinic's own only when the sweep ran on the clinic's plans (``data.folders``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import stats

from flaxdose import evaluation
from flaxdose.data.case import Case
from flaxdose.errors import FlaxdoseError
from flaxdose.io import atomic_folder
from flaxdose.sweeps import report as sweep_report

DEFAULT_ALPHA = 0.05
SCORES = {"dice_mean": "mean isodose Dice", "dvh_abs_err_pct": "mean absolute DVH error (% of Rx)"}
WORSE = {"dice_mean": -1.0, "dvh_abs_err_pct": 1.0}  # the sign of clinic - own when the clinic's plans fit worse
NO_BASELINE = ("the curve has no baseline (a report written before baselines.json): the gain is counted from the "
               "model's Dice on the clinic's plans, not the curve's test plans; give --curve the sweep folder, or "
               "rewrite its report with --stage=report")


def case_scores(rows: Sequence[dict]) -> list[dict]:
    """Per evaluated case: case_id, dice_mean and dvh_abs_err_pct (mean over the case's DVH metrics)."""
    out = []
    for row in rows:
        errors = [v for k, v in row.items() if k.endswith(" abs_err_pct") and math.isfinite(v)]
        out.append({"case_id": row["case_id"], "dice_mean": row["dice_mean"],
                    "dvh_abs_err_pct": float(np.mean(errors)) if errors else math.nan})
    return out


def welch(own: Sequence[float], clinic: Sequence[float]) -> dict:
    """Both groups described (evaluation.describe), clinic - own mean difference, Welch t-test p (None if n < 2)."""
    own, clinic = (np.asarray([v for v in x if math.isfinite(v)], float) for x in (own, clinic))
    p = None
    if len(own) >= 2 and len(clinic) >= 2 and (own.std() > 0 or clinic.std() > 0):
        p = float(stats.ttest_ind(clinic, own, equal_var=False).pvalue)
    difference = float(clinic.mean() - own.mean()) if len(own) and len(clinic) else None
    return {"own": evaluation.describe(own), "clinic": evaluation.describe(clinic), "difference": difference, "p": p}


def signed_errors(rows: Sequence[dict]) -> dict[str, float]:
    """Mean signed DVH error (prediction - plan, % of Rx) per metric key over rows."""
    keys = dict.fromkeys(k.removesuffix(" err_pct") for r in rows for k in r
                         if k.endswith(" err_pct") and not k.endswith("abs_err_pct"))
    return {k: float(np.nanmean([r[f"{k} err_pct"] for r in rows])) for k in keys}


def style_distance(own_rows: Sequence[dict], clinic_rows: Sequence[dict]) -> dict:
    """The model's errors on the clinic's plans against its own style's (module docstring)."""
    if not own_rows or not clinic_rows:
        raise FlaxdoseError("the style check needs evaluated plans of both the model's own style and the clinic")
    own, clinic = case_scores(own_rows), case_scores(clinic_rows)
    out = {score: welch([r[score] for r in own], [r[score] for r in clinic]) for score in SCORES}
    own_signed, clinic_signed = signed_errors(own_rows), signed_errors(clinic_rows)
    out["metrics"] = {k: {"own": own_signed[k], "clinic": v, "shift": v - own_signed[k]}
                      for k, v in clinic_signed.items() if k in own_signed}
    return out


# ---------------------------------------------------------------- the learning curve
@dataclasses.dataclass(frozen=True)
class LearningCurve:
    """One curve of a sweep: per number of target plans, the runs' (seeds') mean Dice and DVH error."""

    source: str
    style: str
    name: str  # the mode (and learning rate when the sweep has several)
    dice: Mapping[int, Sequence[float]]
    dvh: Mapping[int, Sequence[float]]
    baseline_dice: float | None = None  # the unadapted model on the same test plans (n = 0)
    baseline_dvh: float | None = None
    # per number of plans, the runs' (seed, {test case id: Dice}); None: the sweep recorded no per-case Dice
    case_dice: Mapping[int, Sequence[tuple]] | None = None


def read_sweep(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(run rows, baselines) of a sweep folder (runs/*/result.json, baseline/*.json), its report folder or a
    results.csv (with the case_results.csv beside it, when there is one): `sweep_report.read_results`.

    Raises FlaxdoseError when the path holds neither, or for a malformed table.
    """
    return sweep_report.read_results(path)


def learning_curve(path: str | Path, style: str, name: str | None = None) -> LearningCurve:
    """The curve of `style` in a sweep (`read_sweep`); `name` picks a mode, default: the best one.

    Raises FlaxdoseError when the sweep has no finished run of the style or no curve `name`.
    """
    rows, baselines = read_sweep(path)
    rows = [r for r in rows if r.get("style") == style and r.get("dice_mean") is not None]
    if not rows:
        raise FlaxdoseError(f"the sweep {path} has no finished run of style {style!r}; choose --curve_style")
    dice, dvh = sweep_report.curves(rows, "dice_mean")[style], sweep_report.curves(rows, "dvh_abs_err_pct")[style]
    dice = {c: by_n for c, by_n in dice.items() if sweep_report.fewest_plans(by_n) is not None}
    if not dice:
        raise FlaxdoseError(f"the sweep {path} has no run of style {style!r} with a Dice; its runs failed to score")
    if name is None:
        name = max(dice, key=lambda c: sweep_report.fewest_plans(dice[c])[2])
    if name not in dice:
        raise FlaxdoseError(f"the sweep has no curve {name!r} for style {style!r}; it has {sorted(dice)}")
    base = next((b for b in baselines if b.get("style") == style), {})
    cases = sweep_report.case_curves(rows).get(style, {}).get(name)
    return LearningCurve(str(path), style, name, dice[name], dvh[name], base.get("dice_mean"), base.get("dvh_abs_err_pct"),
                         cases)


def recommend(distance: Mapping, curve: LearningCurve, alpha: float = DEFAULT_ALPHA,
              margin: float = sweep_report.ENOUGH_DICE_MARGIN) -> dict:
    """Adapt or not, with how many plans and the expected gain, from the curve (module docstring)."""
    worse = {score: distance[score]["p"] is not None and distance[score]["p"] < alpha
             and distance[score]["difference"] * WORSE[score] > 0 for score in SCORES}
    expect = sweep_report.plans_to_expect(curve.dice, curve.case_dice, margin)  # `fewest_plans` with its interval
    if expect is None:
        raise FlaxdoseError(f"the learning curve {curve.name!r} of {curve.source} has no Dice values to recommend from")
    n, dice_at_n, best = expect["plans"], expect["dice"], expect["best"]
    rise = sweep_report.rise_test(curve.case_dice) if curve.case_dice else None
    ci_text = (f"95 % CI {expect['ci'][0]}-{expect['ci'][1]} plans" if expect["ci"]
               else f"no confidence interval: {expect['no_ci']}")
    dvh_at_n = float(np.nanmean(curve.dvh[n])) if n in curve.dvh else None
    if curve.baseline_dice is not None:
        baseline, baseline_from = curve.baseline_dice, "the sweep's unadapted source model on the curve's test plans"
    else:
        baseline = distance["dice_mean"]["clinic"]["mean"]
        baseline_from = "the unadapted model on the clinic's plans (the sweep recorded no baseline)"
    caveat = "" if curve.baseline_dice is not None else f" Note: {NO_BASELINE}."
    gain = dice_at_n - baseline
    out = {"differs": worse, "alpha": alpha, "curve": {"source": curve.source, "style": curve.style, "name": curve.name},
           "plans_needed": n, "plans_needed_ci": expect["ci"], "plans_needed_ci_missing": expect["no_ci"],
           "curve_rises": rise, "expected_dice": dice_at_n, "best_dice_on_curve": best, "expected_dvh_abs_err_pct": dvh_at_n,
           "baseline_dice": baseline, "baseline_from": baseline_from, "expected_gain_dice": gain,
           "baseline_missing": curve.baseline_dice is None, "runs_at_n": len(curve.dice[n])}
    if not any(worse.values()):
        out["adapt"], out["advice"] = False, (
            f"No adaptation indicated: the model's errors on these plans are not significantly worse than on its own "
            f"style (p >= {alpha:g}). If adapted anyway, the curve expects mean Dice {dice_at_n:.3f} with {n} plans "
            f"({ci_text})." + caveat)
    elif gain <= 0:
        out["adapt"], out["advice"] = False, (
            f"The style differs, but the learning curve shows no gain from adapting ({curve.name}: mean Dice "
            f"{dice_at_n:.3f} with {n} plans vs {baseline:.3f} unadapted, {baseline_from}); collect more plans or "
            "fine-tune longer." + caveat)
    else:
        out["adapt"], out["advice"] = True, (
            f"Adapt ({curve.name}) with {n} plans ({ci_text}): expected mean Dice {dice_at_n:.3f}, "
            f"{gain:+.3f} over {baseline:.3f} "
            f"({baseline_from})" + (f", DVH error {dvh_at_n:.2f} % of Rx" if dvh_at_n is not None else "") +
            (f"; {n} is the curve's largest point, so more plans may add more (not measured)." if n == max(curve.dice)
             else f"; more plans add at most {best - dice_at_n:.3f} on this curve.") + caveat)
    return out


# ---------------------------------------------------------------- the check and its report
def assess_style(model, own_cases: Sequence[Case], clinic_cases: Sequence[Case], curve: LearningCurve | None,
                 alpha: float = DEFAULT_ALPHA, batch_size: int = 1) -> dict:
    """Predict both groups with `model` (a `Model` or `flaxdose.planqa.Ensemble`), compare, recommend.

    Returns {"own_rows", "clinic_rows", "distance", "recommendation"} (no recommendation without a curve).
    """
    rows = {}
    for group, cases in (("own", own_cases), ("clinic", clinic_cases)):
        predicted = model.predict(cases, batch_size=batch_size, progress=True)
        rows[group] = evaluation.evaluate_predictions({group: predicted}, cases)
    distance = style_distance(rows["own"], rows["clinic"])
    return {"own_rows": rows["own"], "clinic_rows": rows["clinic"], "distance": distance,
            "recommendation": recommend(distance, curve, alpha) if curve is not None else None}


def _score_line(label: str, entry: Mapping) -> str:
    own, clinic, p = entry["own"], entry["clinic"], entry["p"]
    sd = lambda d: f" ± {d['sd']:.3f}" if d["sd"] is not None else ""
    return (f"| {label} | {own['mean']:.3f}{sd(own)} ({own['n']}) | {clinic['mean']:.3f}{sd(clinic)} ({clinic['n']}) | "
            f"{entry['difference']:+.3f} | {'n/a' if p is None else f'{p:.2g}'} |")


def plans_line(rec: Mapping) -> str:
    """The recommendation's plan count with its confidence interval, or why it has none."""
    ci = rec.get("plans_needed_ci")
    if ci:
        return (f"Plans to expect: {rec['plans_needed']} (95 % CI {ci[0]}-{ci[1]}; percentile bootstrap over the "
                f"sweep's test cases, {sweep_report.BOOTSTRAP_RESAMPLES} resamples).")
    return f"Plans to expect: {rec['plans_needed']} (no confidence interval: {rec.get('plans_needed_ci_missing')})."


def rise_line(rise: Mapping | None) -> str:
    """`sweep_report.rise_test` of the recommendation's curve in one sentence."""
    if rise is None:
        return f"Does the curve rise? Not tested: {sweep_report.NO_CASE_DATA}."
    if rise["mean"] is None:
        return f"Does the curve rise? Not tested: no test case scored by the same seed at both {rise['fewest']} and {rise['most']} plans."
    ci = f" [95 % CI {rise['ci'][0]:+.3f}, {rise['ci'][1]:+.3f}]" if rise["ci"] else ""
    return (f"Does the curve rise? {rise['verdict']}: Dice with {rise['most']} plans - with {rise['fewest']}, "
            f"{rise['mean']:+.3f}{ci} over {rise['n_pairs']} test cases (seeds averaged), Wilcoxon signed-rank "
            f"p = {rise['p']:.2g}.")


def markdown(result: Mapping, note: str) -> str:
    distance, rec = result["distance"], result["recommendation"]
    lines = ["# Style check", "", note, "",
             "The model's errors on its own style's held-out plans (own) and on the clinic's plans; mean ± SD (n); "
             "p: Welch's t-test, clinic vs own (unpaired).", "",
             "| score | own style | clinic | clinic - own | p |", "|---|---|---|---|---|"]
    lines += [_score_line(label, distance[score]) for score, label in SCORES.items()]
    lines += ["", "Mean signed DVH error, prediction - plan (% of Rx); shift < 0: the clinic's plans give more dose "
              "there than the model predicts:", "", "| metric | own style | clinic | shift |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['own']:+.2f} | {v['clinic']:+.2f} | {v['shift']:+.2f} |" for k, v in distance["metrics"].items()]
    if rec is not None:
        curve = rec["curve"]
        lines += ["", "## Recommendation", "", f"**{rec['advice']}**", "",
                  f"Learning curve: style {curve['style']!r}, curve {curve['name']!r} of {curve['source']}; plans needed = "
                  f"the fewest whose mean Dice is within {sweep_report.ENOUGH_DICE_MARGIN} of the curve's best "
                  f"({rec['best_dice_on_curve']:.3f}); {rec['runs_at_n']} run(s) at that point."]
        lines += ["", f"Unadapted Dice (row 0 of the curve) {rec['baseline_dice']:.3f}: {rec['baseline_from']}."
                  + (f" {NO_BASELINE[0].upper()}{NO_BASELINE[1:]}." if rec.get("baseline_missing") else "")]
        lines += ["", plans_line(rec), "", rise_line(rec["curve_rises"])]
    return "\n".join(lines) + "\n"


def finite_or_none(tree):
    """`tree` with every non-finite float replaced by None (strict JSON)."""
    if isinstance(tree, Mapping):
        return {k: finite_or_none(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [finite_or_none(v) for v in tree]
    return None if isinstance(tree, float) and not math.isfinite(tree) else tree


def write_assessment(result: Mapping, out_dir: str | Path, note: str = "", overwrite: bool = False) -> Path:
    """Write assessment.json (distance, recommendation), cases.csv (both groups' rows) and report.md, atomically."""
    with atomic_folder(out_dir, overwrite, "assessment") as tmp:
        saved = {"note": note, "distance": result["distance"], "recommendation": result["recommendation"]}
        (tmp / "assessment.json").write_text(json.dumps(finite_or_none(saved), indent=1, allow_nan=False) + "\n")
        evaluation.write_csv([*result["own_rows"], *result["clinic_rows"]], tmp / "cases.csv")
        (tmp / "report.md").write_text(markdown(result, note))
    return Path(out_dir) / "report.md"
