"""A sweep's report: results.csv (one row per run), case_results.csv (one row per run and test case),
summary.md and the learning-curve figure.

Besides the mean-over-seeds tables, summary.md answers two questions per curve from the per-case
Dice that runs record (result.json ``case_dice``; case_results.csv in a report folder):

- Does the curve rise? `rise_test`: the Dice of the most-plans runs minus the fewest-plans runs,
  paired per test case (its seeds averaged); the mean difference with its t interval and the
  two-sided Wilcoxon signed-rank p.
- How many plans to expect? `fewest_plans` (the fewest plans whose mean Dice is within
  ENOUGH_DICE_MARGIN of the curve's best) with a percentile-bootstrap interval over the test
  cases (`bootstrap_plans`).

Results written before runs recorded per-case Dice have neither; the report says so.
"""

from __future__ import annotations

import csv
import io
import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import stats

from flaxdose import provenance
from flaxdose.errors import FlaxdoseError
from flaxdose.io import atomic_write_text
from flaxdose.run import Run

COLUMNS = ("run_id", "style", "n_train", "mode", "seed", "learning_rate", "steps", "n_test", "dice_mean", "dice_sd",
           "dvh_abs_err_pct", "final_loss", "wave_size", "wave_layout", "wave_wall_s")
METRICS = {"dice_mean": "mean isodose Dice", "dvh_abs_err_pct": "DVH error (% of Rx)"}
CASE_COLUMNS = ("run_id", "style", "n_train", "mode", "seed", "learning_rate", "case_id", "dice")
RESULTS, CASE_RESULTS, BASELINES = "results.csv", "case_results.csv", "baselines.json"
REQUIRED = ("run_id", "style", "n_train", "mode", "seed", "learning_rate", "dice_mean")  # what the curves need
REWRITE = "python -m flaxdose.launch.sweep --config=... --workdir=SWEEP --stage=report"
INTS = ("n_train", "seed", "steps", "n_test", "wave_size")
FLOATS = ("learning_rate", "dice_mean", "dice_sd", "dvh_abs_err_pct", "final_loss", "wave_wall_s")
# A clinic "needs" the fewest plans whose mean Dice is within this of the curve's best.
ENOUGH_DICE_MARGIN = 0.01
ALPHA = 0.05  # the rise test's significance level
BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE = 2000, 0, 0.95
NO_CASE_DATA = "these results have no per-case Dice (written before runs recorded `case_dice`)"


def read_baselines(root: str | Path) -> list[dict]:
    """The rows of a sweep folder's unadapted baselines (``baseline/<style>.json``), in style order."""
    return [json.loads(p.read_text()) for p in sorted((Path(root) / "baseline").glob("*.json"))]


