"""Evaluate predicted doses against the reference (clinical) doses: tables, statistics, figures.

The command line is `flaxdose.evaluate`. `write_report` writes into a report folder:

- ``cases.csv``: one row per case x model: isodose Dice at 10 %..100 % of the prescription
  (``dice_10``..``dice_100``, ``dice_mean``) and, for every DVH metric (PTV Dmean/D2/D95/D98,
  OAR Dmean/D2), the reference and predicted value and the error prediction - reference in
  Gy and % of the prescription, signed (``err_gy``, ``err_pct``) and absolute (``abs_err_*``);
- ``summary.json``: per model the mean, SD (ddof=1) and median of every metric; with two or
  more models, paired t-tests (scipy.stats.ttest_rel, pairs = the same case, NaN pairs
  dropped) of each model against the first, per metric; ``empty_structures``: structures
  empty in some evaluated cases (their DVH metrics average the other cases), and
  ``failed_cases``: {case id: why} of the cases that could not be predicted or scored;
- ``report.md``: the short table, notes on empty structures and failed cases, and the figures
  ``dice.png``, ``dvh_errors.png`` and ``case_<id>.png`` (see flaxdose.plots), shown in place
  through links relative to the report (the folder stays readable when moved).

Metric conventions are those of flaxdose.metrics. Isodose Dice is restricted to the
reference case's dose region (`Case.dose_region`: the body, or OpenKBP's possible-dose
mask); targets are `Case.targets` (names starting with "PTV").
"""

from __future__ import annotations

import csv
import json
import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from flaxdose.data.case import Case, Dataset, target_names
from flaxdose.errors import FlaxdoseError
from flaxdose.io import atomic_folder
from flaxdose.metrics import ISODOSE_LEVELS, dvh_errors, isodose_dice, plan_dvh_metrics
from tqdm import tqdm

DICE_KEYS = tuple(f"dice_{round(level * 100)}" for level in ISODOSE_LEVELS) + ("dice_mean",)
ERROR_SUFFIXES = ("err_gy", "err_pct", "abs_err_gy", "abs_err_pct")
ID_COLUMNS = ("case_id", "model", "style", "prescription_gy")
log = logging.getLogger("flaxdose")


class Evaluation(NamedTuple):
    rows: list[dict]  # one per case x model, see the module docstring
    references: list[Case]  # the evaluated cases (without failed ones)
    predictions: dict[str, list[Case]]  # model name -> predicted cases, in reference order
    failed: dict[str, str] = {}  # case id -> why it could not be predicted or scored (never mutated)


# ---------------------------------------------------------------- per case
def check_same_grid(pred: Case, ref: Case) -> None:
    """Raise unless `pred` is a dose for the reference case on the reference's voxel grid."""
    where = f"prediction for case {ref.case_id!r}"
    if pred.case_id != ref.case_id:
        raise FlaxdoseError(f"{where} is case {pred.case_id!r}; give predictions in the order of the reference cases")
    if pred.dose is None or ref.dose is None:
        raise FlaxdoseError(f"case {ref.case_id!r}: both the prediction and the reference need a dose")
    if pred.dose.shape != ref.dose.shape or not np.allclose(pred.spacing_mm, ref.spacing_mm) \
            or not np.allclose(pred.origin_mm, ref.origin_mm):
        raise FlaxdoseError(
            f"{where} is on grid {pred.dose.shape} spacing {pred.spacing_mm} origin {pred.origin_mm}, the reference on "
            f"{ref.dose.shape} spacing {ref.spacing_mm} origin {ref.origin_mm}; resample the prediction onto the reference grid"
        )
    if not ref.prescription_gy > 0:
        raise FlaxdoseError(f"reference case {ref.case_id!r} has no prescription; set prescription_gy to evaluate")


