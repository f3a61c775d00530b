"""Plan QA on synthetic data, where the truth is known: ``python -m flaxdose.launch.planqa_study --workdir DIR``.

Stages (recorded in ``DIR/stages.json``; a rerun skips finished stages, training resumes):
1. data: half-size synthetic plans. Source style: training plans (anatomies 0..), a calibration
   split (anatomies 4000..) and a test split (5000..); internal_c plans of other patients (anatomy
   seed 1) for the worked example and the style check;
2. twins: the worse twins of the test plans, one dataset per kind of `DEGRADATIONS` the scale names
   (rectum or bladder objective weakened 2x, 5x, 10x: the same anatomy re-planned; the PTV
   under-covered by 3 %: the unchanged plan normalized to D95 = 97 % of Rx);
3. members: UNets of the quick start's recipe (`flaxdose.configs.quick.get_config()`: its inputs, loss,
   schedule and model settings, whatever they are when the study runs) on the source training plans,
   seeds 0, 1, 2, one after another;
4. curve: a small fine-tuning sweep (`flaxdose.sweeps.runner`) of member 0 on internal_c: the learning
   curve the style check reads its recommendation from;
5. evaluate: calibrate the bands on the calibration split; on the test split the coverage per
   metric, metric family and level, the false-flag rate (unchanged plans) and, per degradation kind,
   the sensitivity at the default level and the ROC curve over the flag threshold (`flaxdose.planqa.roc`)
   with its area; internal_c checked against the source ensemble; the style check; written to
   ``<results>/planqa_<scale>.md`` with figures, the issue's must-hold checks, wall time, load,
   machine and commit.

Scales: ``cpu`` (the committed report) and ``smoke`` (every stage in a few minutes, numbers
meaningless). The cpu scale's wall time, an estimate (not yet measured with the quick recipe's
members): on an idle 2-core CPU about 3 minutes of data and twins (about 150 plans, 0.5-1 s each),
three members at 2-3 minutes each (1000 steps of batch 2), about 5 minutes of curve and 5 of
evaluation: 20-25 minutes; expect 1.5-2x that beside other jobs. The twins share their unchanged
plan's anatomy, hence its prediction: only the plan differs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
from absl import flags
from flaxdose.configs import quick
from flaxdose.configs._sweep import sweep_config
from flaxdose.launch.paper_study import Stages, results_folder
from scipy import stats

from flaxdose import cli, evaluation, planqa, plots, provenance
from flaxdose import config as config_lib
from flaxdose.data.case import Dataset, write_dataset
from flaxdose.errors import FlaxdoseError
from flaxdose.io import require_folder
from flaxdose.planqa import assess
from flaxdose.sweeps.runner import Sweep
from flaxdose.synthetic import generator as synth
from flaxdose.synthetic.styles import STYLE_TABLE
from flaxdose.training import trainer

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Degradation:
    """How one kind of worse twin is made from a test anatomy's unchanged (source-style) plan.

    weights: source-style objective weights multiplied by these factors, and the anatomy planned again
    (e.g. {"rectum": 0.1}: the rectum objective 10x weaker; the generator then normalizes the plan to
    PTV D95 = Rx as every plan). coverage: the resulting dose multiplied by this factor: the plan normalized
    to PTV D95 = coverage x Rx (the same fluence at fewer MU; 0.97: PTV D95 exactly 3 % lower, OAR doses
    3 % lower too). effect: the metric key whose change (twin - unchanged plan) the report gives as the
    true size of the degradation; organ: the structure whose flags are the expected ones.
    """

    label: str
    organ: str
    effect: str
    weights: dict = dataclasses.field(default_factory=dict)
    coverage: float = 1.0


# One line per kind of worse twin (kind -> how it is made); a scale's "twins" names the kinds it plans.
DEGRADATIONS = {
    "rectum_x0.5": Degradation("rectum objective / 2", "Rectum", "Rectum Dmean", {"rectum": 0.5}),
    "rectum_x0.2": Degradation("rectum objective / 5", "Rectum", "Rectum Dmean", {"rectum": 0.2}),
    "rectum_x0.1": Degradation("rectum objective / 10", "Rectum", "Rectum Dmean", {"rectum": 0.1}),
    "bladder_x0.5": Degradation("bladder objective / 2", "Bladder", "Bladder Dmean", {"bladder": 0.5}),
    "bladder_x0.2": Degradation("bladder objective / 5", "Bladder", "Bladder Dmean", {"bladder": 0.2}),
    "bladder_x0.1": Degradation("bladder objective / 10", "Bladder", "Bladder Dmean", {"bladder": 0.1}),
    "ptv_cov97": Degradation("PTV under-covered by 3 %", "PTV", "PTV D95", coverage=0.97),
}
# The must-hold: these twins flagged in >= 80 % with <= 10 % of unchanged plans flagged, and band
# coverage within +-3 points of nominal at 90 % and 95 % per metric family.
MUST_FLAG = ("rectum_x0.1", "bladder_x0.1")
MIN_SENSITIVITY, MAX_FALSE_FLAGS, COVERAGE_LEVELS, COVERAGE_POINTS = 0.8, 0.1, (0.9, 0.95), 0.03
RAPIDPLAN_HALF_WIDTH_GY = 3.4  # the anchor: OAR mean-dose band half-width of a RapidPlan model
CPU = dict(
    scale=0.5,
    seed=0,
    source={"train": (0, 20), "calibration": (4000, 12), "test": (synth.TEST_ANATOMY_BASE, 16)},  # (first anatomy, n)
    twins=tuple(DEGRADATIONS),  # kinds of worse twins
    clinic=dict(style="internal_c", seed=1, n_train=8, n_test=4),
    members=(0, 1, 2),
    # Members: quick.get_config() (features (8, 16, 32), 2 convs per level, PTV distance input, PTV weight 10,
    # warm-up/stable/decay, 1000 steps of batch 2, ...) with these overrides only.
    model={},
    data={"val_cases": 2, "workers": 0},
    train={"log_every": 50},
    curve={"n": (2, 4, 8), "steps": 80, "learning_rate": 3e-4, "mode": "full"},
    levels=(0.8, 0.9, 0.95, 0.99),
)
SCALES = {
    "cpu": CPU,
    # A couple of minutes: every stage runs end to end (numbers meaningless).
    "smoke": {**CPU, "source": {"train": (0, 3), "calibration": (4000, 3), "test": (synth.TEST_ANATOMY_BASE, 3)},
              "clinic": dict(style="internal_c", seed=1, n_train=2, n_test=1), "members": (0, 1),
              "model": {"features": (4, 8), "convs_per_level": 1, "groups": 2},
              "data": {"patch_shape": (16, 16, 16), "patch_sigma": (4.0, 4.0, 2.0), "val_cases": 1, "workers": 0},
              "train": {"steps": 4, "batch_size": 2, "log_every": 2, "eval_every": 4, "checkpoint_every": 4},
              "curve": {"n": (1, 2), "steps": 2, "learning_rate": 3e-4, "mode": "full"}},
}
PREDICT_BATCH = 3  # sliding windows per forward pass


# ---------------------------------------------------------------- stages
def plan_dataset(root: Path, style, splits: dict[str, tuple[int, int]], seed: int, scale: float) -> None:
    """Plans of anatomies (first, n) per split in `style` (a name or a Style), unless already written."""
    if (root / "manifest.json").is_file():
        return
    name = style if isinstance(style, str) else style.name
    ids = {split: [synth.case_id(name, seed, i) for i in range(a, a + n)] for split, (a, n) in splits.items()}
    cases = (synth.generate_case(style, seed, i, scale) for a, n in splits.values() for i in range(a, a + n))
    write_dataset(root, cases, ids, extra={"planqa_study": {"style": name, "splits": splits, "seed": seed}})


def twin_style(kind: str):
    """The source style with kind's objective weights multiplied (`DEGRADATIONS`), named source_<kind>."""
    source = STYLE_TABLE["source"]
    weights = {k: getattr(source, k) * f for k, f in DEGRADATIONS[kind].weights.items()}
    return dataclasses.replace(source, name=f"source_{kind}", **weights)


