"""The paper's study in one command: ``python -m flaxdose.launch.paper_study --scale cpu --workdir DIR``.

Stages (each recorded in ``DIR/stages.json`` when done; a rerun skips finished stages and
training resumes from its checkpoints; ``--until STAGE`` stops after a stage, so a study can
run as several commands):
1. data: the five synthetic planning styles with the paper's Table 1 splits, and the
   source-style plans of every target test patient (the oracle);
2. source: train the source model on the source style;
3. transfer: adapt it to internal_a, internal_b, internal_c and external (paper recipe), and
   the control: the same recipe on source-style plans;
4. evaluate: on every style's test cases the source model and the style's target model, the
   oracle (the same patient's source-style plan scored as a prediction: what a perfect
   source model would score) and, on source, the control;
5. report: ``<results>/paper_study_<scale>.md``: the paper's statistics (per-level mean Dice
   and its range, the Fig. 3 curves, Table 2-style signed DVH errors with paired t-tests),
   the oracle and control rows, the checks of issue 12, wall time, load, machine, commit.

Scales (flaxdose/configs/paper_study.py): ``smoke`` (seconds, used by a test), ``cpu``
(within 40 minutes on a 2-core machine), ``gpu_short`` (one 15-minute GPU allowance, as two
commands), ``paper`` (full size).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
from absl import flags
from flaxdose.configs.paper_study import SCALES

from flaxdose import cli, evaluation, provenance
from flaxdose import config as config_lib
from flaxdose.data.case import Case, Dataset
from flaxdose.errors import FlaxdoseError
from flaxdose.inference.predictor import Model
from flaxdose.io import require_folder
from flaxdose.metrics import dvh_metrics
from flaxdose.synthetic import generator as synth
from flaxdose.training import trainer

SOURCE = "source"
TARGETS = ("internal_a", "internal_b", "internal_c", "external")
CONTROL, ORACLE = "control", "oracle"
SOURCE_MODEL, TARGET_MODEL = "source model", "target model"
CONTROL_MODEL, ORACLE_MODEL = "control (source -> source)", "oracle (source plan)"
FLAGS = flags.FLAGS


def scale_settings(scale: str) -> dict:
    if scale not in SCALES:
        raise FlaxdoseError(f"unknown scale {scale!r}; choose one of {sorted(SCALES)}")
    return SCALES[scale]


def splits(settings: dict) -> dict[str, tuple[int, int]]:
    return settings["splits"] or synth.PAPER_SPLITS


def style_config(style: str, settings: dict, workdir: Path, seed: int):
    """The training config of a study run at this scale, on the study's data.

    `style` is "source" (the source model), a target style (its transfer), or "control"
    (the transfer recipe on the first ``control_plans`` source training plans).
    """
    transfer_style = SOURCE if style == CONTROL else style
    config = config_lib.load_config(SOURCE if style == SOURCE else f"transfer:{transfer_style}")
    # Target styles train on all their plans, as in the paper (their configs set val_cases=0).
    skip = {"scale"} if style == SOURCE else {"scale", "val_cases"}
    overrides = {
        **{f"data.{k}": v for k, v in settings["data"].items() if k not in skip},
        **{f"model.{k}": v for k, v in settings["model"].items()},
        # Transfers keep the source's recipe (the paper: "other hyperparameters unchanged") but their own steps.
        **{f"train.{k}": v for k, v in settings["source_train"].items()},
        **({} if style == SOURCE else {f"train.{k}": v for k, v in settings["target_train"].items()}),
        "data.kind": "folder",
        "data.path": str(workdir / "data" / transfer_style),
        "seed": seed,
    }
    if style != SOURCE:
        overrides.update({"transfer.source": str(workdir / SOURCE), "transfer.learning_rate": settings["transfer_lr"]})
    if style == CONTROL:
        train_ids = Dataset.open(workdir / "data" / SOURCE).split("train")
        overrides["data.train_cases"] = tuple(train_ids[: settings["control_plans"]])
    return config_lib.override(config, overrides)


class Stages:
    """Finished stages and their wall times, persisted in stages.json, for one study: `study` (its settings that
    decide what the stages make, e.g. scale and seed) is kept in study.json, and a workdir holding another
    study is refused (FlaxdoseError) before anything runs: its finished stages would be skipped, and their
    results reported under the new settings. A workdir from before study.json was kept takes `study` as its own;
    one whose study finished no stage (e.g. refused after its settings were recorded) takes the new settings.
    """

    def __init__(self, workdir: Path, label: str = "paper_study", study: dict | None = None):
        self.path, self.label = workdir / "stages.json", label
        self.done = json.loads(self.path.read_text()) if self.path.is_file() else {}
        record, study = workdir / "study.json", dict(study or {})
        held = json.loads(record.read_text()) if record.is_file() and self.done else study
        if held != study:
            shown = lambda d, k: repr(d[k]) if k in d else "not set"
            differ = ", ".join(f"{k} {shown(held, k)} (now {shown(study, k)})" for k in sorted({*held, *study})
                               if held.get(k) != study.get(k))
            raise FlaxdoseError(f"{workdir} holds another {label} ({differ}): its finished stages would be reused "
                                "and reported under the new settings; use a new --workdir, or the same settings to "
                                "resume it")
        record.write_text(json.dumps(study, indent=2))

    def run(self, name: str, fn):
        if name in self.done:
            print(f"[{self.label}] {name}: done earlier, skipped")
            return
        print(f"[{self.label}] {name} ...", flush=True)
        start = time.perf_counter()
        fn()
        self.done[name] = round(time.perf_counter() - start, 1)
        self.path.write_text(json.dumps(self.done, indent=2))


def oracle_tests(settings: dict) -> int:
    """How many test patients the oracle plans cover: the most of any target style."""
    return max(n_test for style, (_, n_test) in splits(settings).items() if style != SOURCE)


def generate_data(workdir: Path, settings: dict, seed: int) -> None:
    scale, workers = settings["data"].get("scale", 1.0), settings.get("data_workers", 0)
    for style, (n_train, n_test) in splits(settings).items():
        synth.ensure_dataset(workdir / "data" / style, style, n_train, n_test, seed=seed, scale=scale, workers=workers)
    # The source-style plans of the target styles' test patients (one training plan: a dataset needs one).
    synth.ensure_dataset(workdir / "data" / ORACLE, SOURCE, 1, oracle_tests(settings), seed=seed, scale=scale,
                         workers=workers)


class SourcePlans:
    """A "predictor" that answers each case with the source-style plan of the same patient (the oracle)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def predict(self, cases, batch_size: int = 1, progress: bool = False) -> list[Case]:
        out = []
        for case in cases:
            plan = self.dataset.load(synth.case_id(SOURCE, case.meta["seed"], case.meta["anatomy_index"]))
            out.append(plan.replace(case_id=case.case_id, style=case.style))
        return out