def evaluate_case(pred: Case, ref: Case, model: str) -> dict:
    """One row: Dice per isodose level and DVH-metric values and errors (see module docstring).

    Raises FlaxdoseError for another grid, or a reference dose that is zero everywhere (no plan:
    scored, it would enter the means as Dice 0 and +100 % errors; non-finite doses are refused
    when a case is made)."""
    check_same_grid(pred, ref)
    if not np.max(ref.dose, initial=0.0) > 0:
        raise FlaxdoseError(f"the reference dose of case {ref.case_id!r} is zero everywhere: it is no plan and "
                            "cannot be scored; fix or drop the case from the dataset")
    rx = ref.prescription_gy
    dice = isodose_dice(pred.dose, ref.dose, rx, body=ref.dose_region())
    row = {"case_id": ref.case_id, "model": model, "style": ref.style, "prescription_gy": rx,
           **{k: v for k, v in dice.items() if k != "mean"}, "dice_mean": dice["mean"]}
    targets = ref.targets
    ref_m = plan_dvh_metrics(ref.dose, ref.masks, ref.structures, ref.spacing_mm, targets=targets)
    pred_m = plan_dvh_metrics(pred.dose, ref.masks, ref.structures, ref.spacing_mm, targets=targets)
    errors = dvh_errors(pred_m, ref_m, rx)
    for key in ref_m:
        row[f"{key} ref_gy"], row[f"{key} pred_gy"] = ref_m[key], pred_m[key]
        row[f"{key} err_gy"], row[f"{key} err_pct"] = errors[f"{key} err_gy"], errors[f"{key} err_pct"]
        row[f"{key} abs_err_gy"], row[f"{key} abs_err_pct"] = abs(row[f"{key} err_gy"]), abs(row[f"{key} err_pct"])
    return row


def evaluate_predictions(predictions: Mapping[str, Sequence[Case]], references: Sequence[Case]) -> list[dict]:
    """Rows for every model x case; `predictions[model]` lists one Case per reference, same order."""
    if not references:
        raise FlaxdoseError("no reference cases to evaluate; the split is empty")
    rows = []
    for model, cases in predictions.items():
        if len(cases) != len(references):
            raise FlaxdoseError(f"model {model!r} has {len(cases)} predictions for {len(references)} reference cases")
        rows += [evaluate_case(p, r, model) for p, r in zip(cases, references)]
    return rows


# ---------------------------------------------------------------- models and datasets
def split_ids(dataset: Dataset, split: str) -> list[str]:
    """The case ids of a split; FlaxdoseError for an empty one."""
    ids = dataset.split(split)
    if not ids:
        raise FlaxdoseError(f"split {split!r} of {dataset.root} is empty; choose a split with cases (e.g. 'test')")
    return ids


def load_references(dataset: Dataset, split: str, ids: Sequence[str] | None = None) -> list[Case]:
    """The planned cases `ids` (default: the whole split) of `dataset`; FlaxdoseError for a case file that cannot be
    read, a case without a reference dose, or a dataset of predictions."""
    cases = [dataset.load(i) for i in (split_ids(dataset, split) if ids is None else ids)]
    missing = [c.case_id for c in cases if c.dose is None]
    if missing:
        raise FlaxdoseError(f"cases {missing[:5]} of {dataset.root} have no reference dose; evaluate only planned cases")
    predicted = [c for c in cases if c.meta.get("predicted_by")]
    if predicted:  # a prediction scored against itself (or another model's) reads as a perfect Dice
        raise FlaxdoseError(f"{dataset.root} holds predictions (case {predicted[0].case_id!r} was predicted by "
                            f"{predicted[0].meta['predicted_by']!r}), not reference plans; evaluate against the "
                            "dataset the plans came from")
    return cases


def unique_names(names: Sequence[str]) -> list[str]:
    """Make model names distinct ("w", "w" -> "w", "w (2)"): they key the tables and legends."""
    out = []
    for name in names:
        candidate, k = name, 2
        while candidate in out:
            candidate, k = f"{name} ({k})", k + 1
        out.append(candidate)
    return out


