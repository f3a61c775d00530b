"""Import clinical DICOM-RT exports into a flaxdose dataset (de-identified).

``python -m flaxdose.import_dicom SRC --out DATASET [--aliases FILE] [--grid model|dose|ct] ...``

Prints a table per plan (structures with cc and dose coverage, dose type, prescription and
its source, grid) and writes it as DATASET/import_report.csv, then the plans per split ("0 test
patients" when none was held out: ``--test_fraction`` is 0 by default). Exit status: 0 every plan
imported; 1 some plans failed (the summary lists them, the others are imported); 2 the
import could not run (one ``flaxdose: error:`` line), e.g. DATASET is SRC or lies inside it.
``--like WORKDIR`` imports on the grid that run's model predicts on (its training voxel spacing,
the default 480 x 480 x 192 mm field of view), the grid ``predict --dicom`` reads: the dataset then
fits ``predict``, ``evaluate`` and ``qa`` with that model without a spacing given by hand.
See docs/dicom.md.
"""

from pathlib import Path

from absl import flags

from flaxdose import cli
from flaxdose.data.case import PROSTATE_STRUCTURES, Dataset
from flaxdose.data.grid import MODEL_SHAPE, MODEL_SPACING_MM
from flaxdose.dicom import MIN_COVERAGE, AliasTable, ReadOptions, import_dicom
from flaxdose.errors import FlaxdoseError

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined only when run as a program, so tests can import the module)."""
    flags.DEFINE_string("out", None, "dataset folder to write (outside SRC)")
    flags.DEFINE_string("aliases", None, "JSON file mapping structure names to extra ROI names")
    flags.DEFINE_list("structures", list(PROSTATE_STRUCTURES), "structures (model channels), in order")
    flags.DEFINE_enum("grid", "model", ["model", "dose", "ct"], "grid of the saved cases")
    flags.DEFINE_list("model_shape", [str(v) for v in MODEL_SHAPE], "model grid shape (x,y,z)")
    flags.DEFINE_list("model_spacing_mm", [str(v) for v in MODEL_SPACING_MM], "model grid spacing (x,y,z) mm")
    flags.DEFINE_string("like", None, "a training workdir: import on the grid its model predicts on (its training "
                        "voxel spacing, the default field of view), as predict --dicom reads; sets --grid model")
    flags.DEFINE_bool("include_ct", False, "also store the CT (HU) on the case grid")
    flags.DEFINE_bool("keep_ids", False, "use PatientID as case id (NOT de-identified)")
    flags.DEFINE_string("salt", None, "salt for the hashed case ids (default: random, ids not reproducible)")
    flags.DEFINE_string("style", "", "planning style label stored in every case")
    flags.DEFINE_float("prescription_gy", None, "override the prescription read from the RTPLAN")
    flags.DEFINE_float("test_fraction", 0.0, "fraction of cases put in the 'test' split")
    flags.DEFINE_integer("seed", 0, "seed of the train/test split")
    flags.DEFINE_bool("overwrite", False, "replace an existing dataset folder")
    flags.DEFINE_float("min_coverage", MIN_COVERAGE, "refuse a plan whose dose covers less than this fraction of a "
                       "target's or OAR's contoured volume (the body's coverage is only recorded)")


def main(argv):
    """absl main: `import_dicom(SRC, --out, ...)`, print the report; exit status 1 if some plans were skipped.

    Raises FlaxdoseError without exactly one SRC and --out, or when no plan could be imported.
    """
    usage = "usage: python -m flaxdose.import_dicom SRC --out DATASET [--aliases FILE]"
    if len(argv) != 2:
        raise FlaxdoseError(f"give exactly one SRC, the folder of DICOM exports (got {len(argv) - 1}); {usage}")
    cli.require(usage, out=(FLAGS.out, "the dataset folder to write"))
    model_shape = [int(v) for v in FLAGS.model_shape]
    model_spacing_mm = [float(v) for v in FLAGS.model_spacing_mm]
    if FLAGS.like:
        model_shape, model_spacing_mm = like_grid(FLAGS.like)
    options = ReadOptions(
        FLAGS.structures, FLAGS.grid, aliases=AliasTable.from_file(FLAGS.aliases),
        prescription_gy=FLAGS.prescription_gy, include_ct=FLAGS.include_ct, model_shape=model_shape,
        model_spacing_mm=model_spacing_mm, keep_ids=FLAGS.keep_ids, salt=FLAGS.salt, style=FLAGS.style,
        min_coverage=FLAGS.min_coverage,
    )
    summary = import_dicom(argv[1], FLAGS.out, options=options, test_fraction=FLAGS.test_fraction, seed=FLAGS.seed,
                           overwrite=FLAGS.overwrite)
    print(summary.report())
    print(split_line(summary.dataset, FLAGS.test_fraction))
    return cli.PARTIAL_FAILURE if summary.failures else 0  # some plans skipped: the report names them


def split_line(dataset: str, test_fraction: float) -> str:
    """The written dataset's splits in one line, saying "0 test patients" outright when none was held out
    (the default, ``--test_fraction 0``), and how to evaluate such an import."""
    splits = Dataset.open(dataset).splits
    counts = ", ".join(f"{name} {len(ids)} plan(s)" for name, ids in splits.items())
    if splits.get("test"):
        return f"splits: {counts} (the plans of one patient stay in one split)"
    return (f"splits: {counts}; 0 test patients (--test_fraction {test_fraction:g}): evaluate the import with "
            "--split all, or import again with --test_fraction 0.2 to hold patients out for testing")


def like_grid(workdir: str) -> tuple[list[int], list[float]]:
    """(shape (x, y, z), spacing (x, y, z) mm) of the model grid the run at `workdir` predicts DICOM on
    (`flaxdose.inference.dicom_grid`). Raises FlaxdoseError for a grid flag given with --like, or a
    workdir without a trained model."""
    from flaxdose import inference  # jax: seconds to load, for --like alone

    given = [name for name in ("model_shape", "model_spacing_mm", "grid") if FLAGS[name].present]
    if given and not (given == ["grid"] and FLAGS.grid == "model"):
        raise FlaxdoseError(f"--like sets the model grid; leave out {', '.join('--' + g for g in given)}")
    if not Path(workdir).exists():
        raise FlaxdoseError(f"--like {workdir} does not exist; give the training workdir of the model to predict with")
    model = inference.Model.load(workdir)
    shape, spacing = inference.dicom_grid([model.train_spacing_mm])
    return list(shape), list(spacing)


def run():
    """Console script ``flaxdose-import``."""
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
