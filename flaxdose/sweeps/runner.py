"""Fine-tuning sweeps: many independent transfer-learning runs packed onto all local devices.

A sweep answers "how many of my plans do I need, which adaptation mode, how stable across
seeds?". Its config (``configs/sweep_*.py``) holds a base run config and a grid:
target style x number of target training plans x mode (the transfer modes, plus
``scratch``: training from random init, the control) x seed x learning rate.

Packing. Runs of one mode share an optimizer structure, so their states can be stacked:
each wave trains up to ``devices x runs_per_device`` runs at once, ``jax.pmap`` over devices
and ``jax.vmap`` over the runs on a device, with no gradient averaging between runs. Every
run keeps its own seed, case subset, grain pipeline, learning rate and checkpoints, and
ends with the parameters it would have had trained alone (a test checks this).

Learning rates: each run's rate lives in its optimizer state (`flaxdose.training.optim`), so the
stacked states carry one rate per run and one compiled step trains them all.

Folder layout (``--workdir``):
- ``sweep.json``: the resolved sweep config; a folder of another sweep is refused;
- ``data/<style>/``: built-in synthetic plans; ``source/``: the source model (unless given);
- ``baseline/<style>.json``: the source model, unadapted, on each style's test cases (n = 0);
- ``runs/<run_id>/``: config.json, checkpoints/, metrics.jsonl, and ``result.json`` once the
  run is trained and evaluated. A rerun skips finished runs and resumes the others;
- ``report/``: results.csv (one row per run), case_results.csv, baselines.json, summary.md, learning_curve.png.

Several processes (a SLURM job array or srun tasks, or explicit shard flags) split the runs by
index. They share nothing, so each is a JAX runtime of its own: `jax.distributed` would turn every
run's checkpoint into a collective (orbax writes only from process 0 and refuses process-local
arrays), which independent runs must not wait on.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from flaxdose import config as config_lib
from flaxdose import evaluation
from flaxdose import run as run_lib
from flaxdose.data import pipeline
from flaxdose.data.case import Dataset
from flaxdose.errors import FlaxdoseError
from flaxdose.inference.predictor import Model
from flaxdose.io import atomic_write_text
from flaxdose.model import UNetSpec
from flaxdose.sweeps import report as sweep_report
from flaxdose.synthetic import generator as synth
from flaxdose.training import resume, trainer, transfer
from flaxdose.training.devices import prefetch, shard_to_devices

SCRATCH = "scratch"
MODES = (*transfer.MODES, SCRATCH)
SOURCE_STYLE = "source"
log = logging.getLogger("flaxdose")


@dataclasses.dataclass(frozen=True)
class Run:
    """One fine-tuning run of the grid: target style, number of its training plans, mode, seed, learning rate.

    `index` is the run's position in `expand_grid`'s order (shards split runs by it).
    """

    index: int
    style: str
    n_train: int
    mode: str
    seed: int
    learning_rate: float

    @property
    def run_id(self) -> str:
        """The run's folder name, e.g. ``internal_c_n005_paper_seed0_lr1e-05``."""
        return f"{self.style}_n{self.n_train:03d}_{self.mode}_seed{self.seed}_lr{self.learning_rate:g}"

    def fields(self) -> dict:
        """run_id and the grid values (not `index`), for result rows."""
        return {"run_id": self.run_id, **{k: v for k, v in dataclasses.asdict(self).items() if k != "index"}}


# ---------------------------------------------------------------- the grid
def expand_grid(grid) -> list[Run]:
    """Every run of the grid, in a fixed order (style, n, mode, seed, learning rate)."""
    runs = []
    for style, counts in grid.targets.items():
        for n in counts:
            for mode in grid.modes:
                rates = grid.scratch_learning_rates if mode == SCRATCH else grid.learning_rates
                for seed in grid.seeds:
                    for lr in rates:
                        runs.append(Run(len(runs), style, int(n), mode, int(seed), float(lr)))
    return runs