def failure_list(failed: Mapping[str, str], limit: int = 5) -> str:
    """``cases a, b: reason; case c: reason (and 3 more)``: {case id: reason}, cases with the same reason
    together (each reason once), the first `limit` case ids of each. A reason that names its case is the
    same reason for another case; such a group shows the first case's reason as it was given, then the
    others: ``case a: case 'a' has spacing 4x4x3 mm; likewise case b``."""
    by_reason: dict[str, list[str]] = {}
    for case_id, reason in failed.items():
        by_reason.setdefault(str(reason).replace(repr(case_id), "\0"), []).append(case_id)
    items = []
    for template, ids in by_reason.items():
        if "\0" not in template or len(ids) == 1:  # the reason as given (it names its one case, if any)
            more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
            items.append(f"case{'s' if len(ids) > 1 else ''} {', '.join(ids[:limit])}{more}: {failed[ids[0]]}")
            continue
        others = ids[1:]
        more = f" and {len(others) - (limit - 1)} more" if len(others) > limit - 1 else ""
        items.append(f"case {ids[0]}: {failed[ids[0]]}; likewise case{'s' if len(others) > 1 else ''} "
                     f"{', '.join(others[:limit - 1])}{more}")
    return "; ".join(items)


def each_case(case_ids: Sequence[str], fn: Callable[[str], object], *, action: str, what: str
              ) -> tuple[dict[str, object], dict[str, str]]:
    """Run ``fn(case_id)`` for every case, keeping going over cases that fail.

    A case whose `fn` raises FlaxdoseError is logged ("case X not <action>: why") and left out.
    Returns ({case id: result} in order, {case id: reason}). Raises FlaxdoseError naming every
    reason (`failure_list`) when no case succeeded; `what` names the cases ("split 'test' of D").
    """
    results, failed = {}, {}
    for case_id in tqdm(case_ids, desc=f"cases {action}", unit="case"):
        try:
            results[case_id] = fn(case_id)
        except FlaxdoseError as e:
            log.warning("case %s not %s: %s", case_id, action, e)
            failed[case_id] = str(e)
    if not results:
        raise FlaxdoseError(f"no case of {what} could be {action}: " + failure_list(failed))
    return results, failed


def evaluate_models(models: Mapping[str, object], dataset: Dataset, split: str, batch_size: int = 1,
                    keep_going: bool = False) -> Evaluation:
    """Predict the split with every model and evaluate against its doses.

    `models` maps names to objects with ``predict(cases, batch_size=, progress=) -> cases``
    (`flaxdose.inference.Model`, or any other predictor). `keep_going`: a case that some model
    cannot predict, or that cannot be scored (a FlaxdoseError), is logged and left out for every
    model (the tests pair cases), and `Evaluation.failed` says why; otherwise the first such case
    stops the evaluation. Raises FlaxdoseError for an empty split, cases without a reference
    dose, or (`keep_going`) when no case could be evaluated.
    """
    if not keep_going:
        references = load_references(dataset, split)
        predictions = {name: m.predict(references, batch_size=batch_size, progress=True) for name, m in models.items()}
        return Evaluation(evaluate_predictions(predictions, references), references, predictions)

    def predict_and_score(case_id: str) -> tuple[Case, dict[str, Case], list[dict]]:
        reference = load_references(dataset, split, [case_id])[0]  # a missing or damaged file fails this case only
        done = {name: m.predict([reference], batch_size=batch_size)[0] for name, m in models.items()}
        return reference, done, [evaluate_case(p, reference, name) for name, p in done.items()]

    results, failed = each_case(split_ids(dataset, split), predict_and_score, action="evaluated",
                                what=f"split {split!r} of {dataset.root}")
    kept = [reference for reference, _, _ in results.values()]
    predictions = {name: [done[name] for _, done, _ in results.values()] for name in models}
    rows = [row for _, _, case_rows in results.values() for row in case_rows]
    rows.sort(key=lambda r: list(models).index(r["model"]))  # model by model, as evaluate_predictions orders them
    return Evaluation(rows, kept, predictions, failed)