def evaluate_style(workdir: Path, style: str, mirror: bool = False) -> dict:
    """The style's test cases: source model and target model (or control), oracle; report folder + summary.

    `mirror`: every network predicts each case and its left-right mirror and averages the two."""
    models = {SOURCE_MODEL: Model.load(workdir / SOURCE, mirror=mirror)}
    if style == SOURCE:
        models[CONTROL_MODEL] = Model.load(workdir / CONTROL, mirror=mirror)
    else:
        models[TARGET_MODEL] = Model.load(workdir / style, mirror=mirror)
        models[ORACLE_MODEL] = SourcePlans(Dataset.open(workdir / "data" / ORACLE))
    ev = evaluation.evaluate_models(models, Dataset.open(workdir / "data" / style), "test")
    note = f"{style} style, test split, {len(ev.references)} cases"
    return evaluation.write_report(ev.rows, workdir / "eval" / style, ev.references, ev.predictions, overwrite=True, note=note)


def load() -> str:
    """The 1, 5 and 15 minute load averages (the machine may be shared)."""
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def run_study(scale: str, workdir: str | Path, results: str | Path, seed: int = 0, until: str | None = None) -> Path | None:
    """Run (or resume) the study; the report's path, or None when stopped early by `until` (a stage name)."""
    settings = scale_settings(scale)
    workdir = require_folder(workdir, "--workdir")
    plan = [("data", lambda: generate_data(workdir, settings, seed))]
    plan += [(s, lambda s=s: trainer.train_and_evaluate(style_config(s, settings, workdir, seed), workdir / s))
             for s in (SOURCE, *TARGETS, CONTROL)]
    plan += [(f"evaluate {s}", lambda s=s: evaluate_style(workdir, s, settings.get("mirror", False)))
             for s in (SOURCE, *TARGETS)]
    names = [name for name, _ in plan]
    if until is not None and until not in names:  # before anything is written
        raise FlaxdoseError(f"--until {until!r} is not a stage; stages: {', '.join(names)}")
    workdir.mkdir(parents=True, exist_ok=True)
    stages = Stages(workdir, study={"scale": scale, "seed": seed})
    loads = json.loads((workdir / "load.json").read_text()) if (workdir / "load.json").is_file() else {}
    loads.setdefault("start", load())
    (workdir / "load.json").write_text(json.dumps(loads))
    pending = [name for name, _ in plan if name not in stages.done]
    for name, fn in plan:
        stages.run(name, fn)
        if name == until:
            print(f"[paper_study] stopped after {until}; rerun without --until to finish")
            return None
    if pending or "end" not in loads:  # rewriting a finished study's report keeps its own end
        loads["end"] = load()
    (workdir / "load.json").write_text(json.dumps(loads))
    summaries = {s: json.loads((workdir / "eval" / s / "summary.json").read_text()) for s in (SOURCE, *TARGETS)}
    return write_report(scale, settings, workdir, Path(results), summaries, stages.done, loads)


