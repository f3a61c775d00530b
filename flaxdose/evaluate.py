"""Evaluate trained models against reference doses (``flaxdose-evaluate``); the library is `flaxdose.evaluation`.

``python -m flaxdose.evaluate --workdir W [--compare W2] [--data DIR] --split test --out REPORT``
(``--split all``: every case of every split, e.g. a clinic's import that has only "train")
predicts every case of the split with each model (best checkpoint) and writes the report
folder described in `flaxdose.evaluation` (cases.csv, summary.json, report.md, figures).
A case that cannot be predicted or scored (no target, another voxel spacing, ...) is left
out and listed (log, summary.json ``failed_cases``, report.md): exit status 1; 2 when no
case could be evaluated.

``python -m flaxdose.evaluate --openkbp --workdir W --data DIR --split val --out REPORT
[--baseline reference.json]`` scores like the OpenKBP challenge instead (dose and DVH score
per patient and overall, submission CSVs, figures; `flaxdose.evaluation.openkbp`): `--data` is a
dataset on the challenge's 128^3 grid, and a model trained on a coarser grid
(``data.downsample``) is scored there after its dose is brought back.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

from absl import flags

from flaxdose import cli, evaluation, inference, openkbp
from flaxdose.data.case import ALL_SPLITS, Dataset, with_all_split
from flaxdose.errors import FlaxdoseError
from flaxdose.evaluation.openkbp import DISTANCE_REFERENCE, NETWORK, evaluate_openkbp
from flaxdose.inference.baseline import DistanceBaseline
from flaxdose.inference.dicom_plans import grid_name
from flaxdose.io import atomic_write_text, check_writable
from flaxdose.metrics import PROSTATE_METRIC_SPECS, compare_specs, parse_metric_spec
from flaxdose.run import Run, require_workdir

FLAGS = flags.FLAGS


def evaluate_workdirs(workdirs: Sequence[str | Path], data: str | Path, split: str, out: str | Path, *,
                      names: Sequence[str] | None = None, which: str = "best", batch_size: int = 1,
                      overwrite: bool = False, example_case: str | None = None, mirror: bool = False,
                      keep_going: bool = True, specs: Sequence[str] | None = None) -> dict:
    """Load each workdir's model, evaluate the split of `data`, write the report folder `out`; the summary.

    `mirror`: each model averages its prediction with that of the left-right mirrored case. `specs`: the
    metrics of clinical_metrics.csv (`write_clinical_metrics`; default prostate constraints).
    `keep_going`: cases that cannot be evaluated are left out and listed in the summary's
    ``failed_cases`` (`flaxdose.evaluation.evaluate_models`). Raises FlaxdoseError before any
    long work for an `out` that holds files (unless `overwrite`), an empty split or one whose
    doses are predictions (not plans), a workdir without a model, or a wrong number of
    `names`; and when no case could be evaluated.
    """
    check_writable(out, overwrite, "evaluation")  # before the long work
    if specs:
        for spec in specs:
            parse_metric_spec(spec)  # a typo refused before any model is loaded
    dataset = with_all_split(Dataset.open(data), split)
    if split not in dataset.splits:
        raise FlaxdoseError(f"dataset {dataset.root} has no split {split!r}; it has {sorted(dataset.splits)}: choose "
                            f"one with --split, or --split {ALL_SPLITS} for every case")
    if keep_going:  # an empty split fails before any model is loaded; an unreadable case file fails that case only
        evaluation.split_ids(dataset, split)
    else:  # an empty split, an unreadable case or predictions fail before any model is loaded
        evaluation.load_references(dataset, split)
    for workdir in workdirs:
        require_workdir(workdir)
    loaded = [inference.Model.load(w, which, mirror=mirror) for w in workdirs]
    if names and len(names) != len(loaded):
        raise FlaxdoseError(f"--names gives {len(names)} names for {len(loaded)} models; give one per model")
    models = dict(zip(evaluation.unique_names(list(names) if names else [m.name for m in loaded]), loaded))
    result = evaluation.evaluate_models(models, dataset, split, batch_size, keep_going=keep_going)
    failed = f" ({len(result.failed)} more not evaluated, see Notes)" if result.failed else ""
    note = f"Split {split!r} of {Path(data).resolve()}: {len(result.references)} cases{failed}; models: " + ", ".join(
        f"{n} ({Path(w).resolve()})" for n, w in zip(models, workdirs))
    summary = evaluation.write_report(result.rows, out, result.references, result.predictions, overwrite=overwrite,
                                      example_case=example_case, note=note, failed=result.failed)
    write_clinical_metrics(result.references, result.predictions, Path(out) / CLINICAL_CSV, specs)
    return summary


CLINICAL_CSV = "clinical_metrics.csv"
CLINICAL_COLUMNS = ("case_id", "model", "structure", "metric", "unit", "reference", "predicted", "difference", "grid")


def write_clinical_metrics(references: Sequence, predictions: dict, path: str | Path,
                           specs: Sequence[str] | None = None) -> Path:
    """Write, per case and model, the metric specs (`flaxdose.metrics.PROSTATE_METRIC_SPECS` by default, e.g.
    ``Rectum V70Gy[%]``, ``PTV D95[%]``) of the reference and the predicted dose with the case's masks on the
    case's grid (`CLINICAL_COLUMNS`; values in the spec's unit, empty for an empty structure), atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CLINICAL_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for model, cases in predictions.items():
        for ref, pred in zip(references, cases):
            for row in compare_specs(ref.dose, pred.dose, ref.masks, ref.structures, ref.spacing_mm, ref.prescription_gy,
                                     PROSTATE_METRIC_SPECS if specs is None else specs):
                values = {k: "" if not math.isfinite(row[k]) else f"{row[k]:.4f}"
                          for k in ("reference", "predicted", "difference")}
                writer.writerow({"case_id": ref.case_id, "model": model, "structure": row["structure"],
                                 "metric": row["metric"], "unit": row["unit"], **values, "grid": grid_name(ref)})
    return atomic_write_text(path, buffer.getvalue())