# ---------------------------------------------------------------- statistics
def metric_columns(rows: Sequence[dict]) -> list[str]:
    """Dice columns then every DVH error column, in table order."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return [k for k in columns if k in DICE_KEYS or k.rsplit(" ", 1)[-1] in ERROR_SUFFIXES]


def _finite(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _by_model(rows: Sequence[dict]) -> dict[str, dict[str, dict]]:
    """model -> case_id -> row."""
    out: dict[str, dict[str, dict]] = {}
    for row in rows:
        out.setdefault(row["model"], {})[row["case_id"]] = row
    return out


def describe(values: Sequence[float]) -> dict:
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": None, "sd": None, "median": None, "n": 0}
    sd = float(np.std(v, ddof=1)) if v.size > 1 else float("nan")
    return {"mean": _finite(v.mean()), "sd": _finite(sd), "median": _finite(np.median(v)), "n": int(v.size)}


def paired_ttest(rows: Sequence[dict], model_a: str, model_b: str) -> dict:
    """scipy.stats.ttest_rel of model_b vs model_a per metric over the cases both evaluated."""
    from scipy import stats

    by_model = _by_model(rows)
    cases = [c for c in by_model[model_a] if c in by_model[model_b]]
    p_values, differences = {}, {}
    for metric in metric_columns(rows):
        a = np.array([by_model[model_a][c].get(metric, np.nan) for c in cases], float)
        b = np.array([by_model[model_b][c].get(metric, np.nan) for c in cases], float)
        keep = np.isfinite(a) & np.isfinite(b)
        differences[metric] = _finite(np.mean(b[keep] - a[keep])) if keep.any() else None
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")  # constant differences -> NaN p-value, reported as null
            p = stats.ttest_rel(b[keep], a[keep]).pvalue if keep.sum() >= 2 else float("nan")
        p_values[metric] = _finite(p)
    return {"models": [model_a, model_b], "num_pairs": len(cases), "p_values": p_values,
            "mean_difference": differences}


def empty_structures(rows: Sequence[dict]) -> dict[str, dict[str, int]]:
    """{structure: {"empty": n, "cases": N}} for every structure empty in n of the N cases of the first
    model's rows (0 < n): an empty mask has no reference Dmean (NaN, `flaxdose.metrics.dvh_metrics`),
    and its DVH metrics' statistics average the other N - n cases."""
    cases = list(next(iter(_by_model(rows).values()), {}).values())
    suffix = " Dmean ref_gy"
    structures = [k.removesuffix(suffix) for k in dict.fromkeys(k for r in cases for k in r) if k.endswith(suffix)]
    out = {}
    for name in structures:
        empty = sum(1 for r in cases if not math.isfinite(float(r.get(name + suffix, math.nan))))
        if empty:
            out[name] = {"empty": empty, "cases": len(cases)}
    return out


def summarize(rows: Sequence[dict]) -> dict:
    """Per-model statistics of every metric, paired t-tests of each model against the first, and the
    structures empty in some cases (`empty_structures`)."""
    by_model = _by_model(rows)
    models = list(by_model)
    columns = metric_columns(rows)
    summary = {
        "models": models,
        "num_cases": {m: len(cases) for m, cases in by_model.items()},
        "metrics": {m: {k: describe([r.get(k, np.nan) for r in cases.values()]) for k in columns}
                    for m, cases in by_model.items()},
        "paired_ttests": [paired_ttest(rows, models[0], other) for other in models[1:]],
        "empty_structures": empty_structures(rows),
    }
    return summary


def dice_mean(summary: dict, model: str) -> float:
    """A model's mean isodose Dice: over the levels 10..100 % and the cases (NaN if none)."""
    mean = summary["metrics"][model]["dice_mean"]["mean"]
    return float("nan") if mean is None else float(mean)


