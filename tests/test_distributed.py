"""Multi-process data parallelism: flaxdose.training.distributed and the trainer run as 2 processes."""

import json
import logging
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from flaxdose import checkpoint
from flaxdose import config as config_lib
from flaxdose.errors import FlaxdoseError
from flaxdose.model import UNetSpec, init_params
from flaxdose.training import distributed, trainer
from flaxdose.training.devices import process_slice

# Run by each of the 2 processes: 2 CPU devices each (4 in all), phase 1 stops at step 2 with a
# checkpoint, phase 2 resumes from it, so resuming in a multi-process run is exercised too.
WORKER = """
import json, logging, sys
from flaxdose import config as config_lib
from flaxdose.training import distributed
logging.basicConfig(level=logging.WARNING)
logging.getLogger("flaxdose").setLevel(logging.INFO)
coordinator, process_id, config_path, workdir = sys.argv[1:]
assert distributed.initialize(coordinator, 2, int(process_id))
import jax
from flaxdose.training import trainer
assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
config = config_lib.load_config_json(config_path)
first = config_lib.load_config_json(config_path)
config_lib.override(first, {"train.steps": 2})
trainer.train_and_evaluate(first, workdir)
print("RESULT", json.dumps(trainer.train_and_evaluate(config, workdir)))
"""


def no_slurm(monkeypatch):
    for var in [v for v in os.environ if v.startswith("SLURM_")]:
        monkeypatch.delenv(var)


@pytest.fixture
def fake_jax_init(monkeypatch):
    """jax.distributed.initialize and jax.config.update recorded instead of run; logger level restored."""
    calls, updates = [], []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.config, "update", lambda name, value: updates.append((name, value)))
    no_slurm(monkeypatch)
    monkeypatch.delenv("JAX_LOCAL_DEVICE_IDS", raising=False)
    logger = logging.getLogger("flaxdose")
    level = logger.level
    yield calls, updates
    logger.setLevel(level)


# ---------------------------------------------------------------- initialize()
@pytest.mark.parametrize(
    "args, message",
    [
        (("127.0.0.1:1234", 2, None), "--process_id missing"),
        ((None, 2, 0), "--coordinator missing"),
        (("127.0.0.1:1234", None, None), "--num_processes, --process_id missing"),
        (("127.0.0.1:1234", 2, 2), r"--process_id=2 must be in 0\.\.1"),
        (("127.0.0.1:1234", 2, -1), r"--process_id=-1 must be in 0\.\.1"),
        (("127.0.0.1:1234", 0, 0), "--num_processes=0 must be a positive integer"),
        (("127.0.0.1", 2, 0), "is not HOST:PORT"),
        (("127.0.0.1:http", 2, 0), "is not HOST:PORT"),
        (("127.0.0.1:70000", 2, 0), "is not HOST:PORT"),
        ((":1234", 2, 0), "is not HOST:PORT"),
        (("tcp://10.0.0.1:1234", 2, 0), "is not HOST:PORT"),
    ],
)
def test_bad_arguments_are_clear_errors(fake_jax_init, args, message):
    calls, _ = fake_jax_init
    with pytest.raises(FlaxdoseError, match=message):
        distributed.initialize(*args)
    assert not calls


def test_single_process_is_a_no_op(fake_jax_init):
    calls, _ = fake_jax_init
    assert distributed.initialize() is False
    assert distributed.initialize("10.0.0.1:1234", 1, 0) is False
    assert not calls


@pytest.mark.parametrize("coordinator", ["10.0.0.1:29500", "node-001.cluster:29500", "[::1]:29500"])
def test_explicit_arguments_start_jax_distributed(fake_jax_init, monkeypatch, coordinator):
    calls, updates = fake_jax_init
    monkeypatch.setenv("SLURM_JOB_ID", "7")  # explicit flags win over a SLURM environment
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert distributed.initialize(coordinator, 4, 1) is True
    assert calls == [dict(coordinator_address=coordinator, num_processes=4, process_id=1)]
    assert not any(name == "jax_cuda_visible_devices" for name, _ in updates)
    assert logging.getLogger("flaxdose").getEffectiveLevel() == logging.WARNING  # process 1 stays quiet


