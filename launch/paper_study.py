"""The paper's study in one command: ``python -m launch.paper_study --scale cpu --workdir DIR``.

Stages (each recorded in ``DIR/stages.json`` when done; a rerun skips finished stages and
training resumes from its checkpoints):
1. data: the five synthetic planning styles with the paper's Table 1 splits;
2. source: train the source model on the source style;
3. transfer: adapt it to internal_a, internal_b, internal_c and external (paper recipe);
4. evaluate: source and target models on every style's test cases;
5. report: ``<results>/paper_study_<scale>.md`` with tables, figures, wall time, machine, commit.

Scales (configs/paper_study.py): ``smoke`` (seconds, used by a test), ``cpu`` (about half an
hour on a 2-core machine), ``paper`` (full size, for a GPU).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from absl import flags

from flaxdose import cli, evaluation, provenance, trainer
from flaxdose import config as config_lib
from flaxdose.configs.paper_study import SCALES
from flaxdose.data.case import Dataset
from flaxdose.errors import FlaxdoseError
from flaxdose.inference import Model
from flaxdose.synthetic import generator as synth

SOURCE = "source"
TARGETS = ("internal_a", "internal_b", "internal_c", "external")
REPO = Path(__file__).resolve().parent.parent
FLAGS = flags.FLAGS


def scale_settings(scale: str) -> dict:
    if scale not in SCALES:
        raise FlaxdoseError(f"unknown scale {scale!r}; choose one of {sorted(SCALES)}")
    return SCALES[scale]


def splits(settings: dict) -> dict[str, tuple[int, int]]:
    return settings["splits"] or synth.PAPER_SPLITS


def style_config(style: str, settings: dict, workdir: Path, seed: int):
    """The source config or a target style's transfer config, at this scale, on the study's data."""
    config = config_lib.load_config(SOURCE if style == SOURCE else f"transfer:{style}")
    # Target styles train on all their plans, as in the paper (their configs set val_cases=0).
    skip = {"scale"} if style == SOURCE else {"scale", "val_cases"}
    overrides = {
        **{f"data.{k}": v for k, v in settings["data"].items() if k not in skip},
        **{f"model.{k}": v for k, v in settings["model"].items()},
        **{f"train.{k}": v for k, v in settings[f"{'source' if style == SOURCE else 'target'}_train"].items()},
        "data.kind": "folder",
        "data.path": str(workdir / "data" / style),
        "seed": seed,
    }
    if style != SOURCE:
        overrides.update({"transfer.source": str(workdir / SOURCE), "transfer.learning_rate": settings["transfer_lr"]})
    return config_lib.override(config, overrides)


class Stages:
    """Finished stages and their wall times, persisted in stages.json."""

    def __init__(self, workdir: Path, label: str = "paper_study"):
        self.path, self.label = workdir / "stages.json", label
        self.done = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def run(self, name: str, fn):
        if name in self.done:
            print(f"[{self.label}] {name}: done earlier, skipped")
            return
        print(f"[{self.label}] {name} ...")
        start = time.perf_counter()
        fn()
        self.done[name] = round(time.perf_counter() - start, 1)
        self.path.write_text(json.dumps(self.done, indent=2))


def generate_data(workdir: Path, settings: dict, seed: int) -> None:
    for style, (n_train, n_test) in splits(settings).items():
        synth.ensure_dataset(workdir / "data" / style, style, n_train, n_test, seed=seed, scale=settings["data"].get("scale", 1.0))


def evaluate_style(workdir: Path, style: str) -> dict:
    """Source model (and the style's target model) on the style's test cases: report folder + summary."""
    models = {"source model": Model.load(workdir / SOURCE)}
    if style != SOURCE:
        models["target model"] = Model.load(workdir / style)
    ev = evaluation.evaluate_models(models, Dataset.open(workdir / "data" / style), "test")
    note = f"{style} style, test split, {len(ev.references)} cases"
    return evaluation.write_report(ev.rows, workdir / "eval" / style, ev.references, ev.predictions, overwrite=True, note=note)


def run_study(scale: str, workdir: str | Path, results: str | Path, seed: int = 0) -> Path:
    settings = scale_settings(scale)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    stages = Stages(workdir)
    stages.run("data", lambda: generate_data(workdir, settings, seed))
    stages.run(SOURCE, lambda: trainer.train_and_evaluate(style_config(SOURCE, settings, workdir, seed), workdir / SOURCE))
    for style in TARGETS:
        stages.run(style, lambda s=style: trainer.train_and_evaluate(style_config(s, settings, workdir, seed), workdir / s))
    summaries = {}
    for style in (SOURCE, *TARGETS):
        stages.run(f"evaluate {style}", lambda s=style: evaluate_style(workdir, s))
        summaries[style] = json.loads((workdir / "eval" / style / "summary.json").read_text())
    return write_report(scale, settings, workdir, Path(results), summaries, stages.done)


# ---------------------------------------------------------------- report
def _mean_sd(summary: dict, model: str, metric: str) -> str:
    stats = summary["metrics"][model][metric]
    return "n/a" if stats["mean"] is None else f"{stats['mean']:.3f} ± {(stats['sd'] or 0):.3f}"


def _dvh_error(summary: dict, model: str) -> float:
    error = evaluation.mean_dvh_error_pct(summary, model)
    return float("nan") if error is None else error


def summary_row(style: str, summary: dict) -> str:
    n = summary["num_cases"]["source model"]
    cells = [style, str(n), _mean_sd(summary, "source model", "dice_mean")]
    if "target model" in summary["models"]:
        change = summary["metrics"]["target model"]["dice_mean"]["mean"] - summary["metrics"]["source model"]["dice_mean"]["mean"]
        p = summary["paired_ttests"][0]["p_values"].get("dice_mean")
        cells += [_mean_sd(summary, "target model", "dice_mean"), f"{change:+.3f}", "n/a" if p is None else f"{p:.2g}",
                  f"{_dvh_error(summary, 'source model'):.2f}", f"{_dvh_error(summary, 'target model'):.2f}"]
    else:
        cells += ["-", "-", "-", f"{_dvh_error(summary, 'source model'):.2f}", "-"]
    return "| " + " | ".join(cells) + " |"


def write_report(scale: str, settings: dict, workdir: Path, results: Path, summaries: dict, times: dict) -> Path:
    figures = results / f"paper_study_{scale}"
    if figures.exists():
        shutil.rmtree(figures)
    figures.mkdir(parents=True)
    lines = [f"# Paper study, scale `{scale}`", "",
             f"Produced by `python -m launch.paper_study --scale {scale}` on {time.strftime('%Y-%m-%d')}, "
             f"commit `{provenance.commit() or 'unknown'}`, machine: {provenance.machine()}.", "",
             "*Source model*: trained on the source style. *Target model*: the source model adapted to the style "
             "with the paper's transfer recipe (encoder + bottleneck frozen, head re-initialized, learning rate / 10). "
             "Dice: isodose Dice averaged over 10 %..100 % of the prescription, body-restricted, mean ± SD over the "
             "style's test cases; p: paired t-test of the per-case mean Dice (target vs source model). DVH error: "
             "mean |prediction - reference| in % of the prescription over PTV Dmean/D2/D95/D98 and OAR Dmean/D2.", "",
             "## Summary", "",
             "| style | test cases | source model Dice | target model Dice | change | p | source model DVH error (%) | target model DVH error (%) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [summary_row(style, summary) for style, summary in summaries.items()]
    lines += ["", "## Per style", ""]
    for style in summaries:
        folder = workdir / "eval" / style
        table = (folder / "report.md").read_text().split("\n", 1)[1]  # drop its title
        lines += [f"### {style}", "", table.strip(), ""]
        for png in sorted(folder.glob("*.png")):
            target = figures / f"{style}_{png.name}"
            shutil.copy(png, target)
            lines.append(f"![{style} {png.stem}]({figures.name}/{target.name})")
        lines.append("")
    lines += timing_and_settings(times, settings)
    report = results / f"paper_study_{scale}.md"
    report.write_text("\n".join(lines))
    return report


def timing_and_settings(times: dict, settings: dict) -> list[str]:
    """A study report's closing sections: wall time per stage (seconds) and the scale's settings."""
    return ["## Wall time", "", "| stage | seconds |", "|---|---|", *[f"| {k} | {v} |" for k, v in times.items()],
            "", f"Total: {sum(times.values()) / 60:.1f} minutes.", "", "## Settings", "", "```json",
            json.dumps(settings, indent=1, default=list), "```", ""]


def define_flags() -> None:
    """The command's flags (defined only when run as a program, so tests can import the module)."""
    flags.DEFINE_enum("scale", "smoke", sorted(SCALES), "study size")
    flags.DEFINE_string("workdir", None, "study folder (data, models, evaluations)")
    flags.DEFINE_string("results", str(REPO / "docs" / "results"), "where the Markdown report and figures go")
    flags.DEFINE_integer("seed", 0, "seed of the data, the initialisation and the patches")


def main(argv):
    del argv
    if not FLAGS.workdir:
        raise FlaxdoseError("--workdir is required: the folder for the study's data, models and evaluations")
    report = run_study(FLAGS.scale, FLAGS.workdir, FLAGS.results, FLAGS.seed)
    print(f"[paper_study] report: {report}")


def run():
    """Console script ``flaxdose-study``."""
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