def level_means(summary: dict, model: str) -> dict[int, float]:
    """{level in %: mean Dice over the cases} of a model, the points of the paper's Fig. 3 curve."""
    return {round(level * 100): summary["metrics"][model][f"dice_{round(level * 100)}"]["mean"] for level in ISODOSE_LEVELS}


def level_range(summary: dict, model: str) -> tuple[float, float]:
    """(lowest, highest) per-level mean Dice of a model: the paper's "mean DSC 0.81-0.94"."""
    values = [v for v in level_means(summary, model).values() if v is not None]
    return (min(values), max(values)) if values else (float("nan"), float("nan"))


def ttest(summary: dict, model_a: str, model_b: str) -> dict:
    """The summary's paired t-test of `model_b` against `model_a` (see `paired_ttest`).

    Raises FlaxdoseError when the summary has no such test (tests are against the first model).
    """
    for test in summary["paired_ttests"]:
        if test["models"] == [model_a, model_b]:
            return test
    raise FlaxdoseError(f"no paired t-test of {model_b!r} against {model_a!r}; the summary tests every model "
                        f"against its first model, {summary['models'][0]!r}")


def mean_dvh_error_pct(summary: dict, model: str) -> float | None:
    """Mean absolute DVH-metric error (% of prescription) of a model, averaged over the metrics."""
    means = [v["mean"] for k, v in summary["metrics"][model].items() if k.endswith(" abs_err_pct") and v["mean"] is not None]
    return float(np.mean(means)) if means else None


