"""Predict doses with a trained model (``flaxdose-predict``); the library is `flaxdose.inference`.

``python -m flaxdose.predict --workdir W [--data DIR] --split test --out OUT`` predicts every
case of a split and writes them as a dataset of Cases whose `dose` is the prediction (Gy);
``--data`` defaults to the dataset the run trained on.
``--rtdose_out DIR --reference CT_DIR`` also writes the prediction of one case as a DICOM
RTDOSE on that patient's CT; ``--dicom PATIENT_DIR`` predicts straight from a patient's
DICOM-RT export (CT + RTSTRUCT [+ RTPLAN]) on the paper's model grid (at the model's training
voxel spacing and the same field of view when it was trained on another, `flaxdose.inference.predict_dicom`;
``flaxdose.qa --dicom`` reads on the same grid). Sliding windows of the
training patch size by default; ``--full_volume`` predicts each volume in one pass.

A case that cannot be predicted (no target, another voxel spacing than the model's, ...) is
left out of ``--out`` and listed (log, the printed line, the manifest's ``failed``): exit
status 1; 2 when no case could be predicted.
"""

import json

from absl import flags

from flaxdose import cli, inference
from flaxdose.errors import FlaxdoseError

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined only when run as a program, so tests can import the module)."""
    flags.DEFINE_string("workdir", None, "training workdir to load the model from (best checkpoint)")
    flags.DEFINE_string("checkpoint", None, "a checkpoint path instead of --workdir")
    flags.DEFINE_string("data", None, "dataset folder (with manifest.json); default: the dataset the run trained on")
    flags.DEFINE_string("split", "test", "which split to predict")
    flags.DEFINE_string("out", None, "output dataset folder for the predicted cases")
    flags.DEFINE_integer("batch_size", 1, "windows per forward pass")
    flags.DEFINE_bool("full_volume", False, "one whole-volume pass per case instead of sliding windows")
    flags.DEFINE_bool("overwrite", False, "replace an existing --out folder")
    flags.DEFINE_string("dicom", None, "predict one patient straight from its DICOM-RT export folder")
    flags.DEFINE_float("prescription_gy", None, "prescription for --dicom when the export has no RTPLAN")
    flags.DEFINE_string("case", None, "with --rtdose_out: the case of --data/--split to export")
    flags.DEFINE_string("rtdose_out", None, "folder for an RTDOSE of the prediction (one case)")
    flags.DEFINE_string("reference", None, "the patient's CT folder for --rtdose_out (default: --dicom)")
    flags.DEFINE_string("plan", None, "the patient's RTPLAN file, referenced by the RTDOSE")


def main(argv):
    """absl main: load the model, predict `--data`/`--split` into `--out` or one `--dicom` patient, then
    optionally write one prediction as RTDOSE; exit status 1 when some cases could not be predicted.
    Raises FlaxdoseError for missing or conflicting flags, or when no case could be predicted."""
    del argv
    usage = ("usage: python -m flaxdose.predict --workdir W (or --checkpoint C) "
             "(--out OUT [--data DIR] | --dicom PATIENT_DIR --rtdose_out DIR)")
    cli.require(usage, workdir=(FLAGS.workdir or FLAGS.checkpoint, "or --checkpoint: the model to predict with"),
                out=(FLAGS.out or FLAGS.dicom, "the folder for the predicted cases; or --dicom"))
    if FLAGS.dicom and not FLAGS.rtdose_out:
        raise FlaxdoseError("--dicom needs --rtdose_out DIR, the folder the predicted RTDOSE is written to")
    if FLAGS.rtdose_out and not (FLAGS.reference or FLAGS.dicom):
        raise FlaxdoseError("--rtdose_out needs --reference CT_DIR, the patient's CT the dose is written on")
    if FLAGS.data and not FLAGS.out:
        raise FlaxdoseError("--data needs --out, the folder for the predicted cases")
    run = FLAGS.checkpoint or FLAGS.workdir
    model = inference.Model.load(run, full_volume=FLAGS.full_volume)
    failed = {}
    if FLAGS.dicom:
        predicted = [inference.predict_dicom(model, FLAGS.dicom, FLAGS.prescription_gy)]
    else:
        data = FLAGS.data or inference.run_dataset(run)
        result = inference.predict_dataset(model, data, FLAGS.split, FLAGS.out, FLAGS.batch_size, FLAGS.overwrite,
                                           keep_going=True)
        ids, failed = result.split(FLAGS.split), result.manifest["failed"]
        print(json.dumps({"predicted": len(ids), "out": str(result.root), "failed": failed}))
        if FLAGS.rtdose_out and FLAGS.case in failed:
            raise FlaxdoseError(f"case {FLAGS.case!r} could not be predicted ({failed[FLAGS.case]}); "
                                f"choose another --case of {ids[:10]}")
        predicted = [result.load(i) for i in ([FLAGS.case] if FLAGS.case else ids)] if FLAGS.rtdose_out else []
    if FLAGS.rtdose_out:
        if len(predicted) != 1:
            raise FlaxdoseError(f"--rtdose_out writes one patient's dose; choose one with --case (of {len(predicted)})")
        path = inference.export_rtdose(predicted[0], FLAGS.reference or FLAGS.dicom, FLAGS.rtdose_out, FLAGS.plan)
        print(json.dumps({"rtdose": str(path)}))
    return cli.PARTIAL_FAILURE if failed else 0  # the log and the printed line name the failed cases


def run():
    """Console script ``flaxdose-predict``."""
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
