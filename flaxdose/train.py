"""Train a dose-prediction model: ``python -m flaxdose.train --config=NAME --workdir=DIR``.

``--config`` is a name in configs/ (``source``, ``quick``, ...) or a path to a config file;
``--config.section.key=value`` overrides any value. Rerunning on the same workdir resumes.
"""

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging

from flaxdose import config as config_lib
from flaxdose.errors import FlaxdoseError

flags.DEFINE_string("config", "quick", "config name in configs/ or path to a config .py file")
flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics.jsonl, TensorBoard events")
FLAGS = flags.FLAGS
_OVERRIDES: list[str] = []


def parse_flags(argv: list[str]) -> list[str]:
    """Take ``--config.x.y=v`` (or ``--config.x.y v``) overrides aside; absl parses the rest."""
    rest, args = [argv[0]], iter(argv[1:])
    for arg in args:
        if arg.startswith("--config."):
            _OVERRIDES.append(arg if "=" in arg else f"{arg}={next(args, '')}")
        else:
            rest.append(arg)
    return FLAGS(rest)


def main(argv):
    del argv
    from flaxdose import trainer  # after flag parsing: jax reads XLA_FLAGS on import

    if not FLAGS.workdir:
        raise FlaxdoseError("--workdir is required: the folder for checkpoints and logs")
    if not FLAGS["verbosity"].present:  # orbax and grain are chatty at INFO; flaxdose's own log is not
        absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("flaxdose").setLevel(logging.INFO)
    config = config_lib.load_config(FLAGS.config, _OVERRIDES)
    result = trainer.train_and_evaluate(config, FLAGS.workdir)
    print({k: round(v, 6) if isinstance(v, float) else v for k, v in result.items()})


def run():
    try:
        app.run(main, flags_parser=parse_flags)
    except FlaxdoseError as e:
        print(f"flaxdose: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