def test_process_0_keeps_logging(fake_jax_init):
    logging.getLogger("flaxdose").setLevel(logging.INFO)
    assert distributed.initialize("10.0.0.1:29500", 2, 0) is True
    assert logging.getLogger("flaxdose").getEffectiveLevel() == logging.INFO


def test_cpu_collectives_are_selected_when_unset(fake_jax_init, monkeypatch):
    _, updates = fake_jax_init
    monkeypatch.setattr(type(jax.config), "jax_cpu_collectives_implementation", None, raising=False)
    distributed.initialize("10.0.0.1:29500", 2, 0)
    assert ("jax_cpu_collectives_implementation", "gloo") in updates


def slurm_env(monkeypatch, tasks, nodes, procid=0, srun=True):
    env = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": str(tasks), "SLURM_NNODES": str(nodes), "SLURM_PROCID": str(procid),
           "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "node[001-002]"}
    if srun:
        env.update(SLURM_STEP_NODELIST="node[001-002]", SLURM_STEP_NUM_NODES=str(nodes))
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_slurm_step_with_one_task_per_node_uses_every_gpu(fake_jax_init, monkeypatch):
    calls, updates = fake_jax_init
    slurm_env(monkeypatch, tasks=2, nodes=2, procid=1)
    assert distributed.initialize() is True
    assert calls == [{}]  # JAX reads coordinator, process count and id from SLURM's environment
    assert ("jax_cuda_visible_devices", "all") in updates  # undoes JAX's one-GPU-per-task default
    assert logging.getLogger("flaxdose").getEffectiveLevel() == logging.WARNING


def test_slurm_step_with_one_task_per_gpu_keeps_jax_default(fake_jax_init, monkeypatch):
    calls, updates = fake_jax_init
    slurm_env(monkeypatch, tasks=8, nodes=2)
    assert distributed.initialize() is True
    assert calls == [{}]
    assert not any(name == "jax_cuda_visible_devices" for name, _ in updates)


@pytest.mark.parametrize("tasks, srun", [(1, True), (4, False)])
def test_slurm_without_several_srun_tasks_is_single_process(fake_jax_init, monkeypatch, tasks, srun):
    """One task, or the batch script itself (no srun: it would wait forever for the other tasks)."""
    calls, _ = fake_jax_init
    slurm_env(monkeypatch, tasks=tasks, nodes=2, srun=srun)
    assert distributed.initialize() is False
    assert not calls


def test_runtime_failures_become_flaxdose_errors(fake_jax_init, monkeypatch):
    def fail(**kwargs):
        raise RuntimeError("jax.distributed.initialize() must be called before any JAX calls")

    monkeypatch.setattr(jax.distributed, "initialize", fail)
    with pytest.raises(FlaxdoseError, match=r"could not start .*must be called before.*before any other JAX use"):
        distributed.initialize("10.0.0.1:29500", 2, 0)


def test_helpers_are_no_ops_in_a_single_process():
    assert distributed.is_primary()
    distributed.barrier("x")  # returns at once
    assert distributed.broadcast_float(0.1) == 0.1


def test_processes_with_different_configs_are_refused(monkeypatch):
    from jax.experimental import multihost_utils

    monkeypatch.setattr(jax, "process_count", lambda *a, **k: 3)
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.array([x, x, x]))
    distributed.check_same('{"seed": 0}', "config")  # all agree
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.array([x, x, x + 1], np.uint32))
    with pytest.raises(FlaxdoseError, match=r"process\(es\) \[2\] run with another config than process 0"):
        distributed.check_same('{"seed": 0}', "config")


def test_cli_refuses_incomplete_flags_before_starting_anything(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "flaxdose.train", "--workdir", str(tmp_path / "w"), "--coordinator=127.0.0.1:1",
         "--num_processes=2"], capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2 and "flaxdose: error: --process_id missing" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------- trainer pieces
