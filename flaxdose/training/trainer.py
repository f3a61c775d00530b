"""Training: `train_and_evaluate(config, workdir)`, and the one loop every training uses.

One code path for any number of local devices: the train step is `jax.pmap`-ed over all of
them (`flaxdose.training.devices`), each device takes `batch_size / num_devices` patches, gradients
and loss are averaged with `lax.pmean`, and the state is donated so parameters are updated in place.
The loss is the MSE of the dose in units of the prescription (the paper's), optionally with the
target voxels weighted more (`train.target_weight`, see `DoseLoss`). Checkpoints hold the
unreplicated state, so a run resumes on any device count (see `flaxdose.checkpoint`).

A run's workdir is a `flaxdose.run.Run` (its config, dataset, training cases and spacing), opened
for training once the resume policy accepts the config (`flaxdose.training.resume`).
`RunFolder.start` is the one place that decides how a run starts (resume from its checkpoint,
fine-tune from a source model, or fresh init); `RunFolder` writes its config.json, logs
(`flaxdose.training.writers`) and checkpoints; `train_steps` is the one loop. `train_and_evaluate`
uses them for one run, and `flaxdose.sweeps.runner` for many runs stacked on the devices.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from tqdm import tqdm

from flaxdose import config as config_lib
from flaxdose import plots
from flaxdose.checkpoint import WorkdirCheckpoints
from flaxdose.data import pipeline
from flaxdose.data.case import target_names
from flaxdose.errors import FlaxdoseError
from flaxdose.inference.predictor import Model
from flaxdose.metrics import isodose_dice
from flaxdose.model import UNet3D, UNetSpec, count_params, init_params
from flaxdose.run import SPACING_KEY, Run
from flaxdose.training import distributed, optim, resume, transfer
from flaxdose.training.devices import AXIS, prefetch, replicate, unreplicate
from flaxdose.training.writers import MetricWriter, NoMetricWriter

log = logging.getLogger("flaxdose")


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any


# ---------------------------------------------------------------- pure steps
@dataclasses.dataclass(frozen=True)
class DoseLoss:
    """Voxel-weighted MSE of the dose (units of the prescription), averaged over the weights.

    A voxel inside any target (input channels `target_channels`) weighs `target_weight`, every
    other voxel 1: ``sum(w * (pred - dose)**2) / sum(w)``. `target_weight` 1 is the paper's plain
    MSE. Why weight: at 8 mm voxels the PTV is ~1 % of a patch, so plain MSE barely sees the
    target's coverage (D95, the 95-100 % isodoses), the quantity a physicist reads first.
    """

    target_channels: tuple[int, ...] = ()
    target_weight: float = 1.0

    @classmethod
    def from_config(cls, config) -> DoseLoss:
        """From `config.train.target_weight` (default 1) and the targets among `config.data.structures`."""
        weight = float(config.train.get("target_weight", 1.0))
        if not weight >= 1.0:
            raise FlaxdoseError(f"train.target_weight={weight}; use 1 (plain MSE) or more")
        structures = tuple(config.data.structures)
        return cls(tuple(structures.index(t) for t in target_names(structures)), weight)

    def __call__(self, params, spec: UNetSpec, batch) -> jax.Array:
        total, weight = self.parts(params, spec, batch)
        return total / weight

    def parts(self, params, spec: UNetSpec, batch) -> tuple[jax.Array, jax.Array]:
        """(sum of w (pred - dose)^2, sum of w) over the batch: summed over devices before the division,
        the loss of a batch split over devices is the loss of the whole batch."""
        pred = UNet3D(spec).apply({"params": params}, batch["inputs"].astype(jnp.float32))
        sq = jnp.square(pred - batch["target"])
        if self.target_weight == 1.0 or not self.target_channels:
            return jnp.sum(sq), jnp.asarray(sq.size, jnp.float32)
        inside = jnp.any(batch["inputs"][..., list(self.target_channels)] > 0, axis=-1)
        w = jnp.where(inside, self.target_weight, 1.0)
        return jnp.sum(w * sq), jnp.sum(w)


def make_train_step(spec: UNetSpec, tx: optax.GradientTransformation, axis_name: str | None = None,
                    loss: DoseLoss = DoseLoss()):
    """(state, batch) -> (state, metrics); with `axis_name`, the loss's sums (and their gradients) are
    summed over that mapped axis before the division, so any device count gives the whole batch's loss."""

    def train_step(state: TrainState, batch):
        (total, weight), grads = jax.value_and_grad(lambda p: loss.parts(p, spec, batch), has_aux=True)(state.params)
        if axis_name is not None:
            total, weight, grads = jax.lax.psum((total, weight, grads), axis_name)
        grads = jax.tree.map(lambda g: g / weight, grads)  # the weight does not depend on the parameters
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, opt_state), {"loss": total / weight}

    return train_step


