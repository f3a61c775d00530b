"""Predict doses with a trained model (``flaxdose-predict``); the library is `flaxdose.inference`.

``python -m flaxdose.predict --workdir W [--data DIR] --split test --out OUT`` predicts every
case of a split and writes them as a dataset of Cases whose `dose` is the prediction (Gy);
``--data`` defaults to the dataset the run trained on; ``--split all`` predicts every case of every split
(e.g. an import with only "train"). ``--workdir`` also takes a model package (``flaxdose.export_model``:
hash-checked, then predicting exactly what its workdir predicts); a package holds no data, so give
``--data`` with it.

DICOM-RT, folder in, folder out: ``--dicom EXPORT_ROOT --out OUT`` predicts every plan found
under EXPORT_ROOT (CT + RTSTRUCT [+ RTPLAN] per plan, any folder layout) and writes per plan
OUT/plan_NN/RD_flaxdose.dcm (an RTDOSE on the plan's CT series and frame of reference,
referencing its RTPLAN), metrics.csv (DVH metrics on that RTDOSE's own grid: the paper's and
``--metrics``, default prostate constraints) and dose.png, plus OUT/summary.csv; the console
shows each plan's folder and key metrics (`flaxdose.inference.predict_dicom_folder`). One plan
failing does not stop the others: it is listed and the exit status is 1.
``--dicom PATIENT_DIR --rtdose_out FILE.dcm|DIR`` predicts the one plan of PATIENT_DIR (DIR gets
RD_flaxdose.dcm; a rerun replaces it with ``--overwrite``). ``--rtdose_out DIR --reference CT_DIR``
writes the prediction of one dataset case on that patient's CT. The export is read on the model
grid (its training voxel spacing, the default field of view; ``flaxdose.qa --dicom`` reads on the
same grid); ``--aliases FILE`` maps the export's ROI names onto the model's structures.

A case that cannot be predicted (no target, another voxel spacing than the model's, ...) is
left out of ``--out`` and listed (log, the printed line, the manifest's ``failed``): exit
status 1; 2 when no case could be predicted.
"""

import json
from pathlib import Path

from absl import flags

