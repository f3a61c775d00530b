"""Fine-tuning sweeps: grid checks, packing into waves, equality with solo runs, resume after kill -9."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from flaxdose import config as config_lib
from flaxdose.checkpoint import restore_params
from flaxdose.errors import FlaxdoseError
from flaxdose.sweeps.runner import (
    Run,
    Sweep,
    check_grid,
    expand_grid,
    plan_waves,
    shard_of,
    wave_layout,
)
from flaxdose.training import trainer

REPO = Path(__file__).resolve().parent.parent


def smoke_config(overrides=None):
    return config_lib.load_config("sweep_smoke", overrides)


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory):
    """sweep_smoke trained once on the 4 simulated devices."""
    sweep = Sweep(smoke_config(), tmp_path_factory.mktemp("sweep") / "smoke")
    sweep.prepare()
    sweep.train()
    sweep.report()
    return sweep


def final_params(workdir):
    return restore_params(workdir, which="latest")[0]


def assert_same_params(a, b, rtol=1e-5, atol=1e-6):
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def reuse_prepared(smoke_sweep, tmp_path, **settings):
    """A sweep file on the smoke sweep's data and source model, so only its runs train."""
    lines = ["from flaxdose.configs import sweep_smoke", "", "def get_config():", "    c = sweep_smoke.get_config()",
             f"    c.source.path = {str(smoke_sweep.source_dir)!r}",
             f"    c.data.folders = {{'internal_c': {str(smoke_sweep.dataset_path('internal_c'))!r}}}"]
    lines += [f"    c.{k} = {v!r}" for k, v in settings.items()] + ["    return c", ""]
    path = tmp_path / "sweep_reuse.py"
    path.write_text("\n".join(lines))
    return path


# ---------------------------------------------------------------- grid and packing
def test_grid_expands_every_combination_once():
    runs = expand_grid(smoke_config().grid)
    assert len(runs) == 8 and len({r.run_id for r in runs}) == 8
    assert [r.index for r in runs] == list(range(8))
    with_scratch = smoke_config({"grid.modes": ("paper", "scratch"), "grid.scratch_learning_rates": (1e-3, 3e-3)})
    runs = expand_grid(with_scratch.grid)
    assert sum(r.mode == "scratch" for r in runs) == 2 * 2 * 2  # n x seeds x scratch rates
    assert {r.learning_rate for r in runs if r.mode == "scratch"} == {1e-3, 3e-3}


@pytest.mark.parametrize("override, message", [
    ({"grid.seeds": ()}, "grid is empty"),
    ({"grid.modes": ()}, "grid is empty"),
    ({"grid.modes": ("paper", "fine")}, "unknown sweep mode"),
    ({"runs_per_device": 0}, "at least 1"),
])
def test_bad_grids_are_refused(override, message):
    config = smoke_config(override)
    with pytest.raises(FlaxdoseError, match=message):
        check_grid(config, {"internal_c": 2, "source": 3})


def test_more_cases_than_the_style_has_is_refused(tmp_path):
    config = smoke_config()
    with config.grid.targets.unlocked():
        config.grid.targets.internal_c = (1, 5)
    with pytest.raises(FlaxdoseError, match="asks for \\[1, 5\\] training plans but style 'internal_c' has 2"):
        Sweep(config, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_waves_keep_one_mode_and_start_step_and_fill_devices():
    runs = [Run(i, "a", 2, mode, 0, 1e-4) for i, mode in enumerate(["paper"] * 5 + ["full"] * 3)]
    waves = plan_waves([(r, 0) for r in runs[:7]] + [(runs[7], 2)], capacity=4)
    assert [[r.index for r, _ in w] for w in waves] == [[0, 1, 2, 3], [4], [5, 6], [7]]
    assert wave_layout(8, 4) == (4, 2) and wave_layout(5, 4) == (3, 2) and wave_layout(3, 4) == (3, 1)
    assert [r.index for r in shard_of(runs, 1, 3)] == [1, 4, 7]
    with pytest.raises(FlaxdoseError, match="shard 3 of 3"):
        shard_of(runs, 3, 3)


# ---------------------------------------------------------------- the smoke sweep
def test_smoke_sweep_packs_8_runs_into_2_waves_and_reports(smoke_sweep):
    rows, baselines = smoke_sweep.collect()
    assert len(rows) == 8 and len(baselines) == 1
    assert {r["wave_layout"] for r in rows} == {"4x1"} and {r["wave_size"] for r in rows} == {4}
    assert len({(r["mode"], r["wave_wall_s"]) for r in rows}) == 2  # one wave per mode
    assert all(0.0 <= r["dice_mean"] <= 1.0 and r["steps"] == 4 for r in rows)
    report = smoke_sweep.root / "report"
    assert (report / "learning_curve.png").stat().st_size > 10_000
    assert len((report / "results.csv").read_text().strip().splitlines()) == 9
    assert "| 0 (source model) |" in (report / "summary.md").read_text()


def test_each_packed_run_equals_the_same_run_trained_alone(smoke_sweep, tmp_path):
    for run in smoke_sweep.runs:
        alone = tmp_path / run.run_id
        trainer.train_and_evaluate(smoke_sweep.run_config(run), alone, devices=jax.devices()[:1])
        assert_same_params(final_params(smoke_sweep.run_dir(run)), final_params(alone))


def test_several_runs_per_device_with_vmap_give_the_same_runs(smoke_sweep, tmp_path):
    config = config_lib.load_config(str(reuse_prepared(smoke_sweep, tmp_path, runs_per_device=2, max_devices=2)))
    sweep = Sweep(config, tmp_path / "vmapped")
    sweep.prepare()
    sweep.train()
    rows, _ = sweep.collect()
    assert {r["wave_layout"] for r in rows} == {"2x2"}
    for run in sweep.runs:
        assert_same_params(final_params(sweep.run_dir(run)), final_params(smoke_sweep.run_dir(run)))


def test_a_killed_sweep_resumes_without_redoing_finished_runs(smoke_sweep, tmp_path):
    config_file = reuse_prepared(smoke_sweep, tmp_path)
    workdir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "flaxdose.launch.sweep", f"--config={config_file}", f"--workdir={workdir}"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    second_wave = [workdir / "runs" / r.run_id / "checkpoints" / "2" for r in smoke_sweep.runs if r.mode == "full"]
    deadline = time.time() + 240
    while not any(p.is_dir() for p in second_wave) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p: (p.stat().st_mtime_ns, p.read_text()) for p in workdir.glob("runs/*/result.json")}
    assert len(finished) == 4, "the kill should land in the second wave"
    resumed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "4 finished earlier" in resumed.stderr and "from step 2" in resumed.stderr
    assert {p: (p.stat().st_mtime_ns, p.read_text()) for p in finished} == finished
    assert len(list(workdir.glob("runs/*/result.json"))) == 8
    for run in smoke_sweep.runs:
        assert_same_params(final_params(workdir / "runs" / run.run_id), final_params(smoke_sweep.run_dir(run)))


