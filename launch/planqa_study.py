"""Plan QA on synthetic data, where the truth is known: ``python -m flaxdose.launch.planqa_study --workdir DIR``.

Stages (recorded in ``DIR/stages.json``; a rerun skips finished stages, training resumes):
1. data: half-size synthetic plans. Source style: training plans (anatomies 0..), a calibration
   split (anatomies 4000..) and a test split (5000..); the test anatomies planned again with one
   OAR weight lowered (the worse twins: rectum weight / 10, bladder weight / 10); internal_c
   plans of other patients (anatomy seed 1) for the worked example and the style check;
2. members: small UNets on the source training plans, seeds 0, 1, 2, one after another;
3. curve: a small fine-tuning sweep (`flaxdose.sweeps.runner`) of member 0 on internal_c: the learning
   curve the style check reads its recommendation from;
4. report: calibrate the bands on the calibration split; on the test split the coverage per
   metric and level, the false-flag rate (unchanged plans) and the sensitivity (worse twins);
   internal_c checked against the source ensemble; the style check; written to
   ``<results>/planqa_<scale>.md`` with figures, wall time, load, machine and commit.

Scales: ``cpu`` (the committed report, sized for about 25 minutes on an idle 2-core CPU) and
``smoke`` (every stage in a few minutes). The twins share their unchanged
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
CPU = dict(
    scale=0.5,
    seed=0,
    source={"train": (0, 20), "calibration": (4000, 12), "test": (synth.TEST_ANATOMY_BASE, 16)},  # (first anatomy, n)
    twins={"rectum": 0.1, "bladder": 0.1},  # the OAR weight x this factor
    clinic=dict(style="internal_c", seed=1, n_train=8, n_test=4),
    members=(0, 1, 2),
    model={"features": (8, 16, 32), "convs_per_level": 1, "groups": 4},
    data={"patch_shape": (32, 32, 16), "patch_sigma": (8.0, 8.0, 4.0), "val_cases": 2, "workers": 0},
    train={"steps": 300, "batch_size": 4, "learning_rate": 1e-3, "log_every": 50, "eval_every": 100,
           "checkpoint_every": 100},
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
              "train": {"steps": 4, "batch_size": 2, "learning_rate": 1e-3, "log_every": 2, "eval_every": 4,
                        "checkpoint_every": 4},
              "curve": {"n": (1, 2), "steps": 2, "learning_rate": 3e-4, "mode": "full"}},
}
PREDICT_BATCH = 3  # sliding windows per forward pass
TWIN_ORGAN = {"rectum": "Rectum", "bladder": "Bladder"}


# ---------------------------------------------------------------- stages
def plan_dataset(root: Path, style, splits: dict[str, tuple[int, int]], seed: int, scale: float) -> None:
    """Plans of anatomies (first, n) per split in `style` (a name or a Style), unless already written."""
    if (root / "manifest.json").is_file():
        return
    name = style if isinstance(style, str) else style.name
    ids = {split: [synth.case_id(name, seed, i) for i in range(a, a + n)] for split, (a, n) in splits.items()}
    cases = (synth.generate_case(style, seed, i, scale) for a, n in splits.values() for i in range(a, a + n))
    write_dataset(root, cases, ids, extra={"planqa_study": {"style": name, "splits": splits, "seed": seed}})


def twin_style(organ: str, factor: float):
    source = STYLE_TABLE["source"]
    return dataclasses.replace(source, name=f"source_{organ}_x{factor:g}", **{organ: getattr(source, organ) * factor})


def make_data(workdir: Path, s: dict) -> None:
    plan_dataset(workdir / "data" / "source", "source", s["source"], s["seed"], s["scale"])
    for organ, factor in s["twins"].items():
        plan_dataset(workdir / "data" / f"twins_{organ}", twin_style(organ, factor), {"test": s["source"]["test"]},
                     s["seed"], s["scale"])
    c = s["clinic"]
    synth.ensure_dataset(workdir / "data" / c["style"], c["style"], c["n_train"], c["n_test"], seed=c["seed"],
                         scale=s["scale"], progress=False)


def member_config(workdir: Path, s: dict, seed: int):
    overrides = {**{f"model.{k}": v for k, v in s["model"].items()}, **{f"data.{k}": v for k, v in s["data"].items()},
                 **{f"train.{k}": v for k, v in s["train"].items()},
                 "data.kind": "folder", "data.path": str(workdir / "data" / "source"), "seed": seed}
    return config_lib.override(quick.base_config(), overrides)


def curve_sweep(workdir: Path, s: dict):
    base = member_config(workdir, s, 0)
    base.train.update(steps=s["curve"]["steps"], eval_every=s["curve"]["steps"], checkpoint_every=s["curve"]["steps"])
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


def twin_effect(plans, twins, organ: str) -> list[float]:
    """How much more Dmean (Gy) each worse twin gives `organ` than its unchanged plan: the true perturbation."""
    key = f"{organ} Dmean"
    return [planqa.case_metrics(t)[key] - planqa.case_metrics(p)[key] for p, t in zip(plans, twins)]


def evaluate(workdir: Path, s: dict, results: Path, scale: str) -> dict:
    """Everything the report states, as numbers (also written to DIR/numbers.json)."""
    ensemble = planqa.Ensemble.load([workdir / "members" / f"seed{k}" for k in s["members"]])
    calibration = planqa.calibrate(ensemble, load(workdir, "source", "calibration"), note="source calibration split",
                                   batch_size=PREDICT_BATCH, progress=True)
    test = load(workdir, "source", "test")
    predictions = ensemble.predict_cases(test, PREDICT_BATCH, progress=True)
    twins = {organ: load(workdir, f"twins_{organ}", "test") for organ in s["twins"]}
    clinic_style = s["clinic"]["style"]
    clinic = load(workdir, clinic_style, "train") + load(workdir, clinic_style, "test")
    clinic_predictions = ensemble.predict_cases(clinic, PREDICT_BATCH, progress=True)
    out = {"members": list(ensemble.members), "calibration": {k: dataclasses.asdict(v) for k, v in calibration.metrics.items()},
           "n_test": len(test), "levels": {}, "twin_effect_gy": {}}
    for level in s["levels"]:
        rows = check_all(test, predictions, calibration, level, planqa.DEFAULT_TOLERANCE_GY)
        entry = {"coverage": planqa.coverage(rows), "unchanged_flagged": flagged_on(planqa.rank_plans(rows)),
                 "half_width_gy": half_widths(rows)}
        for organ, cases in twins.items():
            ranked = planqa.rank_plans(check_all(cases, predictions, calibration, level, planqa.DEFAULT_TOLERANCE_GY))
            entry[f"{organ}_flagged"] = flagged_on(ranked)
            entry[f"{organ}_flagged_on_organ"] = flagged_on(ranked, TWIN_ORGAN[organ])
            flagged = {p["case_id"] for p in ranked if p["flagged"]}
            entry[f"{organ}_flags"] = [c.case_id in flagged for c in cases]  # in test-plan order
        out["levels"][str(level)] = entry
    for organ, cases in twins.items():
        out["twin_effect_gy"][organ] = twin_effect(test, cases, TWIN_ORGAN[organ])
    level = planqa.DEFAULT_LEVEL
    twin_qa = planqa.run_qa(ensemble, calibration, twins["rectum"], level, predictions=predictions)
    clinic_qa = planqa.run_qa(ensemble, calibration, clinic, level, predictions=clinic_predictions)
    out["clinic_qa"] = {"plans": clinic_qa.plans, "inside_band": planqa.coverage(clinic_qa.rows)}
    out["figures"] = write_figures(results / f"planqa_{scale}", {"worse twin": twin_qa, clinic_style: clinic_qa})
    out["style_check"] = style_check(workdir, s, test, predictions, clinic[: s["clinic"]["n_train"]],
                                     clinic_predictions[: s["clinic"]["n_train"]])
    return out


def write_figures(folder: Path, results: dict) -> dict:
    """One figure of the top-ranked flagged plan of each QA run."""
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


def flag_table(numbers: dict, levels, twins) -> list[str]:
    n = numbers["n_test"]
    head = ["level", "unchanged plans flagged (false-flag rate)"] + [
        f"{organ} / {1 / f:g} twins flagged (sensitivity); on the {TWIN_ORGAN[organ].lower()}" for organ, f in twins.items()]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for level in levels:
        e = numbers["levels"][str(level)]
        cells = [f"{round(100 * float(level))} %", f"{e['unchanged_flagged']}/{n} ({e['unchanged_flagged'] / n:.2f})"]
        cells += [f"{e[organ + '_flagged']}/{n} ({e[organ + '_flagged'] / n:.2f}); {e[organ + '_flagged_on_organ']}/{n}"
                  for organ in twins]
        lines.append("| " + " | ".join(cells) + " |")
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


def write_report(numbers: dict, s: dict, times: dict, loads: dict, results: Path, scale: str) -> Path:
    levels, n = s["levels"], numbers["n_test"]
    effects = {organ: np.asarray(v) for organ, v in numbers["twin_effect_gy"].items()}
    lines = [
        f"# Plan QA with predicted DVH bands, scale `{scale}`", "",
        f"Produced by `python -m flaxdose.launch.planqa_study --scale {scale}` on {time.strftime('%Y-%m-%d')}, commit "
        f"`{provenance.commit() or 'unknown'}`, machine: {provenance.machine()}. "
        f"Wall time {sum(times.values()) / 60:.1f} min, CPU time "
        f"{sum(v[3] for v in loads.values() if len(v) > 3) / 60:.1f} min (stages below), while other sessions shared the machine "
        f"(1-minute load average {min(v[0] for v in loads.values()):.1f}-{max(v[0] for v in loads.values()):.1f} "
        "at the stage boundaries).", "",
        f"Ensemble: {len(s['members'])} small UNets (features {s['model']['features']}, {s['train']['steps']} steps, "
        f"batch {s['train']['batch_size']}, patches {s['data']['patch_shape']}), seeds {list(s['members'])}, trained on "
        f"{s['source']['train'][1]} source-style plans (half-size grid). Bands calibrated on "
        f"{s['source']['calibration'][1]} other held-out source plans; every number below is on {n} further test "
        f"plans (other patients) or their twins. Band method: flaxdose/planqa.py; flags: OAR Dmean/D2 above the band "
        f"or PTV D95/D98 below it by more than {planqa.DEFAULT_TOLERANCE_GY:g} Gy; default level "
        f"{round(100 * planqa.DEFAULT_LEVEL)} %. Guide: [../plan_qa.md](../plan_qa.md).", "",
        "## Band coverage on held-out test plans", "",
        f"Reference plans inside their band, per metric, at each nominal (two-sided) level; {n} test plans:", ""]
    lines += coverage_table(numbers, levels)
    lines += ["", "## Worse twins: sensitivity and false flags", "",
              f"Each test patient planned three times: unchanged (source style), with the rectum weight x "
              f"{s['twins']['rectum']:g} and with the bladder weight x {s['twins']['bladder']:g}. The twins' true "
              f"extra OAR mean dose (twin - unchanged plan): rectum {effects['rectum'].mean():+.1f} Gy "
              f"(range {effects['rectum'].min():+.1f} to {effects['rectum'].max():+.1f}), bladder "
              f"{effects['bladder'].mean():+.1f} Gy (range {effects['bladder'].min():+.1f} to "
              f"{effects['bladder'].max():+.1f}). A plan is flagged when any metric is; \"on the rectum\": a flag on "
              "that organ's metrics.", ""]
    lines += flag_table(numbers, levels, s["twins"])
    lines += ["", f"Which twins are caught, at {round(100 * planqa.DEFAULT_LEVEL)} %: the true extra mean dose of flagged "
              "and of missed twins:", ""]
    for organ in s["twins"]:
        caught = np.asarray(numbers["levels"][str(planqa.DEFAULT_LEVEL)][f"{organ}_flags"])
        effect = effects[organ]
        describe = lambda v: f"{v.mean():+.1f} Gy (range {v.min():+.1f} to {v.max():+.1f}, n={v.size})" if v.size else "none"
        lines.append(f"- {organ} twins: flagged {describe(effect[caught])}; missed {describe(effect[~caught])}.")
    figures = numbers["figures"]
    if "worse twin" in figures:
        lines += ["", "Top-ranked flagged rectum twin:", "", f"![worse twin]({figures['worse twin']})"]
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

    stage("data", lambda: make_data(workdir, s))
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
    return write_report(numbers, s, stages.done, loads, results, scale)


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
