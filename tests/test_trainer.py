import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from flaxdose import checkpoint
from flaxdose import config as config_lib
from flaxdose.data import Dataset, pipeline
from flaxdose.errors import FlaxdoseError
from flaxdose.inference.predictor import Model
from flaxdose.model import init_params, preset
from flaxdose.run import Run
from flaxdose.synthetic.phantom import phantom_cases
from flaxdose.training import optim, resume, trainer
from flaxdose.training.devices import shard_to_devices


def assert_trees_close(a, b, **tol):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


@pytest.mark.parametrize("loss", [trainer.DoseLoss(), trainer.DoseLoss((0,), 7.0)], ids=["mse", "ptv_weighted"])
def test_pmap_step_on_4_devices_equals_1_device(loss):
    """Also for the weighted loss, whose shards hold different target weights: sums, then one division."""
    devices = jax.local_devices()
    assert len(devices) == 4, "conftest must simulate 4 CPU devices"
    spec = preset("tiny")
    tx = optax.adam(1e-2)
    params = init_params(spec, jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(0, 2, (8, 8, 8, 4, 6), dtype=np.uint8),
             "target": rng.random((8, 8, 8, 4), dtype=np.float32)}
    state = trainer.TrainState(np.asarray(0), params, tx.init(params))
    results = []
    for devs in (devices[:1], devices):
        step = trainer.pmap_train_step(spec, tx, loss)
        new, metrics = step(trainer.replicate(state, devs), shard_to_devices(batch, devs))
        results.append((trainer.unreplicate(new), float(metrics["loss"][0])))
    (one, loss1), (four, loss4) = results
    assert loss1 == pytest.approx(loss4, rel=1e-5)
    assert_trees_close(one.params, four.params, rtol=1e-4, atol=1e-6)
    assert not np.allclose(jax.tree_util.tree_leaves(one.params)[0], jax.tree_util.tree_leaves(params)[0])


def test_loss_decreases_and_workdir_has_the_artifacts(tmp_path, make_config):
    config = make_config(**{"train.steps": 24, "train.log_every": 4, "train.checkpoint_every": 12, "train.eval_every": 12})
    result = trainer.train_and_evaluate(config, tmp_path)
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses
    assert result["step"] == 24 and np.isfinite(result["val_loss"])
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 24
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents*"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["12", "24"]
    params, meta = checkpoint.restore_params(tmp_path)
    assert meta["step"] in (12, 24) and meta["val_loss"] == pytest.approx(result["best_val_loss"])


