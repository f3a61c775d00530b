"""Statistics over the scored cases: mean, SD and median per metric and model, paired t-tests
(scipy.stats.ttest_rel, pairs = the same case, NaN pairs dropped), structures empty in some cases.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats

from flaxdose.errors import FlaxdoseError
from flaxdose.evaluation.scoring import DICE_KEYS, ERROR_SUFFIXES
from flaxdose.metrics import ISODOSE_LEVELS


# ---------------------------------------------------------------- statistics
def metric_columns(rows: Sequence[dict]) -> list[str]:
    """Dice columns then every DVH error column, in table order."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return [k for k in columns if k in DICE_KEYS or k.rsplit(" ", 1)[-1] in ERROR_SUFFIXES]


def _finite(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def rows_by_model(rows: Sequence[dict]) -> dict[str, dict[str, dict]]:
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
    by_model = rows_by_model(rows)
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
    cases = list(next(iter(rows_by_model(rows).values()), {}).values())
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
    by_model = rows_by_model(rows)
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