def make_twin(kind: str, plan, seed: int, index: int, scale: float):
    """The worse twin of kind `kind` (`DEGRADATIONS`) of the unchanged source plan `plan` of anatomy (seed, index):
    re-planned when the kind changes weights (else `plan` itself), then its dose x the kind's coverage.
    Case id and style: source_<kind>. Raises FlaxdoseError for an unknown kind."""
    if kind not in DEGRADATIONS:
        raise FlaxdoseError(f"unknown worse-twin kind {kind!r}; choose from {', '.join(DEGRADATIONS)} or add a "
                            "line to DEGRADATIONS")
    d, style = DEGRADATIONS[kind], twin_style(kind)
    twin = synth.generate_case(style, seed, index, scale) if d.weights else plan
    dose = twin.dose if d.coverage == 1.0 else (twin.dose * np.float32(d.coverage)).astype(np.float32)
    return twin.replace(case_id=synth.case_id(style.name, seed, index), style=style.name, dose=dose)


def make_data(workdir: Path, s: dict) -> None:
    plan_dataset(workdir / "data" / "source", "source", s["source"], s["seed"], s["scale"])
    c = s["clinic"]
    synth.ensure_dataset(workdir / "data" / c["style"], c["style"], c["n_train"], c["n_test"], seed=c["seed"],
                         scale=s["scale"], progress=False)


def make_twins(workdir: Path, s: dict) -> None:
    """One dataset per kind of worse twin (data/twins_<kind>, split "test"), unless already written."""
    first, n = s["source"]["test"]
    plans = load(workdir, "source", "test")
    for kind in s["twins"]:
        root = workdir / "data" / f"twins_{kind}"
        if (root / "manifest.json").is_file():
            continue
        cases = [make_twin(kind, plan, s["seed"], first + i, s["scale"]) for i, plan in enumerate(plans)]
        write_dataset(root, cases, {"test": [c.case_id for c in cases]},
                      extra={"planqa_study": {"twin": kind, "of": "source test", "seed": s["seed"]}})