def pmap_train_step(spec: UNetSpec, tx: optax.GradientTransformation, loss: DoseLoss = DoseLoss()):
    """The data-parallel step: pmapped over devices, gradients averaged, the state donated."""
    return jax.pmap(make_train_step(spec, tx, AXIS, loss), axis_name=AXIS, donate_argnums=(0,))


# ---------------------------------------------------------------- the run
def check_setup(config, spec: UNetSpec, devices) -> DoseLoss:
    """Settings that cannot work together, refused before anything is read or written; the run's loss
    (`DoseLoss.from_config`, its settings checked with the others)."""
    if int(config.train.steps) < 1:
        raise FlaxdoseError(f"train.steps={config.train.steps}; train at least one step")
    if int(config.train.batch_size) < 1:
        raise FlaxdoseError(f"train.batch_size={config.train.batch_size}; a batch holds at least one patch "
                            "(e.g. --config.train.batch_size=2)")
    if config.data.get("path") and config.data.kind != "folder":
        raise FlaxdoseError(f"data.path={config.data.path!r} is read only with data.kind=folder (it is "
                            f"{config.data.kind!r}); add --config.data.kind=folder")
    if config.data.get("include_ct", False) and config.data.kind in ("synthetic", "phantom"):
        # the built-in generators make no CT: refused before any case is generated, not at the validation cases
        raise FlaxdoseError(f"data.kind={config.data.kind} has no CT (the generator makes none); set "
                            "--config.data.include_ct=False or train on a folder dataset with a CT (data.kind=folder)")
    for key in ("patch_shape", "patch_sigma"):  # checked again against each case's grid once the data is read
        value = tuple(config.data[key]) if isinstance(config.data[key], (tuple, list)) else (config.data[key],)
        if len(value) != 3 or not all(float(v) > 0 for v in value):
            raise FlaxdoseError(f"data.{key}={config.data[key]!r}; give three positive (x, y, z) sizes in voxels, "
                                f"e.g. --config.data.{key}='(32,32,16)'")
    loss = DoseLoss.from_config(config)  # the loss's and the schedule's settings, before anything is written
    optim.schedule_factor(config.train)
    if transfer.is_transfer(config):  # a missing or mismatched source, before any data is generated
        transfer.check_source(config, spec)
    pipeline.check_in_channels(pipeline.InputSpec.from_config(config), spec.in_channels)
    n_processes = jax.process_count()
    if n_processes > 1 and len(devices) != jax.local_device_count():
        # pmap's global axis is (processes x local devices); a subset would borrow other processes' devices
        raise FlaxdoseError(
            f"multi-process training uses all {jax.local_device_count()} local devices of each process, "
            f"got {len(devices)}; leave `devices` unset (choose GPUs with CUDA_VISIBLE_DEVICES)"
        )
    n_global = len(devices) * n_processes
    if config.train.batch_size % n_global:
        where = (f"{n_global} devices ({n_processes} processes x {len(devices)} local devices)" if n_processes > 1
                 else f"{len(devices)} local devices")
        raise FlaxdoseError(
            f"train.batch_size={config.train.batch_size} is not divisible by the {where}; use a multiple of {n_global}"
        )
    return loss