def check_grid(config, available: dict[str, int]) -> None:
    """Refuse grids that cannot run, before anything is written. `available`: style -> training plans.

    Raises FlaxdoseError for an unknown mode, an empty grid axis, a style without data, a plan
    count outside 1..available, or `runs_per_device` < 1.
    """
    grid = config.grid
    unknown = [m for m in grid.modes if m not in MODES]
    if unknown:
        raise FlaxdoseError(f"unknown sweep mode(s) {unknown}; choose from {list(MODES)}")
    empty = [k for k in ("targets", "modes", "seeds", "learning_rates") if not len(grid[k])]
    if SCRATCH in grid.modes and not len(grid.scratch_learning_rates):
        empty.append("scratch_learning_rates")
    if empty or not all(len(v) for v in grid.targets.values()):
        raise FlaxdoseError(
            f"the sweep grid is empty (grid.{', grid.'.join(empty) or 'targets'} has no values); "
            "give every grid axis at least one value"
        )
    for style, counts in grid.targets.items():
        if style not in available:
            raise FlaxdoseError(f"grid.targets names style {style!r} with no data; styles: {sorted(available)}")
        too_many = [n for n in counts if n > available[style]]
        if too_many or min(counts) < 1:
            raise FlaxdoseError(
                f"grid.targets.{style} asks for {list(counts)} training plans but style {style!r} has "
                f"{available[style]}; use 1..{available[style]} (or give the style more plans in data.plans)"
            )
    if config.runs_per_device < 1:
        raise FlaxdoseError(f"runs_per_device={config.runs_per_device}; it must be at least 1")


def plan_waves(pending: Sequence[tuple[Run, int]], capacity: int) -> list[list[tuple[Run, int]]]:
    """Pack (run, start step) pairs into waves: same mode (optimizer structure) and start step."""
    groups: dict[tuple[str, int], list] = {}
    for run, start in pending:
        groups.setdefault((run.mode, start), []).append((run, start))
    return [group[i : i + capacity] for group in groups.values() for i in range(0, len(group), capacity)]


def wave_layout(n_runs: int, n_devices: int) -> tuple[int, int]:
    """(devices, runs per device) for a wave: spread over every device, then as few devices as that needs."""
    per_device = math.ceil(n_runs / min(n_devices, n_runs))
    return math.ceil(n_runs / per_device), per_device


def shard_of(runs: Sequence[Run], index: int, count: int) -> list[Run]:
    """The runs of shard `index` of `count` (run.index % count == index).

    Raises FlaxdoseError for an index outside 0..count-1.
    """
    if not 0 <= index < count:
        raise FlaxdoseError(f"shard {index} of {count} does not exist; shards are numbered 0..{count - 1}")
    return [r for r in runs if r.index % count == index]


# ---------------------------------------------------------------- stacking runs
def stack(trees: Sequence, size: int):
    """Stack per-run pytrees on a new leading axis, padded to `size` by repeating the last run."""
    trees = list(trees) + [trees[-1]] * (size - len(trees))
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def unstack(tree, n: int) -> list:
    """Inverse of `stack` after device sharding: leaves (devices, runs per device, ...) -> the first `n`
    runs' pytrees (numpy; the padding runs dropped)."""
    flat = jax.tree.map(lambda x: np.asarray(x).reshape(-1, *x.shape[2:]), tree)  # (devices, per device, ...)
    return [jax.tree.map(lambda x: x[i], flat) for i in range(n)]


class StackedIterator:
    """One batch from each run's grain iterator per step, stacked; the state lists theirs."""

    def __init__(self, iterators: Sequence, size: int):
        self.iterators, self.size = list(iterators), size

    def __next__(self):
        return stack([next(it) for it in self.iterators], self.size)

    def get_state(self) -> list:
        """Each run's grain iterator state, in run order."""
        return [it.get_state() for it in self.iterators]