def member_config(workdir: Path, s: dict, seed: int):
    """A member's training config: `quick.get_config()` (the quick start's recipe) with the scale's model, data
    and train overrides, on the source training plans."""
    overrides = {**{f"model.{k}": v for k, v in s["model"].items()}, **{f"data.{k}": v for k, v in s["data"].items()},
                 **{f"train.{k}": v for k, v in s["train"].items()},
                 "data.kind": "folder", "data.path": str(workdir / "data" / "source"), "seed": seed}
    return config_lib.override(quick.get_config(), overrides)


def curve_sweep(workdir: Path, s: dict):
    base = member_config(workdir, s, 0)
    # Fine-tuning at a constant rate: the members' warm-up and decay are for training from scratch.
    base.train.update(steps=s["curve"]["steps"], eval_every=s["curve"]["steps"], checkpoint_every=s["curve"]["steps"],
                      schedule="constant", warmup_steps=0, decay_steps=0)
    c = s["clinic"]
    config = sweep_config(base, targets={c["style"]: tuple(s["curve"]["n"])}, modes=(s["curve"]["mode"],), seeds=(0,),
                          learning_rates=(s["curve"]["learning_rate"],), scratch_learning_rates=(), source_train={},
                          plans={c["style"]: (c["n_train"], c["n_test"])}, scale=s["scale"])
    config.source.path = str(workdir / "members" / "seed0")
    config.data.folders = {c["style"]: str(workdir / "data" / c["style"])}
    return Sweep(config, workdir / "curve")


def train_curve(workdir: Path, s: dict) -> None:
    sweep = curve_sweep(workdir, s)
    sweep.prepare()
    sweep.train()
    sweep.report("Learning curve of the plan-QA study's source model on internal_c")


# ---------------------------------------------------------------- evaluation
def load(workdir: Path, name: str, split: str) -> list:
    dataset = Dataset.open(workdir / "data" / name)
    return [dataset.load(i) for i in dataset.split(split)]


def check_all(plans, predictions, calibration, level, tolerance) -> list[dict]:
    return [r for p, q in zip(plans, predictions) for r in planqa.check_plan(p, q, calibration, level, tolerance)]


def flagged_on(plans: list[dict], organ: str | None = None) -> int:
    """Plans with a flag (on `organ`'s metrics when given)."""
    return sum(any(organ is None or f.startswith(organ + " ") for f in p["flags"]) for p in plans)


def half_widths(rows) -> dict[str, float]:
    """Median band half-width (Gy) per metric key."""
    out: dict[str, list[float]] = {}
    for r in rows:
        if r["position"] != "n/a":
            out.setdefault(planqa.metric_key(r["structure"], r["metric"]), []).append((r["upper_gy"] - r["lower_gy"]) / 2)
    return {k: float(np.median(v)) for k, v in out.items()}


def twin_effect(plans, twins, key: str) -> list[float]:
    """How much metric `key` (Gy) of each worse twin exceeds its unchanged plan's: the true perturbation."""
    return [planqa.case_metrics(t)[key] - planqa.case_metrics(p)[key] for p, t in zip(plans, twins)]


def metric_family(row: dict) -> str:
    """The family a check_plan row's metric belongs to: PTV D95/D98 (flagged below), PTV Dmean/D2 (never flagged),
    OAR Dmean, OAR D2 (flagged above): the groups whose pooled coverage the must-hold checks."""
    if row["role"] == "target":
        return "PTV D95, D98" if row["metric"] in planqa.COVERAGE_METRICS else "PTV Dmean, D2"
    return f"OAR {row['metric']}"


def family_coverage(rows) -> dict[str, dict]:
    """Per metric family: n (plan-metrics with a band) and inside (inside their band)."""
    out: dict[str, dict] = {}
    for r in rows:
        if r["position"] != "n/a":
            e = out.setdefault(metric_family(r), {"n": 0, "inside": 0})
            e["n"] += 1
            e["inside"] += r["position"] == "inside"
    return out


def oar_dmean_half_widths(rows) -> list[float]:
    """Band half-widths (Gy) of every OAR mean dose with a band (every OAR, every plan)."""
    return [(r["upper_gy"] - r["lower_gy"]) / 2 for r in rows
            if r["position"] != "n/a" and r["role"] == "OAR" and r["metric"] == "Dmean"]


def roc_entry(good: dict[str, float], worse: dict[str, float], level: float) -> dict:
    """ROC of the flag score (`planqa.roc`) for worse (label 1) against good plans (label 0): the curve, its
    area, the point of band level `level`, and the best true-positive rate at a false-positive rate <= 10 %."""
    scores = [*good.values(), *worse.values()]
    labels = [0] * len(good) + [1] * len(worse)
    fpr, tpr, thresholds = planqa.roc_curve(scores, labels)
    ok = fpr <= MAX_FALSE_FLAGS
    best = int(np.argmax(np.where(ok, tpr, -1.0)))
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thresholds.tolist(),
            "auc": planqa.roc_auc(scores, labels), "point": list(planqa.operating_point(scores, labels, level)),
            "best_tpr_at_fpr": float(tpr[best]), "best_fpr": float(fpr[best]),
            "best_below_level": planqa.threshold_level(float(thresholds[best]))}


