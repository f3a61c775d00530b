"""Synthetic prostate VMAT plans in the paper's five styles (``flaxdose-synth``).

    python -m flaxdose.synth --style internal_c --n 20 [--n_test 5] --seed 0 --out DIR [--scale 0.5]
    python -m flaxdose.synth --study DIR [--seed 0] [--scale 1.0]   # Table 1 sizes
    python -m flaxdose.synth --report DIR                           # style signatures

The library is `flaxdose.synthetic.generator`; docs/synthetic_data.md describes the styles.
"""

import time

from absl import flags

from flaxdose import cli
from flaxdose.errors import FlaxdoseError
from flaxdose.io import require_folder
from flaxdose.synthetic import generator

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined only when run as a program, so tests can import the module)."""
    flags.DEFINE_string("style", None, "planning style: source, internal_a, internal_b, internal_c, external")
    flags.DEFINE_integer("n", None, "number of training cases (with --style/--out)")
    flags.DEFINE_integer("n_test", 0, "with --style/--out: also this many test cases (a 'test' split)")
    flags.DEFINE_integer("seed", 0, "anatomy seed; the same seed gives the same patients in every style")
    flags.DEFINE_float("scale", 1.0, "grid scale: 1.0 = 120x120x64 (4x4x3 mm), 0.5 = 60x60x32 for quick CPU runs")
    flags.DEFINE_string("out", None, "output dataset folder (with --style and --n)")
    flags.DEFINE_string("study", None, "write all five styles with the paper's Table 1 sizes into this folder")
    flags.DEFINE_string("report", None, "print the style signature report of a study (or dataset) folder")
    flags.DEFINE_bool("overwrite", False, "replace an output folder that holds other data")


def main(argv):
    """absl main: write one style's dataset (`--out`), the whole study (`--study`), or print a report (`--report`).

    Raises FlaxdoseError unless exactly one of the three is given (with --style and --n for --out).
    """
    if len(argv) > 1:
        raise FlaxdoseError(f"unexpected arguments: {argv[1:]}")

    modes = [m for m in ("out", "study", "report") if getattr(FLAGS, m)]
    if len(modes) != 1:
        raise FlaxdoseError("pass exactly one of --out (with --style and --n), --study DIR, or --report DIR")
    t0 = time.perf_counter()
    if FLAGS.out:
        if FLAGS.style is None or FLAGS.n is None:
            raise FlaxdoseError("--out needs --style and --n, e.g. --style internal_c --n 20 --out DIR")
        root = generator.ensure_dataset(FLAGS.out, FLAGS.style, FLAGS.n, FLAGS.n_test, FLAGS.seed, FLAGS.scale,
                                        overwrite=FLAGS.overwrite)
        total = FLAGS.n + FLAGS.n_test
        print(f"wrote {total} {FLAGS.style} cases to {root} ({(time.perf_counter() - t0) / total:.2f} s per case)")
    elif FLAGS.study:
        generator.generate_study(require_folder(FLAGS.study, "--study"), FLAGS.seed, FLAGS.scale, FLAGS.overwrite)
        total = sum(a + b for a, b in generator.PAPER_SPLITS.values())
        elapsed = time.perf_counter() - t0
        print(f"study: {total} cases in {elapsed / 60:.1f} min ({elapsed / total:.2f} s per case) under {FLAGS.study}")
    else:
        print(generator.format_report(generator.style_report(generator.load_study(FLAGS.report))))


def run():
    """Console script ``flaxdose-synth``."""
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