# ---------------------------------------------------------------- report
def _fmt(stats: dict) -> str:
    if stats["mean"] is None:
        return "n/a"
    return f"{stats['mean']:.3f} ± {stats['sd']:.3f}" if stats["sd"] is not None else f"{stats['mean']:.3f}"


def _p(p) -> str:
    return "n/a" if p is None else f"{p:.2g}"


def _gain(summary: dict, model: str) -> float:
    return evaluation.dice_mean(summary, model) - evaluation.dice_mean(summary, SOURCE_MODEL)


def summary_table(summaries: dict) -> list[str]:
    """One row per style and model: mean Dice, its per-level range, the mean |DVH error|."""
    lines = ["| style | test cases | model | mean Dice ± SD over cases | per-level mean Dice, range over 10-100 % | "
             "mean \\|DVH error\\| (% of Rx) |", "|---|---|---|---|---|---|"]
    for style, summary in summaries.items():
        for model in summary["models"]:
            low, high = evaluation.level_range(summary, model)
            error = evaluation.mean_dvh_error_pct(summary, model)
            lines.append(f"| {style} | {summary['num_cases'][model]} | {model} | "
                         f"{_fmt(summary['metrics'][model]['dice_mean'])} | {low:.2f}-{high:.2f} | "
                         f"{'n/a' if error is None else f'{error:.2f}'} |")
    return lines


def gains_table(summaries: dict) -> list[str]:
    control = _gain(summaries[SOURCE], CONTROL_MODEL)
    lines = ["| style | source model Dice | target model Dice | Dice gain | control's gain | gain beyond the control | "
             "p (Dice, paired t) | \\|DVH error\\| source -> target (% of Rx) | oracle Dice |",
             "|---|---|---|---|---|---|---|---|---|"]
    for style in TARGETS:
        s = summaries[style]
        gain = _gain(s, TARGET_MODEL)
        p = evaluation.ttest(s, SOURCE_MODEL, TARGET_MODEL)["p_values"].get("dice_mean")
        errors = [evaluation.mean_dvh_error_pct(s, m) for m in (SOURCE_MODEL, TARGET_MODEL)]
        lines.append(f"| {style} | {evaluation.dice_mean(s, SOURCE_MODEL):.3f} | {evaluation.dice_mean(s, TARGET_MODEL):.3f} | "
                     f"{gain:+.3f} | {control:+.3f} | {gain - control:+.3f} | {_p(p)} | "
                     f"{errors[0]:.2f} -> {errors[1]:.2f} | {evaluation.dice_mean(s, ORACLE_MODEL):.3f} |")
    return lines


def checks(summaries: dict) -> list[tuple[str, bool, str]]:
    """Issue 12's measurable "must hold" items: (what, met, the numbers)."""
    source = summaries[SOURCE]
    d95 = source["metrics"][SOURCE_MODEL]["PTV D95 abs_err_pct"]["mean"]
    out = [("source model on source: mean isodose Dice >= 0.88", evaluation.dice_mean(source, SOURCE_MODEL) >= 0.88,
            f"{evaluation.dice_mean(source, SOURCE_MODEL):.3f}"),
           ("source model on source: mean absolute PTV D95 error <= 3 % of Rx", d95 is not None and d95 <= 3.0, f"{d95:.2f} %")]
    control = _gain(source, CONTROL_MODEL)
    for style in TARGETS:
        s = summaries[style]
        dice = [evaluation.dice_mean(s, m) for m in (SOURCE_MODEL, TARGET_MODEL)]
        err = [evaluation.mean_dvh_error_pct(s, m) for m in (SOURCE_MODEL, TARGET_MODEL)]
        out.append((f"{style}: target beats source in mean Dice and mean absolute DVH error, Dice gain > control's",
                    dice[1] > dice[0] and err[1] < err[0] and dice[1] - dice[0] > control,
                    f"Dice {dice[0]:.3f} -> {dice[1]:.3f} (gain {dice[1] - dice[0]:+.3f}, control {control:+.3f}); "
                    f"absolute DVH error {err[0]:.2f} -> {err[1]:.2f} %"))
    levels = evaluation.level_means(summaries["external"], ORACLE_MODEL)
    out.append(("external oracle: per-level mean Dice >= 0.75 at every level", min(levels.values()) >= 0.75,
                f"lowest {min(levels.values()):.3f} at {min(levels, key=levels.get)} %"))
    return out