def evaluate(workdir: Path, s: dict, results: Path, scale: str) -> dict:
    """Everything the report states, as numbers (also written to DIR/numbers.json)."""
    ensemble = planqa.Ensemble.load([workdir / "members" / f"seed{k}" for k in s["members"]])
    calibration = planqa.calibrate(ensemble, load(workdir, "source", "calibration"), note="source calibration split",
                                   batch_size=PREDICT_BATCH, progress=True)
    test = load(workdir, "source", "test")
    predictions = ensemble.predict_cases(test, PREDICT_BATCH, progress=True)
    twins = {kind: load(workdir, f"twins_{kind}", "test") for kind in s["twins"]}
    clinic_style = s["clinic"]["style"]
    clinic = load(workdir, clinic_style, "train") + load(workdir, clinic_style, "test")
    clinic_predictions = ensemble.predict_cases(clinic, PREDICT_BATCH, progress=True)
    tolerance = planqa.DEFAULT_TOLERANCE_GY
    out = {"members": list(ensemble.members), "calibration": {k: dataclasses.asdict(v) for k, v in calibration.metrics.items()},
           "n_test": len(test), "levels": {}, "twin_effect_gy": {}, "roc": {}}
    for level in s["levels"]:
        rows = check_all(test, predictions, calibration, level, tolerance)
        entry = {"coverage": planqa.coverage(rows), "family_coverage": family_coverage(rows),
                 "unchanged_flagged": flagged_on(planqa.rank_plans(rows)), "half_width_gy": half_widths(rows),
                 "oar_dmean_half_width_gy": float(np.median(oar_dmean_half_widths(rows))), "twins": {}}
        for kind, cases in twins.items():
            ranked = planqa.rank_plans(check_all(cases, predictions, calibration, level, tolerance))
            flagged = {p["case_id"] for p in ranked if p["flagged"]}
            entry["twins"][kind] = {"flagged": flagged_on(ranked),
                                    "flagged_on_organ": flagged_on(ranked, DEGRADATIONS[kind].organ),
                                    "flags": [c.case_id in flagged for c in cases]}  # in test-plan order
        out["levels"][str(level)] = entry
    level = planqa.DEFAULT_LEVEL
    good = planqa.flag_scores(check_all(test, predictions, calibration, level, tolerance), calibration, tolerance)
    for kind, cases in twins.items():
        out["twin_effect_gy"][kind] = twin_effect(test, cases, DEGRADATIONS[kind].effect)
        worse = planqa.flag_scores(check_all(cases, predictions, calibration, level, tolerance), calibration, tolerance)
        out["roc"][kind] = roc_entry(good, worse, level)
    shown = [k for k in ("rectum_x0.1", "ptv_cov97") if k in twins] or list(twins)[:1]
    qa = {f"worse twin {k}": planqa.run_qa(ensemble, calibration, twins[k], level, predictions=predictions) for k in shown}
    clinic_qa = planqa.run_qa(ensemble, calibration, clinic, level, predictions=clinic_predictions)
    out["clinic_qa"] = {"plans": clinic_qa.plans, "inside_band": planqa.coverage(clinic_qa.rows)}
    out["figures"] = write_figures(results / f"planqa_{scale}", {**qa, clinic_style: clinic_qa})
    out["figures"]["roc"] = write_roc_figure(results / f"planqa_{scale}", out["roc"], scale)
    out["style_check"] = style_check(workdir, s, test, predictions, clinic[: s["clinic"]["n_train"]],
                                     clinic_predictions[: s["clinic"]["n_train"]])
    return out


def write_roc_figure(folder: Path, roc: dict, scale: str) -> str:
    """The ROC curves of every degradation kind, one panel per organ it degrades; the default level starred."""
    panels: dict[str, dict] = {}
    for kind, e in roc.items():
        d = DEGRADATIONS[kind]
        panels.setdefault(d.organ, {})[d.label] = {"fpr": e["fpr"], "tpr": e["tpr"], "auc": e["auc"], "point": e["point"]}
    png = plots.roc_curves(panels, folder / "roc.png", f"Plan QA ({scale} scale): worse twins against unchanged "
                           "test plans, threshold = the band level", f"default level {round(100 * planqa.DEFAULT_LEVEL)} %")
    return f"{folder.name}/{png.name}"


