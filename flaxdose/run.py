"""A training run's workdir, read in one place: `Run`.

A run's folder holds

    config.json      the resolved config it trains with (written atomically at each start)
    checkpoints/     orbax full states for resuming, best/ the lowest validation loss (`flaxdose.checkpoint`)
    metrics.jsonl, tensorboard/   its logs (`flaxdose.training.writers`)
    result.json      a sweep's run, once trained and evaluated (`flaxdose.sweeps.runner`)
    data/            built-in data generated on first use (`flaxdose.data.builtin`)

Training makes a `Run` of the config it trains (`Run(workdir, config)`); everything that reads a
trained run (prediction, export, evaluation, transfer, plan QA, sweeps) opens one from a path
(`Run.open`: the workdir or a checkpoint inside it), which reads its config.json once. Each
checkpoint's meta records the voxel spacing of the run's training cases (`SPACING_KEY`,
`spacing_record`); a checkpoint from before runs stored it gets it back from the training data
(`Run.recovered_spacing`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from flaxdose import config as config_lib
from flaxdose.checkpoint import CHECKPOINTS, find_checkpoint, saved_steps
from flaxdose.data.builtin import resolve_dataset
from flaxdose.data.case import Dataset
from flaxdose.errors import FlaxdoseError
from flaxdose.io import atomic_write_text
from flaxdose.synthetic.anatomy import grid_for_scale

CONFIG, RESULT = "config.json", "result.json"
PACKAGE_METADATA = "flaxdose_model.json"  # a model package's metadata file (`flaxdose.inference.package`)
SPACING_KEY = "train_spacing_mm"  # checkpoint meta: {"min": [x, y, z], "max": [x, y, z]} (mm)
NEW_WORKDIR = "python -m flaxdose.train --config=quick --workdir W makes one"


def spacing_record(spacings: Iterable[Sequence[float]]) -> dict:
    """What a run stores of its training cases' voxel spacings ((x, y, z) mm each): the per-axis
    range, ``{"min": [x, y, z], "max": [x, y, z]}`` (min == max when every case has one spacing).
    Raises FlaxdoseError for no spacings."""
    values = np.array([tuple(float(v) for v in s) for s in spacings], np.float64).reshape(-1, 3)
    if not len(values):
        raise FlaxdoseError("no training cases to record the voxel spacing of")
    return {"min": [round(float(v), 6) for v in values.min(0)], "max": [round(float(v), 6) for v in values.max(0)]}


def is_package(path: str | os.PathLike) -> bool:
    """Whether `path` is a model package folder (it holds `PACKAGE_METADATA`) or that metadata file itself."""
    path = Path(path)
    return (path / PACKAGE_METADATA).is_file() or (path.name == PACKAGE_METADATA and path.is_file())


def require_workdir(path: str | os.PathLike, name: str = "the workdir") -> None:
    """Refuse a workdir that does not exist, saying so (not as a missing checkpoint inside it)."""
    if not Path(path).exists():
        raise FlaxdoseError(f"{name} {path} does not exist; give a training workdir ({NEW_WORKDIR})")


class Run:
    """One training run's workdir: its config, checkpoints, dataset, trained cases and training spacing.

    `Run(workdir, config)` is the run training starts with `config` (written by `write_config`);
    `Run.open(path)` is a trained run read from its folder, its config.json read once. `config`
    without one given is the folder's config.json. The dataset is resolved once
    (`flaxdose.data.builtin.resolve_dataset`: built-in data is generated on first use).
    """

    def __init__(self, workdir: str | os.PathLike, config=None, checkpoint: Path | None = None):
        self.workdir = Path(workdir)
        self.checkpoint = checkpoint  # the step folder `open` resolved, or None
        self._config, self._opened = config, False
        self._stored, self._stored_read = None, False  # config.json of an earlier start, read once
        self._dataset: Dataset | None = None
        self._split: tuple[list[str], list[str]] | None = None

    @classmethod
    def open(cls, path: str | os.PathLike, which: str = "latest") -> Run:
        """The trained run that holds `path` (a workdir, its checkpoints/ or best/ folder, or one step folder);
        `checkpoint` is the step folder `which` picks ("best": the lowest validation loss, else the latest;
        "latest"), config.json the first one in that folder or above it.

        Raises FlaxdoseError for a model package (it holds the model, not its run), when there is no
        checkpoint under `path` (`flaxdose.checkpoint.find_checkpoint`), or no config.json above it.
        """
        if is_package(path):  # a package has weights and metadata, no run to read data or checkpoints from
            raise FlaxdoseError(f"{path} is a model package: it holds the model, not its training run (no dataset, no "
                                "checkpoints); pass --data DIR for the cases, or use the training workdir it was "
                                "exported from")
        directory, step = find_checkpoint(Path(path), which)
        config_file = next((p / CONFIG for p in [directory, *directory.parents] if (p / CONFIG).is_file()), None)
        if config_file is None:
            raise FlaxdoseError(f"no config.json next to the checkpoint {directory}; pass the training workdir")
        run = cls(config_file.parent, config_lib.load_config_json(config_file), directory / str(step))
        run._opened = True
        return run

    # ------------------------------------------------ the folder
    @property
    def name(self) -> str:
        """The run's name: its folder's."""
        return self.workdir.name

    @property
    def config_file(self) -> Path:
        return self.workdir / CONFIG

    @property
    def checkpoints_dir(self) -> Path:
        """``<workdir>/checkpoints``: the latest full states."""
        return self.workdir / CHECKPOINTS

    @property
    def config(self):
        """The config the run trains with: the one given, else its config.json (raises FlaxdoseError when unreadable)."""
        if self._config is None:
            self._config = self.stored_config()
            if self._config is None:
                raise FlaxdoseError(f"{self.workdir} has no config.json; pass the training workdir")
        return self._config

    def saved_steps(self) -> list[int]:
        """The steps of the finished full checkpoints, ascending ([] for none)."""
        return saved_steps(self.checkpoints_dir)

    @property
    def latest_step(self) -> int | None:
        """The step of the latest finished full checkpoint, or None."""
        return max(self.saved_steps(), default=None)

    @property
    def has_checkpoints(self) -> bool:
        """Whether config.json and a checkpoints/ folder are there: a run whose settings its checkpoints keep."""
        return self.config_file.is_file() and self.checkpoints_dir.is_dir()

    def stored_config(self):
        """config.json as written by an earlier start (a ConfigDict), or None without one; read once.
        Raises FlaxdoseError when it cannot be read."""
        if not self._stored_read:
            self._stored = config_lib.load_config_json(self.config_file) if self.config_file.is_file() else None
            self._stored_read = True
        return self._stored

    def write_config(self) -> None:
        """Write the run's config as config.json, atomically (a reader sees the old file or the new one)."""
        atomic_write_text(self.config_file, config_lib.to_json(self.config))

    def result(self) -> dict | None:
        """result.json (a sweep's run, trained and evaluated) as a dict, or None while there is none."""
        path = self.workdir / RESULT
        return json.loads(path.read_text()) if path.is_file() else None

    def write_result(self, result: dict) -> None:
        """Write result.json atomically."""
        atomic_write_text(self.workdir / RESULT, json.dumps(result, indent=1))

    # ------------------------------------------------ its data
    def dataset(self) -> Dataset:
        """The dataset the run trains (or trained) on, resolved once: a folder dataset is its ``data.path``,
        built-in data is generated under the workdir on first use (or regenerated, if it was deleted).

        Raises FlaxdoseError when the dataset cannot be opened; for an opened run whose folder dataset is
        gone, saying so (pass --data DIR).
        """
        if self._dataset is None:
            data = self.config.data
            if self._opened and data.kind == "folder" and not (Path(data.path) / "manifest.json").is_file():
                raise FlaxdoseError(f"the run {self.workdir} trained on {data.path}, which is gone; pass --data DIR")
            self._dataset = resolve_dataset(data, self.workdir)
        return self._dataset

    def dataset_path(self) -> Path:
        """The folder of `dataset`."""
        return Path(self.dataset().root)

    def split_ids(self) -> tuple[list[str], list[str]]:
        """(training ids, validation ids) of the run: its ``data.train_split`` (or the subset ``data.train_cases``
        of it), validated on the dataset's "val" split when it has one, else on the last ``data.val_cases`` of
        the training cases (at least one case is left to train on).

        Raises FlaxdoseError for ``data.train_cases`` outside the split, or no training cases.
        """
        if self._split is None:
            self._split = self._split_ids()
        return self._split

    def _split_ids(self) -> tuple[list[str], list[str]]:
        dataset, data_cfg = self.dataset(), self.config.data
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

    def trained_cases(self) -> tuple[Dataset, list[str]]:
        """The dataset the run trained on and the ids of the cases it saw: its training cases and its
        validation cases (they picked its checkpoint), in that order (see `split_ids`)."""
        train, val = self.split_ids()
        return self.dataset(), [*train, *val]

    def training_spacing(self) -> dict:
        """The voxel spacing range (`spacing_record`) of the run's training cases, validation cases left out:
        what training stores with every checkpoint (`SPACING_KEY`) so that prediction can refuse cases on
        another spacing. Reads only the cases' headers."""
        train, _ = self.split_ids()
        dataset = self.dataset()
        return spacing_record(dataset.case_spacing_mm(i) for i in train)

    def recovered_spacing(self) -> dict:
        """The training spacing record of a checkpoint that does not store it (trained before flaxdose stored
        `SPACING_KEY`). Built-in synthetic data: the grid of its ``data.scale`` (no data generated); any
        other data: `training_spacing`. Raises FlaxdoseError when the data cannot be read."""
        config = self.config
        try:
            if config.data.kind == "synthetic":
                return spacing_record([grid_for_scale(config.data.scale).spacing_mm])
        except (AttributeError, KeyError) as e:
            raise FlaxdoseError(f"its config.json has no data.{e}") from None
        return self.training_spacing()