# ---------------------------------------------------------------- the sweep
class Sweep:
    """A sweep folder and its config: prepare (data, source model, baselines), train, report.

    `devices` defaults to the local devices (at most `config.max_devices` when set). Raises
    FlaxdoseError for a grid that cannot run (`check_grid`) or a data folder that is not a dataset.
    """

    def __init__(self, config: ml_collections.ConfigDict, root: str | Path, devices=None):
        self.config, self.root = config, Path(root).resolve()
        self.devices = list(devices or jax.local_devices())
        if config.max_devices:
            self.devices = self.devices[: config.max_devices]
        self.runs = expand_grid(config.grid)
        check_grid(config, self.available_plans())
        self._references: dict[str, list] = {}
        self._step_fns: dict = {}

    # ------------------------------------------------ folders and data
    def available_plans(self) -> dict[str, int]:
        """Style -> number of training plans: `data.plans` for built-in styles, the train split of `data.folders`."""
        plans = {style: int(n_train) for style, (n_train, _) in self.config.data.plans.items()}
        for style, folder in self.config.data.folders.items():
            plans[style] = len(Dataset.open(folder).split("train"))
        return plans

    def dataset_path(self, style: str) -> Path:
        """The style's dataset folder: the user's (`data.folders`) or ``<root>/data/<style>``."""
        folders = self.config.data.folders
        return Path(folders[style]) if style in folders else self.root / "data" / style

    @property
    def source_dir(self) -> Path:
        """The source model: `source.path` when given, else ``<root>/source`` (trained by `prepare`)."""
        return Path(self.config.source.path).resolve() if self.config.source.path else self.root / "source"

    def run_dir(self, run: Run) -> Path:
        """``<root>/runs/<run_id>``: the run's workdir."""
        return self.root / "runs" / run.run_id

    def claim_folder(self, create: bool = True) -> None:
        """Write sweep.json (`create`), or check that the folder holds this same sweep: every stage's check,
        before it writes anything.

        Raises FlaxdoseError when sweep.json holds other settings (naming them), when the folder
        holds files but no sweep.json, or, without `create`, when there is no sweep.json (not a
        prepared sweep).
        """
        saved, new = self.root / "sweep.json", json.loads(config_lib.to_json(self.config))
        if saved.is_file():
            old = json.loads(saved.read_text())
            if old != new:
                diffs = sorted(k for k in set(_flatten(old)) | set(_flatten(new)) if _flatten(old).get(k) != _flatten(new).get(k))
                raise FlaxdoseError(
                    f"{self.root} holds another sweep (settings differ: {', '.join(diffs[:6])}); "
                    "use a new --workdir, or the sweep config it was started with"
                )
        elif self.root.exists() and any(self.root.iterdir()):
            raise FlaxdoseError(f"{self.root} holds files but no sweep.json; choose an empty or new --workdir")
        elif not create:
            raise FlaxdoseError(f"{self.root} is not a prepared sweep (no sweep.json); run the sweep with "
                                "--stage=prepare first (one process), or give the --workdir of the sweep")
        else:
            atomic_write_text(saved, config_lib.to_json(self.config))

    def prepare(self) -> None:
        """Synthetic data, the source model and its unadapted scores (skipped when already there)."""
        self.claim_folder()
        styles = set(self.config.grid.targets) | ({SOURCE_STYLE} if not self.config.source.path else set())
        for style in sorted(styles - set(self.config.data.folders)):
            n_train, n_test = self.config.data.plans[style]
            synth.ensure_dataset(self.dataset_path(style), style, n_train, n_test,
                                 seed=self.config.data.seed, scale=self.config.data.scale)
        if not self.config.source.path:
            config = self.source_config()
            usable = math.gcd(config.train.batch_size, len(self.devices))  # devices that split the batch evenly
            trainer.train_and_evaluate(config, self.source_dir, self.devices[:usable])
        for style in self.config.grid.targets:
            path = self.root / "baseline" / f"{style}.json"
            if not path.is_file():
                scores = self.score(Model.load(self.source_dir), style)
                atomic_write_text(path, json.dumps({"style": style, "n_train": 0, "mode": "source model", **scores}, indent=1))

    def is_prepared(self) -> bool:
        """Whether `prepare` finished: every target style has its baseline file."""
        return all((self.root / "baseline" / f"{s}.json").is_file() for s in self.config.grid.targets)

    def source_config(self):
        """The source model's training config: `base` on the source style's data, with `source.train` settings."""
        config = _unlocked_copy(self.config.base)
        config.data.update(kind="folder", path=str(self.dataset_path(SOURCE_STYLE)), train_cases=())
        config.data.val_cases = self.config.source.val_cases
        config.train.update(self.config.source.train.to_dict())
        config.transfer.mode = "none"
        return config

    def run_config(self, run: Run):
        """The standalone training config of one run: `flaxdose.train` on it gives the same model."""
        config = _unlocked_copy(self.config.base)
        train_ids = Dataset.open(self.dataset_path(run.style)).split("train")
        subset = np.random.default_rng(run.seed).permutation(len(train_ids))[: run.n_train]  # nested in n per seed
        config.seed = run.seed
        config.data.update(kind="folder", path=str(self.dataset_path(run.style)), val_cases=0,
                           train_cases=tuple(train_ids[i] for i in sorted(subset)))
        if run.mode == SCRATCH:
            config.transfer.mode = "none"
            config.train.learning_rate = run.learning_rate
        else:
            config.transfer.update(mode=run.mode, source=str(self.source_dir), learning_rate=run.learning_rate)
        return config

    # ------------------------------------------------ status
    def result(self, run: Run) -> dict | None:
        """The run's result.json as a dict, or None while it is unfinished."""
        return run_lib.Run(self.run_dir(run)).result()

    def pending(self, runs: Sequence[Run]) -> list[tuple[Run, int]]:
        """(run, start step) of the unfinished `runs`; the start is the latest saved checkpoint's step, else 0."""
        out = []
        for run in runs:
            if self.result(run) is None:
                out.append((run, run_lib.Run(self.run_dir(run)).latest_step or 0))
        return out

    # ------------------------------------------------ training
    def train(self, shard_index: int = 0, shard_count: int = 1) -> None:
        """Train and evaluate this shard's unfinished runs, wave by wave.

        Raises FlaxdoseError when the folder is not prepared or holds another sweep (`claim_folder`), or for
        a shard outside 0..count-1.
        """
        self.claim_folder(create=False)
        if not self.is_prepared():
            raise FlaxdoseError(
                f"{self.root} is not prepared (data, source model, baselines); run the sweep with --stage=prepare "
                "first (one process), then the shards"
            )
        runs = shard_of(self.runs, shard_index, shard_count)
        pending = self.pending(runs)
        capacity = len(self.devices) * self.config.runs_per_device
        waves = plan_waves(pending, capacity)
        steps = self.config.base.train.steps
        done = len(runs) - len(pending)
        bar = tqdm(total=sum(steps - start for _, start in pending), unit="run-step", dynamic_ncols=True,
                   desc=f"sweep: runs {done}/{len(runs)} done", mininterval=1.0)
        log.info("sweep %s: %d runs here, %d finished earlier, %d waves of up to %d (%d devices x %d)", self.root,
                 len(runs), done, len(waves), capacity, len(self.devices), self.config.runs_per_device)
        try:
            for number, wave in enumerate(waves, 1):
                log.info("wave %d/%d: %d %s runs from step %d", number, len(waves), len(wave), wave[0][0].mode, wave[0][1])
                self.train_wave([r for r, _ in wave], wave[0][1], bar)
                done += len(wave)
                bar.set_description(f"sweep: runs {done}/{len(runs)} done")
        finally:
            bar.close()

    def train_wave(self, runs: Sequence[Run], start: int, bar) -> None:
        """Train runs of one mode from step `start` together (`trainer.train_steps`), then score each."""
        started = time.perf_counter()
        base = self.config.base
        spec = UNetSpec.from_config(base.model)
        n_dev, per_dev = wave_layout(len(runs), len(self.devices))  # waves fit the capacity
        devices, size = self.devices[:n_dev], n_dev * per_dev
        folders, iterators, states = [], [], []
        try:
            for run in runs:
                config = self.run_config(run)
                folders.append(trainer.RunFolder(resume.open_run(self.run_dir(run), config), spec, keep=1))
                patches, _, _ = trainer.build_inputs(folders[-1].run)
                iterators.append(pipeline.make_iterator(patches, workers=0))
                state, tx = folders[-1].start(iterators[-1])
                states.append(state)
            step_fn = self.wave_step(spec, tx, run.mode, devices)  # every run's optimizer has one structure
            batches = prefetch(StackedIterator(iterators, size), devices, global_batches=False)
            state = trainer.train_steps(step_fn, shard_to_devices(stack(states, size), devices), batches,
                                        folders, start, base.train, losses=lambda x: np.asarray(x).reshape(-1)[: len(runs)],
                                        hosts=lambda s: unstack(s, len(runs)), batch_size=base.train.batch_size, bar=bar)
        finally:
            for folder in folders:
                folder.close()
        wall = time.perf_counter() - started
        for run, folder, host in zip(runs, folders, unstack(state, len(runs))):
            model = Model.from_config(folder.config, host.params, name=run.run_id,
                                      train_spacing_mm=folder.meta.get(run_lib.SPACING_KEY))  # checked as Model.load would
            result = {**run.fields(), "steps": base.train.steps, **self.score(model, run.style),
                      "final_loss": folder.last.get("loss", float("nan")), "wave": runs[0].run_id, "wave_size": len(runs),
                      "wave_layout": f"{n_dev}x{per_dev}", "wave_wall_s": round(wall, 1)}
            folder.run.write_result(result)

    def wave_step(self, spec: UNetSpec, tx, mode: str, devices):
        """pmap over devices of vmap over runs; kept per mode and layout, so later waves reuse the compilation."""
        key = (spec, mode, tuple(devices))
        if key not in self._step_fns:
            step = trainer.make_train_step(spec, tx, loss=trainer.DoseLoss.from_config(self.config.base))  # no axis name: runs never average gradients
            self._step_fns[key] = jax.pmap(jax.vmap(step), donate_argnums=(0,), devices=devices)
        return self._step_fns[key]

    # ------------------------------------------------ evaluation and report
    def references(self, style: str) -> list:
        """The style's "test" cases (reference doses), loaded once and cached."""
        if style not in self._references:
            self._references[style] = evaluation.load_references(Dataset.open(self.dataset_path(style)), "test")
        return self._references[style]

    def score(self, model, style: str) -> dict:
        """Mean isodose Dice and DVH error of `model` on the style's test cases.

        Returns {"n_test", "dice_mean", "dice_sd" (over cases), "dvh_abs_err_pct" (mean absolute
        DVH-metric error, % of the prescription), "case_dice" ({case id: mean isodose Dice}, what the
        report pairs across numbers of plans)}.
        """
        refs = self.references(style)
        rows = evaluation.evaluate_predictions({model.name: model.predict(refs)}, refs)
        summary = evaluation.summarize(rows)
        dice = summary["metrics"][model.name]["dice_mean"]
        return {"n_test": len(refs), "dice_mean": dice["mean"], "dice_sd": dice["sd"],
                "dvh_abs_err_pct": evaluation.mean_dvh_error_pct(summary, model.name),
                "case_dice": {row["case_id"]: float(row["dice_mean"]) for row in rows}}

    def collect(self) -> tuple[list[dict], list[dict]]:
        """(finished runs' results, baselines) as rows."""
        rows = [r for r in (self.result(run) for run in self.runs) if r is not None]
        return rows, sweep_report.read_baselines(self.root)

    def report(self, title: str = "") -> Path:
        """Write ``<root>/report/`` (results.csv, summary.md, learning_curve.png) from the finished runs.

        Returns the path of summary.md. Raises FlaxdoseError when the folder is not a prepared sweep or
        holds another sweep (`claim_folder`), before writing anything.
        """
        self.claim_folder(create=False)
        rows, baselines = self.collect()
        return sweep_report.write(self.root / "report", rows, baselines, len(self.runs), self.config, title)


def _unlocked_copy(config):
    config = copy.deepcopy(config)
    config.unlock()
    return config


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