def write_figures(folder: Path, results: dict) -> dict:
    """One figure of the top-ranked flagged plan of each QA run (the folder is emptied first)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    out = {}
    for label, result in results.items():
        top = next((p for p in result.plans if p["flagged"]), None)
        if top is not None:
            rows = [r for r in result.rows if r["case_id"] == top["case_id"]]
            png = folder / f"plan_{top['case_id']}.png"
            plots.plan_bands(result.cases[top["case_id"]], result.predictions[top["case_id"]].member_doses, rows, png)
            out[label] = f"{folder.name}/{png.name}"
    return out


def style_check(workdir: Path, s: dict, own, own_predictions, clinic, clinic_predictions) -> dict:
    """The source ensemble on its own test plans vs the clinic's (internal_c) training plans; the sweep's curve."""
    rows = lambda preds, refs, group: evaluation.evaluate_predictions({group: [p.case for p in preds]}, refs)
    distance = assess.style_distance(rows(own_predictions, own, "own"), rows(clinic_predictions, clinic, "clinic"))
    curve = assess.learning_curve(workdir / "curve", s["clinic"]["style"], s["curve"]["mode"])
    return {"distance": distance, "recommendation": assess.recommend(distance, curve),
            "curve": {"dice": {str(n): v for n, v in curve.dice.items()}, "baseline_dice": curve.baseline_dice}}


# ---------------------------------------------------------------- report
def binomial_ci(k: int, n: int) -> str:
    ci = stats.binomtest(k, n).proportion_ci(0.95)
    return f"{ci.low:.2f}-{ci.high:.2f}"


def coverage_table(numbers: dict, levels) -> list[str]:
    head = [f"{round(100 * float(level))} %" for level in levels]
    default = numbers["levels"][str(planqa.DEFAULT_LEVEL)]["half_width_gy"]
    lines = ["| metric | " + " | ".join(head) + f" | median half-width at {round(100 * planqa.DEFAULT_LEVEL)} % (Gy) |",
             "|---|" + "---|" * (len(head) + 1)]
    metrics = list(numbers["levels"][str(levels[0])]["coverage"])
    for key in metrics:
        cells = [numbers["levels"][str(level)]["coverage"][key] for level in levels]
        lines.append(f"| {key} | " + " | ".join(f"{c['inside']}/{c['n']}" for c in cells) + f" | {default[key]:.1f} |")
    pooled = []
    for level in levels:
        cov = numbers["levels"][str(level)]["coverage"].values()
        k, n = sum(c["inside"] for c in cov), sum(c["n"] for c in cov)
        pooled.append(f"**{k / n:.2f}** ({binomial_ci(k, n)})")
    lines.append("| all metrics pooled (95 % CI, cases correlated) | " + " | ".join(pooled) + " | |")
    return lines


def pct(level) -> str:
    return f"{100 * float(level):g} %"


def family_table(numbers: dict, levels) -> list[str]:
    """Pooled coverage per metric family and level; the must-hold levels get the +-3-point check."""
    families = list(numbers["levels"][str(levels[0])]["family_coverage"])
    lines = ["| metric family | " + " | ".join(pct(level) for level in levels) + " |", "|---|" + "---|" * len(levels)]
    for family in families:
        cells = []
        for level in levels:
            e = numbers["levels"][str(level)]["family_coverage"][family]
            cell = f"{e['inside']}/{e['n']} = {e['inside'] / e['n']:.2f} ({binomial_ci(e['inside'], e['n'])})"
            if float(level) in COVERAGE_LEVELS:
                cell += ": " + ("within" if coverage_ok(e, level) else "**outside**") + " ± 3 points"
            cells.append(cell)
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    return lines


def coverage_ok(entry: dict, level) -> bool:
    return abs(entry["inside"] / entry["n"] - float(level)) <= COVERAGE_POINTS + 1e-9


def flag_table(numbers: dict, levels, twins) -> list[str]:
    """Plans flagged per level: the unchanged plans (false flags) and each kind of worse twin (sensitivity)."""
    n = numbers["n_test"]
    lines = ["| plans | " + " | ".join(pct(level) for level in levels) + " |", "|---|" + "---|" * len(levels)]
    cells = [f"{numbers['levels'][str(level)]['unchanged_flagged']}/{n}" for level in levels]
    lines.append("| unchanged (false flags) | " + " | ".join(cells) + " |")
    for kind in twins:
        es = [numbers["levels"][str(level)]["twins"][kind] for level in levels]
        organ = DEGRADATIONS[kind].organ
        lines.append(f"| {DEGRADATIONS[kind].label} (on the {organ if organ == 'PTV' else organ.lower()}) | "
                     + " | ".join(f"{e['flagged']}/{n} ({e['flagged_on_organ']})" for e in es) + " |")
    return lines


def degradation_table(numbers: dict, twins) -> list[str]:
    """Per kind: the true change, sensitivity and false-flag rate at the default level, AUC, best TPR at FPR <= 10 %."""
    n, level = numbers["n_test"], str(planqa.DEFAULT_LEVEL)
    false = numbers["levels"][level]["unchanged_flagged"]
    lines = [f"| worse twin | true change (twin - plan), mean (range) | sensitivity at {pct(level)} | false-flag rate "
             f"at {pct(level)} | AUC | best sensitivity at false-flag rate <= {MAX_FALSE_FLAGS:g} (level) |",
             "|---|---|---|---|---|---|"]
    for kind in twins:
        d, e, roc = DEGRADATIONS[kind], numbers["levels"][level]["twins"][kind], numbers["roc"][kind]
        effect = np.asarray(numbers["twin_effect_gy"][kind])
        best_level = roc["best_below_level"]
        where = "nothing flagged" if best_level is None or best_level >= 1 else f"below {100 * best_level:.1f} %"
        lines.append(f"| {d.label} | {d.effect} {effect.mean():+.1f} Gy ({effect.min():+.1f} to {effect.max():+.1f}) | "
                     f"{e['flagged']}/{n} = {e['flagged'] / n:.2f} | {false}/{n} = {false / n:.2f} | {roc['auc']:.2f} | "
                     f"{roc['best_tpr_at_fpr']:.2f} at {roc['best_fpr']:.2f} ({where}) |")
    return lines


def must_hold_lines(numbers: dict, s: dict) -> list[str]:
    """The issue's must-hold criteria, each stated as met or not met from the numbers."""
    n, default = numbers["n_test"], numbers["levels"][str(planqa.DEFAULT_LEVEL)]
    false = default["unchanged_flagged"] / n
    verdict = lambda ok: "**met**" if ok else "**not met**"
    lines = [f"At the default level ({pct(planqa.DEFAULT_LEVEL)}), on {n} held-out test plans and their twins:", ""]
    for kind in MUST_FLAG:
        if kind not in s["twins"]:
            lines.append(f"- {DEGRADATIONS[kind].label}: not planned at this scale.")
            continue
        e = default["twins"][kind]
        ok = e["flagged"] / n >= MIN_SENSITIVITY and false <= MAX_FALSE_FLAGS
        roc = numbers["roc"][kind]
        lines.append(f"- >= {pct(MIN_SENSITIVITY)} of the {DEGRADATIONS[kind].label} twins flagged with <= "
                     f"{pct(MAX_FALSE_FLAGS)} of unchanged plans flagged: {e['flagged']}/{n} = {e['flagged'] / n:.2f} "
                     f"flagged, false-flag rate {false:.2f}: {verdict(ok)}. (At any level: the best sensitivity "
                     f"with a false-flag rate <= {MAX_FALSE_FLAGS:g} on its ROC curve is {roc['best_tpr_at_fpr']:.2f}: "
                     f"{'met' if roc['best_tpr_at_fpr'] >= MIN_SENSITIVITY else 'not met'} at another level.)")
    for level in COVERAGE_LEVELS:
        if str(level) not in numbers["levels"]:
            lines.append(f"- coverage at {pct(level)}: not measured at this scale.")
            continue
        fam = numbers["levels"][str(level)]["family_coverage"]
        off = [f"{k}: {e['inside'] / e['n']:.2f}" for k, e in fam.items() if not coverage_ok(e, level)]
        lines.append(f"- band coverage within ± {100 * COVERAGE_POINTS:g} points of {pct(level)} for every metric "
                     f"family: {verdict(not off)}" + (f" (outside: {'; '.join(off)})." if off else "."))
    return lines


