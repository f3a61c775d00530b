"""Fine-tuning sweeps: ``python -m flaxdose.launch.sweep --config=sweep_cpu --workdir=DIR``.

Stages (``--stage``, default ``all``): ``prepare`` (data, source model, unadapted baselines),
``train`` (every unfinished run of this shard, packed onto the local devices), ``report``
(``DIR/report/``: results.csv, summary.md, learning_curve.png). Rerunning resumes: finished
runs are skipped, interrupted ones continue from their checkpoints. Every stage first checks the
folder's sweep.json (`Sweep.claim_folder`): another sweep's folder, or for ``train``/``report`` a
folder that is not a prepared sweep, is refused before anything is written.

Several processes split the runs: ``--shard_index/--shard_count``, a SLURM job array
(``launch/slurm/sweep_array.sbatch``) or the tasks of an ``srun`` step. Each shard is a JAX
runtime of its own (why: flaxdose/sweep.py). Run ``--stage=prepare`` once before the shards.
"""

from __future__ import annotations

import os
from pathlib import Path

from absl import flags

from flaxdose import cli
from flaxdose.errors import FlaxdoseError

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined only when run as a program, so tests can import the module)."""
    cli.config_flag("sweep_cpu", "sweep config name in configs/ (sweep_smoke, sweep_cpu, ...) or a path")
    flags.DEFINE_string("workdir", None, "sweep folder: data, source model, runs, report")
    flags.DEFINE_enum("stage", "all", ["all", "prepare", "train", "report"], "what to do")
    flags.DEFINE_integer("shard_index", None, "this process's shard of the runs (default: SLURM array task or srun task)")
    flags.DEFINE_integer("shard_count", None, "number of shards the runs are split into")
    flags.DEFINE_string("title", "", "report title")


def shard() -> tuple[int, int]:
    """(index, count): explicit flags, else a SLURM job array, else the tasks of an srun step, else (0, 1)."""
    if (FLAGS.shard_index is None) != (FLAGS.shard_count is None):
        raise FlaxdoseError("give both --shard_index and --shard_count, or neither")
    if FLAGS.shard_count is not None:
        return FLAGS.shard_index, FLAGS.shard_count
    env = os.environ
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:  # an array 0-10:2 has tasks 0, 2, .., 10
        first, step = int(env.get("SLURM_ARRAY_TASK_MIN", "0")), int(env.get("SLURM_ARRAY_TASK_STEP", "1") or 1)
        return (int(env["SLURM_ARRAY_TASK_ID"]) - first) // step, int(env["SLURM_ARRAY_TASK_COUNT"])
    if "SLURM_STEP_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    return 0, 1


def main(argv):
    """absl main: run the `--stage` of the sweep in `--workdir`, as shard `shard()` of the runs.

    With `all`, a single process prepares, trains and reports; of several shards each trains and
    shard 0 writes the report from the runs finished so far. Raises FlaxdoseError without
    --workdir, for a training (not sweep) config, or for `prepare` run as several shards.
    """
    del argv
    if not FLAGS.workdir:
        raise FlaxdoseError("--workdir is required: the sweep folder")
    config = FLAGS.config
    if "grid" not in config:
        raise FlaxdoseError("this config is a training config, not a sweep; use a configs/sweep_*.py config")
    from flaxdose.sweeps.runner import (
        Sweep,  # after flag parsing: jax reads XLA_FLAGS on import
    )

    index, count = shard()
    sweep = Sweep(config, FLAGS.workdir)
    if FLAGS.stage == "prepare" or (FLAGS.stage == "all" and count == 1):
        if count > 1:
            raise FlaxdoseError("--stage=prepare runs as one process; start it without shards")
        sweep.prepare()
    if FLAGS.stage in ("train", "all"):
        sweep.train(index, count)
    if FLAGS.stage == "report" or (FLAGS.stage == "all" and index == 0):
        name = Path(flags.FLAGS["config"].config_filename.split(":")[0]).stem
        print(f"[sweep] report: {sweep.report(FLAGS.title or f'Sweep {name}')}")


def run():
    """Console script ``flaxdose-sweep``."""
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
