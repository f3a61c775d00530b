"""A sweep's report: results.csv (one row per run), summary.md and the learning-curve figure."""

from __future__ import annotations

import csv
import io
import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from flaxdose import provenance
from flaxdose.run import Run
from flaxdose.io import atomic_write_text

COLUMNS = ("run_id", "style", "n_train", "mode", "seed", "learning_rate", "steps", "n_test", "dice_mean", "dice_sd",
           "dvh_abs_err_pct", "final_loss", "wave_size", "wave_layout", "wave_wall_s")
METRICS = {"dice_mean": "mean isodose Dice", "dvh_abs_err_pct": "DVH error (% of Rx)"}
# A clinic "needs" the fewest plans whose mean Dice is within this of the curve's best.
ENOUGH_DICE_MARGIN = 0.01


def read_baselines(root: str | Path) -> list[dict]:
    """The rows of a sweep folder's unadapted baselines (``baseline/<style>.json``), in style order."""
    return [json.loads(p.read_text()) for p in sorted((Path(root) / "baseline").glob("*.json"))]


def read_results(root: str | Path) -> tuple[list[dict], list[dict]]:
    """(the finished runs' result.json rows, in folder order; `read_baselines`) of a sweep folder
    (``runs/<id>/result.json``, ``baseline/<style>.json``)."""
    root = Path(root)
    runs = sorted(d for d in (root / "runs").iterdir() if d.is_dir()) if (root / "runs").is_dir() else []
    return [r for r in (Run(d).result() for d in runs) if r is not None], read_baselines(root)


def curve_name(row: dict, several_rates: bool) -> str:
    """A curve's label: the mode, plus the learning rate when its mode was run at several."""
    return f"{row['mode']} lr {row['learning_rate']:g}" if several_rates else row["mode"]


def curves(rows: Sequence[dict], metric: str) -> dict[str, dict[str, dict[int, list[float]]]]:
    """style -> curve (mode, and learning rate when the grid has several) -> n plans -> values over seeds."""
    rates: dict[str, set] = {}
    for r in rows:
        rates.setdefault(r["mode"], set()).add(r["learning_rate"])
    out: dict = {}
    for r in rows:
        name = curve_name(r, len(rates[r["mode"]]) > 1)
        value = np.nan if r[metric] is None else r[metric]
        out.setdefault(r["style"], {}).setdefault(name, {}).setdefault(int(r["n_train"]), []).append(value)
    return out


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


def plans_needed(by_n: dict[int, list[float]]) -> str:
    """`fewest_plans` with ENOUGH_DICE_MARGIN as text; "n/a" when no plan count has a Dice."""
    found = fewest_plans(by_n)
    if found is None:
        return "n/a"
    enough, dice, best = found
    return f"{enough} (Dice {dice:.3f}; best {best:.3f})"


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
    """summary.md: provenance, then per style the Dice and DVH-error tables and the plans needed per curve.

    rows: result.json dicts of finished runs; baselines: the unadapted source model per style;
    n_total: runs in the grid; config: the sweep config (for the run settings shown).
    """
    by_style = {b["style"]: b for b in baselines}
    dice, dvh = curves(rows, "dice_mean"), curves(rows, "dvh_abs_err_pct")
    # a wave's runs share its wall time: count it once per wave (named by its first run)
    waves = {r.get("wave", (r["wave_layout"], r["wave_wall_s"], r["mode"])): r["wave_wall_s"] for r in rows}
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
        lines += ["", f"Plans needed (fewest whose mean Dice is within {ENOUGH_DICE_MARGIN} of the best on the curve):", ""]
        lines += [f"- {name}: {plans_needed(by_n)}" for name, by_n in dice[style].items()] + [""]
    return "\n".join(lines)


def write(out_dir: Path, rows: Sequence[dict], baselines: Sequence[dict], n_total: int, config, title: str = "") -> Path:
    """Write results.csv, learning_curve.png and summary.md into `out_dir`; returns summary.md."""
    from flaxdose import plots  # matplotlib only when figures are drawn

    out_dir.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore", restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "results.csv", text.getvalue())
    if rows:
        panels = {label: curves(rows, key) for key, label in METRICS.items()}
        base = {label: {b["style"]: b.get(key) for b in baselines} for key, label in METRICS.items()}
        plots.learning_curves(panels, base, out_dir / "learning_curve.png")
    return atomic_write_text(out_dir / "summary.md", summary_markdown(rows, baselines, n_total, config, title))
