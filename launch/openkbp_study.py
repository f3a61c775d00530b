"""The OpenKBP study in one command: ``python -m flaxdose.launch.openkbp_study --scale openkbp_cpu --src provided-data --workdir DIR``.

`--src` is the challenge's `provided-data` folder (with `train-pats` and `validation-pats`;
docs/openkbp.md shows how to rebuild it). Stages (each recorded in ``DIR/stages.json`` when
done; a rerun skips finished stages and training resumes from its checkpoints):
1. convert: validation-pats on the challenge's 128^3 grid (what is scored), and every
   patient on the scale's training grid (`--downsample`; one dataset when that is 128^3); no CT;
2. distance-to-target: fit the non-learned reference model (flaxdose.inference.baseline) on train-pats;
3. train: the network on train-pats, validated on validation-pats (best checkpoint);
4. evaluate: both models on validation-pats, scored like the challenge on its own grid
   against the original doses (flaxdose.evaluation.openkbp), submission CSVs, figures;
5. grid floor: the reference doses themselves sent through the coarse grid and back, the
   best score any model trained on that grid could reach;
6. report: ``<results>/openkbp_<scale>.md`` with tables, figures, wall time, machine load,
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
from flaxdose.configs.openkbp_study import SCALES
from flaxdose.launch.paper_study import Stages, results_folder, timing_and_settings

from flaxdose import cli, provenance
from flaxdose import config as config_lib
from flaxdose.checkpoint import find_checkpoint
from flaxdose.data.case import Dataset
from flaxdose.errors import FlaxdoseError
from flaxdose.evaluation.openkbp import (
    DISTANCE_REFERENCE,
    NETWORK,
    evaluate_openkbp,
    predict_openkbp,
    score_predictions,
)
from flaxdose.inference.baseline import DistanceBaseline
from flaxdose.inference.predictor import Model
from flaxdose.io import require_folder
from flaxdose.model import count_params
from flaxdose.openkbp import TARGET_PRESCRIPTION_GY, convert_openkbp
from flaxdose.training import trainer

FLAGS = flags.FLAGS
# The challenge's best test-phase scores (Babier et al., Med Phys 48:5549, 2021; models using the CT).
PUBLISHED = {"dose_score": 2.43, "dvh_score": 1.48}


def scale_settings(scale: str) -> dict:
    if scale not in SCALES:
        raise FlaxdoseError(f"unknown scale {scale!r}; choose one of {sorted(SCALES)}")
    return SCALES[scale]


def report_name(scale: str) -> str:
    return scale if scale.startswith("openkbp") else f"openkbp_{scale}"


def study_config(scale: str, train_data: Path, seed: int, anneal_from: Path | None = None):
    """``configs/openkbp.py:SCALE``, training on `train_data`.

    With `anneal_from`: the second phase, which fine-tunes every parameter of that run's best
    checkpoint at the lower learning rate of the scale's ``anneal`` settings (fresh Adam
    moments, the patches in another order): a step decay of the learning rate, made of two runs.
    """
    overrides = {"data.path": str(train_data), "seed": seed}
    if anneal_from is not None:
        anneal = dict(scale_settings(scale)["anneal"])
        overrides.update({f"train.{k}": v for k, v in anneal.items() if k != "learning_rate"})
        overrides.update({"transfer.mode": "full", "transfer.source": str(anneal_from),
                          "transfer.learning_rate": anneal["learning_rate"], "seed": seed + 1})
    return config_lib.load_config(f"openkbp:{scale}", overrides)


class GridRoundTrip:
    """A "model" that returns each (coarse-grid) case's own reference dose: the grid's floor."""

    name = "reference dose through the grid"

    def predict(self, cases, batch_size: int = 1, progress: bool = False):
        return list(cases)


def fit_distance_reference(train_data: Path, path: Path) -> None:
    dataset = Dataset.open(train_data)
    DistanceBaseline.fit([dataset.load(i) for i in dataset.split("train")], TARGET_PRESCRIPTION_GY).save(path)


def validation_cases(full: Path) -> list:
    dataset = Dataset.open(full)
    return [dataset.load(i) for i in dataset.split("val")]


def evaluate(workdir: Path, network: Path, full: Path, factor: int, mirror: bool) -> None:
    models = {NETWORK: Model.load(network, mirror=mirror), DISTANCE_REFERENCE: DistanceBaseline.load(workdir / "distance_to_target.json")}
    references = validation_cases(full)
    note = f"validation-pats ({len(references)} patients), models trained on a grid {factor}x coarser than 128^3"
    evaluate_openkbp(models, references, workdir / "eval", factor, overwrite=True, note=note, progress=False)


def grid_floor(workdir: Path, full: Path, factor: int) -> None:
    references = validation_cases(full)
    scores = score_predictions(predict_openkbp(GridRoundTrip(), references, factor), references)
    (workdir / "grid_floor.json").write_text(json.dumps(scores.summary, indent=2) + "\n")


def conversions(src: str | Path | None, full: Path, train_data: Path, factor: int) -> list[tuple]:
    """(stage name, CSV folder, dataset, grid factor) of the convert stages.

    Only validation-pats is needed on the challenge's grid (it is scored there); every patient
    goes onto the training grid. One dataset when the training grid is the challenge's.
    """
    if factor == 1:
        return [("convert", src, full, 1)]
    return [("convert validation-pats", src and Path(src) / "validation-pats", full, 1),
            (f"convert at {128 // factor}^3", src, train_data, factor)]


def convert(src: str | Path | None, out: Path, factor: int) -> None:
    if src is None:
        raise FlaxdoseError("--src (the challenge's provided-data folder) is needed to convert the data")
    convert_openkbp(src, out, include_ct=False, overwrite=True, progress=False, downsample=factor)


def run_study(scale: str, src: str | Path, workdir: str | Path, results: str | Path, seed: int = 0,
              data_only: bool = False) -> Path:
    """Run (or resume) every stage; the report's path. `data_only`: stop after converting (workdir's path)."""
    settings = scale_settings(scale)
    factor = settings["downsample"]
    workdir = require_folder(workdir, "--workdir")
    full = workdir / "data" / "openkbp"
    train_data = full if factor == 1 else workdir / "data" / f"openkbp_{factor}x"
    if src is not None and not Path(src).is_dir():  # before the workdir is made
        raise FlaxdoseError(f"--src {src} is not a folder; pass the challenge's provided-data folder (with "
                            "train-pats and validation-pats)")
    workdir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    stages = Stages(workdir, "openkbp_study", study={"scale": scale, "seed": seed})
    for name, folder, out, grid_factor in conversions(src, full, train_data, factor):
        stages.run(name, lambda args=(folder, out, grid_factor): convert(*args))
    missing = {"train", "val"} - set(Dataset.open(train_data).splits)
    if missing:
        raise FlaxdoseError(f"{src} lacks the challenge's {sorted(missing)} patients; pass a provided-data folder "
                            "with train-pats and validation-pats")
    if data_only:
        return workdir
    stages.run("distance-to-target", lambda: fit_distance_reference(train_data, workdir / "distance_to_target.json"))
    config = study_config(scale, train_data, seed)
    stages.run("train", lambda: trainer.train_and_evaluate(config, workdir / "model"))
    network, configs = workdir / "model", [config]
    if settings.get("anneal"):
        configs.append(study_config(scale, train_data, seed, anneal_from=network))
        network = workdir / "model_annealed"
        stages.run("anneal", lambda: trainer.train_and_evaluate(configs[-1], network))
    stages.run("evaluate", lambda: evaluate(workdir, network, full, factor, settings.get("mirror", False)))
    if factor > 1:
        stages.run("grid floor", lambda: grid_floor(workdir, full, factor))
    load = {"before": load_before, "after": os.getloadavg()}
    return write_report(scale, settings, configs, network, workdir, Path(results), stages.done, load)


# ---------------------------------------------------------------- report
def _row(name: str, scores: dict, note: str) -> str:
    return f"| {name} | {scores['dose_score']:.2f} | {scores['dvh_score']:.2f} | {note} |"


def write_report(scale: str, settings: dict, configs: list, network: Path, workdir: Path, results: Path, times: dict,
                 load: dict) -> Path:
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
    config = configs[0]
    params = count_params(Model.load(network).params)
    rows = [_row(f"flaxdose network ({params:,} parameters, masks only)", scores[NETWORK],
                 f"validation-pats, {n} patients"),
            _row("distance-to-target model (non-learned)", scores[DISTANCE_REFERENCE], f"validation-pats, {n} patients")]
    if (workdir / "grid_floor.json").is_file():
        floor = json.loads((workdir / "grid_floor.json").read_text())
        rows.append(_row(f"reference dose sent through the {grid}^3 grid and back", floor,
                         "the floor of this grid: no model trained on it can do better"))
    rows.append(_row("best challenge entry (published)", PUBLISHED,
                     "test-pats (100 patients), used the CT; Babier et al. 2021"))
    mean_load = lambda key: ", ".join(f"{x:.1f}" for x in load[key])
    lines = [
        f"# OpenKBP, scale `{scale}`", "",
        f"Produced by `python -m flaxdose.launch.openkbp_study --scale {scale}` on {time.strftime('%Y-%m-%d')}, "
        f"commit `{provenance.commit() or 'unknown'}`, machine: {provenance.machine()}. "
        f"Load average (1, 5, 15 min) at the start {mean_load('before')}, at the end {mean_load('after')} "
        f"(the machine's cores are shared; a load above the core count slows every stage).", "",
        "Data: the AAPM OpenKBP challenge's head-and-neck IMRT plans, `train-pats` "
        f"({len(Dataset.open(config.data.path).split('train'))} patients in our copy) trains and `validation-pats` validates "
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
        "The distance-to-target model predicts each voxel's dose from its signed distance to the nearest target, a step "
        "function of distance fitted on train-pats (median dose / target level per 2.5 mm; "
        "`flaxdose.inference.baseline.DistanceBaseline`).", "",
        "## Per metric", "",
        (workdir / "eval" / "report.md").read_text().split("Mean absolute error of each DVH metric (Gy):", 1)[1].strip(),
        "",
    ]
    # Only aggregate figures leave the run folder: a patient's dose slice is challenge data.
    for png in (p for p in summary["figures"] if not p.startswith("case_")):
        shutil.copy(workdir / "eval" / png, figures / png)
        lines.append(f"![{Path(png).stem}]({figures.name}/{png})")
    lines += ["", "The dose slice and DVHs of one validation patient (`case_<id>.png` in `<workdir>/eval/`) and the "
              "submission CSVs of both models (the challenge's format, one `pt_N.csv` per patient, in "
              "`<workdir>/eval/submission/`) stay in the run folder (not committed: they hold challenge data).", "",
              "## Training", "",
              f"UNet features {tuple(config.model.features)}, {config.model.convs_per_level} convs per level, "
              f"{config.model.dtype}, patches {'x'.join(map(str, config.data.patch_shape))} around the targets "
              f"(sigma {tuple(config.data.patch_sigma)} voxels), left-right flips"
              + ("; predictions average the case and its left-right mirror image." if settings.get("mirror") else "."),
              ""]
    for phase, (c, folder) in zip(("train", "anneal"), zip(configs, ("model", "model_annealed"))):
        rate = c.transfer.learning_rate if c.transfer.mode != "none" else c.train.learning_rate
        lines.append(f"- {phase}: {c.train.steps} steps of {c.train.batch_size} patches, Adam {rate:g}"
                     + (", starting from the train phase's best checkpoint" if phase == "anneal" else "")
                     + f"; best checkpoint by validation loss: step {find_checkpoint(workdir / folder, 'best')[1]}.")
    lines += ["", *timing_and_settings(times, settings)]
    report = results / f"{name}.md"
    report.write_text("\n".join(lines))
    return report


def define_flags() -> None:
    """The command's flags (defined only when run as a program, so tests can import the module)."""
    flags.DEFINE_enum("scale", "smoke", sorted(SCALES), "study size")
    flags.DEFINE_string("src", None, "the challenge's provided-data folder (train-pats, validation-pats)")
    flags.DEFINE_string("workdir", None, "study folder (datasets, models, evaluation)")
    flags.DEFINE_string("results", None, "where the Markdown report and figures go (default: WORKDIR/report; "
                      "--results docs/results updates the committed reports)")
    flags.DEFINE_integer("seed", 0, "seed of the initialisation and the patches")
    flags.DEFINE_bool("data_only", False, "stop after converting: prepare a workdir to carry to a GPU machine")


def main(argv):
    del argv
    usage = "usage: python -m flaxdose.launch.openkbp_study --scale openkbp_cpu --src PROVIDED_DATA --workdir DIR"
    if not FLAGS.workdir:
        raise FlaxdoseError(f"--workdir is missing: the study's folder; {usage}")
    if not (FLAGS.src or (Path(FLAGS.workdir) / "stages.json").is_file()):
        raise FlaxdoseError(f"--src is missing: the challenge's provided-data folder (train-pats, validation-pats; "
                            f"for --scale smoke: ../shared/openkbp-sample); {usage}")
    results = results_folder(FLAGS.results, FLAGS.workdir)
    done = run_study(FLAGS.scale, FLAGS.src, FLAGS.workdir, results, FLAGS.seed, FLAGS.data_only)
    print(f"[openkbp_study] {'data' if FLAGS.data_only else 'report'}: {done}")


def run():
    """Console script ``flaxdose-openkbp-study``."""
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
