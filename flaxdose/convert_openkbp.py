"""Convert OpenKBP challenge data: ``python -m flaxdose.convert_openkbp SRC --out DATASET`` (``flaxdose-convert-openkbp``).

SRC is the challenge's `provided-data` folder (or one split folder, or one `pt_N`); the
dataset keeps the challenge's splits (train, val, test). ``--downsample 2`` stores the
cases on a 64^3 grid of twice the voxel size (see `flaxdose.openkbp.downsample_case`);
``--noinclude_ct`` leaves the CT out.
"""

from absl import flags

from flaxdose import cli
from flaxdose.errors import FlaxdoseError
from flaxdose.openkbp import convert_openkbp

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined only when run as a program, so tests can import the module)."""
    flags.DEFINE_string("out", None, "dataset folder to write")
    flags.DEFINE_bool("include_ct", True, "store the CT (HU) in every case")
    flags.DEFINE_integer("downsample", 1, "store the cases on a grid this many times coarser (1, 2 or 4)")
    flags.DEFINE_bool("overwrite", False, "replace an existing dataset folder")


USAGE = "usage: python -m flaxdose.convert_openkbp SRC --out DATASET [--downsample 2] [--noinclude_ct]"


def main(argv):
    """absl main: convert SRC into the dataset `--out` and print its splits.

    Raises FlaxdoseError without exactly one SRC, without --out (naming it), or for data that
    is not the challenge's (see `flaxdose.openkbp.convert_openkbp`).
    """
    if len(argv) != 2:
        raise FlaxdoseError(f"give exactly one SRC, the challenge's provided-data folder (got {len(argv) - 1}); {USAGE}")
    cli.require(USAGE, out=(FLAGS.out, "the dataset folder to write"))
    ds = convert_openkbp(argv[1], FLAGS.out, include_ct=FLAGS.include_ct, overwrite=FLAGS.overwrite,
                         downsample=FLAGS.downsample)
    print(f"wrote {ds.manifest['num_cases']} OpenKBP cases to {ds.root}: "
          + ", ".join(f"{k} {len(v)}" for k, v in ds.splits.items()))


def run():
    """Console script ``flaxdose-convert-openkbp``."""
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
