"""The OpenKBP study in one command: ``python -m launch.openkbp_study --scale openkbp_cpu --src provided-data --workdir DIR``.

`--src` is the challenge's `provided-data` folder (with `train-pats` and `validation-pats`;
docs/openkbp.md shows how to rebuild it). Stages (each recorded in ``DIR/stages.json`` when
done; a rerun skips finished stages and training resumes from its checkpoints):
1. convert: the CSVs into a flaxdose dataset on the challenge's 128^3 grid (no CT);
2. downsample: the same cases on the scale's coarser training grid (if any);
3. reference: fit the non-learned distance-to-target reference (flaxdose.baseline) on train-pats;
4. train: the network on train-pats, validated on validation-pats (best checkpoint);
5. evaluate: both models on validation-pats, scored like the challenge on its own grid
   against the original doses (flaxdose.openkbp_eval), submission CSVs, figures;
6. grid floor: the reference doses themselves sent through the coarse grid and back, the
   best score any model trained on that grid could reach;
7. report: ``<results>/openkbp_<scale>.md`` with tables, figures, wall time, machine load,
   machine and commit.

Scales (configs/openkbp_study.py): ``smoke`` (seconds, used by a test), ``openkbp_cpu``
(within 40 minutes on a 2-core machine), ``openkbp_gpu`` (one short GPU call, bf16).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from absl import flags

from configs.openkbp_study import SCALES
from flaxdose import cli, provenance, trainer
from flaxdose import config as config_lib
from flaxdose.baseline import DistanceBaseline
from flaxdose.data.case import Dataset
from flaxdose.errors import FlaxdoseError
from flaxdose.openkbp import (
    TARGET_PRESCRIPTION_GY,
    convert_openkbp,
    downsample_dataset,
    predict_openkbp,
    score_predictions,
)
from flaxdose.openkbp_eval import evaluate_openkbp
from launch.paper_study import Stages

REPO = Path(__file__).resolve().parent.parent
# The challenge's best test-phase scores (Babier et al., Med Phys 48:5549, 2021; models using the CT).
PUBLISHED = {"dose_score": 2.43, "dvh_score": 1.48}
NETWORK, REFERENCE = "network", "reference"


def scale_settings(scale: str) -> dict:
    if scale not in SCALES:
        raise FlaxdoseError(f"unknown scale {scale!r}; choose one of {sorted(SCALES)}")
    return SCALES[scale]


def report_name(scale: str) -> str:
    return scale if scale.startswith("openkbp") else f"openkbp_{scale}"


def study_config(settings: dict, train_data: Path, seed: int):
    """configs/openkbp.py at this scale, training on `train_data`."""
    config = config_lib.load_config("openkbp")
    overrides = {
        **{f"data.{k}": v for k, v in settings["data"].items()},
        **{f"model.{k}": v for k, v in settings["model"].items()},
        **{f"train.{k}": v for k, v in settings["train"].items()},
        "data.path": str(train_data),
        "data.downsample": settings["downsample"],
        "seed": seed,
    }
    for key, value in overrides.items():
        config_lib.apply_override(config, f"{key}={value}")
    return config


class GridRoundTrip:
    """A "model" that returns each (coarse-grid) case's own reference dose: the grid's floor."""

    name = "reference dose through the grid"

    def predict(self, cases, batch_size: int = 1, progress: bool = False):
        return list(cases)


def fit_reference(train_data: Path, path: Path) -> None:
    dataset = Dataset.open(train_data)
    DistanceBaseline.fit([dataset.load(i) for i in dataset.split("train")], TARGET_PRESCRIPTION_GY).save(path)


def validation_cases(full: Path) -> list:
    dataset = Dataset.open(full)
    return [dataset.load(i) for i in dataset.split("val")]


def evaluate(workdir: Path, full: Path, factor: int) -> None:
    from flaxdose.predict import Model

    models = {NETWORK: Model.load(workdir / "model"), REFERENCE: DistanceBaseline.load(workdir / "reference.json")}
    references = validation_cases(full)
    note = f"validation-pats ({len(references)} patients), models trained on a grid {factor}x coarser than 128^3"
    evaluate_openkbp(models, references, workdir / "eval", factor, overwrite=True, note=note, progress=False)


def grid_floor(workdir: Path, full: Path, factor: int) -> None:
    references = validation_cases(full)
    scores = score_predictions(predict_openkbp(GridRoundTrip(), references, factor), references)
    (workdir / "grid_floor.json").write_text(json.dumps(scores.summary, indent=2) + "\n")


def run_study(scale: str, src: str | Path, workdir: str | Path, results: str | Path, seed: int = 0) -> Path:
    settings = scale_settings(scale)
    factor = settings["downsample"]
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    full = workdir / "data" / "openkbp"
    train_data = full if factor == 1 else workdir / "data" / f"openkbp_{factor}x"
    load_before = os.getloadavg()
    stages = Stages(workdir, "openkbp_study")
    stages.run("convert", lambda: convert_openkbp(src, full, include_ct=False, overwrite=True, progress=False))
    missing = {"train", "val"} - set(Dataset.open(full).splits)
    if missing:
        raise FlaxdoseError(f"{src} lacks the challenge's {sorted(missing)} patients; pass a provided-data folder "
                            "with train-pats and validation-pats")
    if factor > 1:
        stages.run("downsample", lambda: downsample_dataset(Dataset.open(full), train_data, factor, overwrite=True,
                                                            progress=False))
    stages.run("reference", lambda: fit_reference(train_data, workdir / "reference.json"))
    config = study_config(settings, train_data, seed)
    stages.run("train", lambda: trainer.train_and_evaluate(config, workdir / "model"))
    stages.run("evaluate", lambda: evaluate(workdir, full, factor))
    if factor > 1:
        stages.run("grid floor", lambda: grid_floor(workdir, full, factor))
    load = {"before": load_before, "after": os.getloadavg()}
    return write_report(scale, settings, config, workdir, Path(results), stages.done, load)


# ---------------------------------------------------------------- report
def _row(name: str, scores: dict, note: str) -> str:
    return f"| {name} | {scores['dose_score']:.2f} | {scores['dvh_score']:.2f} | {note} |"


def write_report(scale: str, settings: dict, config, workdir: Path, results: Path, times: dict, load: dict) -> Path:
    from flaxdose.checkpoint import find_checkpoint
    from flaxdose.model import count_params
    from flaxdose.predict import Model

    name = report_name(scale)
    figures = results / name
    if figures.exists():
        shutil.rmtree(figures)
    figures.mkdir(parents=True)
    summary = json.loads((workdir / "eval" / "summary.json").read_text())
    scores = summary["scores"]
    n = scores[NETWORK]["num_cases"]
    factor = settings["downsample"]
    grid = 128 // factor
    best_step = find_checkpoint(workdir / "model", "best")[1]
    params = count_params(Model.load(workdir / "model").params)
    rows = [_row(f"flaxdose network ({params:,} parameters, masks only)", scores[NETWORK],
                 f"validation-pats, {n} patients"),
            _row("distance-to-target reference (non-learned)", scores[REFERENCE], f"validation-pats, {n} patients")]
    if (workdir / "grid_floor.json").is_file():
        floor = json.loads((workdir / "grid_floor.json").read_text())
        rows.append(_row(f"reference dose sent through the {grid}^3 grid and back", floor,
                         "the floor of this grid: no model trained on it can do better"))
    rows.append(_row("best challenge entry (published)", PUBLISHED,
                     "test-pats (100 patients), used the CT; Babier et al. 2021"))
    mean_load = lambda key: ", ".join(f"{x:.1f}" for x in load[key])
    lines = [
        f"# OpenKBP, scale `{scale}`", "",
        f"Produced by `python -m launch.openkbp_study --scale {scale}` on {time.strftime('%Y-%m-%d')}, "
        f"commit `{provenance.commit() or 'unknown'}`, machine: {provenance.machine()}. "
        f"Load average (1, 5, 15 min) at the start {mean_load('before')}, at the end {mean_load('after')} "
        f"(the machine's cores are shared; a load above the core count slows every stage).", "",
        "Data: the AAPM OpenKBP challenge's head-and-neck IMRT plans, `train-pats` "
        f"({len(Dataset.open(config.data.path).split('train'))} patients) trains and `validation-pats` validates "
        "(the best checkpoint by validation loss) and is scored. Inputs: the ten structure masks in the "
        "challenge's order; no CT. "
        + (f"Training grid: {grid}^3, {factor}x the challenge's voxel size along every axis "
           "(`flaxdose.openkbp.downsample_case`). " if factor > 1 else "Training grid: the challenge's 128^3. ")
        + "Scores are computed on the challenge's own 128^3 grid against the original doses: the "
        "prediction is brought back with `flaxdose.openkbp.upsample_dose` (cubic spline, normalized by the "
        "possible-dose mask) and multiplied by the possible-dose mask, as the challenge does.", "",
        "## Scores", "",
        "Dose score: mean absolute dose error inside the possible-dose mask, averaged over patients. DVH score: "
        "mean absolute error of the challenge's DVH metrics (OAR D_0.1_cc and mean, target D_99, D_95, D_1), "
        "pooled over patients, ROIs and metrics. Gy, lower is better (`flaxdose.metrics.openkbp_scores`).", "",
        "| model | dose score (Gy) | DVH score (Gy) | patients |", "|---|---|---|---|", *rows, "",
        "The reference predicts each voxel's dose from its signed distance to the nearest target, a step "
        "function of distance fitted on train-pats (median dose / target level per 2.5 mm; "
        "`flaxdose.baseline.DistanceBaseline`).", "",
        "## Per metric", "",
        (workdir / "eval" / "report.md").read_text().split("Mean absolute error of each DVH metric (Gy):", 1)[1].strip(),
        "",
    ]
    for png in summary["figures"]:
        shutil.copy(workdir / "eval" / png, figures / png)
        lines.append(f"![{Path(png).stem}]({figures.name}/{png})")
    lines += ["", "Submission CSVs of both models (the challenge's format, one `pt_N.csv` per patient) are in "
              f"`{workdir.resolve() / 'eval' / 'submission'}` of the run (not committed: they hold challenge data).",
              "", "## Training", "",
              f"{config.train.steps} steps of {config.train.batch_size} {'x'.join(map(str, config.data.patch_shape))} "
              f"patches, Adam {config.train.learning_rate:g}, UNet features {tuple(config.model.features)}, "
              f"{config.model.convs_per_level} convs per level, {config.model.dtype}; best checkpoint (lowest "
              f"validation loss): step {best_step}.", "",
              "## Wall time", "", "| stage | seconds |", "|---|---|"] + [f"| {k} | {v} |" for k, v in times.items()]
    lines += ["", f"Total: {sum(times.values()) / 60:.1f} minutes.", "", "## Settings", "", "```json",
              json.dumps(settings, indent=1, default=list), "```", ""]
    report = results / f"{name}.md"
    report.write_text("\n".join(lines))
    return report


def define_flags() -> None:
    flags.DEFINE_enum("scale", "smoke", sorted(SCALES), "study size")
    flags.DEFINE_string("src", None, "the challenge's provided-data folder (train-pats, validation-pats)")
    flags.DEFINE_string("workdir", None, "study folder (datasets, models, evaluation)")
    flags.DEFINE_string("results", str(REPO / "docs" / "results"), "where the Markdown report and figures go")
    flags.DEFINE_integer("seed", 0, "seed of the initialisation and the patches")


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    if not FLAGS.workdir or not FLAGS.src:
        raise FlaxdoseError("usage: python -m launch.openkbp_study --scale openkbp_cpu --src PROVIDED_DATA --workdir DIR")
    report = run_study(FLAGS.scale, FLAGS.src, FLAGS.workdir, FLAGS.results, FLAGS.seed)
    print(f"[openkbp_study] report: {report}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
