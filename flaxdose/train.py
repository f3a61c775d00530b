"""Train a dose-prediction model: ``python -m flaxdose.train --config=NAME --workdir=DIR`` (``flaxdose-train``).

``--config`` is a name in configs/ (``source``, ``quick``, ``transfer:external``, ...) or a
path to a config file; ``--config.section.key=value`` overrides any value. Rerunning on the
same workdir resumes. The library function is `flaxdose.training.trainer.train_and_evaluate`.

Multi-process (multi-host) data parallelism: run one process per machine with the same
``--coordinator=HOST:PORT`` (process 0's machine) and ``--num_processes``, and its own
``--process_id``; under SLURM, ``srun python -m flaxdose.train ...`` needs none of them.
"""

from absl import flags

from flaxdose import cli
from flaxdose.errors import FlaxdoseError

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined only when run as a program, so tests can import the module)."""
    cli.config_flag("quick")
    flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics.jsonl, TensorBoard events")
    flags.DEFINE_string("source", None, "source-model workdir or checkpoint for transfer configs (= --config.transfer.source)")
    flags.DEFINE_string("coordinator", None, "multi-process runs: HOST:PORT of process 0 (same on every process)")
    flags.DEFINE_integer("num_processes", None, "multi-process runs: number of processes (same on every process)")
    flags.DEFINE_integer("process_id", None, "multi-process runs: this process's id, 0..num_processes-1")


def main(argv):
    """absl main: start the multi-process runtime if asked, then `trainer.train_and_evaluate(config, workdir)`.

    Raises FlaxdoseError without --workdir, for a sweep config, or for bad multi-process flags.
    """
    del argv
    if not FLAGS.workdir:
        raise FlaxdoseError("--workdir is required: the folder for checkpoints and logs")
    config = FLAGS.config
    if "grid" in config:
        raise FlaxdoseError("this config is a sweep; run it with python -m flaxdose.launch.sweep --config=...")
    if FLAGS.source:
        with config.unlocked():
            config.transfer.source = FLAGS.source
    from flaxdose.training import distributed  # after flag parsing: jax reads XLA_FLAGS on import

    # before the trainer import and anything else that could create a JAX backend
    distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    from flaxdose.training import trainer  # after the runtime has started, as everything that may use JAX

    result = trainer.train_and_evaluate(config, FLAGS.workdir)
    if distributed.is_primary():
        print({k: round(v, 6) if isinstance(v, float) else v for k, v in result.items()})


def run():
    """Console script ``flaxdose-train``."""
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
