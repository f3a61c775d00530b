"""Plan QA against predicted DVH bands (``flaxdose-qa``); the library is `flaxdose.planqa`.

    python -m flaxdose.qa --workdirs W1,W2,W3 --calibration_data SRC --calibration_split calibration --out CAL
    python -m flaxdose.qa --workdirs W1,W2,W3 --calibration CAL/calibration.json --data DIR [--split all] --out QA
    python -m flaxdose.qa --workdirs 'SWEEP/runs/internal_a_n010_full_seed*' --calibration C.json --dicom PATIENT --out QA

An ensemble of trained models (workdirs, model packages of ``flaxdose.export_model``, or glob
patterns such as a sweep's runs of one setting) predicts each plan's DVH metrics; held-out plans of the models' style calibrate the
bands (``--calibration_data``, written to OUT/calibration.json for reuse with ``--calibration``).
Every plan of ``--data`` (a dataset, e.g. one written by ``flaxdose-import``) or the one plan of
``--dicom`` (a patient's CT + RTSTRUCT + RTDOSE [+ RTPLAN] export, read on the grid that
``flaxdose.predict --dicom`` predicts on: the models' training spacing when the default 4x4x3 mm
does not fit it) is checked: OAR Dmean/D2 above the band or PTV D95/D98 below it by more than
``--tolerance_gy`` is flagged. A DICOM plan's metrics are taken on its own RTDOSE grid with the
structures rasterized there (the numbers its planning system shows), the members' predictions
resampled onto that grid (`flaxdose.planqa.on_plan_grid`); qa.csv's ``grid`` column and report.md
name the grid. ``--aliases FILE`` maps the export's ROI names onto the models' structures. OUT gets qa.csv,
clinical_metrics.csv (``--metrics`` specs such as ``Rectum V70Gy[%]``, plan vs prediction, no bands),
summary.json, report.md and one figure per flagged plan (see flaxdose/planqa.py).

Exit status: 0 every plan checked, none flagged; 3 every plan checked, at least one flagged
(``cli.FLAGGED``; the ranked list is printed and in report.md); 1 some plans of the dataset
have no dose and were not checked (listed), whatever the others gave; 2 bad input.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from absl import flags

from flaxdose import cli, planqa
from flaxdose.data.case import ALL_SPLITS
from flaxdose.data.grid import MODEL_SHAPE, MODEL_SPACING_MM
from flaxdose.dicom import AliasTable
from flaxdose.errors import FlaxdoseError
from flaxdose.inference.dicom_plans import grid_name
from flaxdose.inference.package import is_package
from flaxdose.io import atomic_folder, check_writable
from flaxdose.metrics import parse_metric_spec

FLAGS = flags.FLAGS
log = logging.getLogger("flaxdose")
USAGE = ("usage: python -m flaxdose.qa --workdirs W1,W2 (--calibration FILE | --calibration_data DIR) "
         "[--data DIR [--split all] | --dicom PATIENT_DIR] --out OUT")


def define_flags() -> None:
    """The command's flags (defined only when run as a program, so tests can import the module)."""
    flags.DEFINE_list("workdirs", None, "the ensemble: training workdirs, model packages (flaxdose.export_model) or "
                      "glob patterns, comma-separated")
    flags.DEFINE_string("which", "best", "checkpoint of each member: best or latest")
    flags.DEFINE_string("calibration", None, "a calibration.json written earlier for these members")
    flags.DEFINE_string("calibration_data", None, "dataset of held-out plans of the models' style to calibrate on")
    flags.DEFINE_string("calibration_split", "calibration", "split of --calibration_data (not the models' training plans)")
    flags.DEFINE_string("data", None, "dataset whose plans are checked")
    flags.DEFINE_string("split", ALL_SPLITS, "split of --data to check ('all': every split)")
    flags.DEFINE_string("dicom", None, "check one patient's DICOM-RT export (with its RTDOSE) instead of --data")
    flags.DEFINE_float("prescription_gy", None, "prescription for --dicom when the export has no RTPLAN")
    flags.DEFINE_string("aliases", None, "--dicom: JSON file mapping structures to ROI names, e.g. "
                        '{"Rectum": ["Rektum_wall"]}')
    flags.DEFINE_list("model_shape", None, "--dicom: model grid shape (x,y,z); default: as predict --dicom reads it "
                      f"({'x'.join(map(str, MODEL_SHAPE))}, or the same field of view at the models' spacing)")
    flags.DEFINE_list("model_spacing_mm", None, "--dicom: model grid spacing (x,y,z) mm; default: "
                      f"{'x'.join(f'{v:g}' for v in MODEL_SPACING_MM)}, or the models' training spacing when that "
                      "does not fit them")
    flags.DEFINE_list("metrics", None, "clinical_metrics.csv: DVH metrics as physicists write them, plan vs "
                      "prediction, e.g. 'Rectum V70Gy[%],PTV D95[%]' (default: prostate constraints)")
    flags.DEFINE_float("level", planqa.DEFAULT_LEVEL, "band level, two-sided (0.95: 95 % of good plans inside)")
    flags.DEFINE_float("tolerance_gy", planqa.DEFAULT_TOLERANCE_GY, "flag only beyond the band by more than this")
    flags.DEFINE_string("out", None, "report folder")
    flags.DEFINE_integer("batch_size", 1, "windows per forward pass", lower_bound=1)
    flags.DEFINE_bool("overwrite", False, "replace an existing --out folder")


