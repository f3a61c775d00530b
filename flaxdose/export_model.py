"""Export a trained model as a model package (``flaxdose-export-model``); the library is `flaxdose.inference.package`.

    python -m flaxdose.export_model --workdir W --out PKG [--which best|latest] [--name NAME] [--overwrite]

PKG is one folder (flaxdose_model.json, config.json, params.npz) that describes itself: inputs and
channel order, voxel spacing, prescription normalisation, structures, a training-data summary
(counts; no patient names or IDs), versions, intended use, SHA-256 hashes. ``flaxdose.predict
--workdir PKG``, ``flaxdose.qa --workdirs PKG`` (and evaluate, ``import_dicom --like PKG``) load it
as they load a workdir, after checking its hashes.
"""

import json
from pathlib import Path

from absl import flags

from flaxdose import cli
from flaxdose.errors import FlaxdoseError
from flaxdose.inference import package

FLAGS = flags.FLAGS
USAGE = "usage: python -m flaxdose.export_model --workdir W --out PKG"


def define_flags() -> None:
    """The command's flags (defined only when run as a program, so tests can import the module)."""
    flags.DEFINE_string("workdir", None, "the training workdir to export")
    flags.DEFINE_string("out", None, "the package folder to write")
    flags.DEFINE_enum("which", "best", ["best", "latest"], "checkpoint: best (lowest validation loss) or latest")
    flags.DEFINE_string("name", None, "the model's name in predictions and QA reports (default: the workdir's)")
    flags.DEFINE_bool("overwrite", False, "replace an existing --out folder")


def main(argv):
    if len(argv) > 1:
        raise FlaxdoseError(f"unexpected arguments {argv[1:]}; {USAGE}")
    cli.require(USAGE, workdir=(FLAGS.workdir, "the training run to export"), out=(FLAGS.out, "the package folder"))
    metadata = package.export_model(FLAGS.workdir, FLAGS.out, which=FLAGS.which, name=FLAGS.name,
                                    overwrite=FLAGS.overwrite)
    print(json.dumps({"package": str(Path(FLAGS.out).resolve()), "name": metadata["name"],
                      "step": metadata["training"]["step"], "package_sha256": metadata["package_sha256"]}))
    return 0


def run():
    """Console script ``flaxdose-export-model``."""
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
