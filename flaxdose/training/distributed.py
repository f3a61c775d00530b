"""Multi-process (multi-host) training on JAX's own runtime.

`initialize()` starts `jax.distributed` when the program runs as one of several processes:
explicit ``--coordinator/--num_processes/--process_id``, or a SLURM step launched by
``srun`` with more than one task (JAX reads the rest from SLURM's environment). Otherwise it
does nothing, and everything stays single-process. It must run before anything creates a
JAX backend (``jax.devices()``, any computation), because the backends are built for the
process group.

Once started, `jax.pmap` spans the devices of all processes: each process feeds its own
devices and `lax.pmean` averages over the global device axis (see `flaxdose.training.trainer`).
"""

from __future__ import annotations

import logging
import os
import re
import zlib

import jax
import numpy as np
from jax.experimental import multihost_utils

from flaxdose.errors import FlaxdoseError

log = logging.getLogger("flaxdose")

# HOST:PORT with HOST a name, an IPv4 address or a bracketed IPv6 address
_ADDRESS = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9._-]*):(\d{1,5})$")
_SLURM_STEP = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> bool:
    """Start the multi-process runtime if this is one of several processes; True if it did.

    Give all three arguments (the same `coordinator` HOST:PORT of process 0 and
    `num_processes` everywhere, `process_id` 0..N-1) or none: then a multi-task SLURM step is
    detected from the environment, and anything else is a single-process run (returns False).
    Raises FlaxdoseError for some but not all three arguments, a coordinator that is not
    HOST:PORT, an invalid count or id, or a runtime that cannot start (JAX already in use, or
    the coordinator unreachable).
    """
    given = {"--coordinator": coordinator, "--num_processes": num_processes, "--process_id": process_id}
    missing = [name for name, value in given.items() if value is None]
    if 0 < len(missing) < 3:
        raise FlaxdoseError(
            f"{', '.join(missing)} missing: --coordinator, --num_processes and --process_id go together; "
            "give all three on every process, or none (single process, or SLURM detection under srun)"
        )
    if not missing:
        _check_explicit(coordinator, num_processes, process_id)
        if num_processes == 1:
            return False  # nothing to coordinate
        kwargs = dict(coordinator_address=coordinator.strip(), num_processes=num_processes, process_id=process_id)
        rank, one_per_node = process_id, False
    else:
        tasks = slurm_tasks()
        if tasks is None:
            return False
        kwargs, rank = {}, int(os.environ["SLURM_PROCID"])
        one_per_node = tasks == _slurm_nodes()
        log.info("SLURM step with %d tasks: starting the multi-process runtime (this is task %d)", tasks, rank)
    _start(kwargs, one_per_node)
    if rank != 0:  # one process speaks for the run; the others report warnings and errors only
        log.setLevel(logging.WARNING)
    return True


def _check_explicit(coordinator, num_processes, process_id) -> None:
    if not isinstance(coordinator, str) or not (m := _ADDRESS.match(coordinator.strip())) or not 0 < int(m[1]) < 65536:
        raise FlaxdoseError(
            f"--coordinator={coordinator!r} is not HOST:PORT; give process 0's machine and a free port, "
            "e.g. 10.0.0.1:29500 or node001:29500 (127.0.0.1:29500 when all processes run on one machine)"
        )
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise FlaxdoseError(f"--num_processes={num_processes!r} must be a positive integer, the number of processes")
    if isinstance(process_id, bool) or not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise FlaxdoseError(
            f"--process_id={process_id!r} must be in 0..{num_processes - 1} (--num_processes={num_processes}); "
            "give each process its own id, with 0 on the coordinator's machine"
        )


def slurm_tasks() -> int | None:
    """Task count of a SLURM step started by srun with several tasks, else None.

    SLURM_NTASKS alone is not enough: a batch script run directly (no srun) sees the job's
    task count but is a single process, and would wait forever for the others.
    """
    if not all(os.environ.get(var) for var in _SLURM_STEP):
        if os.environ.get("SLURM_JOB_ID") and _int_env("SLURM_NTASKS", 1) > 1:
            log.warning("SLURM job with %s tasks but not started by srun: training as a single process; "
                        "launch with `srun python -m flaxdose.train ...` to use every task", os.environ["SLURM_NTASKS"])
        return None
    tasks = _int_env("SLURM_NTASKS", 1)
    return tasks if tasks > 1 else None


def _slurm_nodes() -> int | None:
    for var in ("SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES"):
        if os.environ.get(var):
            return _int_env(var, None)
    return None


def _int_env(var: str, default):
    try:
        return int(os.environ[var])
    except (KeyError, ValueError):
        return default


def _start(kwargs: dict, one_per_node: bool) -> None:
    # pmean across processes on CPU needs cross-process collectives; "gloo" is JAX's TCP
    # implementation (default since jax 0.5, unset before). A user's "mpi" is kept.
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # RuntimeError (called too late or twice), coordinator unreachable, ...
        raise FlaxdoseError(
            f"could not start the multi-process runtime ({e}); call flaxdose.training.distributed.initialize once, before any "
            "other JAX use, and check that process 0 runs and its --coordinator address is reachable from every process"
        ) from None
    if one_per_node and not os.environ.get("JAX_LOCAL_DEVICE_IDS"):
        # JAX's SLURM detection assumes one task per GPU and shows task i only GPU i; with one
        # task per node that would leave all but GPU 0 idle, so give the task every GPU it sees.
        # Backends are created lazily, after this.
        jax.config.update("jax_cuda_visible_devices", "all")
        jax.config.update("jax_rocm_visible_devices", "all")


def is_primary() -> bool:
    """True in process 0, the one that writes logs, metrics and previews (also when single-process)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name`; a no-op for a single process."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def check_same(text: str, what: str) -> None:
    """Refuse to go on unless every process has the same `text` (e.g. its config as JSON).

    Processes that disagree on the config would wait on each other at different steps, or
    train different models, without any error.
    """
    if jax.process_count() == 1:
        return
    digests = np.asarray(multihost_utils.process_allgather(np.uint32(zlib.crc32(text.encode())))).ravel()
    differ = [i for i, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise FlaxdoseError(
            f"process(es) {differ} run with another {what} than process 0; start every process with the same "
            "--config and --config.* overrides"
        )


def broadcast_float(value: float) -> float:
    """Process 0's `value`, bit for bit, in every process (a no-op for a single process)."""
    if jax.process_count() == 1:
        return value
    # as int32 words: JAX without x64 would round a float64 to float32 on the way
    words = np.array([value], np.float64).view(np.int32)
    return float(np.asarray(multihost_utils.broadcast_one_to_all(words), np.int32).view(np.float64)[0])