def grid_flag(name: str, kind: type) -> list | None:
    """The (x, y, z) values of the grid flag `name` (None when not given); FlaxdoseError unless 3 numbers > 0."""
    values = FLAGS[name].value
    if values is None:
        return None
    try:
        parsed = [kind(v) for v in values]
    except ValueError:
        parsed = []
    if len(parsed) != 3 or not all(v > 0 for v in parsed):
        raise FlaxdoseError(f"--{name} takes 3 numbers > 0 (x,y,z), got {','.join(values)!r}")
    return parsed


def calibration_for(ensemble: planqa.Ensemble) -> planqa.Calibration:
    if FLAGS.calibration:
        calibration = planqa.Calibration.load(FLAGS.calibration)
        calibration.check_members(ensemble)
        return calibration
    references, _ = planqa.load_plans(FLAGS.calibration_data, FLAGS.calibration_split)
    members = planqa.expand_workdirs(FLAGS.workdirs)
    # a package lists no training cases (never patient IDs), so only workdirs are checked for calibration plans
    # they trained on; the report says which members were not
    packages = [m for m in members if is_package(m)]
    planqa.check_held_out([m for m in members if not is_package(m)], references)
    note = f"split {FLAGS.calibration_split!r} of {Path(FLAGS.calibration_data).resolve()}"
    if packages:
        unchecked = ", ".join(str(m) for m in packages)
        log.warning("model package(s) %s list no training cases: make sure the calibration plans were not among "
                    "their training plans (bands would come out too narrow)", unchecked)
        note += (f"; not checked to be held out from the model package(s) {unchecked} (a package lists no "
                 "training cases): the calibration plans must not be among their training plans")
    return planqa.calibrate(ensemble, references, note, FLAGS.batch_size, progress=True)