# ---------------------------------------------------------------- folders
def test_a_folder_of_another_sweep_is_refused_untouched(smoke_sweep):
    before = {p: p.stat().st_mtime_ns for p in smoke_sweep.root.rglob("*")}
    other = Sweep(smoke_config({"grid.seeds": (0, 1, 2)}), smoke_sweep.root)
    with pytest.raises(FlaxdoseError, match="holds another sweep .*grid.seeds"):
        other.prepare()
    assert {p: p.stat().st_mtime_ns for p in smoke_sweep.root.rglob("*")} == before


def test_a_non_sweep_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FlaxdoseError, match="no sweep.json"):
        Sweep(smoke_config(), tmp_path).prepare()


def test_shards_need_a_prepared_folder(tmp_path):
    with pytest.raises(FlaxdoseError, match="--stage=prepare"):
        Sweep(smoke_config(), tmp_path / "new").train(0, 2)


def test_cli_refuses_a_training_config():
    out = subprocess.run([sys.executable, "-m", "flaxdose.launch.sweep", "--config=quick", "--workdir=/tmp/unused"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "not a sweep" in out.stderr


def test_two_processes_split_a_sweep(smoke_sweep, tmp_path):
    """Two shards at once on one prepared folder: each trains its half; the results are the sweep's."""
    config_file = reuse_prepared(smoke_sweep, tmp_path)
    workdir = tmp_path / "two_processes"
    Sweep(config_lib.load_config(str(config_file)), workdir).prepare()  # one process prepares first
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "flaxdose.launch.sweep", f"--config={config_file}", f"--workdir={workdir}", "--stage=train",
         f"--shard_index={i}", "--shard_count=2"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
        assert "4 runs here" in err
    assert len(list(workdir.glob("runs/*/result.json"))) == 8
    for run in smoke_sweep.runs:
        assert_same_params(final_params(workdir / "runs" / run.run_id), final_params(smoke_sweep.run_dir(run)))


def test_plans_to_expect_skips_plan_counts_without_dice():
    from flaxdose.sweeps.report import plans_text, plans_to_expect

    nan = float("nan")
    # means: n=5 -> 0.81, n=10 -> 0.82 (best); 0.81 is within the 0.01 margin, so 5 plans are enough
    text = plans_text(plans_to_expect({2: [nan, nan], 5: [0.80, 0.82], 10: [0.815, 0.825]}, None))
    assert text.startswith("5 (") and text.endswith("; Dice 0.810, best 0.820")
    assert plans_text(plans_to_expect({2: [nan], 5: [nan]}, None)) == "n/a"


def test_report_and_train_refuse_a_folder_that_is_not_a_prepared_sweep(tmp_path):
    for stage in ("report", "train"):
        with pytest.raises(FlaxdoseError, match="not a prepared sweep .*--stage=prepare"):
            getattr(Sweep(smoke_config(), tmp_path / "missing"), stage)()
    assert not (tmp_path / "missing").exists()  # no "0 of 8 runs" report


def test_every_stage_refuses_another_sweeps_folder_untouched(tmp_path):
    Sweep(smoke_config(), tmp_path / "sweep").claim_folder()  # sweep.json of the smoke sweep
    before = {p: p.read_bytes() for p in (tmp_path / "sweep").rglob("*")}
    other = Sweep(smoke_config({"grid.seeds": (0, 1, 2)}), tmp_path / "sweep")
    for stage in ("prepare", "train", "report"):
        with pytest.raises(FlaxdoseError, match="holds another sweep .*grid.seeds"):
            getattr(other, stage)()
    assert {p: p.read_bytes() for p in (tmp_path / "sweep").rglob("*")} == before


def test_cli_report_refuses_a_missing_folder(tmp_path):
    out = subprocess.run([sys.executable, "-m", "flaxdose.launch.sweep", "--config=sweep_smoke",
                          f"--workdir={tmp_path / 'missing'}", "--stage=report"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "not a prepared sweep" in out.stderr and not (tmp_path / "missing").exists()
