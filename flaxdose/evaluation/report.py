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
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

import numpy as np

from flaxdose.data.case import Case, target_names
from flaxdose.errors import FlaxdoseError
from flaxdose.evaluation.scoring import DICE_KEYS, ID_COLUMNS
from flaxdose.evaluation.summary import rows_by_model, summarize
from flaxdose.io import atomic_folder


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

    by_model = rows_by_model(rows)
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
    first = rows_by_model(rows)[rows[0]["model"]]
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
    with atomic_folder(out_dir, overwrite, "evaluation") as tmp:
        summary = summarize(rows)
        summary["failed_cases"] = dict(failed or {})
        write_csv(rows, tmp / "cases.csv")
        summary["figures"] = _figures(rows, reference_cases, predictions, tmp, example_case)
        summary["note"] = note
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
        (tmp / "report.md").write_text(_markdown(summary, note))
    return summary