def evaluate_openkbp_workdir(workdir: str | Path, data: str | Path, split: str, out: str | Path, *,
                             baseline: str | Path | None = None, which: str = "best", overwrite: bool = False,
                             example_case: str | None = None, mirror: bool = False) -> dict:
    """Score the model of `workdir` (and the reference model in `baseline`) like the OpenKBP challenge; the summary.

    Raises FlaxdoseError before any long work for an `out` that holds files (unless
    `overwrite`), a `data` not on the challenge's grid, a workdir without a model (`Model.load`), or a
    run whose grid factor disagrees with its training dataset.
    """
    check_writable(out, overwrite, "evaluation")
    dataset = Dataset.open(data)
    if openkbp.dataset_downsample(dataset) != 1:
        raise FlaxdoseError(f"{dataset.root} is downsampled; score against the challenge-grid dataset "
                            "(python -m flaxdose.convert_openkbp without --downsample)")
    network = inference.Model.load(workdir, which, mirror=mirror)  # its config.json read once, with the model
    factor = openkbp.training_downsample(network.config.data)
    references = evaluation.load_references(dataset, split)
    models = {NETWORK: network}
    if baseline:
        models[DISTANCE_REFERENCE] = DistanceBaseline.load(baseline)
    note = f"Split {split!r} of {dataset.root.resolve()} ({len(references)} patients); network {Path(workdir).resolve()}"
    return evaluate_openkbp(models, references, out, factor, overwrite=overwrite, example_case=example_case, note=note)