def femoral_sd_ratio(workdir: Path) -> float:
    """SD over the external test patients of the femoral-head mean dose (both heads), external plans
    over the same patients' source-style plans: how much of the external femoral dose the anatomy explains."""
    oracle = SourcePlans(Dataset.open(workdir / "data" / ORACLE))
    external = evaluation.load_references(Dataset.open(workdir / "data" / "external"), "test")
    femoral = lambda c: np.mean([dvh_metrics(c.dose, c.mask(f"Femur_Head_{side}"), c.spacing_mm)["Dmean"] for side in "LR"])
    sd = lambda cases: np.std([femoral(c) for c in cases], ddof=1)
    return float(sd(external) / sd(oracle.predict(external)))


def training_table(workdir: Path) -> list[str]:
    """Per training run: steps, the training loss early / at half / at the end (has it plateaued?),
    and the best validation loss (source model only; the transfers train on all their plans)."""
    lines = ["| run | steps | training loss, first log | at half | last | last / half | best validation MSE (step) |",
             "|---|---|---|---|---|---|---|"]
    for run in (SOURCE, *TARGETS, CONTROL):
        records = [json.loads(line) for line in (workdir / run / "metrics.jsonl").read_text().splitlines()]
        losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
        vals = [(r["val_loss"], r["step"]) for r in records if "val_loss" in r]
        if not losses:
            continue
        half = next(loss for step, loss in losses if step >= losses[-1][0] / 2)
        best = f"{min(vals)[0]:.5f} ({min(vals)[1]})" if vals else "-"
        lines.append(f"| {run} | {losses[-1][0]} | {losses[0][1]:.5f} | {half:.5f} | {losses[-1][1]:.5f} | "
                     f"{losses[-1][1] / half:.2f} | {best} |")
    return lines


def _copy_figures(folder: Path, figures: Path, style: str) -> list[str]:
    lines = []
    for png in sorted(folder.glob("*.png")):
        target = figures / f"{style}_{png.name}"
        shutil.copy(png, target)
        lines.append(f"![{style} {png.stem}]({figures.name}/{target.name})")
    return lines


def write_report(scale: str, settings: dict, workdir: Path, results: Path, summaries: dict, times: dict,
                 loads: dict) -> Path:
    commit = provenance.commit() or "unknown"  # before the report's own (tracked) figures are replaced
    figures = results / f"paper_study_{scale}"
    if figures.exists():
        shutil.rmtree(figures)
    figures.mkdir(parents=True)
    femoral = femoral_sd_ratio(workdir)
    lines = [f"# Paper study, scale `{scale}`", "",
             f"Produced by `python -m flaxdose.launch.paper_study --scale {scale}` on {time.strftime('%Y-%m-%d')}, "
             f"commit `{commit}`, machine: {provenance.machine()}; load average "
             f"(1/5/15 min) at the start {loads.get('start')}, at the end {loads.get('end')}.", "",
             recipe_line(settings), "",
             "*Source model*: trained on the source style. *Target model*: the source model adapted to the style "
             "with the paper's transfer recipe (encoder + bottleneck frozen, head re-initialized), learning rate "
             f"{transfer_ratio(settings)} of the source's (the paper's: 1/10). "
             f"*Control*: the same recipe on {settings['control_plans']} source-style training plans, scored on the "
             "source test cases: what the extra training alone brings. *Oracle*: the same patient's source-style plan "
             "scored as a prediction of the target plan: what a perfect source model would score. "
             "Dice: isodose Dice at 10 %..100 % of the prescription, body-restricted; *mean Dice* is the mean over "
             "levels and cases; the paper's \"mean DSC 0.81-0.94\" is the range over the levels of the per-level "
             "mean. DVH errors: prediction − reference in % of the prescription, signed (Table 2) or absolute; "
             "p: paired t-test (scipy.stats.ttest_rel) over the test cases, each model against the source model.", "",
             "## Summary", ""]
    lines += summary_table(summaries)
    lines += ["", "## Transfer gains against the control", ""] + gains_table(summaries)
    lines += ["", "## Checks (issue 12)", "", "| check | met | measured |", "|---|---|---|"]
    lines += [f"| {what} | {'yes' if ok else '**no**'} | {numbers} |" for what, ok, numbers in checks(summaries)]
    lines += [f"| external vs source plans: femoral-head mean-dose SD at most twice source's | "
              f"{'yes' if femoral <= 2 else '**no**'} | ratio {femoral:.2f} on the external test patients |"]
    lines += ["", "## Per style", "", "Per-level Dice (the paper's Fig. 3), then Table 2: signed DVH errors "
              "(mean ± SD over cases) with paired t-tests against the source model.", ""]
    for style, summary in summaries.items():
        lines += [f"### {style}", "", evaluation.markdown_table(summary), ""]
        lines += _copy_figures(workdir / "eval" / style, figures, style) + [""]
    lines += ["## Training", "", "Training loss: the training objective (MSE of dose / Rx, target voxels weighted "
              f"{settings['source_train'].get('target_weight', 1.0):g}x) over the logged window of patches; "
              "validation MSE: the evaluation's own inference on the held-out source plans (it picks the "
              "source model's checkpoint).", ""] + training_table(workdir) + [""]
    ablation = results / f"paper_study_{scale}_ablation.md"  # hand-kept: trials outside this run
    if ablation.is_file():
        lines += [f"## Ablation (separate trial runs, from {ablation.name})", "", ablation.read_text().strip(), ""]
    lines += timing_and_settings(times, settings)
    report = results / f"paper_study_{scale}.md"
    report.write_text("\n".join(lines))
    return report