def main(argv):
    if len(argv) > 1:
        raise FlaxdoseError(f"unexpected arguments {argv[1:]}; {USAGE}")
    cli.require(USAGE, workdirs=(FLAGS.workdirs, "the ensemble's trained runs"), out=(FLAGS.out, "the QA folder"))
    if bool(FLAGS.calibration) == bool(FLAGS.calibration_data):
        raise FlaxdoseError(f"give one of --calibration FILE (a saved calibration) or --calibration_data DIR "
                            f"(held-out plans to calibrate on); {USAGE}")
    if FLAGS.data and FLAGS.dicom:
        raise FlaxdoseError("check either a dataset (--data) or one DICOM export (--dicom), not both")
    if not (FLAGS.data or FLAGS.dicom or FLAGS.calibration_data):
        raise FlaxdoseError(f"nothing to do: give --data or --dicom (or --calibration_data alone to calibrate); {USAGE}")
    planqa.check_level(FLAGS.level)
    if FLAGS.metrics:
        for spec in FLAGS.metrics:
            parse_metric_spec(spec)  # a typo refused before the long work
    check_writable(FLAGS.out, FLAGS.overwrite, "qa")  # before the long work
    if FLAGS.aliases and not FLAGS.dicom:
        raise FlaxdoseError("--aliases maps ROI names of a DICOM export; it goes with --dicom")

    aliases = AliasTable.from_file(FLAGS.aliases)
    workdirs = planqa.expand_workdirs(FLAGS.workdirs)
    for workdir in workdirs:
        if not Path(workdir).exists():
            raise FlaxdoseError(f"--workdirs: {workdir} does not exist; give training workdirs (python -m "
                                "flaxdose.train --config=quick --workdir W makes one) or model packages (python -m "
                                "flaxdose.export_model --workdir W --out PKG makes one)")
    ensemble = planqa.Ensemble.load(workdirs, FLAGS.which)
    plans, own = [], None
    if FLAGS.dicom:  # read (and checked against the members) before the long calibration
        model_case, own = planqa.read_dicom_plans(FLAGS.dicom, ensemble, FLAGS.prescription_gy,
                                                  grid_flag("model_shape", int), grid_flag("model_spacing_mm", float),
                                                  aliases)
        plans = [model_case]
    elif FLAGS.data:  # read before the long calibration too: a wrong --split or --data is refused first
        plans, skipped = planqa.load_plans(FLAGS.data, FLAGS.split)
    calibration = calibration_for(ensemble)
    if not (FLAGS.data or FLAGS.dicom):  # calibrate only
        with atomic_folder(FLAGS.out, FLAGS.overwrite, "qa") as tmp:
            calibration.save(tmp / "calibration.json")
        path = Path(FLAGS.out).resolve() / "calibration.json"
        print(json.dumps({"calibration": str(path), "cases": len(calibration.cases)}))
        return 0
    predictions = None
    if FLAGS.dicom:
        skipped = []
        # plan metrics on the plan's own RTDOSE grid (what the planning system shows), the prediction brought there
        made = ensemble.predict_cases(plans, FLAGS.batch_size, progress=True)
        predictions = [planqa.on_plan_grid(made[0], own)]
        note = (f"DICOM export {Path(FLAGS.dicom).resolve()}. DVH metrics of the plan and of the prediction on the "
                f"plan's own {grid_name(own)} (the members predicted on the {grid_name(plans[0])}; their doses "
                "resampled trilinearly); the bands' calibration residuals come from the calibration plans' grid")
        plans = [own]
    else:
        note = f"Split {FLAGS.split!r} of {Path(FLAGS.data).resolve()}: {len(plans)} plans, DVH metrics on each plan's grid"
    result = planqa.run_qa(ensemble, calibration, plans, FLAGS.level, FLAGS.tolerance_gy, predictions=predictions,
                           batch_size=FLAGS.batch_size, progress=True)
    info = planqa.write_report(result, calibration, FLAGS.out, skipped=skipped, note=note, overwrite=FLAGS.overwrite,
                               specs=FLAGS.metrics)
    flagged = [{"case_id": p["case_id"], "score_gy": round(p["score_gy"], 2), "flags": p["flags"]}
               for p in result.plans if p["flagged"]]
    print(json.dumps({"out": str(Path(FLAGS.out).resolve()), "plans": info["num_plans"], "flagged": flagged,
                      "not_checked": skipped}))
    if skipped:
        return cli.PARTIAL_FAILURE
    return cli.FLAGGED if flagged else 0


def run():
    """Console script ``flaxdose-qa``."""
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