def define_flags() -> None:
    """The command's flags (defined only when run as a program, so tests can import the module)."""
    flags.DEFINE_string("workdir", None, "training workdir of the model to evaluate")
    flags.DEFINE_string("compare", None, "a second workdir: evaluated too, with paired t-tests against --workdir")
    flags.DEFINE_list("names", None, "display names of the models, comma-separated (default: workdir names)")
    flags.DEFINE_string("which", "best", "checkpoint to load: best or latest")
    flags.DEFINE_string("data", None, "dataset folder (with manifest.json) holding the reference doses; "
                        "default: the dataset the --workdir run trained on")
    flags.DEFINE_string("split", "test", "which split to evaluate ('all': every case of every split)")
    flags.DEFINE_string("out", None, "report folder (CSV, summary.json, report.md, figures)")
    flags.DEFINE_string("case", None, "case id for the dose-slice/DVH figure (default: the median-Dice case)")
    flags.DEFINE_integer("batch_size", 1, "volumes per forward pass", lower_bound=1)
    flags.DEFINE_bool("overwrite", False, "replace an existing --out folder")
    flags.DEFINE_bool("openkbp", False, "score like the OpenKBP challenge (dose and DVH score, submission CSVs)")
    flags.DEFINE_string("baseline", None, "with --openkbp: a distance-to-target reference (flaxdose.inference.baseline) to score too")
    flags.DEFINE_list("metrics", None, "clinical_metrics.csv: DVH metrics as physicists write them, e.g. "
                      "'Rectum V70Gy[%],Bladder V65Gy[cc],PTV D95[%]' (default: prostate constraints)")
    flags.DEFINE_bool("mirror", False, "average each prediction with that of the left-right mirrored case (test-time augmentation)")


def main(argv):
    """absl main: evaluate `--workdir` (and `--compare`) on `--data`/`--split`, write `--out`, print the mean Dice
    (and the cases that failed: exit status 1).

    Raises FlaxdoseError when --workdir or --out is missing, or --data with --openkbp (and see
    `evaluate_workdirs`).
    """
    del argv
    cli.require("usage: python -m flaxdose.evaluate --workdir W [--compare W2] [--data DIR] [--split test] --out REPORT",
                workdir=(FLAGS.workdir, "the trained run to score"), out=(FLAGS.out, "the report folder"))
    if FLAGS.openkbp:
        if FLAGS.compare or FLAGS.names:
            raise FlaxdoseError("--openkbp scores one network (and --baseline); drop --compare and --names")
        if not FLAGS.data:  # the run's own dataset may be downsampled; the challenge scores on its 128^3 grid
            raise FlaxdoseError("--openkbp needs --data: the challenge-grid dataset (convert_openkbp without --downsample)")
        summary = evaluate_openkbp_workdir(FLAGS.workdir, FLAGS.data, FLAGS.split, FLAGS.out, baseline=FLAGS.baseline,
                                           which=FLAGS.which, overwrite=FLAGS.overwrite, example_case=FLAGS.case,
                                           mirror=FLAGS.mirror)
        print(json.dumps({"out": str(Path(FLAGS.out).resolve()), **summary["scores"]}))
        return
    workdirs = [FLAGS.workdir] + ([FLAGS.compare] if FLAGS.compare else [])
    if not FLAGS.data:  # the run's own dataset is found through the workdir
        for workdir in workdirs:
            require_workdir(workdir)
    data = FLAGS.data or Run.open(FLAGS.workdir).dataset_path()
    summary = evaluate_workdirs(workdirs, data, FLAGS.split, FLAGS.out, names=FLAGS.names, which=FLAGS.which,
                                batch_size=FLAGS.batch_size, overwrite=FLAGS.overwrite, example_case=FLAGS.case,
                                mirror=FLAGS.mirror, specs=FLAGS.metrics)
    brief = {m: summary["metrics"][m]["dice_mean"]["mean"] for m in summary["models"]}
    failed = summary["failed_cases"]
    print(json.dumps({"out": str(Path(FLAGS.out).resolve()), "mean_dice": brief, "failed": failed}))
    return cli.PARTIAL_FAILURE if failed else 0  # the report and the log name the failed cases


def run():
    """Console script ``flaxdose-evaluate``."""
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