def transfer_ratio(settings: dict) -> str:
    """The transfers' learning rate as a fraction of the source's, e.g. "1/2"."""
    ratio = settings["source_train"].get("learning_rate", 1e-4) / settings["transfer_lr"]
    return f"1/{ratio:.3g}"


def recipe_line(settings: dict) -> str:
    """One sentence: the scale's inputs, loss, schedule and inference, and where they depart from the paper."""
    train = settings["source_train"]
    inputs = ("the six masks plus the signed distance to the PTV (a 7th channel, not the paper's)"
              if settings["data"].get("target_distance") else "the paper's six masks")
    weight = float(train.get("target_weight", 1.0))
    loss = f"MSE with PTV voxels weighted {weight:g}x" if weight != 1 else "MSE (the paper's)"
    schedule = train.get("schedule", "constant")
    rate = train.get("learning_rate", 1e-4)
    mirror = "; evaluation averages each prediction with that of the left-right mirrored case" if settings.get("mirror") else ""
    return (f"Recipe at this scale: inputs {inputs}; loss {loss}; Adam {rate:g}, schedule `{schedule}`, "
            f"{train['steps']} steps; transfers learning rate {settings['transfer_lr']:g}{mirror}.")


def timing_and_settings(times: dict, settings: dict) -> list[str]:
    """A study report's closing sections: wall time per stage (seconds) and the scale's settings."""
    return ["## Wall time", "", "| stage | seconds |", "|---|---|", *[f"| {k} | {v} |" for k, v in times.items()],
            "", f"Total: {sum(times.values()) / 60:.1f} minutes.", "", "## Settings", "", "```json",
            json.dumps(settings, indent=1, default=list), "```", ""]


def results_folder(results: str | None, workdir: str | Path) -> Path:
    """Where a study's report goes: `results` if given (``--results docs/results`` updates the
    repository's committed reports), else ``WORKDIR/report``: an installed flaxdose has no source
    tree to write into, and trying a study never overwrites the committed docs."""
    return Path(results) if results else Path(workdir) / "report"


def define_flags() -> None:
    """The command's flags (defined only when run as a program, so tests can import the module)."""
    flags.DEFINE_enum("scale", "smoke", sorted(SCALES), "study size")
    flags.DEFINE_string("workdir", None, "study folder (data, models, evaluations)")
    flags.DEFINE_string("results", None, "where the Markdown report and figures go (default: WORKDIR/report; "
                      "--results docs/results updates the committed reports)")
    flags.DEFINE_integer("seed", 0, "seed of the data, the initialisation and the patches")
    flags.DEFINE_string("until", None, "stop after this stage (e.g. source); a rerun continues from there")


def main(argv):
    del argv
    if not FLAGS.workdir:
        raise FlaxdoseError("--workdir is required: the folder for the study's data, models and evaluations")
    report = run_study(FLAGS.scale, FLAGS.workdir, results_folder(FLAGS.results, FLAGS.workdir), FLAGS.seed,
                       FLAGS.until)
    if report is not None:
        print(f"[paper_study] report: {report}")


def run():
    """Console script ``flaxdose-study``."""
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
