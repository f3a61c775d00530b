"""Train a dose-prediction model: ``python -m flaxdose.train --config=NAME --workdir=DIR``.

``--config`` is a name in configs/ (``source``, ``quick``, ...) or a path to a config file;
``--config.section.key=value`` overrides any value. Rerunning on the same workdir resumes.

Multi-process (multi-host) data parallelism: run one process per machine with the same
``--coordinator=HOST:PORT`` (process 0's machine) and ``--num_processes``, and its own
``--process_id``; under SLURM, ``srun python -m flaxdose.train ...`` needs none of them.
"""

from absl import flags

from flaxdose import cli, distributed
from flaxdose import config as config_lib
from flaxdose.errors import FlaxdoseError

flags.DEFINE_string("config", "quick", "config name in configs/ or path to a config .py file")
flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics.jsonl, TensorBoard events")
flags.DEFINE_string("source", None, "source-model workdir or checkpoint for transfer configs (= --config.transfer.source)")
distributed.define_flags()
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if not FLAGS.workdir:
        raise FlaxdoseError("--workdir is required: the folder for checkpoints and logs")
    overrides = cli.CONFIG_OVERRIDES + ([f"transfer.source={FLAGS.source}"] if FLAGS.source else [])
    config = config_lib.load_config(FLAGS.config, overrides)
    if "grid" in config:
        raise FlaxdoseError(f"config {FLAGS.config!r} is a sweep; run it with python -m launch.sweep --config={FLAGS.config}")
    # before the trainer import and anything else that could create a JAX backend
    distributed.initialize_from_flags()
    from flaxdose import trainer  # after flag parsing: jax reads XLA_FLAGS on import

    result = trainer.train_and_evaluate(config, FLAGS.workdir)
    if distributed.is_primary():
        print({k: round(v, 6) if isinstance(v, float) else v for k, v in result.items()})


if __name__ == "__main__":
    cli.run(main, cli.parse_flags_with_overrides)