def build_inputs(run: Run):
    """The training-patch pipeline, the number of training cases and the validation cases of a run
    (`Run.split_ids` of `Run.dataset`). Raises FlaxdoseError for a dataset of other structures."""
    config = run.config
    structures = tuple(config.data.structures)
    dataset = run.dataset()
    if dataset.structures and dataset.structures != structures:
        raise FlaxdoseError(
            f"dataset {dataset.root} has structures {list(dataset.structures)} but the config expects "
            f"{list(structures)} in that order; fix data.structures or re-import the data"
        )
    train_ids, val_ids = run.split_ids()
    inputs = pipeline.InputSpec.from_config(config)
    pipeline.require_inputs(dataset, val_ids, inputs, "validation cases")
    patches = pipeline.patch_dataset(
        pipeline.CaseSource(dataset, train_ids, inputs),
        patch_shape=config.data.patch_shape,
        sigma=config.data.patch_sigma,
        batch_size=config.train.batch_size,
        seed=config.seed,
        structures=structures,
        flip_lr=config.data.flip_lr,
    )
    val_cases = [dataset.load(i) for i in val_ids]
    return patches, len(train_ids), val_cases


class RunFolder:
    """What one training run writes in its workdir (config.json, logs, checkpoints), and how it starts.

    `start()` decides, in one place for every kind of training: resume from the latest
    checkpoint (params, optimizer state and input-pipeline position), else fine-tune from
    the source model (transfer configs), else a fresh init. A finished run (its latest
    checkpoint at ``train.steps``) is never reopened for writing: no config.json rewrite,
    no new log or TensorBoard file. With several processes only the primary one writes
    logs and config.json; every process takes part in the (collective) checkpoint saves.
    Every checkpoint's meta holds the training cases' voxel spacing (`Run.training_spacing`).
    `run` is the workdir's `Run`, opened once the resume policy accepted it (`resume.open_run`).
    """

    def __init__(self, run: Run, spec: UNetSpec, *, keep: int | None = None, primary: bool = True):
        self.run, self.config, self.workdir, self.spec, self.primary = run, run.config, run.workdir, spec, primary
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ckpt = WorkdirCheckpoints(self.workdir, keep=keep or self.config.train.keep_checkpoints)
        self.writer = NoMetricWriter()
        self.meta: dict = {}
        self.last: dict = {}  # the latest logged values: step, loss, patches_per_s, val_loss

    def start(self, data_iter=None) -> tuple[TrainState, optax.GradientTransformation]:
        """The run's first state (host arrays) and optimizer; restores `data_iter`'s position on resume.

        Raises FlaxdoseError when a checkpoint or the pipeline state cannot be restored (and see
        `transfer.init_transfer`).
        """
        rng = jax.random.key(self.config.seed)
        if transfer.is_transfer(self.config):  # the source model's params, its head re-initialized per mode
            params, self.meta = transfer.init_transfer(self.config, self.spec, rng)
        else:
            params, self.meta = init_params(self.spec, rng, self.config.data.patch_shape), {}
        self.meta[SPACING_KEY] = self.run.training_spacing()
        tx = optim.make_optimizer(self.config, params)
        opt_state = tx.init(params)
        step = self.ckpt.latest_step() or 0
        if step:  # resume: the checkpoint's params, optimizer state and pipeline position replace the above
            params, opt_state, saved = self.ckpt.restore(step, params, opt_state)
            if data_iter is not None:
                try:
                    data_iter.set_state(saved["data_state"])
                except (KeyError, ValueError, TypeError) as e:
                    raise FlaxdoseError(
                        f"cannot restore the input pipeline state of step {step} ({e!r}); resume with the "
                        "data.workers setting of the original run"
                    ) from None
            log.info("resumed from step %d in %s", step, self.workdir)
        if self.primary and step < self.config.train.steps:
            self.run.write_config()
            self.writer = MetricWriter(self.workdir, step)
        self.last = {"step": step}
        return TrainState(np.int32(step), params, opt_state), tx

    def log(self, step: int, **scalars) -> None:
        self.writer.write(step, **scalars)
        self.last.update(step=step, **{k: float(v) for k, v in scalars.items()})

    def learning_rate(self, step: int) -> float:
        """The learning rate of update `step` of this run (`optim.learning_rate`)."""
        return optim.learning_rate(self.config, step)

    def save(self, step: int, host: TrainState, data_state, val_loss: float | None = None) -> None:
        """Checkpoint the host state after `step`, with the pipeline position of the last batch it consumed."""
        self.ckpt.save(step, host.params, host.opt_state, meta={**self.meta, "data_state": data_state}, val_loss=val_loss)

    def close(self) -> None:
        """Wait for pending checkpoint writes and close the files."""
        try:
            self.ckpt.wait()
        finally:
            self.writer.close()
            self.ckpt.close()