def clinic_table(numbers: dict) -> list[str]:
    inside = numbers["clinic_qa"]["inside_band"]
    n = len(numbers["clinic_qa"]["plans"])
    flags = {}
    for plan in numbers["clinic_qa"]["plans"]:
        for key in plan["flags"]:
            flags[key] = flags.get(key, 0) + 1
    lines = ["| metric | above band | inside | below band | flagged |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['above']}/{n} | {v['inside']}/{n} | {v['below']}/{n} | {flags.get(k, 0)}/{n} |"
              for k, v in inside.items()]
    return lines


def style_lines(check: dict, n_test: int) -> list[str]:
    d, rec = check["distance"], check["recommendation"]
    fmt = lambda e, side: f"{e[side]['mean']:.3f} ± {e[side]['sd']:.3f} (n={e[side]['n']})"
    lines = ["| score | source model on its own test plans | on internal_c plans | difference | Welch p |",
             "|---|---|---|---|---|"]
    for score, label in assess.SCORES.items():
        e = d[score]
        p = "n/a" if e["p"] is None else f"{e['p']:.2g}"
        lines.append(f"| {label} | {fmt(e, 'own')} | {fmt(e, 'clinic')} | {e['difference']:+.3f} | {p} |")
    lines += ["", "Mean signed DVH error, prediction - plan (% of Rx):", "",
              "| metric | own style | internal_c | shift |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['own']:+.2f} | {v['clinic']:+.2f} | {v['shift']:+.2f} |" for k, v in d["metrics"].items()]
    curve = ", ".join(f"{n} plans: {np.mean(v):.3f}" for n, v in check["curve"]["dice"].items())
    lines += ["", f"Learning curve (mean Dice on the {n_test} internal_c test plans; unadapted: "
              f"{check['curve']['baseline_dice']:.3f}): {curve}.", "", f"**Recommendation:** {rec['advice']}"]
    return lines


def member_text(c) -> str:
    """One sentence on a member's training config (`member_config`)."""
    m, d, tr = c.model, c.data, c.train
    inputs = "structure masks" + {True: " + signed distance to the PTV", "per_target": " + a distance per target"}.get(
        d.get("target_distance", False), "") + (" + CT" if d.get("include_ct", False) else "")
    return (f"features {tuple(m.features)}, {m.convs_per_level} conv(s) per level, norm order {m.get('norm_order', '?')}, "
            f"up-sampling init {m.get('upsample_init', '?')}; inputs: {inputs}; PTV weight {tr.get('target_weight', 1.0):g} "
            f"in the MSE; {tr.steps} steps of batch {tr.batch_size}, patches {tuple(d.patch_shape)}, learning rate "
            f"{tr.learning_rate:g} ({tr.get('schedule', 'constant')})")