# ---------------------------------------------------------------- report
def write_csv(rows: Sequence[dict], path: str | Path) -> Path:
    fields = list(ID_COLUMNS) + [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ID_COLUMNS]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="nan")
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def markdown_table(summary: dict) -> str:
    """Dice per level and signed DVH errors (% of Rx), mean ± SD per model, and a p-value column per
    paired t-test (each model against the first)."""
    models, tests = summary["models"], summary["paired_ttests"]
    shown = [k for k in next(iter(summary["metrics"].values())) if k in DICE_KEYS or k.endswith(" err_pct")]
    fmt = lambda s: "n/a" if s["mean"] is None else f"{s['mean']:.3f} ± {s['sd']:.3f}" if s["sd"] is not None \
        else f"{s['mean']:.3f}"
    head = ["metric", *models] + [f"p ({t['models'][1]} vs {t['models'][0]})" for t in tests]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in shown:
        cells = [k, *(fmt(summary["metrics"][m][k]) for m in models)]
        for test in tests:
            p = test["p_values"].get(k)
            cells.append("n/a" if p is None else f"{p:.3g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_notes(summary: dict) -> list[str]:
    """Lines saying which structures were empty in some cases and which cases failed (none: [])."""
    notes = []
    for name, count in summary.get("empty_structures", {}).items():
        n, total = count["empty"], count["cases"]
        rest = f"its DVH metrics average the other {total - n}" if n < total else "it has no DVH metrics"
        notes.append(f"- {name}: empty in {n} of {total} cases; {rest}.")
    for case_id, why in summary.get("failed_cases", {}).items():
        notes.append(f"- case {case_id} not evaluated: {why}")
    return notes


FIGURE_CAPTIONS = {"dice.png": "Isodose Dice per dose level, mean over the cases, per model",
                   "dvh_errors.png": "DVH-metric errors per structure (prediction − reference, % of prescription)"}


def figure_lines(figures: Sequence[str]) -> list[str]:
    """Markdown that shows each figure of the report folder in place (links relative to report.md, so the
    folder can be moved or shared whole), each under its caption."""
    from urllib.parse import quote

    lines = []
    for name in figures:
        caption = FIGURE_CAPTIONS.get(name) or (
            f"Dose slices and DVHs of case {name.removeprefix('case_').removesuffix('.png')} (reference and each "
            "model's prediction)" if name.startswith("case_") else name)
        lines += [f"**{caption}**\n", f"![{caption}]({quote(name)})\n"]
    return lines


def _markdown(summary: dict, split_note: str) -> str:
    notes = report_notes(summary)
    figures = summary.get("figures") or []
    return "\n".join([f"# Dose-prediction evaluation\n\n{split_note}\n",
                      "Dice: isodose volumes at % of prescription. DVH errors: prediction − reference, % of prescription.",
                      "Values: mean ± SD over cases.\n", markdown_table(summary),
                      *(["\n## Notes\n", *notes] if notes else []),
                      *(["\n## Figures\n", *figure_lines(figures)] if figures else [])]) + "\n"


def _figures(rows: Sequence[dict], references: Sequence[Case], predictions: Mapping[str, Sequence[Case]],
             folder: Path, example_case: str | None) -> list[str]:
    from flaxdose import plots  # matplotlib only when figures are drawn

    by_model = _by_model(rows)
    dice_keys = [k for k in DICE_KEYS if k != "dice_mean"]
    dice = {m: np.array([[r[k] for k in dice_keys] for r in cases.values()]) for m, cases in by_model.items()}
    plots.dice_curve(dice, [int(k.split("_")[1]) for k in dice_keys], folder / "dice.png")
    errors = {m: {k.removesuffix(" err_pct"): [r[k] for r in cases.values()] for k in next(iter(cases.values()))
                  if k.endswith(" err_pct") and not k.endswith("abs_err_pct")} for m, cases in by_model.items()}
    metrics = list(next(iter(errors.values())))
    targets = set(target_names(references[0].structures))
    files = ["dice.png"]
    if metrics:  # cases with only a body have no DVH metrics
        plots.dvh_error_violins(errors, [k for k in metrics if k.split(" ")[0] in targets],
                                [k for k in metrics if k.split(" ")[0] not in targets], folder / "dvh_errors.png")
        files.append("dvh_errors.png")
    index = _example_index(rows, references, example_case)
    case_png = f"case_{references[index].case_id}.png"
    plots.case_figure(references[index], {m: p[index] for m, p in predictions.items()}, folder / case_png)
    return [*files, case_png]


def _example_index(rows: Sequence[dict], references: Sequence[Case], example_case: str | None) -> int:
    """The requested case, else the one with the median mean Dice of the first model (a typical case)."""
    ids = [c.case_id for c in references]
    if example_case is not None:
        if example_case not in ids:
            raise FlaxdoseError(f"example case {example_case!r} is not among the evaluated cases {ids[:10]}; "
                                "choose one of them (--case)")
        return ids.index(example_case)
    first = _by_model(rows)[rows[0]["model"]]
    scores = np.array([first[i]["dice_mean"] for i in ids])
    return int(np.argsort(scores)[(len(scores) - 1) // 2])


def write_report(rows: Sequence[dict], out_dir: str | Path, reference_cases: Sequence[Case],
                 predictions: Mapping[str, Sequence[Case]], *, overwrite: bool = False,
                 example_case: str | None = None, note: str = "", failed: Mapping[str, str] | None = None) -> dict:
    """Write cases.csv, summary.json, report.md and the PNG figures into `out_dir` atomically.

    `failed`: {case id: why} of the split's cases that could not be evaluated (`Evaluation.failed`),
    listed in summary.json (``failed_cases``) and report.md. Everything is written into a
    temporary folder next to `out_dir` and renamed at the end, so an interrupted run never
    leaves a half-written report. Returns the summary dict.
    """
    if not rows:
        raise FlaxdoseError("no evaluation rows to report; evaluate at least one case")
    with atomic_folder(out_dir, overwrite) as tmp:
        summary = summarize(rows)
        summary["failed_cases"] = dict(failed or {})
        write_csv(rows, tmp / "cases.csv")
        summary["figures"] = _figures(rows, reference_cases, predictions, tmp, example_case)
        summary["note"] = note
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
        (tmp / "report.md").write_text(_markdown(summary, note))
    return summary
