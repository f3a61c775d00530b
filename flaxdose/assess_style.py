"""Style check before adapting a model (``flaxdose-assess``); the library is `flaxdose.planqa.assess`.

    python -m flaxdose.assess_style --workdirs W[,W2,...] --own_data SRC [--own_split test] \\
        --data CLINIC [--split all] [--curve SWEEP_DIR_or_results.csv --curve_style STYLE [--curve_mode full]] --out REPORT

Predicts held-out plans of the model's own style (``--own_data``) and the clinic's plans
(``--data``; several workdirs: their ensemble's mean dose), compares the errors (mean isodose
Dice, mean |DVH error|, Welch's t-test) and, with a sweep's learning curve, recommends whether
to adapt, with how many plans and the expected gain. REPORT gets assessment.json, cases.csv
and report.md. Exit status 0, or 2 for bad input (flaxdose.cli).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import flags

from flaxdose import cli, planqa
from flaxdose.data.case import ALL_SPLITS
from flaxdose.errors import FlaxdoseError
from flaxdose.io import check_writable
from flaxdose.planqa import assess

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined only when run as a program, so tests can import the module)."""
    flags.DEFINE_list("workdirs", None, "the source model's workdir (several, or glob patterns: an ensemble)")
    flags.DEFINE_string("which", "best", "checkpoint to load: best or latest")
    flags.DEFINE_string("own_data", None, "dataset with held-out plans of the model's own style")
    flags.DEFINE_string("own_split", "test", "split of --own_data (plans the model did not train on)")
    flags.DEFINE_string("data", None, "the clinic's plans (a dataset, e.g. from flaxdose-import)")
    flags.DEFINE_string("split", ALL_SPLITS, "split of --data ('all': every split)")
    flags.DEFINE_string("curve", None, "a sweep folder or its report/results.csv: the learning curve")
    flags.DEFINE_string("curve_style", None, "the sweep's target style whose curve stands for this clinic")
    flags.DEFINE_string("curve_mode", None, "the curve's mode (e.g. full); default: the best one")
    flags.DEFINE_float("alpha", assess.DEFAULT_ALPHA, "significance level of the style-difference tests")
    flags.DEFINE_string("out", None, "report folder")
    flags.DEFINE_integer("batch_size", 1, "windows per forward pass", lower_bound=1)
    flags.DEFINE_bool("overwrite", False, "replace an existing --out folder")


USAGE = ("usage: python -m flaxdose.assess_style --workdirs W --own_data SRC --data CLINIC "
         "[--curve SWEEP --curve_style STYLE] --out REPORT")


def rise_summary(rise: dict | None) -> dict | None:
    """The printed line's ``curve_rises``: the rise test's verdict, Wilcoxon p and mean difference (None: not tested)."""
    return rise and {k: rise[k] for k in ("verdict", "p", "mean")}


def main(argv):
    """absl main: assess the clinic's style against the model's own, write `--out`, print the verdict.

    Raises FlaxdoseError naming every missing required flag, for positional arguments, or for
    --curve without --curve_style (and see `flaxdose.planqa.assess`).
    """
    if len(argv) > 1:
        raise FlaxdoseError(f"unexpected arguments {argv[1:]} (every input is a flag); {USAGE}")
    cli.require(USAGE, workdirs=(FLAGS.workdirs, "the source model's training workdir(s)"),
                own_data=(FLAGS.own_data, "held-out plans of the model's own style"),
                data=(FLAGS.data, "the clinic's plans"), out=(FLAGS.out, "the report folder"))
    if bool(FLAGS.curve) != bool(FLAGS.curve_style):
        raise FlaxdoseError("--curve needs --curve_style (the sweep's style that stands for this clinic), and back")
    check_writable(FLAGS.out, FLAGS.overwrite, "assessment")
    curve = assess.learning_curve(FLAGS.curve, FLAGS.curve_style, FLAGS.curve_mode) if FLAGS.curve else None
    own, _ = planqa.load_plans(FLAGS.own_data, FLAGS.own_split)
    clinic, _ = planqa.load_plans(FLAGS.data, FLAGS.split)
    ensemble = planqa.Ensemble.load(planqa.expand_workdirs(FLAGS.workdirs), FLAGS.which)
    result = assess.assess_style(ensemble, own, clinic, curve, FLAGS.alpha, FLAGS.batch_size)
    note = (f"Model: {', '.join(ensemble.members)}. Own style: split {FLAGS.own_split!r} of "
            f"{Path(FLAGS.own_data).resolve()} ({len(own)} plans). Clinic: split {FLAGS.split!r} of "
            f"{Path(FLAGS.data).resolve()} ({len(clinic)} plans).")
    report = assess.write_assessment(result, FLAGS.out, note, FLAGS.overwrite)
    rec = result["recommendation"]
    print(json.dumps({"report": str(report.resolve()), "dice_difference": result["distance"]["dice_mean"]["difference"],
                      "p": result["distance"]["dice_mean"]["p"], "adapt": rec and rec["adapt"],
                      "plans_needed": rec and rec["plans_needed"], "plans_needed_ci": rec and rec["plans_needed_ci"],
                      "curve_rises": rec and rise_summary(rec["curve_rises"])}))
    if rec and rec["baseline_missing"]:
        print(f"[assess] {assess.NO_BASELINE}", file=sys.stderr)


def run():
    """Console script ``flaxdose-assess``."""
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
