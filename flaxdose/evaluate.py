"""Evaluate trained models against reference doses (``flaxdose-evaluate``); the library is `flaxdose.evaluation`.

``python -m flaxdose.evaluate --workdir W [--compare W2] --data DIR --split test --out REPORT``
predicts every case of the split with each model (best checkpoint) and writes the report
folder described in `flaxdose.evaluation` (cases.csv, summary.json, report.md, figures).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from absl import flags

from flaxdose import cli, evaluation, inference
from flaxdose.data.case import Dataset
from flaxdose.errors import FlaxdoseError
from flaxdose.io import check_writable

FLAGS = flags.FLAGS


def evaluate_workdirs(workdirs: Sequence[str | Path], data: str | Path, split: str, out: str | Path, *,
                      names: Sequence[str] | None = None, which: str = "best", batch_size: int = 1,
                      overwrite: bool = False, example_case: str | None = None) -> dict:
    """Load each workdir's model, evaluate the split of `data`, write the report folder `out`; the summary.

    Raises FlaxdoseError before any long work for an `out` that holds files (unless
    `overwrite`), an empty split, a workdir without a model, or a wrong number of `names`.
    """
    check_writable(out, overwrite)  # before the long work
    dataset = Dataset.open(data)
    evaluation.load_references(dataset, split)  # an empty split fails before any model is loaded
    loaded = [inference.Model.load(w, which) for w in workdirs]
    if names and len(names) != len(loaded):
        raise FlaxdoseError(f"--names gives {len(names)} names for {len(loaded)} models; give one per model")
    models = dict(zip(evaluation.unique_names(list(names) if names else [m.name for m in loaded]), loaded))
    rows, references, predictions = evaluation.evaluate_models(models, dataset, split, batch_size)
    note = f"Split {split!r} of {Path(data).resolve()}: {len(references)} cases; models: " + ", ".join(
        f"{n} ({Path(w).resolve()})" for n, w in zip(models, workdirs))
    return evaluation.write_report(rows, out, references, predictions, overwrite=overwrite, example_case=example_case, note=note)


def define_flags() -> None:
    """The command's flags (defined only when run as a program, so tests can import the module)."""
    flags.DEFINE_string("workdir", None, "training workdir of the model to evaluate")
    flags.DEFINE_string("compare", None, "a second workdir: evaluated too, with paired t-tests against --workdir")
    flags.DEFINE_list("names", None, "display names of the models, comma-separated (default: workdir names)")
    flags.DEFINE_string("which", "best", "checkpoint to load: best or latest")
    flags.DEFINE_string("data", None, "dataset folder (with manifest.json) holding the reference doses")
    flags.DEFINE_string("split", "test", "which split to evaluate")
    flags.DEFINE_string("out", None, "report folder (CSV, summary.json, report.md, figures)")
    flags.DEFINE_string("case", None, "case id for the dose-slice/DVH figure (default: the median-Dice case)")
    flags.DEFINE_integer("batch_size", 1, "volumes per forward pass")
    flags.DEFINE_bool("overwrite", False, "replace an existing --out folder")


def main(argv):
    """absl main: evaluate `--workdir` (and `--compare`) on `--data`/`--split`, write `--out`, print the mean Dice.

    Raises FlaxdoseError when --workdir, --data or --out is missing (and see `evaluate_workdirs`).
    """
    del argv
    if not FLAGS.workdir or not FLAGS.data or not FLAGS.out:
        raise FlaxdoseError("usage: python -m flaxdose.evaluate --workdir W [--compare W2] --data DIR "
                            "[--split test] --out REPORT")
    workdirs = [FLAGS.workdir] + ([FLAGS.compare] if FLAGS.compare else [])
    summary = evaluate_workdirs(workdirs, FLAGS.data, FLAGS.split, FLAGS.out, names=FLAGS.names, which=FLAGS.which,
                                batch_size=FLAGS.batch_size, overwrite=FLAGS.overwrite, example_case=FLAGS.case)
    brief = {m: summary["metrics"][m]["dice_mean"]["mean"] for m in summary["models"]}
    print(json.dumps({"out": str(Path(FLAGS.out).resolve()), "mean_dice": brief}))


def run():
    """Console script ``flaxdose-evaluate``."""
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