def write_report(numbers: dict, s: dict, times: dict, loads: dict, results: Path, scale: str, member) -> Path:
    """The study's report, ``results/planqa_<scale>.md``; `member` is member seed 0's config (`member_config`)."""
    levels, n, default = s["levels"], numbers["n_test"], str(planqa.DEFAULT_LEVEL)
    lines = [
        f"# Plan QA with predicted DVH bands, scale `{scale}`", "",
        f"Produced by `python -m flaxdose.launch.planqa_study --scale {scale}` on {time.strftime('%Y-%m-%d')}, commit "
        f"`{provenance.commit() or 'unknown'}`, machine: {provenance.machine()}. "
        f"Wall time {sum(times.values()) / 60:.1f} min, CPU time "
        f"{sum(v[3] for v in loads.values() if len(v) > 3) / 60:.1f} min (stages below), while other sessions shared the machine "
        f"(1-minute load average {min(v[0] for v in loads.values()):.1f}-{max(v[0] for v in loads.values()):.1f} "
        "at the stage boundaries).", "",
        f"Ensemble: {len(s['members'])} UNets of the quick start's recipe (`flaxdose.configs.quick.get_config()`; "
        f"{member_text(member)}), seeds {list(s['members'])}, trained on "
        f"{s['source']['train'][1]} source-style plans (half-size grid). Bands calibrated on "
        f"{s['source']['calibration'][1]} other held-out source plans; every number below is on {n} further test "
        f"plans (other patients) or their twins. Band method: flaxdose/planqa; flags: OAR Dmean/D2 above the band "
        f"or PTV D95/D98 below it by more than {planqa.DEFAULT_TOLERANCE_GY:g} Gy; default level "
        f"{pct(planqa.DEFAULT_LEVEL)}. Guide: [../plan_qa.md](../plan_qa.md).", "",
        "## The issue's must-hold", ""]
    lines += must_hold_lines(numbers, s)
    hw = numbers["levels"][default]["oar_dmean_half_width_gy"]
    hw90 = numbers["levels"].get("0.9", {}).get("oar_dmean_half_width_gy")
    lines += ["", f"Median band half-width of the OAR mean doses (bladder, rectum, femoral heads; every test plan): "
              f"**{hw:.1f} Gy** at {pct(default)}" + (f", {hw90:.1f} Gy at 90 %" if hw90 is not None else "")
              + f"; the issue's anchor: \"{RAPIDPLAN_HALF_WIDTH_GY:g} Gy for a RapidPlan model trained on automated "
              "plans\" (level not stated there).", "",
              "## Band coverage on held-out test plans", "",
              f"Reference plans inside their band, per metric family (pooled over structures and plans; 95 % CI "
              f"Clopper-Pearson, plans correlated), at each nominal (two-sided) level; {n} test plans:", ""]
    lines += family_table(numbers, levels)
    n_family = max(e["n"] for e in numbers["levels"][default]["family_coverage"].values())
    lines += ["", f"The ± {100 * COVERAGE_POINTS:g}-point check is on the point estimate: with {n_family} plan-metrics "
              f"(the largest family) the binomial SD of a coverage alone is {100 * math.sqrt(0.95 * 0.05 / n_family):.1f} "
              f"points at 95 % and {100 * math.sqrt(0.9 * 0.1 / n_family):.1f} at 90 %, and plans are correlated."]
    lines += ["", "Per metric:", ""]
    lines += coverage_table(numbers, levels)
    kinds = "; ".join(f"{d.label}" for k, d in DEGRADATIONS.items() if k in s["twins"])
    lines += ["", "## Worse twins: sensitivity, false flags and ROC", "",
              f"Each test patient's unchanged (source-style) plan and its worse twins: {kinds}. An OAR twin is the "
              "same anatomy planned again with that objective's weight divided (the generator normalizes every plan to "
              "PTV D95 = Rx); the PTV twin is the unchanged plan normalized to PTV D95 = 97 % of Rx (its dose x 0.97: "
              "the same fluence at 3 % fewer MU, so its OAR doses are 3 % lower too). A plan is flagged when any "
              "metric is. The ROC curve sweeps the flag threshold, the band level (`flaxdose.planqa.roc`: a plan's "
              "flag score is the largest level at which it is still flagged): true-positive rate = twins of that kind "
              "flagged, false-positive rate = unchanged test plans flagged; the star is the default level.", ""]
    lines += degradation_table(numbers, s["twins"])
    figures = numbers["figures"]
    if "roc" in figures:
        lines += ["", f"![ROC]({figures['roc']})"]
    lines += ["", "Plans flagged per level (in brackets: flagged on the degraded organ's metrics):", ""]
    lines += flag_table(numbers, levels, s["twins"])
    lines += ["", f"Which twins are caught at {pct(default)}: the true change of flagged and of missed twins:", ""]
    describe = lambda v: f"{v.mean():+.1f} Gy (range {v.min():+.1f} to {v.max():+.1f}, n={v.size})" if v.size else "none"
    for kind in s["twins"]:
        caught = np.asarray(numbers["levels"][default]["twins"][kind]["flags"], bool)
        effect = np.asarray(numbers["twin_effect_gy"][kind])
        lines.append(f"- {DEGRADATIONS[kind].label} ({DEGRADATIONS[kind].effect}): flagged {describe(effect[caught])}; "
                     f"missed {describe(effect[~caught])}.")
    for label, png in figures.items():
        if label.startswith("worse twin "):
            lines += ["", f"Top-ranked flagged twin, {DEGRADATIONS[label.removeprefix('worse twin ')].label}:", "",
                      f"![{label}]({png})"]
    style = s["clinic"]["style"]
    lines += ["", f"## Worked example: {style} plans checked against the source ensemble", "",
              f"{len(numbers['clinic_qa']['plans'])} {style} plans (other patients) at the "
              f"{round(100 * planqa.DEFAULT_LEVEL)} % level. {style} turns the NTO off and trades femoral-head dose for "
              "lower bladder and rectum dose: its femoral heads should lie above the source bands (flagged: a source "
              "planner would spare them), its rectum and bladder below.", ""]
    lines += clinic_table(numbers)
    if style in figures:
        lines += ["", f"![{style}]({figures[style]})"]
    lines += ["", f"## Style check: {style} against the source model", "",
              f"The ensemble's mean dose on the {n} source test plans vs the {s['clinic']['n_train']} {style} training "
              f"plans; the learning curve is a `flaxdose.sweeps.runner` of member seed 0 fine-tuned ({s['curve']['mode']}, "
              f"{s['curve']['steps']} steps, learning rate {s['curve']['learning_rate']:g}, one seed) on "
              f"{list(s['curve']['n'])} of those plans.", ""]
    lines += style_lines(numbers["style_check"], s["clinic"]["n_test"])
    lines += ["", "## Wall time, CPU time and load", "", "| stage | wall s | CPU s (user + system) | load (1 min) at end |",
              "|---|---|---|---|"]
    lines += [f"| {k} | {v} | {loads.get(k, [math.nan] * 4)[3]} | {loads.get(k, [math.nan])[0]:.1f} |"
              for k, v in times.items()]
    cpu = sum(v[3] for v in loads.values() if len(v) > 3)
    lines += ["", f"Total: {sum(times.values()) / 60:.1f} min wall, {cpu / 60:.1f} min CPU."]
    lines += ["", "## Settings", "", "```json", json.dumps(s, indent=1, default=list), "```", ""]
    report = results / f"planqa_{scale}.md"
    report.write_text("\n".join(lines))
    return report


