"""Test setup: 4 simulated CPU devices (set before jax is imported) and tiny configs."""

import atexit
import os
import shutil
import socket
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for this test session, its xdist workers and the CLIs the tests
# start in subprocesses: they compile the same tiny programs again and again. Fresh per session (no
# stale entries), removed at exit by the process that made it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="flaxdose-test-jax-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

import pytest  # noqa: E402

from flaxdose import config as config_lib  # noqa: E402


def tiny_config(**overrides):
    """The quick config shrunk to seconds: phantom data on a 16x16x8 grid, a 2-level UNet (still with
    quick's target-distance input and target-weighted loss)."""
    config = config_lib.load_config("quick")
    settings = {
        "model.features": (4, 8),
        "model.convs_per_level": 1,
        "model.groups": 2,
        "data.kind": "phantom",
        "data.phantom_shape": (16, 16, 8),
        "data.n_train": 6,
        "data.n_test": 2,
        "data.val_cases": 2,
        "data.patch_shape": (8, 8, 8),
        "data.patch_sigma": (2.0, 2.0, 1.0),
        "train.steps": 6,
        "train.batch_size": 4,
        "train.learning_rate": 3e-3,
        "train.schedule": "constant",  # quick's warmup and decay need more steps than these
        "train.log_every": 2,
        "train.eval_every": 3,
        "train.checkpoint_every": 3,
        **overrides,
    }
    return config_lib.override(config, settings)


@pytest.fixture
def make_config():
    return tiny_config


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago: for multi-process coordinators."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rt_export(tmp_path_factory):
    """One synthetic DICOM-RT patient without CT (fast to read): RTSTRUCT, RTPLAN and the PLAN dose
    (`tests/dicom_factory.py`)."""
    import dicom_factory

    return dicom_factory.write_export(tmp_path_factory.mktemp("rt_export") / "p", with_ct=False)


@pytest.fixture(scope="module")
def rt_export_ct(tmp_path_factory):
    """The same patient with its CT series."""
    import dicom_factory

    return dicom_factory.write_export(tmp_path_factory.mktemp("rt_export_ct") / "p")


@pytest.fixture(scope="session")
def phantom_run(tmp_path_factory):
    """One tiny model trained 30 steps on phantom plans (24 x 24 x 16 voxels of 4 x 4 x 5 mm), shared by the
    prediction and clinical-path tests: read it, never train it further."""
    from flaxdose.training import trainer

    workdir = tmp_path_factory.mktemp("phantom_run")
    trainer.train_and_evaluate(tiny_config(**{"train.steps": 30, "data.phantom_shape": (24, 24, 16)}), workdir)
    return workdir


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(workdir, dataset folder): one tiny model trained 2 steps on 16x16x8 phantoms of 4 x 4 x 5 mm (quick's
    target-distance input), checkpoints at steps 1 and 2, shared by the evaluation, spacing, prediction and
    transfer tests (once per xdist worker): read it, never train it further or change it (copy it first)."""
    from flaxdose.training import trainer

    workdir = tmp_path_factory.mktemp("tiny_run")
    trainer.train_and_evaluate(tiny_config(**{"train.steps": 2, "train.checkpoint_every": 1, "train.eval_every": 2}),
                               workdir)
    return workdir, next((workdir / "data").iterdir())


@pytest.fixture(scope="session")
def with_a_case_without_ptv(tiny_run, tmp_path_factory):
    """The tiny run's test cases plus one whose PTV is not contoured (split "test"), and that case alone ("bad")."""
    from flaxdose.data import Dataset, write_dataset

    data = Dataset.open(tiny_run[1])
    good = [data.load(i) for i in data.split("test")]
    masks = good[0].masks.copy()
    masks[good[0].structures.index("PTV")] = False
    bad = good[0].replace(case_id="no_ptv", masks=masks)
    root = tmp_path_factory.mktemp("data") / "mixed"
    write_dataset(root, [*good, bad], {"test": [c.case_id for c in good] + ["no_ptv"], "bad": ["no_ptv"]})
    return root, [c.case_id for c in good]


def run_cli(module, *args, timeout=300):
    """`python -m flaxdose.MODULE ARGS` in a subprocess: its CompletedProcess (text stdout and stderr)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", f"flaxdose.{module}", *args], capture_output=True, text=True,
                          timeout=timeout)