def train_steps(step_fn, state, batches, runs: Sequence[RunFolder], start: int, train_cfg, *, losses, hosts,
                batch_size: int, validate: Callable | None = None, bar=None):
    """The training loop: steps start+1..train_cfg.steps of one or several runs; the final state.

    `step_fn(state, batch) -> (state, {"loss": ...})` updates every run at once; `batches`
    yields (device batch, pipeline state(s) after it); `losses(loss)` gives one float per run
    of a step's loss output, `hosts(state)` one host `TrainState` per run, and the pipeline
    state is one per run (a list) or shared (one run). Every ``log_every`` steps each run logs
    its mean loss and the throughput; every ``eval_every`` and checkpoint step, `validate(state)`
    (if given) gives the first run's validation loss; every ``checkpoint_every`` steps and at
    the end every run saves a checkpoint.
    """
    total, window, tick = train_cfg.steps, [], time.perf_counter()
    for step in range(start + 1, total + 1):
        batch, data_state = next(batches)
        state, metrics = step_fn(state, batch)
        window.append(metrics["loss"])
        if bar is not None:
            bar.update(len(runs))
        is_last = step == total
        logged = [{} for _ in runs]  # one record per run and logged step
        if step % train_cfg.log_every == 0 or is_last:
            mean = np.mean([losses(x) for x in window], axis=0)
            rate = len(window) * batch_size / (time.perf_counter() - tick)
            for run, loss, scalars in zip(runs, mean, logged):
                scalars.update(loss=loss, learning_rate=run.learning_rate(step), patches_per_s=rate)
            if bar is not None:
                bar.set_postfix(loss=f"{mean[0]:.4g}", patches_s=f"{rate:.1f}")
            window, tick = [], time.perf_counter()
        do_ckpt = step % train_cfg.checkpoint_every == 0 or is_last
        do_eval = validate is not None and (do_ckpt or step % train_cfg.eval_every == 0)
        if do_eval:
            scores = validate(state)
            logged[0].update(scores if isinstance(scores, dict) else {"val_loss": scores})
        for run, scalars in zip(runs, logged):
            if scalars:
                run.log(step, **scalars)
        if do_ckpt:
            data_states = data_state if isinstance(data_state, list) else [data_state]
            val = runs[0].last.get("val_loss") if validate is not None else None
            for run, host, run_data_state in zip(runs, hosts(state), data_states):
                run.save(step, host, run_data_state, val)
        if do_ckpt or do_eval:
            tick = time.perf_counter()  # evaluation and saving time is not training throughput
    return state


def validation_scores(model: Model, cases, batch_size: int = 1) -> dict[str, float]:
    """{"val_loss": the mean over the cases of the voxel mean of ((predicted - reference dose) / prescription)^2,
    "val_dice": the mean over the cases of the mean isodose Dice (10..100 % of the prescription, in the dose
    region)}, from one prediction of the cases (NaN for none). The prediction is exactly what `Model.predict`
    returns and evaluation scores (sliding windows, clipped at 0, zero outside the dose region); the loop
    selects its `best` checkpoint by val_loss. Raises FlaxdoseError for cases without a dose (and see
    `Model.predict`)."""
    if not cases:
        return {"val_loss": float("nan"), "val_dice": float("nan")}
    missing = [c.case_id for c in cases if c.dose is None]
    if missing:
        raise FlaxdoseError(f"validation cases {missing[:5]} have no reference dose")
    predicted = model.predict(cases, batch_size=batch_size, check=False)  # mid-training models are far off
    pairs = list(zip(predicted, cases))
    mse = np.mean([np.mean(((p.dose - c.dose) / c.prescription_gy) ** 2, dtype=np.float64) for p, c in pairs])
    dice = np.mean([isodose_dice(p.dose, c.dose, c.prescription_gy, body=c.dose_region())["mean"] for p, c in pairs])
    return {"val_loss": float(mse), "val_dice": float(dice)}