from flaxdose import cli, inference
from flaxdose.dicom import AliasTable
from flaxdose.errors import FlaxdoseError
from flaxdose.io import check_writable
from flaxdose.run import Run

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined only when run as a program, so tests can import the module)."""
    flags.DEFINE_string("workdir", None, "training workdir to load the model from (best checkpoint), or a model package "
                        "(python -m flaxdose.export_model)")
    flags.DEFINE_string("checkpoint", None, "a checkpoint path instead of --workdir")
    flags.DEFINE_string("data", None, "dataset folder (with manifest.json); default: the dataset the run trained on")
    flags.DEFINE_string("split", "test", "which split to predict ('all': every case of every split)")
    flags.DEFINE_string("out", None, "output dataset folder for the predicted cases")
    flags.DEFINE_integer("batch_size", 1, "windows per forward pass", lower_bound=1)
    flags.DEFINE_bool("full_volume", False, "one whole-volume pass per case instead of sliding windows")
    flags.DEFINE_bool("overwrite", False, "replace an existing --out folder")
    flags.DEFINE_string("dicom", None, "a DICOM-RT export: with --out, a root whose every plan is predicted; with "
                        "--rtdose_out, one patient's folder")
    flags.DEFINE_float("prescription_gy", None, "prescription for --dicom when the export has no RTPLAN")
    flags.DEFINE_string("aliases", None, "--dicom: JSON file mapping structures to ROI names, e.g. "
                        '{"Rectum": ["Rektum_wall"]}')
    flags.DEFINE_enum("bits", "32", ["16", "32"], "bits per stored dose value in the RTDOSE")
    flags.DEFINE_list("metrics", None, "--dicom --out: DVH metrics as physicists write them, e.g. "
                      "'Rectum V70Gy[%],Bladder V65Gy[cc],PTV D95[%],PTV Dmax[0.03cc]' (default: prostate constraints)")
    flags.DEFINE_string("case", None, "with --rtdose_out: the case of --data/--split to export")
    flags.DEFINE_string("rtdose_out", None, "RTDOSE of one prediction: a .dcm file, or a folder (gets RD_flaxdose.dcm)")
    flags.DEFINE_string("reference", None, "the patient's CT folder for --rtdose_out (default: --dicom)")
    flags.DEFINE_string("plan", None, "the patient's RTPLAN file, referenced by the RTDOSE (default: the export's)")

def main(argv):
    """absl main: load the model, predict `--data`/`--split` into `--out`, or the plans of a `--dicom` export
    (every plan into `--out`, or one into `--rtdose_out`); exit status 1 when some cases or plans could not
    be predicted. Raises FlaxdoseError for missing or conflicting flags, or when nothing could be predicted."""
    del argv
    usage = ("usage: python -m flaxdose.predict --workdir W|PKG (or --checkpoint C) "
             "(--out OUT [--data DIR] | --dicom EXPORT_ROOT --out OUT | --dicom PATIENT_DIR --rtdose_out FILE_OR_DIR)")
    if FLAGS.dicom and not (FLAGS.out or FLAGS.rtdose_out):
        raise FlaxdoseError("--dicom needs --out OUT (every plan under an export root: RTDOSE, metrics, figure per "
                            "plan) or --rtdose_out FILE.dcm|DIR (one patient's RTDOSE)")
    cli.require(usage, workdir=(FLAGS.workdir or FLAGS.checkpoint, "or --checkpoint: the model to predict with"),
                out=(FLAGS.out or FLAGS.rtdose_out, "the folder for the predictions (or --rtdose_out with --dicom)"))
    if FLAGS.dicom and FLAGS.out and FLAGS.rtdose_out:
        raise FlaxdoseError("--dicom takes --out OUT (every plan of an export root) or --rtdose_out (one patient), "
                            "not both")
    if FLAGS.rtdose_out and not (FLAGS.reference or FLAGS.dicom):
        raise FlaxdoseError("--rtdose_out needs --reference CT_DIR, the patient's CT the dose is written on")
    if FLAGS.data and not FLAGS.out:
        raise FlaxdoseError("--data needs --out, the folder for the predicted cases")
    if FLAGS.data and FLAGS.dicom:
        raise FlaxdoseError("predict either a dataset (--data) or a DICOM export (--dicom), not both")
    aliases = _aliases()
    bits = int(FLAGS.bits)
    if FLAGS.rtdose_out:
        inference.resolve_rtdose_path(FLAGS.rtdose_out)  # a bad path refused before the long work
    run = FLAGS.checkpoint or FLAGS.workdir
    check_run_exists(run, "--checkpoint" if FLAGS.checkpoint else "--workdir")
    if FLAGS.dicom and FLAGS.out:
        check_writable(FLAGS.out, FLAGS.overwrite, "dicom predictions")
        model = inference.Model.load(run, full_volume=FLAGS.full_volume)
        results = inference.predict_dicom_folder(model, FLAGS.dicom, FLAGS.out, prescription_gy=FLAGS.prescription_gy,
                                                 aliases=aliases, bits=bits, specs=FLAGS.metrics,
                                                 overwrite=FLAGS.overwrite, batch_size=FLAGS.batch_size, echo=print)
        failed = {r.name: f"{r.folder}: {r.error}" for r in results if r.error}
        done = [r.name for r in results if r.rtdose]
        print(json.dumps({"plans": len(results), "rtdose_written": len(done), "out": str(Path(FLAGS.out).resolve()),
                          "summary": str(Path(FLAGS.out).resolve() / inference.SUMMARY_CSV), "failed": failed}))
        if not done and not any(r.metrics for r in results):
            raise FlaxdoseError(f"no plan under {FLAGS.dicom} could be predicted: " + "; ".join(
                f"{k} ({v})" for k, v in failed.items()))
        return cli.PARTIAL_FAILURE if failed else 0
    model = inference.Model.load(run, full_volume=FLAGS.full_volume)
    failed = {}
    if FLAGS.dicom:
        return _one_dicom_patient(model, aliases, bits)
    data = FLAGS.data or Run.open(run).dataset_path()
    result = inference.predict_dataset(model, data, FLAGS.split, FLAGS.out, FLAGS.batch_size, FLAGS.overwrite,
                                       keep_going=True)
    ids, failed = result.split(FLAGS.split), result.manifest["failed"]
    print(json.dumps({"predicted": len(ids), "out": str(result.root), "failed": failed}))
    if FLAGS.rtdose_out:
        if FLAGS.case in failed:
            raise FlaxdoseError(f"case {FLAGS.case!r} could not be predicted ({failed[FLAGS.case]}); "
                                f"choose another --case of {ids[:10]}")
        predicted = [result.load(i) for i in ([FLAGS.case] if FLAGS.case else ids)]
        if len(predicted) != 1:
            raise FlaxdoseError(f"--rtdose_out writes one patient's dose; choose one with --case (of {len(predicted)})")
        path = inference.export_rtdose(predicted[0], FLAGS.reference, FLAGS.rtdose_out, FLAGS.plan, bits=bits,
                                       overwrite=FLAGS.overwrite)
        print(json.dumps({"rtdose": str(path)}))
    return cli.PARTIAL_FAILURE if failed else 0  # the log and the printed line name the failed cases


def _aliases():
    if FLAGS.aliases and not FLAGS.dicom:
        raise FlaxdoseError("--aliases maps ROI names of a DICOM export; it goes with --dicom")
    return AliasTable.from_file(FLAGS.aliases)


def check_run_exists(path: str, flag: str) -> None:
    """Refuse a workdir, package or checkpoint that does not exist, saying so (not a missing checkpoint inside it)."""
    if not Path(path).exists():
        raise FlaxdoseError(f"{flag} {path} does not exist; give a training workdir (python -m flaxdose.train "
                            "--config=quick --workdir W makes one) or a model package (python -m "
                            "flaxdose.export_model --workdir W --out PKG makes one)")


def _one_dicom_patient(model, aliases, bits: int) -> int:
    """--dicom PATIENT_DIR --rtdose_out: `inference.predict_dicom_patient`, its line on the console."""
    result = inference.predict_dicom_patient(model, FLAGS.dicom, FLAGS.rtdose_out, prescription_gy=FLAGS.prescription_gy,
                                             aliases=aliases, bits=bits, specs=FLAGS.metrics, overwrite=FLAGS.overwrite,
                                             reference=FLAGS.reference, plan_path=FLAGS.plan,
                                             batch_size=FLAGS.batch_size)
    print(inference.plan_line(result))
    print(json.dumps({"rtdose": str(result.rtdose)}))
    return 0


def run():
    """Console script ``flaxdose-predict``."""
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
