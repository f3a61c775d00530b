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
