"""Configs and the command line every command shares (flaxdose.config, flaxdose.cli): names, overrides, one-line
errors, -h, missing and bad flags."""

import subprocess
import sys

import pytest

from conftest import run_cli
from flaxdose import cli
from flaxdose import config as config_lib
from flaxdose.errors import FlaxdoseError


def test_names_paths_and_overrides(tmp_path):
    config = config_lib.load_config("source", {"train.steps": 10, "model.dtype": "bfloat16", "data.patch_shape": (48, 48, 24)})
    assert config.train.steps == 10 and config.model.dtype == "bfloat16" and tuple(config.data.patch_shape) == (48, 48, 24)
    assert config.train.learning_rate == 1e-4
    assert config_lib.load_config("source", {"train.learning_rate": 1}).train.learning_rate == 1.0  # int for a float
    path = tmp_path / "mine.py"
    path.write_text("from flaxdose.configs import quick\n\ndef get_config():\n    c = quick.get_config()\n    c.seed = 7\n    return c\n")
    assert config_lib.load_config(str(path)).seed == 7
    assert {"source", "quick", "transfer"} <= set(config_lib.available_configs())
    external = config_lib.load_config("transfer:external")
    assert (external.data.style, external.data.n_train, external.data.n_test, external.transfer.mode) == ("external", 20, 40, "paper")


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("nonesuch", {}, "available: .*quick.*source"),
        ("_sweep", {}, "unknown config"),
        ("transfer:elsewhere", {}, "unknown target style"),
        ("quick", {"train.stepz": 3}, "stepz"),
        ("quick", {"trian.steps": 3}, "trian"),
        ("quick", {"train.steps": "ten"}, "ten"),
        ("quick", {"data.flip_lr": 1}, "flip_lr"),
    ],
)
def test_config_errors(name, overrides, message):
    with pytest.raises(FlaxdoseError, match=message):
        config_lib.load_config(name, overrides)


def test_config_names_become_paths_on_the_command_line():
    argv = ["prog", "--config=quick", "--config.train.steps=5", "--config", "transfer:external", "--workdir=/tmp/x"]
    out = cli.resolve_config_args(argv)
    assert out[1] == f"--config={config_lib.CONFIG_DIR / 'quick.py'}" and out[2] == "--config.train.steps=5"
    assert out[3:5] == ["--config", f"{config_lib.CONFIG_DIR / 'transfer.py'}:external"] and out[5] == "--workdir=/tmp/x"
    with pytest.raises(FlaxdoseError, match="available"):
        cli.resolve_config_args(["prog", "--config=nope"])


@pytest.mark.parametrize("args, message", [
    (["--config=nope"], "unknown config 'nope'"),
    (["--config.train.steps=ten"], "ten"),
    (["--config.train.stepz=3"], "unknown config setting 'stepz' in --config.train.stepz"),
    (["--config.trian.steps=3"], "unknown config setting 'trian' in --config.trian.steps"),
    (["--workdir"], "workdir"),
])
def test_cli_errors_are_one_line_and_exit_2(args, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flaxdose.train", *args], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("flaxdose: error:") and message in proc.stderr and "Traceback" not in proc.stderr


def test_every_shipped_config_loads_and_builds_a_model():
    from flaxdose.data.pipeline import InputSpec
    from flaxdose.model import UNetSpec
    from flaxdose.sweeps.runner import check_grid
    from flaxdose.training import optim

    names = [n for n in config_lib.available_configs() if n != "transfer"]
    names += [f"transfer:{style}" for style in ("internal_a", "internal_b", "internal_c", "external")]
    for name in names:
        config = config_lib.load_config(name)
        if "grid" in config:  # a sweep: its grid is valid for its data, its runs train `base`
            check_grid(config, {style: n_train for style, (n_train, _) in config.data.plans.items()})
            config = config.base
        spec = UNetSpec.from_config(config.model)
        assert spec.in_channels == InputSpec.from_config(config).channels, name  # masks + distance(s) + CT
        optim.schedule_factor(config.train)  # its warmup and decay fit its steps
        assert all(p % spec.factor == 0 for p in config.data.patch_shape), name


def test_console_script_help_lists_the_commands_flags():
    """`flaxdose-predict --help` listed no flags (absl shows the main module's, the script wrapper's)."""
    import shutil
    from pathlib import Path

    script = Path(sys.executable).parent / "flaxdose-predict"
    if not script.exists():
        script = shutil.which("flaxdose-predict")
    if script is None:
        pytest.skip("flaxdose is not installed with its console scripts")
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert "--workdir" in out.stdout + out.stderr and "--rtdose_out" in out.stdout + out.stderr
    assert out.returncode == 0  # asking for help is not an error (absl exits 1)


def test_require_names_every_missing_flag_and_what_it_is_for():
    from flaxdose import cli

    cli.require("usage: x", workdir=("runs/a", "the run"), out=("r", "the report"))  # nothing missing
    with pytest.raises(FlaxdoseError) as e:
        cli.require("usage: x --workdir W --out R", workdir=("runs/a", "the run"), out=("", "the report folder"),
                    data=(None, "the dataset"))
    assert str(e.value) == "missing --out (the report folder), --data (the dataset); usage: x --workdir W --out R"


def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    script = ("from flaxdose import cli\n"
              "def main(argv):\n"
              "    raise KeyboardInterrupt\n"
              "cli.run(main)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.startswith("flaxdose: interrupted") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- -h is --help
COMMANDS = ("train", "predict", "evaluate", "qa", "import_dicom", "assess_style", "convert_openkbp", "synth")


@pytest.mark.parametrize("command", COMMANDS)
def test_short_h_is_help(command):
    short, long = run_cli(command, "-h", timeout=120), run_cli(command, "--help", timeout=120)
    assert short.returncode == long.returncode == 0, short.stderr[-1000:]
    assert short.stdout == long.stdout and f"flaxdose.{command}" in short.stdout and "--" in short.stdout


def test_help_alias_leaves_values_after_the_separator():
    from flaxdose.cli import help_alias

    assert help_alias(["prog", "-h", "--out=x", "--", "-h"]) == ["prog", "--help", "--out=x", "--", "-h"]


# ---------------------------------------------------------------- missing and bad flags are named
@pytest.mark.parametrize("command, args, missing", [
    ("assess_style", ["--workdirs=w", "--data=d"], "missing --own_data (held-out plans of the model's own style), "
                                                   "--out (the report folder)"),
    ("convert_openkbp", ["some_src"], "missing --out (the dataset folder to write)"),
])
def test_missing_required_flags_are_named(command, args, missing, tmp_path):
    done = run_cli(command, *args, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith(f"flaxdose: error: {missing}; usage: python -m flaxdose.{command}")


@pytest.mark.parametrize("command", ["predict", "evaluate", "qa"])
def test_a_batch_size_below_1_is_a_one_line_flag_error(command, tmp_path):
    result = run_cli(command, "--batch_size=0", f"--out={tmp_path / 'o'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--batch_size=0" in result.stderr and "positive" in result.stderr


def test_help_of_a_config_command_lists_config():
    """--config is defined in flaxdose.cli, not in the command's module; --help must still list it."""
    out = subprocess.run([sys.executable, "-m", "flaxdose.train", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--config: config name in configs/" in out.stdout and "--workdir:" in out.stdout