def test_each_process_takes_its_contiguous_slice_of_the_global_batch():
    batch = {"inputs": np.arange(8 * 3).reshape(8, 3), "target": np.arange(8)}
    parts = [process_slice(batch, p, 4) for p in range(4)]
    assert [list(p["target"]) for p in parts] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    np.testing.assert_array_equal(np.concatenate([p["inputs"] for p in parts]), batch["inputs"])
    assert process_slice(batch, 0, 1) is batch


def test_batch_size_must_divide_the_global_device_count(monkeypatch, make_config):
    config = make_config(**{"train.batch_size": 4})
    spec = UNetSpec.from_config(config.model)
    devices = jax.local_devices()
    trainer.check_setup(config, spec, devices)  # 4 patches on 4 devices of one process
    monkeypatch.setattr(jax, "process_count", lambda *a, **k: 2)
    with pytest.raises(FlaxdoseError, match=r"not divisible by the 8 devices \(2 processes x 4 local devices\).*multiple of 8"):
        trainer.check_setup(config, spec, devices)
    with pytest.raises(FlaxdoseError, match="uses all 4 local devices of each process, got 2"):
        trainer.check_setup(make_config(**{"train.batch_size": 8}), spec, devices[:2])


# ---------------------------------------------------------------- 2 processes x 2 devices
def test_two_processes_train_like_one_and_resume(tmp_path, make_config, free_port):
    config = make_config(**{"train.steps": 4, "train.log_every": 2, "train.eval_every": 2, "train.checkpoint_every": 2})
    config_path = tmp_path / "config.json"
    config_path.write_text(config_lib.to_json(config))
    (tmp_path / "worker.py").write_text(WORKER)
    workdir, coordinator = tmp_path / "multi", f"127.0.0.1:{free_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    procs, logs = [], []
    for pid in range(2):
        out, err = (open(tmp_path / f"p{pid}.{kind}", "w+") for kind in ("out", "err"))
        logs.append((out, err))
        procs.append(subprocess.Popen(
            [sys.executable, str(tmp_path / "worker.py"), coordinator, str(pid), str(config_path), str(workdir)],
            env=env, cwd=tmp_path, stdout=out, stderr=err,
        ))
    try:
        # the single-process reference on the same global batch (4 devices here) meanwhile
        reference = trainer.train_and_evaluate(config, tmp_path / "single", devices=jax.local_devices())
        deadline = time.time() + 240
        while time.time() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # a hung collective or barrier must not hang the suite
            p.wait()
    texts = []
    for files in logs:
        for f in files:
            f.seek(0)
            texts.append(f.read())
            f.close()
    out0, err0, out1, err1 = texts
    assert [p.returncode for p in procs] == [0, 0], f"process 0:\n{err0[-3000:]}\nprocess 1:\n{err1[-3000:]}"

    template = init_params(UNetSpec.from_config(config.model), jax.random.key(0), config.data.patch_shape)
    multi, meta = checkpoint.restore_params(workdir, template, which="latest")
    single, _ = checkpoint.restore_params(tmp_path / "single", template, which="latest")
    assert meta["step"] == 4
    for a, b in zip(jax.tree_util.tree_leaves(multi), jax.tree_util.tree_leaves(single)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(jax.tree_util.tree_leaves(multi)[0], jax.tree_util.tree_leaves(template)[0])

    results = [json.loads(line.split(" ", 1)[1]) for line in (out0, out1) for line in line.splitlines() if line.startswith("RESULT")]
    assert [r["step"] for r in results] == [4, 4]
    assert results[0]["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    assert results[0]["val_loss"] == results[1]["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-5)
    assert "preview" in results[0] and "preview" not in results[1] and (workdir / "preview.png").is_file()
    # written once, by process 0: each logged step appears once, as in the single-process run
    records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(l) for l in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], sorted(r)) for r in records] == [(r["step"], sorted(r)) for r in expected]
    losses = lambda rs: [r.get("loss", r.get("val_loss")) for r in rs]
    assert losses(records) == pytest.approx(losses(expected), rel=1e-5)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert "resumed from step 2" in err0 and "resumed from step" not in err1
    assert "train:" not in err1  # no progress bar in process 1