def run_study(workdir: str | Path, results: str | Path, scale: str = "cpu") -> Path:
    s, workdir, results = SCALES[scale], require_folder(workdir, "--workdir"), Path(results)
    workdir.mkdir(parents=True, exist_ok=True)
    stages = Stages(workdir, "planqa_study", study={"scale": scale})
    load_file = workdir / "load.json"
    loads = json.loads(load_file.read_text()) if load_file.is_file() else {}

    def stage(name, fn):
        if name not in stages.done:
            cpu = sum(os.times()[:4])  # user + system seconds of this process and its children
            stages.run(name, fn)
            loads[name] = [*os.getloadavg(), round(sum(os.times()[:4]) - cpu, 1)]
            load_file.write_text(json.dumps(loads))

    unknown = [k for k in s["twins"] if k not in DEGRADATIONS]
    if unknown:
        raise FlaxdoseError(f"unknown worse-twin kinds {unknown}; choose from {', '.join(DEGRADATIONS)}")
    stage("data", lambda: make_data(workdir, s))
    stage("twins", lambda: make_twins(workdir, s))
    for seed in s["members"]:
        stage(f"member seed {seed}", lambda k=seed: trainer.train_and_evaluate(member_config(workdir, s, k),
                                                                               workdir / "members" / f"seed{k}"))
    stage("curve", lambda: train_curve(workdir, s))
    numbers = {}

    def evaluate_stage():
        numbers.update(evaluate(workdir, s, results, scale))
        (workdir / "numbers.json").write_text(json.dumps(assess.finite_or_none(numbers), indent=1, default=float))

    stages.done.pop("evaluate", None)  # always re-evaluated: cheap, and the report needs its numbers
    stage("evaluate", evaluate_stage)
    return write_report(numbers, s, stages.done, loads, results, scale, member_config(workdir, s, s["members"][0]))


def define_flags() -> None:
    """The command's flags (defined only when run as a program, so tests can import the module)."""
    flags.DEFINE_enum("scale", "cpu", sorted(SCALES), "study size (smoke: every stage in a few minutes)")
    flags.DEFINE_string("workdir", None, "study folder (data, models, sweep)")
    flags.DEFINE_string("results", None, "where planqa_cpu.md and its figures go (default: WORKDIR/report; "
                      "--results docs/results updates the committed report)")


def main(argv):
    del argv
    if not FLAGS.workdir:
        raise FlaxdoseError("--workdir is required: the folder for the study's data and models")
    print(f"[planqa_study] report: {run_study(FLAGS.workdir, results_folder(FLAGS.results, FLAGS.workdir), FLAGS.scale)}")


def run():
    """Console script ``flaxdose-planqa-study``."""
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