def read_results(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(run rows, baselines) of a sweep folder, a report folder or a results.csv.

    A sweep folder (``runs/<id>/result.json``, ``baseline/<style>.json``): the finished runs' result.json
    rows in folder order (with ``case_dice`` where the run recorded it) and `read_baselines`. A report
    folder or a results.csv: its rows with the numbers parsed (`read_results_csv`) and the baselines of
    the baselines.json beside it (`write` puts them there); none for reports written before that file.

    Raises FlaxdoseError when the path holds neither, or for a malformed table.
    """
    path = Path(path)
    if path.is_dir() and (path / "runs").is_dir():
        runs = sorted(d for d in (path / "runs").iterdir() if d.is_dir())
        return [r for r in (Run(d).result() for d in runs) if r is not None], read_baselines(path)
    csv_path = path / RESULTS if path.is_dir() else path
    if not csv_path.is_file():
        raise FlaxdoseError(f"{path} is neither a sweep folder (runs/, baseline/) nor a sweep's results.csv "
                            "(or the report folder holding it)")
    return read_results_csv(csv_path), read_baselines_json(csv_path.parent / BASELINES)


def read_baselines_json(path: str | Path) -> list[dict]:
    """The baselines a report folder's baselines.json lists (`write`); [] when there is no such file.

    Raises FlaxdoseError when the file is not a JSON list of objects with a style.
    """
    path = Path(path)
    if not path.is_file():
        return []
    try:
        baselines = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise FlaxdoseError(f"{path} is not JSON ({e}); rewrite the report with {REWRITE}") from None
    if not isinstance(baselines, list) or not all(isinstance(b, dict) and "style" in b for b in baselines):
        raise FlaxdoseError(f"{path} is not a list of baselines (objects with a style); rewrite the report with {REWRITE}")
    return baselines


def _number(text: str | None, kind: type, where: str, column: str, hint: str = "is this a sweep's results.csv?"):
    if text is None or text.strip() == "":
        return None
    try:
        return kind(float(text)) if kind is int else float(text)
    except ValueError:
        raise FlaxdoseError(f"{where}: column {column!r} holds {text!r}, not a number; {hint}") from None


def _read_csv(path: Path, columns: Sequence[str], not_text: str, lacking: str) -> list[dict]:
    """The rows of the CSV table at `path`; FlaxdoseError "... is not a CSV text file (...); `not_text`" for a file
    that is not CSV text, "... lacks the column(s) [...]`lacking`" when one of `columns` is missing."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields, rows = reader.fieldnames or [], list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise FlaxdoseError(f"{path} is not a CSV text file ({e}); {not_text}") from None
    missing = [c for c in columns if c not in fields]
    if missing:
        raise FlaxdoseError(f"{path} lacks the column(s) {missing}{lacking}")
    return rows


def read_results_csv(path: str | Path) -> list[dict]:
    """The rows of a sweep's results.csv (numbers parsed; empty cells None), each with ``case_dice``
    ({case id: Dice}) from the case_results.csv beside it when that file exists and lists the run.

    Raises FlaxdoseError for a file that is not CSV text, lacks a REQUIRED column or has no rows, for a
    repeated run_id, for a cell that should be a number and is not, and for a case_results.csv that does
    not match results.csv (`attach_case_results`).
    """
    path = Path(path)
    fix = f"rewrite it from the sweep folder with {REWRITE}"
    rows = _read_csv(path, REQUIRED, f"is this a sweep's results.csv? {fix}", f" of a sweep's results.csv; {fix}")
    if not rows:
        raise FlaxdoseError(f"{path} lists no runs (it is empty or only a header); {fix} once runs have finished")
    out, seen = [], {}
    for i, row in enumerate(rows, 2):
        if row["run_id"] in seen:
            raise FlaxdoseError(f"{path} line {i} repeats run {row['run_id']!r} of line {seen[row['run_id']]} "
                                f"(it would count twice); {fix}")
        seen[row["run_id"]] = i
        parsed = dict(row)
        for kinds, kind in ((INTS, int), (FLOATS, float)):
            parsed.update({k: _number(row[k], kind, f"{path} line {i}", k, f"is this a sweep's results.csv? {fix}")
                           for k in kinds if k in row})
        out.append(parsed)
    if (path.parent / CASE_RESULTS).is_file():
        attach_case_results(out, path.parent / CASE_RESULTS)
    return out


def attach_case_results(rows: Sequence[dict], path: str | Path) -> None:
    """Set ``row["case_dice"]`` ({case id: Dice}) on each row of `rows` (results.csv rows) that case_results.csv
    at `path` lists; rows it does not list are left without (no per-case data).

    Raises FlaxdoseError when the file lacks a column, when it names a run that results.csv lacks or
    describes a run differently (the two files are from different reports), for a repeated
    (run, case) and for a Dice that is not a number.
    """
    path = Path(path)
    fix = (f"write both files again from the sweep folder (python -m flaxdose.launch.sweep --config=... "
           f"--workdir=SWEEP --stage=report), or delete {path} to use results.csv without per-case Dice")
    lines = _read_csv(path, CASE_COLUMNS, fix, f"; {fix}")
    hint = f"is this a sweep's case_results.csv? {fix}"
    by_id = {r.get("run_id"): r for r in rows}
    found: dict[str, dict[str, float]] = {}
    for i, line in enumerate(lines, 2):
        where = f"{path} line {i}"
        run = by_id.get(line["run_id"])
        if run is None:
            raise FlaxdoseError(f"{where} refers to run {line['run_id']!r}, which {path.parent / RESULTS} does not list; "
                                f"{fix}")
        for key in ("style", "n_train", "mode", "seed", "learning_rate"):
            kind = int if key in INTS else float if key in FLOATS else str
            value = line[key] if kind is str else _number(line[key], kind, where, key, hint)
            if key in run and run[key] != value:
                raise FlaxdoseError(f"{where} gives run {line['run_id']!r} {key} {value!r}, results.csv {run[key]!r}; {fix}")
        cases = found.setdefault(line["run_id"], {})
        if line["case_id"] in cases:
            raise FlaxdoseError(f"{where} repeats case {line['case_id']!r} of run {line['run_id']!r}; {fix}")
        cases[line["case_id"]] = _number(line["dice"], float, where, "dice", hint)
    for run_id, cases in found.items():
        by_id[run_id]["case_dice"] = {c: np.nan if d is None else d for c, d in cases.items()}


def case_rows(rows: Sequence[dict]) -> list[dict]:
    """case_results.csv's rows: one per (run with ``case_dice``, test case), in run then case order."""
    return [{**{k: r.get(k) for k in CASE_COLUMNS[:-2]}, "case_id": case, "dice": dice}
            for r in rows for case, dice in (r.get("case_dice") or {}).items()]


def curve_name(row: dict, several_rates: bool) -> str:
    """A curve's label: the mode, plus the learning rate when its mode was run at several."""
    return f"{row['mode']} lr {row['learning_rate']:g}" if several_rates else row["mode"]


def _grouped(rows: Sequence[dict], value, keep=lambda r: True) -> dict:
    """style -> curve (`curve_name`) -> n plans -> [value(row)] over the `keep` rows; curve names come from all rows."""
    rates: dict[str, set] = {}
    for r in rows:
        rates.setdefault(r["mode"], set()).add(r["learning_rate"])
    out: dict = {}
    for r in rows:
        if keep(r):
            name = curve_name(r, len(rates[r["mode"]]) > 1)
            out.setdefault(r["style"], {}).setdefault(name, {}).setdefault(int(r["n_train"]), []).append(value(r))
    return out


def curves(rows: Sequence[dict], metric: str) -> dict[str, dict[str, dict[int, list[float]]]]:
    """style -> curve (mode, and learning rate when the grid has several) -> n plans -> values over seeds."""
    return _grouped(rows, lambda r: np.nan if r[metric] is None else r[metric])


def case_curves(rows: Sequence[dict]) -> dict[str, dict[str, dict[int, list[tuple]]]]:
    """Like `curves`, of the runs that recorded per-case Dice: n plans -> [(seed, {case id: Dice})] over seeds.

    Styles and curves without such runs are absent (results written before runs recorded ``case_dice``).
    """
    return _grouped(rows, lambda r: (r.get("seed"), r["case_dice"]), keep=lambda r: bool(r.get("case_dice")))


def _cell(values: Sequence[float]) -> str:
    v = np.asarray(values, float)
    sd = f" ± {np.nanstd(v, ddof=1):.3f}" if np.isfinite(v).sum() > 1 else ""
    return f"{np.nanmean(v):.3f}{sd} ({len(v)})"


def fewest_plans(by_n: dict[int, list[float]], margin: float = ENOUGH_DICE_MARGIN) -> tuple[int, float, float] | None:
    """(fewest plans n whose mean Dice over seeds is within `margin` of the curve's best, its mean Dice, the best).

    Plan counts whose runs have no Dice (NaN) are left out; None when none has one.
    """
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mean of all-NaN values: NaN, left out below
        means = {n: float(np.nanmean(v)) for n, v in by_n.items()}
    means = {n: m for n, m in means.items() if np.isfinite(m)}
    if not means:
        return None
    best = max(means.values())
    enough = min(n for n, m in means.items() if m >= best - margin)
    return enough, means[enough], best


def _per_case(runs: Sequence[tuple]) -> dict[tuple, float]:
    """{(seed, case id): Dice} of one point's runs [(seed, {case: Dice})]; runs sharing a seed are averaged per case."""
    values: dict[tuple, list[float]] = {}
    for seed, cases in runs:
        for case, dice in cases.items():
            values.setdefault((seed, case), []).append(dice)
    return {k: float(np.mean(v)) for k, v in values.items()}


def rise_test(by_n_cases: dict[int, list[tuple]], alpha: float = ALPHA) -> dict | None:
    """Does the curve rise from its fewest to its most plans? A paired test over the test cases.

    by_n_cases: n plans -> [(seed, {case id: Dice})] (`case_curves`). A test case's difference d is
    Dice(most plans) - Dice(fewest plans) averaged over the seeds that scored it at both ends (finite
    Dice); the seeds of one case are averaged, not counted as pairs of their own, because they share
    the case. Returns {"fewest", "most", "n_pairs" (test cases with a d), "mean" (of d), "ci" ((low,
    high): the 95 % t interval mean ± t(0.975, n-1) SD / sqrt(n); None for fewer than 2 cases), "p"
    (two-sided Wilcoxon signed-rank, `scipy.stats.wilcoxon`; 1.0 when every d is 0, None without
    cases), "verdict" ("rises" when mean > 0 and p < alpha, else "no significant rise")}; None when
    fewer than two plan counts have per-case Dice.
    """
    ns = sorted(n for n, runs in by_n_cases.items() if runs)
    if len(ns) < 2:
        return None
    low, high = _per_case(by_n_cases[ns[0]]), _per_case(by_n_cases[ns[-1]])
    per_case: dict = {}
    for seed, case in set(low) & set(high):
        if np.isfinite(high[seed, case]) and np.isfinite(low[seed, case]):
            per_case.setdefault(case, []).append(high[seed, case] - low[seed, case])
    d = np.asarray([np.mean(per_case[c]) for c in sorted(per_case, key=str)], float)
    out = {"fewest": ns[0], "most": ns[-1], "n_pairs": len(d), "mean": float(d.mean()) if len(d) else None,
           "ci": None, "p": None, "verdict": "no significant rise"}
    if len(d) >= 2:
        half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
        out["ci"] = (out["mean"] - half, out["mean"] + half)
    if len(d):
        out["p"] = 1.0 if not np.any(d != 0) else float(stats.wilcoxon(d).pvalue)
        if out["mean"] > 0 and out["p"] < alpha:
            out["verdict"] = "rises"
    return out


def bootstrap_plans(by_n_cases: dict[int, list[tuple]], margin: float = ENOUGH_DICE_MARGIN,
                    resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                    confidence: float = CONFIDENCE) -> dict | None:
    """The plans to expect (`fewest_plans`) with its percentile-bootstrap interval over the test cases.

    Percentile bootstrap (Efron & Tibshirani, An Introduction to the Bootstrap, 1993, ch. 13): each
    of `resamples` resamples draws the curve's test cases with replacement (numpy
    ``default_rng(seed)``: deterministic), the same drawn cases for every point of the curve; a point's
    mean Dice is the mean over the drawn cases of the case's Dice averaged over the point's runs
    (seeds), which on the original cases is the runs' mean Dice when every run scored every case;
    `fewest_plans` then gives the resample's plan count. The interval is the (1 - confidence) / 2
    and (1 + confidence) / 2 quantiles of those counts (``method="inverted_cdf"``: always plan counts
    of the grid). by_n_cases: n plans -> [(seed, {case id: Dice})] (`case_curves`).

    Returns {"plans" (the rule on the original cases), "low", "high", "n_cases", "resamples"}, or None
    when no point has a finite per-case Dice.
    """
    ns = sorted(n for n, runs in by_n_cases.items() if runs)
    cases = sorted({c for n in ns for _, d in by_n_cases[n] for c in d}, key=str)
    if not ns or not cases:
        return None
    table = np.full((len(ns), len(cases)), np.nan)  # per point and case: the Dice averaged over the point's runs
    for i, n in enumerate(ns):
        for j, case in enumerate(cases):
            values = [d[case] for _, d in by_n_cases[n] if case in d and np.isfinite(d[case])]
            table[i, j] = np.mean(values) if values else np.nan
    draws = np.random.default_rng(seed).integers(0, len(cases), size=(resamples, len(cases)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a point with no finite case among the drawn: NaN, left out
        means = np.nanmean(table[:, draws], axis=2)  # (points, resamples)
        sample = np.nanmean(table, axis=1)
    point = fewest_plans({n: [m] for n, m in zip(ns, sample)}, margin)
    if point is None:
        return None
    counts = [found[0] for b in range(resamples)
              if (found := fewest_plans({n: [m] for n, m in zip(ns, means[:, b])}, margin)) is not None]
    low, high = np.quantile(counts, [(1 - confidence) / 2, (1 + confidence) / 2], method="inverted_cdf")
    return {"plans": point[0], "low": int(low), "high": int(high), "n_cases": len(cases), "resamples": len(counts)}


def plans_to_expect(by_n: dict[int, list[float]], by_n_cases: dict[int, list[tuple]] | None,
                    margin: float = ENOUGH_DICE_MARGIN) -> dict | None:
    """The plans to expect on a curve: `fewest_plans` of the runs' mean Dice, with `bootstrap_plans`'s interval.

    Returns {"plans", "dice", "best", "ci" ((low, high) or None), "no_ci" (why there is none, or None)};
    None when no plan count has a Dice. No interval when some plan count with a Dice has no per-case
    Dice (results written before runs recorded it).
    """
    found = fewest_plans(by_n, margin)
    if found is None:
        return None
    out = {"plans": found[0], "dice": found[1], "best": found[2], "ci": None, "no_ci": None}
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        scored = sorted(n for n, v in by_n.items() if np.isfinite(np.nanmean(v)))
    lacking = [n for n in scored if not (by_n_cases or {}).get(n)]
    if lacking:
        out["no_ci"] = NO_CASE_DATA if len(lacking) == len(scored) else f"the runs with {lacking} plans have no per-case Dice"
        return out
    boot = bootstrap_plans(by_n_cases, margin)
    if boot is None:
        out["no_ci"] = "no finite per-case Dice"
    else:
        out["ci"] = (boot["low"], boot["high"])
    return out


def plans_text(expect: dict | None) -> str:
    """`plans_to_expect` as text: "N (95 % CI A-B); Dice d, best b", "n/a" without a Dice."""
    if expect is None:
        return "n/a"
    ci = f"95 % CI {expect['ci'][0]}-{expect['ci'][1]}" if expect["ci"] else f"no CI: {expect['no_ci']}"
    return f"{expect['plans']} ({ci}); Dice {expect['dice']:.3f}, best {expect['best']:.3f}"


def rise_table(style_dice: dict, style_cases: dict | None) -> list[str]:
    """Markdown lines: "Does the curve rise?" (`rise_test`) per curve, or one line when there is no per-case Dice."""
    tests = {name: rise_test((style_cases or {}).get(name, {})) for name in style_dice}
    if not any(tests.values()):
        return [f"Does the curve rise? Not tested: {NO_CASE_DATA}."]
    lines = ["Does the curve rise? Dice at the most plans - Dice at the fewest, paired per test case (its seeds averaged); "
             "mean difference [95 % t interval]; two-sided Wilcoxon signed-rank p; \"rises\": mean > 0 and "
             f"p < {ALPHA:g}.", "",
             "| curve | plans | test cases | mean diff [95 % CI] | Wilcoxon p | verdict |", "|---|---|---|---|---|---|"]
    for name, t in tests.items():
        if t is None:
            lines.append(f"| {name} | - | 0 | - | - | not tested: no per-case Dice at two plan counts |")
            continue
        ci = f" [{t['ci'][0]:+.3f}, {t['ci'][1]:+.3f}]" if t["ci"] else ""
        mean = "-" if t["mean"] is None else f"{t['mean']:+.3f}{ci}"
        p = "-" if t["p"] is None else f"{t['p']:.2g}"
        lines.append(f"| {name} | {t['fewest']} → {t['most']} | {t['n_pairs']} | {mean} | {p} | {t['verdict']} |")
    return lines


def metric_table(style: str, style_curves: dict, baseline: dict | None, metric: str) -> list[str]:
    """Markdown table lines: one row per plan count (row 0: the unadapted `baseline`), one column per curve.

    Cells are mean ± SD over seeds (number of runs), "-" where a curve has no run.
    """
    names = list(style_curves)
    ns = sorted({n for c in style_curves.values() for n in c})
    lines = [f"| plans | {' | '.join(names)} |", "|---|" + "---|" * len(names)]
    if baseline is not None and baseline.get(metric) is not None:
        lines.append(f"| 0 (source model) | {' | '.join([f'{baseline[metric]:.3f}'] * len(names))} |")
    for n in ns:
        lines.append(f"| {n} | " + " | ".join(_cell(style_curves[c][n]) if n in style_curves[c] else "-" for c in names) + " |")
    return lines


def summary_markdown(rows: Sequence[dict], baselines: Sequence[dict], n_total: int, config, title: str) -> str:
    """summary.md: provenance, then per style the Dice and DVH-error tables, whether each curve rises
    (`rise_table`) and the plans to expect per curve (`plans_to_expect`).

    rows: result.json dicts of finished runs; baselines: the unadapted source model per style;
    n_total: runs in the grid; config: the sweep config (for the run settings shown).
    """
    by_style = {b["style"]: b for b in baselines}
    dice, dvh, cases = curves(rows, "dice_mean"), curves(rows, "dvh_abs_err_pct"), case_curves(rows)
    # a wave's runs share its wall time: count it once per wave (named by its first run)
    # (rows read back from a results.csv have no "wave" column; hand-made ones may lack the wave timing)
    waves = {r.get("wave", (r.get("wave_layout"), r.get("wave_wall_s"), r["mode"])): r.get("wave_wall_s") or 0.0
             for r in rows}
    lines = [f"# {title or 'Fine-tuning sweep'}", "",
             f"{len(rows)} of {n_total} runs finished; written {time.strftime('%Y-%m-%d %H:%M')} by commit "
             f"`{provenance.commit() or 'unknown'}` on {provenance.machine()}. "
             f"Each run: {config.base.train.steps} steps, batch {config.base.train.batch_size}, patches "
             f"{tuple(config.base.data.patch_shape)}, UNet features {tuple(config.base.model.features)}; "
             f"wave training time (packed runs share it) summed: {sum(waves.values()) / 60:.1f} min.", "",
             "Cells: mean ± SD over seeds (number of runs), on the style's test cases. Row 0: the source model "
             "without adaptation. Modes: `paper` freezes encoder + bottleneck and re-initializes the head; `full`, "
             "`decoder`, `head`, `norm_head` train those parts; `scratch` trains from random initialization (control).",
             "", "![learning curves](learning_curve.png)", ""]
    for style in dice:
        lines += [f"## {style}", "", "Mean isodose Dice (higher is better):", ""]
        lines += metric_table(style, dice[style], by_style.get(style), "dice_mean")
        lines += ["", "Mean absolute DVH-metric error, % of prescription (lower is better):", ""]
        lines += metric_table(style, dvh[style], by_style.get(style), "dvh_abs_err_pct")
        lines += [""] + rise_table(dice[style], cases.get(style))
        lines += ["", f"Plans to expect (the fewest whose mean Dice is within {ENOUGH_DICE_MARGIN} of the best on the "
                  f"curve; 95 % CI: percentile bootstrap over the test cases, {BOOTSTRAP_RESAMPLES} resamples):", ""]
        lines += [f"- {name}: Plans to expect: {plans_text(plans_to_expect(by_n, cases.get(style, {}).get(name)))}"
                  for name, by_n in dice[style].items()] + [""]
    return "\n".join(lines)


def _csv_text(columns: Sequence[str], rows: Sequence[dict], **options) -> str:
    """`rows` as CSV text with a header of `columns` (`options`: csv.DictWriter's)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, **options)
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def write(out_dir: Path, rows: Sequence[dict], baselines: Sequence[dict], n_total: int, config, title: str = "") -> Path:
    """Write results.csv, case_results.csv (`case_rows`; only its header when no run recorded per-case Dice),
    baselines.json (`baselines`: what `read_results` gives back with the rows), learning_curve.png and
    summary.md into `out_dir`; returns summary.md."""
    from flaxdose import plots  # matplotlib only when figures are drawn

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / RESULTS, _csv_text(COLUMNS, rows, extrasaction="ignore", restval=""))
    atomic_write_text(out_dir / CASE_RESULTS, _csv_text(CASE_COLUMNS, case_rows(rows)))
    atomic_write_text(out_dir / BASELINES, json.dumps(list(baselines), indent=1) + "\n")
    if rows:
        panels = {label: curves(rows, key) for key, label in METRICS.items()}
        base = {label: {b["style"]: b.get(key) for b in baselines} for key, label in METRICS.items()}
        plots.learning_curves(panels, base, out_dir / "learning_curve.png")
    return atomic_write_text(out_dir / "summary.md", summary_markdown(rows, baselines, n_total, config, title))
