"""Training: `train_and_evaluate(config, workdir)`, and the one loop every training uses.

One code path for any number of local devices: the train step is `jax.pmap`-ed over all of
them, each device takes `batch_size / num_devices` patches, gradients and loss are averaged
with `lax.pmean`, and the state is donated so parameters are updated in place. The loss is
the MSE of the dose in units of the prescription (the paper's), optionally with the target
voxels weighted more (`train.target_weight`, see `DoseLoss`). Checkpoints hold the unreplicated state,
so a run resumes on any device count (see `flaxdose.checkpoint`).

`RunFolder` is the one place that decides how a run starts (resume from its checkpoint,
fine-tune from a source model, or fresh init) and that writes a run's config.json, logs and
checkpoints; `train_steps` is the one loop. `train_and_evaluate` uses both for one run, and
`flaxdose.sweeps.runner` for many runs stacked on the devices.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import shlex
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from tqdm import tqdm

from flaxdose import config as config_lib
from flaxdose.checkpoint import WorkdirCheckpoints, saved_steps
from flaxdose.data import pipeline
from flaxdose.data.builtin import resolve_dataset
from flaxdose.data.case import Dataset, target_names
from flaxdose.errors import FlaxdoseError
from flaxdose.inference.predictor import Model
from flaxdose.inference.spacing import SPACING_KEY, spacing_record
from flaxdose.model import COMPUTE_ONLY, UNet3D, UNetSpec, count_params, init_params
from flaxdose.training import distributed, optim, transfer

AXIS = "devices"
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


# ---------------------------------------------------------------- helpers
def device_sharding(devices) -> jax.sharding.NamedSharding:
    """Leading axis split over `devices`: the layout `jax.pmap` takes and returns."""
    mesh = jax.sharding.Mesh(np.asarray(devices), (AXIS,))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))


def replicate(tree, devices):
    n, sharding = len(devices), device_sharding(devices)
    return jax.tree.map(lambda x: jax.device_put(np.broadcast_to(x, (n, *np.shape(x))), sharding), tree)


def unreplicate(tree):
    return jax.tree.map(lambda x: np.asarray(x[0]), tree)


def shard_to_devices(batch, devices):
    """Split the leading (global batch) axis over `devices` and start the transfer."""
    n, sharding = len(devices), device_sharding(devices)
    return jax.tree.map(lambda x: jax.device_put(x.reshape(n, x.shape[0] // n, *x.shape[1:]), sharding), batch)


def process_slice(batch, index: int, count: int):
    """Process `index` of `count`'s rows [index*B/count, (index+1)*B/count) of a global batch of B."""
    if count == 1:
        return batch
    return jax.tree.map(lambda x: x[index * (x.shape[0] // count) : (index + 1) * (x.shape[0] // count)], batch)


def prefetch(iterator, devices, size: int = 2, global_batches: bool = True) -> Iterator[tuple[Any, dict]]:
    """Yield (device batch, iterator state after that batch), keeping `size` batches in flight.

    The state travels with its batch, so a checkpoint records exactly the batches consumed.
    With several processes, each one's iterator yields the same global batch (same pipeline,
    same seed) and the process keeps its slice: pmap's global device axis then sees exactly
    the batch a single process would, split the same way. `global_batches=False`: the batches
    are this process's own (a sweep's runs), used whole.
    """
    index, count = (jax.process_index(), jax.process_count()) if global_batches else (0, 1)
    queue = collections.deque()
    while True:
        while len(queue) < size:
            batch = process_slice(next(iterator), index, count)
            queue.append((shard_to_devices(batch, devices), iterator.get_state()))
        yield queue.popleft()


def initial_params(config, spec: UNetSpec) -> tuple[Any, dict]:
    """(params, metadata) a run starts from: fresh (seed ``config.seed``), or the source model for transfer configs."""
    rng = jax.random.key(config.seed)
    if transfer.is_transfer(config):
        return transfer.init_transfer(config, spec, rng)
    return init_params(spec, rng, config.data.patch_shape), {}


def split_ids(dataset: Dataset, data_cfg) -> tuple[list[str], list[str]]:
    train = dataset.split(data_cfg.train_split)
    chosen = list(data_cfg.get("train_cases") or ())
    if chosen:  # an explicit subset of the split, e.g. a sweep's few-shot runs
        unknown = sorted(set(chosen) - set(train))
        if unknown:
            raise FlaxdoseError(
                f"data.train_cases names cases {unknown[:5]} that are not in split {data_cfg.train_split!r} "
                f"of {dataset.root}; choose from its {len(train)} cases"
            )
        train = chosen
    if "val" in dataset.splits:
        return train, dataset.split("val")
    n_val = min(data_cfg.val_cases, max(len(train) - 1, 0))
    if not train:
        raise FlaxdoseError(f"dataset {dataset.root} has no training cases in split {data_cfg.train_split!r}")
    return (train[:-n_val], train[-n_val:]) if n_val else (train, [])


def training_spacing(config, workdir: Path) -> dict:
    """The voxel spacing range of a run's training cases (`flaxdose.inference.spacing_record`), which
    its checkpoints keep so that prediction can refuse cases on another spacing. Reads only the
    cases' headers; the dataset is the one `build_inputs` trains on."""
    dataset = resolve_dataset(config.data, workdir)
    train_ids, _ = split_ids(dataset, config.data)
    return spacing_record(dataset.case_spacing_mm(i) for i in train_ids)


# The settings that shape a run's optimisation: changed between a checkpoint and its resumption,
# they change the learning-rate schedule (`optim.schedule_factor` is a function of steps, warmup
# and decay), the loss or the rate mid-run, or the patches it draws (the seed picks them; the
# resumed iterator state would no longer be the run's).
OPTIMISATION_SETTINGS = ("train.steps", "train.batch_size", "train.learning_rate", "train.schedule",
                         "train.warmup_steps", "train.decay_steps", "train.end_lr_fraction", "train.target_weight",
                         "transfer.mode", "transfer.learning_rate",
                         "seed", "data.flip_lr", "data.patch_shape", "data.patch_sigma")
_UNUSED_BY_SCHEDULE = {"constant": {"train.warmup_steps", "train.decay_steps", "train.end_lr_fraction"},
                       "warmup_cosine": {"train.decay_steps"}}


def optimisation_settings(config) -> dict:
    """{"train.steps": ..., ...}: the `OPTIMISATION_SETTINGS` of `config` as its run uses them: after
    `optim.fit_schedule` (a short run's warmup and decay are fitted to it, as `train_and_evaluate`
    trains and stores them), without those the run ignores (a schedule's unused settings, the
    learning rate of the mode not trained: ``train.*`` for transfer, ``transfer.*`` else); absent
    settings are None."""
    values = json.loads(config_lib.to_json(optim.fit_schedule(config)))
    unused = set(_UNUSED_BY_SCHEDULE.get(values.get("train", {}).get("schedule", "constant"), ()))
    unused.add("train.learning_rate" if transfer.is_transfer(config) else "transfer.learning_rate")
    return {key: _dotted(values, key) for key in OPTIMISATION_SETTINGS if key not in unused}


def _flag(key: str, value) -> str:
    """The command-line flag that sets `key` to `value`, quoted for a shell: ``'--config.data.patch_shape=(32,32,16)'``."""
    if isinstance(value, (list, tuple)):
        value = "(" + ",".join(map(str, value)) + ")"
    return shlex.quote(f"--config.{key}={value}")


def _shown(settings: dict, key: str) -> str:
    """A setting of `optimisation_settings` for a message: its value, or "not used" (by that run's schedule or mode)."""
    return repr(settings[key]) if key in settings else "not used"


def _dotted(values: dict, key: str):
    """``values["data"]["flip_lr"]`` for "data.flip_lr" (None where absent)."""
    for part in key.split("."):
        values = values.get(part) if isinstance(values, dict) else None
    return values


def check_workdir(workdir: Path, config) -> list[str]:
    """Refuse a workdir that holds checkpoints of a different model or of other optimisation settings,
    before writing anything; returns notes on the changes accepted (to log).

    Settings are compared as the runs use them (`optimisation_settings`), so re-running the same
    command resumes. One change is accepted: another ``train.steps``, (a) for a ``"constant"``
    schedule (extending or shortening a run; nothing else depends on the step count), (b) for a
    finished run on any schedule (extending it: from its last step on it follows the schedule of the
    longer run, warmup and decay as `optim.fit_schedule` fits them to it; `extension_note`), and (c)
    a count at or below the steps already trained (nothing to train). A scheduled run that has not
    finished is refused: its rate would change mid-run. Raises FlaxdoseError naming each difference,
    and the settings that resume the stored run.
    """
    saved = workdir / "config.json"
    if not saved.is_file() or not (workdir / "checkpoints").is_dir():
        return []
    old = json.loads(saved.read_text()).get("model", {})
    new = json.loads(config_lib.to_json(config))["model"]
    diffs = [f"model.{k}: {old.get(k)!r} there vs {new.get(k)!r} now" for k in sorted(set(old) | set(new))
             if old.get(k) != new.get(k) and k not in COMPUTE_ONLY]
    if diffs:
        raise FlaxdoseError(
            f"workdir {workdir} holds checkpoints of another model ({'; '.join(diffs)}); "
            "use a new --workdir, or the model settings it was trained with"
        )
    done = saved_steps(workdir / "checkpoints")
    if not done:
        return []  # nothing trained yet: nothing to keep consistent
    old_config = config_lib.load_config_json(saved)
    old, new = optimisation_settings(old_config), optimisation_settings(config)
    notes = []
    steps = old.get("train.steps"), new.get("train.steps")
    if None not in steps and steps[1] != steps[0]:
        finished = max(done) >= steps[0]
        constant = old.get("train.schedule") == new.get("train.schedule") == "constant"
        if steps[1] <= max(done):  # nothing to train; the checkpoints stay as they are
            notes.append(f"train.steps {steps[0]} -> {steps[1]}: the run in {workdir} has already trained to step "
                         f"{max(done)}; nothing to train (its checkpoints are kept as they are)")
        elif constant:
            notes.append(f"train.steps {steps[0]} -> {steps[1]}: the constant-rate run in {workdir} now ends at step {steps[1]}")
        elif finished and old.get("train.schedule") == new.get("train.schedule"):
            notes.append(extension_note(old_config, config, max(done), workdir))
            for key in _FITTED_TO_STEPS:  # the new length's schedule, as `optim.fit_schedule` fitted it
                if key in new:
                    old[key] = new[key]
        if constant or finished or steps[1] <= max(done):
            old["train.steps"] = steps[1]
    changed = [k for k in OPTIMISATION_SETTINGS if (k in old or k in new) and old.get(k) != new.get(k)]
    if changed:
        stored = " ".join(_flag(k, old[k]) for k in changed if old.get(k) is not None)
        extend = (f"; to train longer, let the run finish at step {old['train.steps']} first: a finished run "
                  "extends with a larger --config.train.steps" if "train.steps" in changed else "")
        raise FlaxdoseError(
            f"workdir {workdir} holds checkpoints trained with other settings "
            f"({'; '.join(f'{k}: {_shown(old, k)} there vs {_shown(new, k)} now' for k in changed)}): resuming would "
            f"change the learning-rate schedule, the loss or the patches drawn mid-run; use a new --workdir, or resume with the stored "
            f"settings ({stored or 'see ' + str(saved)}){extend}"
        )
    return notes


# The schedule settings `optim.fit_schedule` derives from train.steps: an extended run takes the new length's.
_FITTED_TO_STEPS = ("train.warmup_steps", "train.decay_steps")


def learning_rate(config, step: int) -> float:
    """The learning rate that update number `step` (1-based) of a run of `config` applies: the run's base rate
    (``train.learning_rate``, or ``transfer.learning_rate`` for transfer) times its schedule's factor
    (`optim.schedule_factor`) of the step count before the update."""
    base = float(config.transfer.learning_rate if transfer.is_transfer(config) else config.train.learning_rate)
    schedule = optim.schedule_factor(config.train)
    return base if schedule is None else base * float(schedule(max(int(step) - 1, 0)))


def extension_note(old_config, config, done: int, workdir: Path) -> str:
    """The log line of a finished run with a scheduled learning rate extended to more steps: from step `done` on
    it follows the schedule of the longer run, so the rate returns from where the run ended to that schedule's."""
    old_steps, new_steps = int(old_config.train.steps), int(config.train.steps)
    ended, resumes = learning_rate(old_config, done), learning_rate(config, done + 1)
    decay = config.train.get("decay_steps") if config.train.get("schedule") == "warmup_stable_decay" else None
    left = new_steps - done
    tail = (", following it to the end" if not decay else f", then decays again over its last {decay} steps"
            if decay < left else f", decaying over the {left} steps left")  # the new end may fall inside the decay
    return (f"train.steps {old_steps} -> {new_steps}: the finished run in {workdir} continues from step {done} on the "
            f"{config.train.schedule} schedule of a {new_steps}-step run: the learning rate goes from {ended:.3g} (where "
            f"it ended) to {resumes:.3g} at step {done + 1}{tail}")


class NoMetricWriter:
    """What processes other than 0 of a multi-process run write: nothing (process 0 writes once)."""

    def write(self, step: int, **scalars):
        pass

    def image(self, tag: str, step: int, png: Path):
        pass

    def close(self):
        pass


METRICS_JSONL, TENSORBOARD = "metrics.jsonl", "tensorboard"


class MetricWriter:
    """metrics.jsonl (one JSON record per logged step) plus TensorBoard event files (tensorboardX) in the workdir.

    A run that starts at `start_step` (the restored checkpoint's step; 0 for a fresh run) first removes what an
    interrupted earlier attempt logged after that step (`truncate_logs`), from metrics.jsonl and the event files,
    and tells TensorBoard to purge it too (``purge_step``), so the logs read as one continuous run with every
    step once: the steps after the checkpoint are trained, and logged, again.
    """

    def __init__(self, workdir: Path, start_step: int = 0):
        from tensorboardX import SummaryWriter

        removed = truncate_logs(workdir, start_step)
        if removed:
            log.info("removed %d records after step %d from %s and TensorBoard (logged by an interrupted run; "
                     "those steps are trained again)", removed, start_step, METRICS_JSONL)
        self._jsonl = open(workdir / METRICS_JSONL, "a")
        earlier = any((workdir / TENSORBOARD).glob("events.out.tfevents*"))  # a TensorBoard open on them purges too
        self._tb = SummaryWriter(str(workdir / TENSORBOARD), purge_step=start_step + 1 if earlier else None)

    def write(self, step: int, **scalars):
        self._jsonl.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")
        self._jsonl.flush()
        for key, value in scalars.items():
            self._tb.add_scalar(key, float(value), int(step))

    def image(self, tag: str, step: int, png: Path):
        """The PNG file `png` as TensorBoard image `tag` at `step`."""
        import matplotlib.image

        pixels = matplotlib.image.imread(str(png))  # float RGBA in [0, 1]
        self._tb.add_image(tag, pixels[..., :3], int(step), dataformats="HWC")
        self._tb.flush()

    def close(self):
        self._jsonl.close()
        self._tb.close()


def truncate_logs(workdir: Path, step: int) -> int:
    """Remove every record logged after `step` from a workdir's metrics.jsonl and TensorBoard event files
    (each rewritten atomically; a line or record cut short by a kill is dropped too); the number of
    metrics.jsonl records removed (TensorBoard holds the same steps, or fewer: it writes in batches)."""
    from flaxdose.io import atomic_file, atomic_write_text

    removed = 0
    path = workdir / METRICS_JSONL
    if path.is_file():
        lines = path.read_text().splitlines()
        kept = []
        for line in lines:
            try:
                record_step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):  # a line cut short by a kill
                continue
            if record_step <= step:
                kept.append(line)
        if len(kept) != len(lines):
            atomic_write_text(path, "".join(line + "\n" for line in kept))
            removed += len(lines) - len(kept)
    for events in sorted((workdir / TENSORBOARD).glob("events.out.tfevents*")):
        records = read_event_records(events)
        kept = [r for r in records if event_step(r) <= step]
        if len(kept) == len(records) and events.stat().st_size == sum(16 + len(r) for r in records):
            continue
        with atomic_file(events, "wb") as f:
            for record in kept:
                f.write(event_frame(record))
    return removed


def read_event_records(path: Path) -> list[bytes]:
    """The serialized `Event` protos of a TensorBoard event file (TFRecord framing: length, its CRC, data, its
    CRC); a record cut short at the end (a killed writer) is left out."""
    import struct

    data, pos, records = path.read_bytes(), 0, []
    while pos + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        end = pos + 12 + length + 4
        if end > len(data):
            break
        records.append(data[pos + 12:pos + 12 + length])
        pos = end
    return records


def event_frame(record: bytes) -> bytes:
    """`record` framed as a TFRecord, as tensorboardX writes it."""
    import struct

    from tensorboardX.record_writer import masked_crc32c

    header = struct.pack("<Q", len(record))
    return header + struct.pack("<I", masked_crc32c(header)) + record + struct.pack("<I", masked_crc32c(record))


def event_step(record: bytes) -> int:
    from tensorboardX.proto.event_pb2 import Event

    return int(Event.FromString(record).step)


# ---------------------------------------------------------------- the loop
def check_setup(config, spec: UNetSpec, devices) -> None:
    """Settings that cannot work together, refused before anything is read or written."""
    if int(config.train.steps) < 1:
        raise FlaxdoseError(f"train.steps={config.train.steps}; train at least one step")
    if int(config.train.batch_size) < 1:
        raise FlaxdoseError(f"train.batch_size={config.train.batch_size}; a batch holds at least one patch "
                            "(e.g. --config.train.batch_size=2)")
    if config.data.get("path") and config.data.kind != "folder":
        raise FlaxdoseError(f"data.path={config.data.path!r} is read only with data.kind=folder (it is "
                            f"{config.data.kind!r}); add --config.data.kind=folder")
    for key in ("patch_shape", "patch_sigma"):  # checked again against each case's grid once the data is read
        value = tuple(config.data[key]) if isinstance(config.data[key], (tuple, list)) else (config.data[key],)
        if len(value) != 3 or not all(float(v) > 0 for v in value):
            raise FlaxdoseError(f"data.{key}={config.data[key]!r}; give three positive (x, y, z) sizes in voxels, "
                                f"e.g. --config.data.{key}='(32,32,16)'")
    DoseLoss.from_config(config)  # the loss's and the schedule's settings, before anything is written
    optim.schedule_factor(config.train)
    if transfer.is_transfer(config):  # a missing or mismatched source, before any data is generated
        transfer.check_source(config, spec)
    with_distance = bool(config.data.get("target_distance", False))
    n_inputs = pipeline.input_channels(config.data.structures, with_distance)
    if n_inputs != spec.in_channels:
        what = f"data.structures has {len(config.data.structures)} names" + (" plus the target-distance channel"
                                                                            if with_distance else "")
        raise FlaxdoseError(f"{what} but model.in_channels is {spec.in_channels}; set --config.model.in_channels={n_inputs}")
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


def build_inputs(config, workdir: Path):
    """The dataset, the training-patch pipeline and the validation examples of a run."""
    structures = tuple(config.data.structures)
    dataset = resolve_dataset(config.data, workdir)
    if dataset.structures and dataset.structures != structures:
        raise FlaxdoseError(
            f"dataset {dataset.root} has structures {list(dataset.structures)} but the config expects "
            f"{list(structures)} in that order; fix data.structures or re-import the data"
        )
    train_ids, val_ids = split_ids(dataset, config.data)
    patches = pipeline.patch_dataset(
        pipeline.CaseSource(dataset, train_ids, structures, with_distance=config.data.get("target_distance", False)),
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
    """One run's workdir: how the run starts, and everything it writes (config.json, logs, checkpoints).

    `start()` decides, in one place for every kind of training: resume from the latest
    checkpoint (params, optimizer state and input-pipeline position), else fine-tune from
    the source model (transfer configs), else a fresh init. A finished run (its latest
    checkpoint at ``train.steps``) is never reopened for writing: no config.json rewrite,
    no new log or TensorBoard file. With several processes only the primary one writes
    logs and config.json; every process takes part in the (collective) checkpoint saves.
    Every checkpoint's meta holds the training cases' voxel spacing (`training_spacing`).
    """

    def __init__(self, config, workdir: str | Path, spec: UNetSpec, *, keep: int | None = None, primary: bool = True):
        self.config, self.workdir, self.spec, self.primary = config, Path(workdir).resolve(), spec, primary
        for note in check_workdir(self.workdir, config):
            log.info("%s", note)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ckpt = WorkdirCheckpoints(self.workdir, keep=keep or config.train.keep_checkpoints)
        self.writer = NoMetricWriter()
        self.meta: dict = {}
        self.last: dict = {}  # the latest logged values: step, loss, patches_per_s, val_loss

    @property
    def finished(self) -> bool:
        return (self.ckpt.latest_step() or 0) >= self.config.train.steps

    def start(self, data_iter=None) -> tuple[TrainState, optax.GradientTransformation]:
        """The run's first state (host arrays) and optimizer; restores `data_iter`'s position on resume.

        Raises FlaxdoseError when a checkpoint or the pipeline state cannot be restored.
        """
        params, self.meta = initial_params(self.config, self.spec)
        self.meta[SPACING_KEY] = training_spacing(self.config, self.workdir)
        tx = optim.make_optimizer(self.config, params)
        opt_state = tx.init(params)
        step = self.ckpt.latest_step() or 0
        if step:
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
            (self.workdir / "config.json").write_text(config_lib.to_json(self.config))
            self.writer = MetricWriter(self.workdir, step)
        self.last = {"step": step}
        return TrainState(np.int32(step), params, opt_state), tx

    def log(self, step: int, **scalars) -> None:
        self.writer.write(step, **scalars)
        self.last.update(step=step, **{k: float(v) for k, v in scalars.items()})

    def learning_rate(self, step: int) -> float:
        """The learning rate of update `step` of this run (`learning_rate`)."""
        return learning_rate(self.config, step)

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
    """{"val_loss": `flaxdose.inference.validation_mse`, "val_dice": the mean over the cases of the mean isodose
    Dice (10..100 % of the prescription, in the dose region)}, from one prediction of the cases (NaN for
    none). Raises FlaxdoseError for cases without a dose (and see `Model.predict`)."""
    from flaxdose.metrics import isodose_dice

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

    A resumed run keeps its optimisation settings (`check_workdir`). `devices` defaults to all local devices. Returns {"step", "loss", "patches_per_s",
    "val_loss", "best_val_loss", "preview"} as far as they apply. Raises FlaxdoseError for
    settings that cannot work together, a workdir of another model, or unreadable data.
    """
    workdir = Path(workdir).resolve()
    spec = UNetSpec.from_config(config.model)
    devices = list(devices or jax.local_devices())
    config = optim.fit_schedule(config)  # a short run's warmup and decay shrink with it (logged)
    check_setup(config, spec, devices)
    check_workdir(workdir, config)  # before the data is built; RunFolder checks again and logs accepted changes
    primary = distributed.is_primary()  # with several processes, process 0 alone writes logs and files
    if jax.process_count() > 1:
        distributed.check_same(config_lib.to_json(config), "config")
        # built-in data is generated on first use: by process 0 alone, as concurrent writers of
        # one cache folder would replace each other's copy. The barrier also keeps process 0 from
        # rewriting config.json while another process is still checking it.
        if primary and config.data.kind != "folder":
            resolve_dataset(config.data, workdir)
        distributed.barrier("flaxdose: dataset ready")
    patches, n_train, val_cases = build_inputs(config, workdir)
    data_iter = pipeline.make_iterator(patches, workers=config.data.workers)
    run = RunFolder(config, workdir, spec, primary=primary)
    try:
        host, tx = run.start(data_iter)
        start, total = int(host.step), config.train.steps
        if run.meta:
            log.info("transfer: %s", run.meta)
        steps = f"steps {start + 1}..{total}" if start < total else f"nothing to train (already at step {start})"
        log.info("training %s parameters on %d devices, %d train / %d val cases, %s",
                 f"{count_params(host.params):,}", len(devices), n_train, len(val_cases), steps)
        def validate(state) -> dict[str, float]:
            # The evaluation's own inference (sliding windows, clipping, dose region), so `best` is
            # the checkpoint evaluation would rank best.
            model = Model.from_config(config, jax.tree.map(lambda x: x[0], state.params), name="validation")
            scores = validation_scores(model, val_cases, batch_size=config.train.batch_size)
            # every process must agree on saving a new `best`
            return {key: distributed.broadcast_float(value) for key, value in scores.items()}

        bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0,
                   disable=not primary)
        try:
            state = train_steps(pmap_train_step(spec, tx, DoseLoss.from_config(config)), replicate(host, devices), prefetch(data_iter, devices),
                                [run], start, config.train, losses=lambda x: [float(x[0])],
                                hosts=lambda s: [unreplicate(s)], batch_size=config.train.batch_size,
                                validate=validate if val_cases else None, bar=bar)
        finally:
            bar.close()
        result = {**run.last, "best_val_loss": run.ckpt.best_val}
        if val_cases and primary and (start < total or not (workdir / "preview.png").is_file()):  # also after an interrupted end
            model = Model.from_config(config, unreplicate(state.params), name="prediction")
            result["preview"] = str(write_preview(workdir, model, val_cases[0]))
            run.writer.image("preview", total, Path(result["preview"]))
    finally:
        run.close()
        close = getattr(data_iter, "close", None)
        if close:
            close()
    return result


def write_preview(workdir: Path, model: Model, case) -> Path:
    """preview.png: the model's dose next to the reference for one validation case."""
    from flaxdose import plots
    from flaxdose.metrics import isodose_dice

    predicted = model.predict([case])[0]
    dice = isodose_dice(predicted.dose, case.dose, case.prescription_gy, body=case.dose_region())["mean"]
    log.info("validation case %s: mean isodose Dice %.3f (preview.png)", case.case_id, dice)
    return plots.case_figure(case, {f"prediction (Dice {dice:.2f})": predicted}, workdir / "preview.png")