def train_and_evaluate(config, workdir: str | Path, devices=None) -> dict[str, float]:
    """Train (or resume) the run described by `config` in `workdir`; returns final metrics.

    A resumed run keeps its optimisation settings (`resume.check_resume`). `devices` defaults to all local
    devices. Returns {"step", "loss", "patches_per_s", "val_loss", "best_val_loss", "preview"} as far as
    they apply. Raises FlaxdoseError for settings that cannot work together, a workdir of another model,
    or unreadable data.
    """
    devices = list(devices or jax.local_devices())
    config = optim.fit_schedule(config)  # a short run's warmup and decay shrink with it (logged)
    spec = UNetSpec.from_config(config.model)
    loss = check_setup(config, spec, devices)
    run = resume.open_run(workdir, config)  # before the data is built
    workdir = run.workdir
    primary = distributed.is_primary()  # with several processes, process 0 alone writes logs and files
    if jax.process_count() > 1:
        distributed.check_same(config_lib.to_json(config), "config")
        # built-in data is generated on first use: by process 0 alone, as concurrent writers of
        # one cache folder would replace each other's copy. The barrier also keeps process 0 from
        # rewriting config.json while another process is still checking it.
        if primary and config.data.kind != "folder":
            run.dataset()
        distributed.barrier("flaxdose: dataset ready")
    patches, n_train, val_cases = build_inputs(run)
    data_iter = pipeline.make_iterator(patches, workers=config.data.workers)
    folder = RunFolder(run, spec, primary=primary)
    try:
        host, tx = folder.start(data_iter)
        start, total = int(host.step), config.train.steps
        if folder.meta:
            log.info("transfer: %s", folder.meta)
        steps = f"steps {start + 1}..{total}" if start < total else f"nothing to train (already at step {start})"
        log.info("training %s parameters on %d devices, %d train / %d val cases, %s",
                 f"{count_params(host.params):,}", len(devices), n_train, len(val_cases), steps)
        # the evaluation's own inference (sliding windows, clipping, dose region), so `best` is the
        # checkpoint evaluation would rank best
        model = Model.from_config(config, host.params, name="validation")

        def validate(state) -> dict[str, float]:
            scores = validation_scores(model.with_params(jax.tree.map(lambda x: x[0], state.params)), val_cases,
                                       batch_size=config.train.batch_size)
            # every process must agree on saving a new `best`
            return {key: distributed.broadcast_float(value) for key, value in scores.items()}

        bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0,
                   disable=not primary)
        try:
            state = train_steps(pmap_train_step(spec, tx, loss), replicate(host, devices), prefetch(data_iter, devices),
                                [folder], start, config.train, losses=lambda x: [float(x[0])],
                                hosts=lambda s: [unreplicate(s)], batch_size=config.train.batch_size,
                                validate=validate if val_cases else None, bar=bar)
        finally:
            bar.close()
        result = {**folder.last, "best_val_loss": folder.ckpt.best_val}
        if val_cases and primary and (start < total or not (workdir / "preview.png").is_file()):  # also after an interrupted end
            preview = plots.write_preview(workdir, model.with_params(unreplicate(state.params), name="prediction"),
                                          val_cases[0])
            result["preview"] = str(preview)
            folder.writer.image("preview", total, preview)
    finally:
        folder.close()
        close = getattr(data_iter, "close", None)
        if close:
            close()
    return result