def test_interrupted_run_resumes_to_the_same_result_on_another_device_count(tmp_path, make_config):
    devices = jax.local_devices()
    straight = trainer.train_and_evaluate(make_config(), tmp_path / "a", devices=devices)
    trainer.train_and_evaluate(make_config(**{"train.steps": 3}), tmp_path / "b", devices=devices)
    resumed = trainer.train_and_evaluate(make_config(), tmp_path / "b", devices=devices[:1])
    assert resumed["step"] == straight["step"] == 6
    a, _ = checkpoint.restore_params(tmp_path / "a", which="latest")
    b, _ = checkpoint.restore_params(tmp_path / "b", which="latest")
    assert_trees_close(a, b, rtol=1e-4, atol=1e-6)
    # a finished run is not reopened for writing: no file of the workdir changes or appears
    files = lambda: {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*") if p.is_file()}
    before = files()
    again = trainer.train_and_evaluate(make_config(), tmp_path / "a", devices=devices)
    assert again["step"] == 6 and files() == before


def test_incompatible_workdir_is_refused_untouched(tmp_path, make_config):
    trainer.train_and_evaluate(make_config(**{"train.steps": 3}), tmp_path)
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(FlaxdoseError, match="another model"):
        trainer.train_and_evaluate(make_config(**{"model.features": (4, 12)}), tmp_path)
    assert (tmp_path / "config.json").read_text() == before
    (tmp_path / "config.json").unlink()  # even without config.json the parameter shapes are checked
    with pytest.raises(FlaxdoseError, match="parameter shapes differ"):
        trainer.train_and_evaluate(make_config(**{"model.features": (4, 12), "train.steps": 6}), tmp_path)


def test_a_run_of_one_conv_form_resumes_and_predicts_in_the_other(tmp_path, make_config):
    """The 3x3x3 convolution form changes how the UNet is computed, not its parameters: a run trained with
    the 3D form resumes with the 2D rewrite, and its checkpoint predicts the same dose in both forms."""
    trainer.train_and_evaluate(make_config(**{"train.steps": 3, "model.conv": "3d"}), tmp_path)
    assert trainer.train_and_evaluate(make_config(**{"model.conv": "2d"}), tmp_path)["step"] == 6
    model = Model.load(tmp_path, full_volume=True)
    case = phantom_cases(5, 1, shape=(16, 16, 8))[0]
    doses = {}
    for form in ("3d", "2d", "2d_taps"):
        other = Model(dataclasses.replace(model.spec, conv=form), model.params, model.structures,
                      inputs=model.inputs, window=model.window)
        doses[form] = other.predict([case])[0].dose
    for form in ("2d", "2d_taps"):
        assert np.abs(doses[form] - doses["3d"]).max() <= 1e-5 * np.abs(doses["3d"]).max(), form
    assert doses["3d"].max() > 0


def test_bad_data_settings_are_clear_errors(tmp_path, make_config):
    with pytest.raises(FlaxdoseError, match="does not exist"):
        trainer.train_and_evaluate(make_config(**{"data.kind": "folder", "data.path": str(tmp_path / "x")}), tmp_path / "w")
    with pytest.raises(FlaxdoseError, match="divisible"):
        trainer.train_and_evaluate(make_config(**{"train.batch_size": 6}), tmp_path / "w")
    with pytest.raises(FlaxdoseError, match="in_channels"):
        trainer.train_and_evaluate(make_config(**{"model.in_channels": 5}), tmp_path / "w")
    for bad in ((32,), (8, 8, 0)):  # refused before any data is generated or folder made
        with pytest.raises(FlaxdoseError, match="three positive"):
            trainer.train_and_evaluate(make_config(**{"data.patch_shape": bad}), tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_sigkill_mid_run_then_rerun_finishes(tmp_path):
    """The README's promise: kill -9 a training run, rerun the same command, it resumes."""
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "flaxdose.train", "--config=quick", "--workdir=run",  # relative, as users type it
           "--config.data.kind=phantom", "--config.data.phantom_shape=(16,16,8)", "--config.data.n_train=6",
           "--config.data.val_cases=2", "--config.data.patch_shape=(8,8,8)", "--config.model.features=(4,8)",
           "--config.model.convs_per_level=1", "--config.model.groups=2", "--config.train.schedule=constant",
           "--config.train.steps=400",
           "--config.train.checkpoint_every=2", "--config.train.eval_every=2"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any((workdir / "checkpoints").glob("[1-9]*")):
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps and max(steps) < 400
    done = subprocess.run(cmd[:-3] + ["--config.train.steps=" + str(max(steps) + 4)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == max(steps) + 4
    assert f"resumed from step {max(steps)}" in done.stderr


def test_validation_loss_is_the_evaluation_pipelines_mse(tmp_path, make_config):
    """The loss that picks `best` is the MSE of exactly what evaluation scores: sliding windows,
    clipped at 0, zero outside the body; recomputed here by hand from Model.predict's doses."""
    from flaxdose.data.case import Dataset
    from flaxdose.inference.predictor import Model

    config = make_config(**{"train.steps": 3, "train.eval_every": 3, "train.checkpoint_every": 3})
    trainer.train_and_evaluate(config, tmp_path)
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if "val_loss" in l]
    dataset = Dataset.open(next((tmp_path / "data").iterdir()))
    val_cases = [dataset.load(i) for i in dataset.split("train")[-2:]]  # data.val_cases=2: the last two
    model = Model.load(tmp_path, "latest")
    assert model.window == tuple(config.data.patch_shape)  # sliding windows, as evaluation predicts
    predicted = model.predict(val_cases)
    mse = np.mean([np.mean(((p.dose.astype(np.float64) - c.dose) / c.prescription_gy) ** 2) for p, c in zip(predicted, val_cases)])
    assert [r["val_loss"] for r in records] == [pytest.approx(mse, rel=1e-5)]
    # the validation Dice beside it: isodose volumes at 10..100 % of Rx inside the body, by hand
    def dice_by_hand(pred, case):
        body, rx, scores = case.dose_region(), case.prescription_gy, []
        for level in np.arange(1, 11) / 10:
            a, b = (pred >= level * rx) & body, (case.dose >= level * rx) & body
            scores.append(1.0 if a.sum() + b.sum() == 0 else 2 * (a & b).sum() / (a.sum() + b.sum()))
        return np.mean(scores)
    by_hand = np.mean([dice_by_hand(p.dose, c) for p, c in zip(predicted, val_cases)])
    assert [r["val_dice"] for r in records] == [pytest.approx(by_hand, abs=1e-6)]


@pytest.mark.parametrize("overrides, message", [
    ({"train.steps": -5}, "train at least one step"),
    ({"train.batch_size": 0}, "at least one patch"),  # was a traceback from grain, exit 1
    ({"data.path": "/somewhere"}, "data.kind=folder"),
    ({"transfer.mode": "paper", "transfer.source": "/no/such/run"}, "does not exist"),
    ({"transfer.mode": "encoder", "transfer.source": "/no/such/run"}, "unknown transfer mode"),
    # the built-in generators make no CT: it failed after generating the cases, advising import_dicom --include_ct
    ({"data.include_ct": True}, r"data.kind=phantom has no CT \(the generator makes none\); set "
                                r"--config.data.include_ct=False or train on a folder dataset with a CT"),
    ({"data.kind": "synthetic", "data.include_ct": True}, r"data.kind=synthetic has no CT \(the generator makes none"),
])
def test_bad_settings_are_refused_before_data_is_generated(tmp_path, make_config, overrides, message):
    """A new-user pass: these ran (steps=-5, exit 0), silently ignored data.path, or failed only
    after generating a whole dataset into the workdir."""
    with pytest.raises(FlaxdoseError, match=message):
        trainer.train_and_evaluate(make_config(**overrides), tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_include_ct_on_synthetic_data_is_refused_before_any_case_is_generated(tmp_path):
    """The command a user types (quick's synthetic data, a CT input): one line saying synthetic data has no CT and
    the two fixes, before the ~30 s of generating 28 cases; no workdir, no data folder left behind."""
    proc = subprocess.run([sys.executable, "-m", "flaxdose.train", "--config=quick", "--config.data.include_ct=True",
                           "--config.model.in_channels=8", f"--workdir={tmp_path / 'W'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "data.kind=synthetic has no CT (the generator makes none)" in proc.stderr
    assert "--config.data.include_ct=False" in proc.stderr and "data.kind=folder" in proc.stderr
    assert "import_dicom" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_workdir_that_cannot_be_created_is_a_one_line_error(tmp_path):
    (tmp_path / "a_file").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "flaxdose.train", "--config=quick", f"--workdir={tmp_path / 'a_file'}",
                           "--config.train.steps=1"], capture_output=True, text=True, timeout=300)
    # (one step also logs its shrunk warmup and decay first: the error is the last line)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("flaxdose: error:")


def test_dose_loss_weights_target_voxels_as_computed_by_hand(make_config):
    spec = preset("tiny")
    params = init_params(spec, jax.random.key(1))
    rng = np.random.default_rng(3)
    inputs = np.zeros((2, 8, 8, 4, 6), np.uint8)
    inputs[:, 2:5, 3:6, 1:3, 0] = 1  # channel 0: the PTV
    inputs[..., 5] = 1  # body
    batch = {"inputs": inputs, "target": rng.random((2, 8, 8, 4), dtype=np.float32)}
    pred = np.asarray(trainer.UNet3D(spec).apply({"params": params}, inputs.astype(np.float32)))
    sq = (pred.astype(np.float64) - batch["target"]) ** 2
    w = np.where(inputs[..., 0] > 0, 7.0, 1.0)
    by_hand = (w * sq).sum() / w.sum()
    config = make_config(**{"train.target_weight": 7.0})
    loss = trainer.DoseLoss.from_config(config)
    assert loss.target_channels == (0,)  # the PTV among the prostate structures
    assert float(loss(params, spec, batch)) == pytest.approx(by_hand, rel=1e-5)
    assert float(trainer.DoseLoss()(params, spec, batch)) == pytest.approx(sq.mean(), rel=1e-5)  # the paper's MSE
    assert by_hand != pytest.approx(sq.mean(), rel=1e-3)  # the weighting changes the value
    with pytest.raises(FlaxdoseError, match="target_weight"):
        trainer.DoseLoss.from_config(make_config(**{"train.target_weight": 0.5}))


def test_target_distance_model_trains_and_predicts_with_its_seventh_channel(tmp_path, make_config):
    with pytest.raises(FlaxdoseError, match="in_channels=7"):
        trainer.train_and_evaluate(make_config(**{"data.target_distance": True, "model.in_channels": 6}), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    config = make_config(**{"data.target_distance": True, "model.in_channels": 7})
    result = trainer.train_and_evaluate(config, tmp_path / "run")
    assert np.isfinite(result["val_loss"])
    model = Model.load(tmp_path / "run")
    assert model.inputs.target_distance is True and model.spec.in_channels == 7
    case = phantom_cases(9, 1, shape=(16, 16, 8))[0]
    pred = model.predict([case])[0].dose
    inputs = pipeline.model_inputs(case, model.inputs)
    by_hand = np.clip(model.predict_relative(inputs), 0, None) * case.prescription_gy * case.dose_region()
    np.testing.assert_allclose(pred, by_hand, rtol=1e-5, atol=1e-5)
    blind = inputs.copy()
    blind[..., 6] = 0  # the prediction does use the distance channel
    assert not np.allclose(model.predict_relative(blind), model.predict_relative(inputs), atol=1e-4)


def tensorboard_values(folder):
    """[(tag, step, kind)] of every summary value in a TensorBoard folder's event files, in file order, read here
    from the TFRecord framing (8-byte length, 4-byte CRC, the Event proto, 4-byte CRC)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    values = []
    for path in sorted(folder.glob("events.out.tfevents*"), key=lambda p: p.stat().st_mtime_ns):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            values += [(v.tag, event.step, v.WhichOneof("value")) for v in event.summary.value]
    return values


def test_interrupted_then_extended_run_logs_every_step_once(tmp_path, make_config, monkeypatch, caplog):
    """A run stopped after logging step 6 but before its step-6 checkpoint resumes from step 3: metrics.jsonl and
    TensorBoard read as one continuous run (steps 4 and 6 once, not twice). A finished run extends with a larger
    train.steps, also on a warmup-stable-decay schedule, whose rate goes back up and decays again (the logged
    learning rate, by hand); an unfinished one is refused with how to extend it."""
    schedule = {"train.schedule": "warmup_stable_decay", "train.warmup_steps": 1, "train.decay_steps": 2,
                "train.end_lr_fraction": 0.01}
    config = make_config(**schedule)  # 6 steps, logs every 2, validates and saves every 3
    real_save = trainer.RunFolder.save

    def save(self, step, *args, **kwargs):
        if step == 6:
            raise KeyboardInterrupt  # Ctrl-C between the step-6 logs and its checkpoint
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(trainer.RunFolder, "save", save)
    with pytest.raises(KeyboardInterrupt):
        trainer.train_and_evaluate(config, tmp_path)
    monkeypatch.undo()
    read = lambda: [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in read()] == [2, 3, 4, 6]  # logged past the last checkpoint (3)
    with pytest.raises(FlaxdoseError, match="let the run finish at step 6 first: a finished run extends"):
        trainer.train_and_evaluate(make_config(**schedule, **{"train.steps": 9}), tmp_path)

    trainer.train_and_evaluate(config, tmp_path)  # resumes from step 3
    records = read()
    assert [r["step"] for r in records] == [2, 3, 4, 6]
    assert {k for r in records for k in r} == {"step", "loss", "learning_rate", "patches_per_s", "val_loss", "val_dice"}
    # warmup 1 step, stable, then a cosine to 1 % over the last 2: update t applies 3e-3 * factor(t - 1)
    assert [r["learning_rate"] for r in records if "learning_rate" in r] == pytest.approx([3e-3, 3e-3, 3e-3 * 0.505])

    with caplog.at_level("INFO", logger="flaxdose"):
        trainer.train_and_evaluate(make_config(**schedule, **{"train.steps": 9}), tmp_path)
    assert "continues from step 6 on the warmup_stable_decay schedule of a 9-step run" in caplog.text
    records = read()
    assert [r["step"] for r in records] == [2, 3, 4, 6, 8, 9]
    assert [r["learning_rate"] for r in records if r["step"] > 6] == pytest.approx([3e-3, 3e-3 * 0.505])
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 9
    assert checkpoint.saved_steps(tmp_path / "checkpoints")[-1] == 9

    values = tensorboard_values(tmp_path / "tensorboard")
    for tag in ("loss", "learning_rate", "patches_per_s", "val_loss", "val_dice"):
        steps = [step for t, step, _ in values if t == tag]
        assert steps == [r["step"] for r in records if tag in r], tag  # each step once, in order
    assert [(step, kind) for t, step, kind in values if t == "preview"] == [(6, "image"), (9, "image")]


# ---------------------------------------------------------------- a resumed run keeps its optimisation settings
# A short warmup-stable-decay run: warmup 3 + decay 250 > 4 steps -> warmup 3 kept, decay 4 - 3 = 1.
WSD = {"train.steps": 4, "train.schedule": "warmup_stable_decay", "train.warmup_steps": 3, "train.decay_steps": 250,
       "train.checkpoint_every": 2, "train.eval_every": 2}



@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 4-step warmup-stable-decay run on 16x16x8 phantoms (4 x 4 x 5 mm) and its dataset."""
    from conftest import tiny_config

    workdir = tmp_path_factory.mktemp("run")
    trainer.train_and_evaluate(tiny_config(**WSD), workdir)
    return workdir, Dataset.open(next((workdir / "data").iterdir()))


def fake_run(workdir: Path, config) -> Path:
    """A workdir holding config.json and one finished checkpoint folder (what check_resume looks at)."""
    (workdir / "checkpoints" / "2" / "params").mkdir(parents=True)
    (workdir / "config.json").write_text(config_lib.to_json(optim.fit_schedule(config)))
    return workdir


def test_the_same_command_resumes_and_other_settings_are_refused(trained, caplog, tmp_path):
    from conftest import tiny_config

    workdir, _ = trained
    stored = json.loads((workdir / "config.json").read_text())["train"]
    assert (stored["warmup_steps"], stored["decay_steps"]) == (3, 1)
    before = (workdir / "config.json").read_text()
    assert (workdir / "preview.png").is_file()
    (workdir / "preview.png").unlink()  # as a Ctrl-C just after the last step leaves it
    with caplog.at_level("INFO", logger="flaxdose"):
        assert trainer.train_and_evaluate(tiny_config(**WSD), workdir)["step"] == 4  # same command: resumes (finished)
    assert "nothing to train (already at step 4)" in caplog.text and "steps 5..4" not in caplog.text
    assert (workdir / "preview.png").is_file()  # written again
    # the finished run extends to 8 steps (warmup 3 + decay 250 > 8 -> warmup 3 kept, decay 8 - 3 = 5): accepted,
    # on the 8-step run's schedule from step 4 on (the extension's training is tested elsewhere in this file; here only checked)
    notes = resume.check_resume(Run(workdir), optim.fit_schedule(tiny_config(**{**WSD, "train.steps": 8})))
    assert len(notes) == 1 and "continues from step 4 on the warmup_stable_decay schedule of a 8-step run" in notes[0]
    assert "decaying over the 4 steps left" in notes[0]  # its 5-step decay began at step 3, before step 4
    assert (workdir / "config.json").read_text() == before
    # a scheduled run that has not finished is refused: its rate would change mid-run
    unfinished = fake_run(tmp_path / "unfinished", tiny_config(**{**WSD, "train.steps": 20}))
    with pytest.raises(FlaxdoseError) as e:
        resume.check_resume(Run(unfinished), optim.fit_schedule(tiny_config(**{**WSD, "train.steps": 40})))
    # 20 steps: decay 20 - 3 = 17; 40 steps: 37
    message = str(e.value)
    assert "train.steps: 20 there vs 40 now" in message and "train.decay_steps: 17 there vs 37 now" in message
    assert "use a new --workdir" in message and "--config.train.steps=20 --config.train.decay_steps=17" in message
    assert "let the run finish at step 20 first: a finished run extends with a larger --config.train.steps" in message


def test_each_optimisation_setting_is_compared(tmp_path):
    from conftest import tiny_config

    base = tiny_config(**{"train.steps": 20})  # constant schedule
    workdir = fake_run(tmp_path / "w", base)
    assert resume.check_resume(Run(workdir), base) == []
    notes = resume.check_resume(Run(workdir), tiny_config(**{"train.steps": 40}))  # extending a constant run
    assert notes and "train.steps 20 -> 40" in notes[0]
    assert resume.check_resume(Run(workdir), tiny_config(**{"train.steps": 20, "train.warmup_steps": 7})) == []  # unused
    notes = resume.check_resume(Run(workdir), tiny_config(**{"train.steps": 10}))  # shortening it: the same rate
    assert notes and "train.steps 20 -> 10" in notes[0] and "now ends at step 10" in notes[0]
    notes = resume.check_resume(Run(workdir), tiny_config(**{"train.steps": 2}))  # fake_run's checkpoint is step 2
    assert "already trained to step 2; nothing to train" in notes[0] and "now ends" not in notes[0]
    for key, value in (("train.batch_size", 8), ("train.learning_rate", 1e-3),
                       ("train.schedule", "warmup_cosine"), ("train.target_weight", 1.0), ("transfer.mode", "full")):
        with pytest.raises(FlaxdoseError, match=rf"{key}: .* there vs {value!r} now"):
            resume.check_resume(Run(workdir), tiny_config(**{"train.steps": 20, key: value}))
    with pytest.raises(FlaxdoseError) as e:  # the constant run has no warmup: "not used", not None
        resume.check_resume(Run(workdir), tiny_config(**{"train.steps": 20, "train.schedule": "warmup_cosine"}))
    assert "train.warmup_steps: not used there vs" in str(e.value) and "None" not in str(e.value)
    cosine = tiny_config(**cosine_settings())
    workdir = fake_run(tmp_path / "c", cosine)
    for key, value in (("train.steps", 40), ("train.warmup_steps", 6), ("train.end_lr_fraction", 0.1)):
        with pytest.raises(FlaxdoseError, match=rf"{key}: .* there vs {value!r} now"):
            resume.check_resume(Run(workdir), tiny_config(**{**cosine_settings(), key: value}))
    transfer = tiny_config(**{"train.steps": 20, "transfer.mode": "full", "transfer.learning_rate": 1e-4})
    workdir = fake_run(tmp_path / "t", transfer)
    assert resume.check_resume(Run(workdir), tiny_config(**{"train.steps": 20, "transfer.mode": "full",
                                                         "transfer.learning_rate": 1e-4,
                                                         "train.learning_rate": 0.5})) == []  # not used by transfer
    with pytest.raises(FlaxdoseError, match=r"transfer.learning_rate: 0.0001 there vs 0.001 now"):
        resume.check_resume(Run(workdir), tiny_config(**{"train.steps": 20, "transfer.mode": "full",
                                                      "transfer.learning_rate": 1e-3}))


def test_resuming_with_another_seed_or_augmentation_is_refused(tmp_path):
    """The seed picks the patches, flips and patch settings shape them: changed mid-run, the resumed
    run would not be the one its checkpoints came from."""
    from conftest import tiny_config

    base = tiny_config(**{"train.steps": 20})
    workdir = fake_run(tmp_path / "w", base)
    for key, value, shown in (("seed", 1, "0 there vs 1 now"), ("data.flip_lr", False, "True there vs False now"),
                              ("data.patch_sigma", (3.0, 3.0, 1.0), "[2.0, 2.0, 1.0] there vs [3.0, 3.0, 1.0] now")):
        with pytest.raises(FlaxdoseError) as e:
            resume.check_resume(Run(workdir), tiny_config(**{"train.steps": 20, key: value}))
        assert f"{key}: {shown}" in str(e.value)
    with pytest.raises(FlaxdoseError) as e:
        resume.check_resume(Run(workdir), tiny_config(**{"train.steps": 20, "data.patch_shape": (16, 16, 8)}))
    # the stored setting as a flag a shell takes as it is (a tuple needs quotes)
    assert "'--config.data.patch_shape=(8,8,8)'" in str(e.value)


def cosine_settings():
    return {"train.steps": 20, "train.schedule": "warmup_cosine", "train.warmup_steps": 5}
