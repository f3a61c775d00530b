"""Train a dose-prediction model: ``python -m flaxdose.train --config=NAME --workdir=DIR``.

``--config`` is a name in configs/ (``source``, ``quick``, ...) or a path to a config file;
``--config.section.key=value`` overrides any value. Rerunning on the same workdir resumes.
"""

from absl import flags

from flaxdose import cli
from flaxdose import config as config_lib
from flaxdose.errors import FlaxdoseError

flags.DEFINE_string("config", "quick", "config name in configs/ or path to a config .py file")
flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics.jsonl, TensorBoard events")
flags.DEFINE_string("source", None, "source-model workdir or checkpoint for transfer configs (= --config.transfer.source)")
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
    overrides = _OVERRIDES + ([f"transfer.source={FLAGS.source}"] if FLAGS.source else [])
    config = config_lib.load_config(FLAGS.config, overrides)
    result = trainer.train_and_evaluate(config, FLAGS.workdir)
    print({k: round(v, 6) if isinstance(v, float) else v for k, v in result.items()})


if __name__ == "__main__":
    cli.run(main, parse_flags)
